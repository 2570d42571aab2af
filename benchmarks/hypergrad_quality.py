"""Does the hypergradient point where the meta-objective goes? Every estimator, every shipped domain.

For each domain setting it pre-trains with Algorithm 1 at its defaults (the paper's estimator,
Neumann M = 1, α = PT lr, past batch) to a few states, and at each state measures, with
:func:`metapt.diagnostics.diagnose` (same batches and random draws for every option, the
meta-objective on MetaFT-validation only, averaged over ``val_pairs`` FT/validation pairs):

- sign agreement of ⟨ĥ, d⟩ with the central difference of the T-step lookahead (T = the meta
  interval) over its own direction and N random unit directions, and their correlation;
- cos(ĥ, exact T-step derivative) (reverse-mode through the same T PT steps);
- SNR (mean pairwise cosine of hypergradients from independent batches; ‖mean‖/‖std‖);
- cost of one estimate in PT-step units (timed at the state, in this process);
- the Hessian's extreme Ritz values (Lanczos).

Then it picks, from the numbers, the option with the highest mean sign agreement over all
domains and states among those costing at most ``--max-cost`` PT steps (so a meta-step every 10
PT steps stays under 1.6× plain pre-training), and writes JSON and Markdown.

Sizes are reduced to fit about 15 minutes on one thread; they are stated in the results:
molecules: the main job's model (GIN 3 × 64, layer norm, dropout 0.2), PT batch 64, Adam 1e-3,
meta interval 10, but ``--mol-pretrain`` ChEMBL molecules (of 35,633) and ``--mol-downstream``
B3DB molecules; ECG: the ``ecg`` preset's model and warp on ../shared/data/mitbih with labelled
beats capped per record, T = 10 instead of its meta interval of 20.

    OMP_NUM_THREADS=1 python benchmarks/hypergrad_quality.py --out benchmarks/results/hypergrad_quality.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from metapt import MetaPretrainer, MetaSchedule
from metapt.diagnostics import DiagnoseOptions, default_estimators, diagnose
from metapt.run_diagnosis import format_table
from metapt.hypergrad import Estimator, sgd
from _results import source_commit  # noqa: E402  (HEAD; refused if metapt comes from another tree)


def estimators(pt_lr: float, horizon: int, only: list[str] | None = None) -> dict[str, Estimator]:
    ests = default_estimators(pt_lr, horizon)
    return ests if not only else {k: v for k, v in ests.items() if k in only}


def molecules_setting(args, example_weights: bool):
    from metapt.domains.molecules.models import GINEncoder
    from metapt.domains.molecules.problem import MoleculesProblem, WeightingConfig, load_molecule_data

    data = load_molecule_data("b3db", seed=0, max_pretrain=args.mol_pretrain, max_downstream=args.mol_downstream)
    torch.manual_seed(0)
    weighting = WeightingConfig(task_weights=not example_weights, example_weights=example_weights)
    problem = MoleculesProblem(data, GINEncoder(num_layers=3, emb_dim=64, dropout=0.2, norm="layer"), weighting,
                               pt_batch_size=64, seed=0)
    torch.manual_seed(1)
    trainer = MetaPretrainer(
        problem, problem.initial_params(), problem.initial_head(), problem.initial_metaparams(),
        pt_optimizer=lambda ps: torch.optim.Adam(ps, lr=1e-3),
        meta_optimizer=lambda ps: torch.optim.Adam(ps, lr=0.05),
        inner_optimizer=sgd(0.1),
        schedule=MetaSchedule(interval=10, unroll_steps=1, warmup_steps=args.warmup),
    )
    size = {"pretrain_molecules": len(data.pretrain_positions), "tasks": len(data.pretrain_task_names),
            "ft_train": len(data.split["ft_train"]), "metaval": len(data.split["metaval"]),
            "model": "GIN 3x64 layer norm, dropout 0.2", "pt_batch": 64, "pt_lr": 1e-3, "meta_interval": 10}
    return trainer, size


def ecg_setting(args):
    from metapt.config import load_config
    from metapt.domains.ecg.problem import ECGSimCLRProblem
    from metapt.domains.ecg.splits import load_and_split

    config = load_config("ecg")
    data_cfg = replace(config.data, max_labelled_per_record=args.ecg_cap, cap_keeps_positives=True)
    ds, split = load_and_split(Path(args.ecg_data), data_cfg)
    problem = ECGSimCLRProblem.from_dataset(ds, split, replace(config.problem, use_warp=True))
    torch.manual_seed(1)
    trainer = MetaPretrainer(
        problem, problem.initial_params(0), problem.initial_head(), problem.initial_metaparams(0),
        pt_optimizer=lambda ps: torch.optim.Adam(ps, lr=config.pretrain.lr),
        meta_optimizer=lambda ps: torch.optim.Adam(ps, lr=config.meta.lr),
        inner_optimizer=sgd(config.meta.inner_lr),
        schedule=MetaSchedule(interval=10, unroll_steps=1, warmup_steps=args.warmup),
    )
    size = {"pretrain_beats": int(len(split.pretrain)), "ft_train": int(len(split.ft_train)),
            "metaval": int(len(split.metaval)), "model": "preset ecg (1-D ResNet widths 8-16-32-32, warp)",
            "labelled_cap_per_record": args.ecg_cap, "pt_lr": config.pretrain.lr,
            "meta_interval": "10 here (preset: 20)"}
    return trainer, size


def measure(name, trainer, size, args, log):
    states = []
    opts = DiagnoseOptions(horizon=args.horizon, directions=args.directions, epsilon=args.epsilon,
                           val_pairs=args.val_pairs, snr_samples=args.snr_samples, lanczos_steps=args.lanczos)
    ests = estimators(float(trainer.pt_opt.param_groups[0]["lr"]), args.horizon, args.estimators)
    for target in args.states:
        start = time.perf_counter()
        trainer.run_until(args.warmup + target)
        ran = time.perf_counter() - start
        start = time.perf_counter()
        result = diagnose(trainer, ests, opts)
        result["seconds"] = time.perf_counter() - start
        result["train_seconds_before"] = ran
        log(f"{name} @ step {trainer.step}: {result['seconds']:.0f} s\n{format_table(result)}\n")
        states.append(result)
    return {"size": size, "states": states}


OVERHEAD_CANDIDATES = ("neumann1_past (paper)", "identity_next", "identity_next_adam", "unrolled_T1")


def overhead(args, log) -> dict:
    """Meta-training time / plain pre-training time per estimator, a meta-step every 10 PT steps, on the
    molecules GIN (the main job's 3 × 64 and Hu et al.'s 5 × 300), task weights: chunks of 10 PT steps,
    every trainer on the same batch indices, in rotating order; median of per-chunk ratios."""
    from metapt.domains.molecules.models import GINEncoder
    from metapt.domains.molecules.problem import MoleculesProblem, WeightingConfig, load_molecule_data

    data = load_molecule_data("b3db", seed=0, max_pretrain=args.mol_pretrain, max_downstream=args.mol_downstream)
    out = {}
    for size, kw in {"small": dict(num_layers=3, emb_dim=64, dropout=0.2, norm="layer"),
                     "hu2020": dict(num_layers=5, emb_dim=300, dropout=0.2, norm="batch")}.items():
        ests = default_estimators(1e-3, args.horizon)
        trainers = {}
        for name in ("plain", *OVERHEAD_CANDIDATES):
            torch.manual_seed(0)
            problem = MoleculesProblem(data, GINEncoder(**kw), WeightingConfig(), pt_batch_size=64, seed=0)
            schedule = MetaSchedule(interval=10, unroll_steps=1, warmup_steps=0, learn_phi=name != "plain")
            trainers[name] = MetaPretrainer(
                problem, problem.initial_params(), problem.initial_head(), problem.initial_metaparams(),
                pt_optimizer=lambda ps: torch.optim.Adam(ps, lr=1e-3),
                meta_optimizer=lambda ps: torch.optim.Adam(ps, lr=0.05), inner_optimizer=sgd(0.1), schedule=schedule,
                estimator=None if name == "plain" else ests[name])
        names = list(trainers)
        ratios = {n: [] for n in OVERHEAD_CANDIDATES}
        for chunk in range(args.overhead_chunks + 1):
            seconds = {}
            for name in names[chunk % len(names):] + names[:chunk % len(names)]:
                t = trainers[name]
                start = time.perf_counter()
                t.run_until(t.step + 10)
                seconds[name] = time.perf_counter() - start
            if chunk:  # the first chunk warms up
                for n in OVERHEAD_CANDIDATES:
                    ratios[n].append(seconds[n] / seconds["plain"])
        out[size] = {n: {"median_ratio": statistics.median(r), "ratios": r} for n, r in ratios.items()}
        log(f"overhead {size}: " + ", ".join(f"{n} {v['median_ratio']:.3f}x" for n, v in out[size].items()))
    return out


def summarise(domains: dict, max_cost: float, overheads: dict | None = None) -> dict:
    names = list(next(iter(domains.values()))["states"][0]["estimators"])
    table = {}
    for est in names:
        rows = [s["estimators"][est] for d in domains.values() for s in d["states"]]
        per_domain = {}
        for dname, d in domains.items():
            rs = [s["estimators"][est] for s in d["states"]]
            per_domain[dname] = {k: _mean([r[k] for r in rs]) for k in
                                 ("sign_agreement_exact", "sign_agreement_fd", "correlation_exact", "cos_exact",
                                  "snr", "mean_pairwise_cos", "cost_pt_steps")}
            per_domain[dname]["against_lowers_rate"] = _mean([float(r["own_fd"] > 0) for r in rs])
        cos = _mean([r["cos_exact"] for r in rows])
        table[est] = {"overall_sign_agreement": _mean([r["sign_agreement_exact"] for r in rows]),
                      # over uniformly random directions, P(sign agrees) = 1 − arccos(cos)/π
                      "expected_random_direction_agreement": 1 - math.acos(max(-1.0, min(1.0, cos))) / math.pi
                      if math.isfinite(cos) else float("nan"),
                      "overall_sign_agreement_fd": _mean([r["sign_agreement_fd"] for r in rows]),
                      "overall_cos_exact": _mean([r["cos_exact"] for r in rows]),
                      "mean_cost_pt_steps": _mean([r["cost_pt_steps"] for r in rows]),
                      "domains": per_domain}
    affordable = {k: v for k, v in table.items() if v["mean_cost_pt_steps"] <= max_cost}
    choice = max(affordable, key=lambda k: affordable[k]["overall_cos_exact"]) if affordable else None
    rule_overhead = None
    if overheads:  # the binding constraint: <= 1.6x plain pre-training on the molecules GIN, measured
        sizes = [k for k in ("small", "hu2020") if k in overheads]
        within = {n: table[n] for n in overheads[sizes[0]] if all(overheads[z][n]["median_ratio"] <= 1.6 for z in sizes)}
        rule_overhead = max(within, key=lambda k: within[k]["overall_cos_exact"]) if within else None
    truth = {dname: {k: _mean([s["truth"][k] for s in d["states"]]) for k in
                     ("fd_vs_exact_correlation", "fd_vs_exact_sign_agreement")} for dname, d in domains.items()}
    return {"table": table, "truth": truth, "choice_by_measured_overhead": rule_overhead,
            "rule_overhead": "highest mean cosine with the exact T-step derivative among the options whose measured "
                             "meta-training time is <= 1.6x plain pre-training on both molecules GIN sizes",
            "rule": f"highest mean cosine with the exact T-step derivative over states and domains (the noise-free "
                    f"summary of sign agreement: over random directions P(agree) = 1 - arccos(cos)/pi) among options "
                    f"costing <= {max_cost} PT steps (mean over states)",
            "choice": choice}


def markdown(result: dict) -> str:
    s = result["summary"]
    lines = ["# Hypergradient quality: lookahead agreement per domain and estimator", "",
             f"Command: `{result['command']}`  ", f"Commit: `{result['commit']}`; threads: {result['threads']}; "
             f"total {result['seconds']:.0f} s", "",
             f"Lookahead horizon T = {result['options']['horizon']} PT steps, {result['options']['directions']} random "
             f"unit directions + each estimator's own, ε = {result['options']['epsilon']}, meta-objective averaged "
             f"over {result['options']['val_pairs']} FT/MetaFT-validation pairs, states at PT steps "
             f"warm-up + {result['options']['states']}.", ""]
    for dname, d in result["domains"].items():
        lines += [f"## {dname}", "", "size: " + ", ".join(f"{k} {v}" for k, v in d["size"].items()), "",
                  "| estimator | sign agreement (exact) | sign agreement (FD) | cos(exact T-step) | stepping against ĥ lowers L_V (FD) | SNR | mean pair cos | cost (PT steps) |",
                  "|---|---|---|---|---|---|---|---|"]
        for est, row in s["table"].items():
            r = row["domains"][dname]
            lines.append(f"| {est} | {_f(r['sign_agreement_exact'])} | {_f(r['sign_agreement_fd'])} | {_f(r['cos_exact'])} | "
                         f"{_f(r['against_lowers_rate'])} | {_f(r['snr'])} | {_f(r['mean_pairwise_cos'])} | "
                         f"{_f(r['cost_pt_steps'])} |")
        t = s["truth"][dname]
        lines += ["", f"Truth check over the random directions: finite differences vs exact T-step derivative: "
                      f"correlation {_f(t['fd_vs_exact_correlation'])}, sign agreement {_f(t['fd_vs_exact_sign_agreement'])}."]
        curv = [st["curvature"] for st in d["states"] if st["curvature"]]
        if curv:
            lines += ["", "Hessian Ritz values per state (λmin, λmax): " +
                      ", ".join(f"({c['lambda_min']:.3g}, {c['lambda_max']:.3g})" for c in curv)]
        lines.append("")
    lines += ["## Choice", "", f"Rule: {s['rule']}.", "",
              "| estimator | overall sign agreement (exact) | overall sign agreement (FD) | overall cos(exact) | "
              "expected agreement, random directions | mean cost (PT steps) |",
              "|---|---|---|---|---|---|"]
    for est, row in s["table"].items():
        lines.append(f"| {est} | {_f(row['overall_sign_agreement'])} | {_f(row['overall_sign_agreement_fd'])} | "
                     f"{_f(row['overall_cos_exact'])} | {_f(row['expected_random_direction_agreement'])} | "
                     f"{_f(row['mean_cost_pt_steps'])} |")
    lines += ["", f"Chosen: **{s['choice']}**", ""]
    if "overhead" in result:
        o, run = result["overhead"], result["overhead_run"]
        lines += ["## Measured overhead (the binding cost constraint)", "",
                  f"Command: `{run['command']}`; commit `{run['commit']}`", "",
                  "Meta-training / plain pre-training time, task weights, a meta-step every 10 PT steps, median of "
                  "per-chunk ratios (10 PT steps a chunk, trainers interleaved in rotating order):", "",
                  "| estimator | " + " | ".join(f"GIN {z}" for z in o) + " | overall cos(exact) |",
                  "|---|" + "---|" * (len(o) + 1)]
        for n in next(iter(o.values())):
            lines.append(f"| {n} | " + " | ".join(f"{o[z][n]['median_ratio']:.3f}x" for z in o)
                         + f" | {_f(s['table'][n]['overall_cos_exact'])} |")
        lines += ["", f"Rule: {s['rule_overhead']}.", "", f"Chosen (the default): **{s['choice_by_measured_overhead']}**"]
        lines.append("")
    return "\n".join(lines)


def _mean(xs):
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return statistics.fmean(xs) if xs else float("nan")


def _f(x):
    return "–" if x is None or not math.isfinite(x) else f"{x:.3g}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/hypergrad_quality.json")
    ap.add_argument("--domains", nargs="+", default=["molecules_task_weights", "molecules_example_weights", "ecg_warp"])
    ap.add_argument("--mol-pretrain", type=int, default=6000)
    ap.add_argument("--mol-downstream", type=int, default=2000)
    ap.add_argument("--ecg-data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "mitbih"))
    ap.add_argument("--ecg-cap", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--states", type=int, nargs="+", default=[10, 100, 200], help="PT steps after warm-up")
    ap.add_argument("--horizon", type=int, default=10)
    ap.add_argument("--directions", type=int, default=8)
    ap.add_argument("--epsilon", type=float, default=0.5)
    ap.add_argument("--val-pairs", type=int, default=4)
    ap.add_argument("--snr-samples", type=int, default=3)
    ap.add_argument("--lanczos", type=int, default=10)
    ap.add_argument("--max-cost", type=float, default=6.0)
    ap.add_argument("--estimators", nargs="+", default=None, help="a subset of the options, by name")
    ap.add_argument("--summarise-only", metavar="JSON", help="recompute the summary and Markdown of a results file")
    ap.add_argument("--overhead-only", metavar="JSON", help="measure the default estimator's overhead and add it "
                                                            "to a results file")
    ap.add_argument("--overhead-chunks", type=int, default=12)
    args = ap.parse_args()
    if args.overhead_only:
        path = Path(args.overhead_only)
        result = json.loads(path.read_text(encoding="utf-8"))
        result["overhead"] = overhead(args, lambda m: print(m, file=sys.stderr, flush=True))
        result["overhead_run"] = {"command": "OMP_NUM_THREADS=1 python " + " ".join(sys.argv),
                                  "commit": source_commit()}
        result["summary"] = summarise(result["domains"], result["options"]["max_cost"], result["overhead"])
        path.write_text(json.dumps(result, indent=1, default=float) + "\n", encoding="utf-8")
        path.with_suffix(".md").write_text(markdown(result), encoding="utf-8")
        return
    if args.summarise_only:
        path = Path(args.summarise_only)
        result = json.loads(path.read_text(encoding="utf-8"))
        result["summary"] = summarise(result["domains"], result["options"]["max_cost"], result.get("overhead"))
        path.write_text(json.dumps(result, indent=1, default=float) + "\n", encoding="utf-8")
        path.with_suffix(".md").write_text(markdown(result), encoding="utf-8")
        print(json.dumps(result["summary"], indent=1, default=float))
        return
    started = time.perf_counter()

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    domains = {}
    for name in args.domains:
        if name == "molecules_task_weights":
            trainer, size = molecules_setting(args, example_weights=False)
        elif name == "molecules_example_weights":
            trainer, size = molecules_setting(args, example_weights=True)
        elif name == "ecg_warp":
            trainer, size = ecg_setting(args)
        else:
            raise SystemExit(f"unknown domain {name!r}")
        domains[name] = measure(name, trainer, size, args, log)
        partial = Path(args.out).with_suffix(".partial.json")
        partial.write_text(json.dumps(domains, indent=1, default=float) + "\n", encoding="utf-8")
    result = {
        "command": "OMP_NUM_THREADS=1 python " + " ".join(sys.argv),
        "commit": source_commit(),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(), "torch": torch.__version__,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "threads": torch.get_num_threads(), "python": platform.python_version(), "torch": torch.__version__},
        "options": {"horizon": args.horizon, "directions": args.directions, "epsilon": args.epsilon,
                    "val_pairs": args.val_pairs, "snr_samples": args.snr_samples, "states": args.states,
                    "warmup": args.warmup, "max_cost": args.max_cost},
        "domains": domains,
    }
    result["summary"] = summarise(domains, args.max_cost)
    result["seconds"] = time.perf_counter() - started
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=float) + "\n", encoding="utf-8")
    out.with_suffix(".md").write_text(markdown(result), encoding="utf-8")
    print(json.dumps(result["summary"], indent=1, default=float))


if __name__ == "__main__":
    main()
