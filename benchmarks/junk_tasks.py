"""Planted junk tasks: do learned task weights sink pre-training tasks that carry no signal?

Protocol (fixed before the runs it reports; issue 20):

* Data: the molecules job's pre-training set (ChEMBL, 30 targets, ``--setting``) plus ``--junk``
  junk tasks, each a copy of a real target whose labels are permuted among the molecules where
  that target is observed (same sparsity and balance, no signal;
  :func:`metapt.domains.molecules.problem.add_junk_tasks`, seeded by ``data.split_seed``).
* Each option of the noise-control grid (``OPTIONS``: ``--set`` overrides of the molecules job)
  learns task weights with every pre-training seed in ``--seeds``; ``uniform`` (φ frozen) is
  pre-trained with the same seeds as the cost baseline, in the same process.
* Read per run: whether every junk weight is below the median real weight (the issue's bar), the
  share of junk tasks below it, the junk tasks' mean percentile among all weights (chance 0.5),
  AUROC of −weight for the junk flag; over seeds: the mean pairwise Spearman ρ of the real tasks'
  weights (with a 95 % t-CI over the seeds' leave-one-out ρ: each seed against the mean of the
  others) and the same for all tasks; cost: the option's pre-training time over uniform's.
* Premise: the mean hypergradient of the junk tasks' logits against the real ones', summed over
  the run (``--premise``: averaged over the run's meta-steps, from the accumulated estimator).

No downstream scores are read (nothing here can pick a default by test data).

    OMP_NUM_THREADS=1 python benchmarks/junk_tasks.py --out junk_tasks
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch
from _results import provenance, write
from scipy import stats
from sklearn.metrics import roc_auc_score

from metapt.config import load_config
from metapt.domains.molecules.job import DOMAIN, METHODS, MoleculesJob
from metapt.domains.molecules.problem import is_junk_task
from metapt.evaluation import mean_ci95, seed_agreement
from metapt.runner import build_trainer
from rich.console import Console

#: The accumulated estimator with a draw every 2nd PT step, normalised weights and Polyak-averaged φ:
#: the base of the last rows of the grid.
_EVERY2 = ["meta.estimator=accumulated", "meta.estimator.every=2", "meta.normalize_weights=true", "meta.average=polyak"]
#: The noise-control options compared (``--set`` overrides on top of the base configuration).
OPTIONS: dict[str, list[str]] = {
    "default": [],
    "momentum 0.99": ["meta.momentum=0.99"],
    "polyak": ["meta.average=polyak"],
    "normalized": ["meta.normalize_weights=true"],
    "accumulated": ["meta.estimator=accumulated"],
    "accumulated + polyak": ["meta.estimator=accumulated", "meta.average=polyak"],
    "accumulated + normalized + polyak": ["meta.estimator=accumulated", "meta.normalize_weights=true",
                                          "meta.average=polyak"],
    "accumulated every 3rd + normalized + polyak": ["meta.estimator=accumulated", "meta.estimator.every=3",
                                                    "meta.normalize_weights=true", "meta.average=polyak"],
    "accumulated every 2nd + normalized + polyak": _EVERY2,
    "accumulated every 2nd + normalized + polyak + interval 20": [*_EVERY2, "meta.interval=20"],
    # the planted-noise sign check: one validation batch's v decides most of a draw (plan amendment 2)
    "accumulated every 2nd + normalized + polyak + v decay 0.9": [*_EVERY2, "meta.estimator.direction_decay=0.9"],
    "accumulated every 2nd + normalized + polyak + v decay 0.9 + fresh head": [
        *_EVERY2, "meta.estimator.direction_decay=0.9", "meta.head_start=initial"],
    # more meta-steps, or v from more validation batches per meta-step (plan amendment 3)
    "accumulated every 2nd + normalized + polyak + interval 5": [*_EVERY2, "meta.interval=5"],
    "accumulated every 2nd + normalized + polyak + 4 val batches": [*_EVERY2, "meta.batches=4"],
}


def base_overrides(args) -> list[str]:
    sets = [f"data.settings=[{args.setting}]", f"data.junk_tasks={args.junk}", f"pretrain.steps={args.steps}",
            "device=cpu", *args.set]
    if args.max_pretrain:
        sets.append(f"data.max_pretrain={args.max_pretrain}")
    return sets


def pretrain(config: MoleculesJob, data, method: str, seed: int):
    """The trained trainer, its pre-training seconds, and the hypergradients its φ updates used."""
    built = DOMAIN.pretraining(config, data, METHODS[method], seed, torch.device("cpu"))
    trainer = build_trainer(built, config, METHODS[method], seed)
    used = []
    step = trainer.meta_opt.step

    def recording_step(*a, **kw):  # the hypergradient each applied meta-step used (the premise)
        used.append({k: v.grad.detach().to_dense().clone() for k, v in trainer.metaparams.items()
                     if v.grad is not None})
        return step(*a, **kw)

    trainer.meta_opt.step = recording_step
    start = time.perf_counter()
    trainer.run_until(config.pretrain.steps)
    return trainer, time.perf_counter() - start, used


def junk_scores(weights: np.ndarray, junk: np.ndarray) -> dict:
    if not junk.any():  # --junk 0: only the agreement of the real tasks' weights is measured
        return {"all_junk_below_median_real": False, **dict.fromkeys(
            ["share_junk_below_median_real", "junk_mean_percentile", "auroc_neg_weight_junk"], math.nan)}
    real_median = float(np.median(weights[~junk]))
    ranks = stats.rankdata(weights) / len(weights)
    return {"all_junk_below_median_real": bool((weights[junk] < real_median).all()),
            "share_junk_below_median_real": float((weights[junk] < real_median).mean()),
            "junk_mean_percentile": float(ranks[junk].mean()),
            "auroc_neg_weight_junk": float(roc_auc_score(junk, -weights))}


def _auroc(flags: np.ndarray, scores: np.ndarray) -> float:
    return float(roc_auc_score(flags, scores)) if 0 < flags.sum() < len(flags) else math.nan


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--setting", default="b3db", choices=["b3db", "heldout"])
    ap.add_argument("--junk", type=int, default=10)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--max-pretrain", type=int, default=None)
    ap.add_argument("--seeds", default="100,101,102,103,104")
    ap.add_argument("--options", default=",".join(OPTIONS), help="comma-separated names of OPTIONS")
    ap.add_argument("--set", action="append", default=[], help="extra override on the base config")
    ap.add_argument("--out", help="results name under benchmarks/results (without extension)")
    ap.add_argument("--skip-uniform", action="store_true", help="no uniform runs (no cost column)")
    ap.add_argument("--allow-dirty", action="store_true")
    args = ap.parse_args()
    prov = provenance(args.allow_dirty) if args.out else None
    seeds = [int(s) for s in args.seeds.split(",")]
    options = [o.strip() for o in args.options.split(",")]
    unknown = [o for o in options if o not in OPTIONS]
    if unknown:
        raise SystemExit(f"unknown options {unknown}; choose from {list(OPTIONS)}")
    torch.set_num_threads(1)
    base: MoleculesJob = load_config("molecules", base_overrides(args))
    data = DOMAIN.load(base, args.setting, Console(stderr=True))
    names = list(data.pretrain_task_names)
    junk = np.array([is_junk_task(n) for n in names])
    started = time.perf_counter()
    uniform_seconds = {}
    for seed in [] if args.skip_uniform else seeds:
        _, uniform_seconds[seed], _ = pretrain(base, data, "uniform", seed)
    runs, table = [], {}
    for option in options:
        config = load_config("molecules", base_overrides(args) + OPTIONS[option])
        weights, ratios = [], []
        for seed in seeds:
            trainer, seconds, used = pretrain(config, data, "meta_task_weights", seed)
            # the run's mean hypergradient per task and its t-statistic over meta-steps: a positive
            # one lowers the weight; does the data say the junk tasks should sink?
            hyper = torch.stack([u["task_logits"] for u in used]).double().numpy()
            t_stat = hyper.mean(0) / (hyper.std(0, ddof=1) / math.sqrt(len(hyper)) + 1e-30)
            phi = trainer.averaged_metaparams
            w = DOMAIN.describe(config, data, METHODS["meta_task_weights"], phi)["task_weights"]
            w = np.array([w[n] for n in names])
            weights.append(w)
            ratios.append(seconds / uniform_seconds[seed] if seed in uniform_seconds else math.nan)
            runs.append({"option": option, "seed": seed, "seconds": round(seconds, 1),
                         "cost_vs_uniform": ratios[-1], "skipped": trainer.skipped,
                         "task_weights": dict(zip(names, w.round(4).tolist())), **junk_scores(w, junk),
                         "premise_auroc_mean_hypergrad_junk": _auroc(junk, hyper.mean(0)),
                         "premise_auroc_t_junk": _auroc(junk, t_stat),
                         "premise_t_junk_mean": float(t_stat[junk].mean()) if junk.any() else math.nan,
                         "premise_t_real_mean": float(t_stat[~junk].mean())})
            print(f"{option} seed {seed}: {runs[-1]['share_junk_below_median_real']:.2f} junk below median, "
                  f"AUROC {runs[-1]['auroc_neg_weight_junk']:.2f}, {seconds:.0f} s", flush=True)
        mine = [r for r in runs if r["option"] == option]
        table[option] = {
            "seeds_all_junk_below_median": sum(r["all_junk_below_median_real"] for r in mine),
            "share_junk_below_median": mean_ci95([r["share_junk_below_median_real"] for r in mine]),
            "junk_mean_percentile": mean_ci95([r["junk_mean_percentile"] for r in mine]),
            "auroc_neg_weight_junk": mean_ci95([r["auroc_neg_weight_junk"] for r in mine]),
            "agreement_real_tasks": seed_agreement([w[~junk] for w in weights]),
            "agreement_all_tasks": seed_agreement(weights),
            "cost_vs_uniform": float(np.mean(ratios)),
            "pretrain_seconds": float(np.mean([r["seconds"] for r in mine])),
            "premise_auroc_t_junk": mean_ci95([r["premise_auroc_t_junk"] for r in mine]),
            "premise_t_junk_minus_real": mean_ci95([r["premise_t_junk_mean"] - r["premise_t_real_mean"] for r in mine]),
        }
    result = {"benchmark": "junk_tasks", **(prov or {}), "setting": args.setting, "junk_tasks": int(junk.sum()),
              "real_tasks": int((~junk).sum()), "pretrain_molecules": len(data.pretrain_positions),
              "steps": args.steps, "seeds": seeds, "options": {o: OPTIONS[o] for o in options},
              "base_overrides": args.set, "table": table, "runs": runs,
              "uniform_seconds": uniform_seconds, "wall_seconds": round(time.perf_counter() - started, 1)}
    md = markdown(result)
    print(md)
    if args.out:
        write(args.out, result, md)


def _pm(cell) -> str:
    mean, ci = cell
    if not math.isfinite(mean):
        return "—"
    return f"{mean:.2f} ± {ci:.2f}" if ci is not None and math.isfinite(ci) else f"{mean:.2f}"


def markdown(r: dict) -> str:
    n = len(r["seeds"])
    lines = [f"# Planted junk tasks: {r['junk_tasks']} label-permuted copies among {r['real_tasks']} real targets",
             "", f"`{r.get('command', '')}` (commit {r.get('commit', '?')[:10]}, {r['wall_seconds']:.0f} s; "
             f"{r['setting']}, {r['pretrain_molecules']} pre-training molecules, {r['steps']} PT steps, "
             f"pre-training seeds {r['seeds'][0]}–{r['seeds'][-1]})", "",
             "Mean ± 95 % CI over pre-training seeds. Bar (issue 20): every junk weight below the median real "
             "weight, in every seed. Agreement: Spearman ρ of the learned real-task weights, each seed against "
             "the mean of the others (CI over seeds), and the mean over pairs. Premise: each task's mean "
             "hypergradient over the run's applied meta-steps as a t-statistic (positive lowers the weight); its "
             "AUROC for the junk flag is how well the integrated signal itself separates junk from real tasks.", "",
             f"| option | seeds with every junk task below the median (of {n}) | share of junk below median | "
             "junk mean percentile (chance 0.5) | AUROC of −weight for junk | agreement ρ, real tasks "
             "(leave-one-out) | pairwise ρ | premise: AUROC of the run's hypergradient t for junk | "
             "premise: t junk − t real | cost vs uniform | seconds per run |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for option, t in r["table"].items():
        a = t["agreement_real_tasks"]
        lines.append(f"| {option} | {t['seeds_all_junk_below_median']} | {_pm(t['share_junk_below_median'])} | "
                     f"{_pm(t['junk_mean_percentile'])} | {_pm(t['auroc_neg_weight_junk'])} | "
                     f"{_pm((a['leave_one_out_mean'], a['leave_one_out_ci95']))} | {a['pairwise_mean']:.2f} | "
                     f"{_pm(t['premise_auroc_t_junk'])} | {_pm(t['premise_t_junk_minus_real'])} | "
                     + (f"{t['cost_vs_uniform']:.2f}× |" if math.isfinite(t["cost_vs_uniform"]) else "— |")
                     + (f" {t['pretrain_seconds']:.0f} |" if "pretrain_seconds" in t else " — |"))
    lines += ["", "Options (overrides of the molecules job): " + "; ".join(
        f"**{o}**: `{' '.join(v) or '(none)'}`" for o, v in r["options"].items())]
    if r["base_overrides"]:
        lines.append(f"Base overrides: `{' '.join(r['base_overrides'])}`.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
