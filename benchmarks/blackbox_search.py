"""Meta-learned task weights against Optuna TPE at 1×, 2× and 5× the meta-learned run's compute,
with one search per pre-training seed and the search's actual pick.

For each pre-training seed s (its own θ₀ and batch order, shared by every run of that seed):

- meta-learned: the runner's ``meta_task_weights`` phase (the default estimator and schedule of
  the ``molecules`` preset), then fine-tuning. Its CPU time, pre-training plus fine-tuning, is W_s.
- uniform: the same pre-training with every weight 1 (φ frozen at φ₀).
- Optuna TPE (sampler seeded with s): each trial pre-trains with fixed weights w ∈ [0, 2]^T
  (uniform prior on each weight) and fine-tunes; its objective is the downstream *valid* AUROC.
  The study runs until it has spent 5·W_s. At each budget b·W_s the pick is the trial with the best
  valid AUROC among those finished by then, and the table reports that trial's test AUROC.

Every run fine-tunes the same way (one fine-tuning seed; the epoch picked on valid), so test is
read only to fill the table. Compute is CPU time of this process (``time.process_time``, one torch
thread): the machine is shared, and wall time moves with other people's load.

    .venv/bin/python benchmarks/blackbox_search.py                       # 5 seeds, held-out setting
    # two processes share the seeds, then the table from their finished seeds:
    .venv/bin/python benchmarks/blackbox_search.py --only-seeds 0,1,2 & .venv/bin/python benchmarks/blackbox_search.py --only-seeds 3,4; wait
    .venv/bin/python benchmarks/blackbox_search.py
    .venv/bin/python benchmarks/blackbox_search.py --smoke --allow-dirty  # seconds, end to end

Per-seed records go to runs/blackbox_search[_TAG]/seedS.json (reused by a later run with the same
arguments; each keeps the commit it was run at); the table to benchmarks/results/blackbox_search[_TAG].{json,md}.
Needs Optuna: ``pip install -e ".[bench]"``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import replace
from typing import Any

import torch
from _results import ROOT, provenance, write
from rich.console import Console

from metapt.config import load_config
from metapt.domains.molecules.data import target_name
from metapt.domains.molecules.job import DOMAIN
from metapt.evaluation import finetune_and_score, mean_ci95
from metapt.metaparams import weights_from_logits
from metapt.runner import build_trainer

BUDGETS = (1, 2, 5)


def run_once(config: Any, data: Any, downstream: Any, method: str, seed: int, weights: list[float] | None = None
             ) -> dict[str, Any]:
    """Pre-train (with ``weights`` frozen, if given) and fine-tune once; scores and CPU seconds."""
    start = time.process_time()
    m = DOMAIN.methods[method]
    built = DOMAIN.pretraining(config, data, m, seed, torch.device("cpu"))
    if weights is not None:  # w = 2·sigmoid(logit), w in (0, 2)
        w = torch.tensor(weights, dtype=torch.float32).clamp(1e-4, 2 - 1e-4)
        built = replace(built, metaparams={"task_logits": torch.log(w / (2 - w))})
    trainer = build_trainer(built, config, m, seed)
    trainer.run_until(config.pretrain.steps)
    ev = config.evaluation
    score = finetune_and_score(built.encoder(trainer.params), built.emb_dim, downstream.num_tasks,
                               downstream.iterate(None, ev.min_batches_per_epoch), ev.full_finetune, seed=0,
                               metric=downstream.metric)
    learned = weights_from_logits(trainer.metaparams["task_logits"]).tolist()
    finite = lambda v: v if math.isfinite(v) else None  # noqa: E731  (NaN: a split with one class; counted, not scored)
    return {"valid": finite(score["valid"]), "test": finite(score["test"]), "best_epoch": score["best_epoch"],
            "cpu_seconds": time.process_time() - start, "weights": [round(v, 4) for v in learned]}


def search_seed(config: Any, data: Any, downstream: Any, seed: int, budget: float) -> dict[str, Any]:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    meta = run_once(config, data, downstream, "meta_task_weights", seed)
    uniform = run_once(config, data, downstream, "uniform", seed)
    w_budget = meta["cpu_seconds"]
    tasks = len(data.pretrain_task_names)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed))
    trials, spent = [], 0.0
    while spent < budget * w_budget:
        trial = study.ask()
        weights = [trial.suggest_float(f"w{j}", 0.0, 2.0) for j in range(tasks)]
        r = run_once(config, data, downstream, "uniform", seed, weights)
        if r["valid"] is None:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
        else:
            study.tell(trial, r["valid"])
        spent += r["cpu_seconds"]
        trials.append({**r, "finished_at_w": spent / w_budget})
        print(f"seed {seed}: trial {len(trials)} valid {r['valid']} test {r['test']} at {spent / w_budget:.2f} W", flush=True)
    picks = {}
    for b in BUDGETS:
        done = [i for i, t in enumerate(trials) if t["finished_at_w"] <= b and t["valid"] is not None]
        best = max(done, key=lambda i: trials[i]["valid"]) if done else None
        picks[str(b)] = None if best is None else {"trial": best, "trials_done": len(done),
                                                   "valid": trials[best]["valid"], "test": trials[best]["test"]}
    return {"seed": seed, "meta": meta, "uniform": uniform, "trials": trials, "picks": picks}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--setting", default="heldout", choices=("heldout", "b3db"))
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--only-seeds", default="", help="run just these seeds and write no table (see above)")
    ap.add_argument("--set", action="append", default=[], help="override a key of the molecules preset")
    ap.add_argument("--smoke", action="store_true", help="a tiny configuration, seconds end to end")
    ap.add_argument("--tag", default="")
    ap.add_argument("--allow-dirty", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    source = provenance(args.allow_dirty)
    overrides = [f"data.settings=[{args.setting}]", "pretrain.steps=1000", "evaluation.full_finetune.epochs=3"]
    if args.smoke:
        overrides += ["data.max_pretrain=300", "data.max_downstream=600", "pretrain.steps=30", "meta.warmup_steps=5",
                      "model.emb_dim=16", "evaluation.full_finetune.epochs=1"]
    config = load_config("molecules", [*overrides, *args.set])
    name = "blackbox_search" + (f"_{args.tag}" if args.tag else "") + ("_smoke" if args.smoke else "")
    folder = ROOT / "runs" / name
    folder.mkdir(parents=True, exist_ok=True)
    # a seed's record is reused by a later run with the same arguments; it keeps its own commit
    key = {"dirty": source["dirty"], "setting": args.setting, "overrides": overrides + args.set}
    data = DOMAIN.load(config, args.setting, Console(stderr=True))
    downstream = DOMAIN.downstream(config, data)

    only = [int(s) for s in args.only_seeds.split(",") if s]
    records = []
    for seed in only or range(args.seeds):
        path = folder / f"seed{seed}.json"
        if path.is_file() and json.loads(path.read_text()).get("key") == key:
            records.append(json.loads(path.read_text()))
            continue
        record = {"key": key, "commit": source["commit"], **search_seed(config, data, downstream, seed, max(BUDGETS))}
        path.write_text(json.dumps(record, indent=1, allow_nan=False))
        records.append(record)
    if only:
        print(f"seeds {only} done in {folder}; run again without --only-seeds for the table")
        return
    result = {**source, "seed_commits": sorted({r["commit"] for r in records}), "setting": args.setting, "overrides": key["overrides"], "budgets": list(BUDGETS),
              "pretrain_tasks": {t: target_name(t) for t in data.pretrain_task_names},
              "summary": summarise(records), "seeds": records}
    write(name, result, markdown(result))


def summarise(records: list[dict[str, Any]]) -> dict[str, Any]:
    def stat(values: list[float | None]) -> dict[str, Any]:
        mean, ci = mean_ci95(values)
        return {"mean": mean, "ci95": ci, "values": values, "unscored": sum(v is None for v in values)}

    def diff(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else a - b

    out: dict[str, Any] = {"meta": {s: stat([r["meta"][s] for r in records]) for s in ("valid", "test")},
                           "uniform": {s: stat([r["uniform"][s] for r in records]) for s in ("valid", "test")},
                           "meta_minus_uniform_test": stat([diff(r["meta"]["test"], r["uniform"]["test"]) for r in records]),
                           "W_cpu_seconds": stat([r["meta"]["cpu_seconds"] for r in records])}
    for b in BUDGETS:
        picks = [r["picks"][str(b)] for r in records]
        usable = [(r, p) for r, p in zip(records, picks) if p is not None]
        out[f"tpe_{b}W"] = {
            "seeds_with_a_finished_trial": len(usable),
            "trials_done": [p["trials_done"] for _, p in usable],
            **{s: stat([p[s] for _, p in usable]) for s in ("valid", "test")},
            "meta_minus_tpe_test": stat([diff(r["meta"]["test"], p["test"]) for r, p in usable]),
        }
    return out


def markdown(r: dict[str, Any]) -> str:
    s = r["summary"]
    def f(c: dict[str, Any], scale: float = 1, fmt: str = ".4f") -> str:
        if not math.isfinite(c["mean"]):
            return "n/a"
        text = f"{scale * c['mean']:{fmt}}" + (f" ± {scale * c['ci95']:{fmt.lstrip('+')}}" if math.isfinite(c["ci95"]) else "")
        return text + (f" ({c['unscored']} unscored)" if c["unscored"] else "")

    pts = lambda c: f(c, 100, "+.1f")  # noqa: E731
    n = len(r["seeds"])
    lines = [f"# Meta-learned task weights vs Optuna TPE, {n} pre-training seeds ({r['setting']})", "",
             f"Per seed, W = CPU seconds of the meta-learned run (pre-training + fine-tuning); mean W "
             f"{s['W_cpu_seconds']['mean']:.1f} s. TPE's pick at b·W is its best-valid trial finished within b·W; "
             "the table gives that trial's test AUROC. Mean ± 95 % CI over pre-training seeds; paired "
             "differences per seed, in AUROC points.", "",
             "| method | compute | valid AUROC | test AUROC | meta − this, test (points) |", "|---|---|---|---|---|",
             f"| meta-learned task weights | 1 W | {f(s['meta']['valid'])} | {f(s['meta']['test'])} | |",
             f"| uniform weights | ≈ {sum(x['uniform']['cpu_seconds'] for x in r['seeds']) / sum(x['meta']['cpu_seconds'] for x in r['seeds']):.2f} W "
             f"| {f(s['uniform']['valid'])} | {f(s['uniform']['test'])} | {pts(s['meta_minus_uniform_test'])} |"]
    for b in r["budgets"]:
        t = s[f"tpe_{b}W"]
        if not t["seeds_with_a_finished_trial"]:
            lines.append(f"| Optuna TPE, pick at {b} W | {b} W | no trial finished | | |")
            continue
        done = t["trials_done"]
        lines.append(f"| Optuna TPE, pick at {b} W ({min(done)}–{max(done)} trials; {t['seeds_with_a_finished_trial']}/{n} seeds) "
                     f"| {b} W | {f(t['valid'])} | {f(t['test'])} | {pts(t['meta_minus_tpe_test'])} |")
    lines += ["", "## Per seed (test AUROC)", "", "| seed | W (CPU s) | meta | uniform | " +
              " | ".join(f"TPE at {b} W" for b in r["budgets"]) + " | trials |", "|---|---|---|---|" + "---|" * len(r["budgets"]) + "---|"]
    for x in r["seeds"]:
        picks = [x["picks"][str(b)] for b in r["budgets"]]
        g = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
        lines.append(f"| {x['seed']} | {x['meta']['cpu_seconds']:.1f} | {g(x['meta']['test'])} | {g(x['uniform']['test'])} | "
                     + " | ".join("–" if p is None else g(p["test"]) for p in picks) + f" | {len(x['trials'])} |")
    lines += ["", f"Configuration: preset molecules with {', '.join(f'`{o}`' for o in r['overrides'])}. Every trial is in "
              "the JSON.", "", f"Command: `{r['command']}` at commit {r['commit']}; the seeds were run at commit(s) "
              f"{', '.join(r['seed_commits'])}.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
