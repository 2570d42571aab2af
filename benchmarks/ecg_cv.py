"""ECG with a CI over patients: record-wise cross-validation over every MIT-BIH record.

    .venv/bin/python benchmarks/ecg_cv.py [--folds 6] [--grid 0.01,0.1] [--set key=value ...]
    # two processes, one thread each, then the table from their finished folds:
    .venv/bin/python benchmarks/ecg_cv.py --only-folds 0,1,2 & .venv/bin/python benchmarks/ecg_cv.py --only-folds 3,4,5; wait
    .venv/bin/python benchmarks/ecg_cv.py

Fold k tests on its records (``data.cv_folds=K, data.cv_fold=k``: each record is tested in
exactly one fold), pre-trains with seed k on every other record, and runs every method
there; so the K folds are K pre-training seeds as well as K disjoint sets of patients, and
the CIs below are over folds. The warp's fixed-magnitude controls (``--grid``: the warp
network frozen at φ₀ with another initial magnitude) run as extra methods of the same
fold; in each fold the magnitude with the best downstream-valid AUROC is picked (test is
read only for the table). Run folders go to runs/ecg_cv/ (git-ignored); a re-run reuses
finished folds and resumes an interrupted one.

Writes benchmarks/results/ecg_cv[_TAG].json and .md (command, commit, machine).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _results import ROOT, made_at, provenance, run_or_reuse, write

from metapt.config import load_config
from metapt.evaluation import mean_ci95

#: table rows: (key, label); "fixed_best" is the grid's pick by validation, per fold
ROWS = (("no_pretrain", "no pre-training"), ("simclr", "SimCLR (default augmentations)"),
        ("simclr_fixed_warp", "SimCLR + warp frozen at φ₀"), ("fixed_best", "SimCLR + fixed warp, magnitude picked on valid"),
        ("simclr_meta_warp", "SimCLR + meta-learned warp"), ("simclr_fixed_noise", "SimCLR + noise frozen at φ₀"),
        ("simclr_meta_noise", "SimCLR + meta-learned noise"))
GAINS = (("simclr_meta_warp", "simclr"), ("simclr_meta_warp", "simclr_fixed_warp"), ("simclr_meta_warp", "fixed_best"),
         ("simclr_meta_noise", "simclr"), ("simclr_meta_noise", "simclr_fixed_noise"), ("simclr_fixed_warp", "simclr"),
         ("simclr", "no_pretrain"))
LABELS = {"no_pretrain": "no pre-training", "simclr": "SimCLR", "simclr_fixed_warp": "SimCLR + fixed warp",
          "simclr_meta_warp": "SimCLR + meta warp", "simclr_meta_noise": "SimCLR + meta noise",
          "simclr_fixed_noise": "SimCLR + fixed noise"}


def fold_scores(summary: dict[str, Any], method: str) -> dict[str, dict[str, dict[str, float]]]:
    """{mode: {fraction: {"test", "valid"}}}: the fold's means over fine-tuning seeds."""
    cells = summary["settings"]["ecg"]["scores"][LABELS[method]]
    return {mode: {f: {"test": float(np.nanmean(c["test"])), "valid": float(np.nanmean(c["valid"]))}
                   for f, c in by_fraction.items()} for mode, by_fraction in cells.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "mitbih")
    ap.add_argument("--preset", default="ecg-benchmark")
    ap.add_argument("--folds", type=int, default=6)
    ap.add_argument("--methods", default="no_pretrain,simclr,simclr_fixed_warp,simclr_meta_warp")
    ap.add_argument("--grid", default="0.01,0.1", help="other initial magnitudes of the frozen warp ('' for none)")
    ap.add_argument("--set", action="append", default=[], help="override a config key of every run")
    ap.add_argument("--only-folds", default="", help="run just these folds (e.g. 0,1,2: two processes can share "
                    "the folds) and write no results; a later run without it reuses them and writes the table")
    ap.add_argument("--tag", default="")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--allow-dirty", action="store_true")
    args = ap.parse_args()
    if not any(args.data.glob("*_beats.csv")):
        ap.error(f"no beat-layout ECG folder at {args.data}; pass --data DIR")
    torch.set_num_threads(args.threads)
    source = provenance(args.allow_dirty)
    methods = [m for m in args.methods.split(",") if m]
    grid = [float(g) for g in args.grid.split(",") if g]
    name = "ecg_cv" + (f"_{args.tag}" if args.tag else "")
    start = time.perf_counter()

    commit = source["commit"]  # noted in each run folder this invocation makes
    only = [int(k) for k in args.only_folds.split(",") if k]
    folds: list[dict[str, Any]] = []
    for k in only or range(args.folds):
        base = [f"data_dir={args.data.resolve()}", f"data.cv_folds={args.folds}", f"data.cv_fold={k}",
                f"pretrain.seed={k}", *args.set]
        config = load_config(args.preset, [*base, f"methods=[{', '.join(methods)}]"])
        summary = run_or_reuse(ROOT / "runs" / name / f"fold{k}", config, commit)
        runs = {f"fold{k}": summary}
        scores = {m: fold_scores(summary, m) for m in methods}
        grid_scores = {}
        for g in grid:
            gc = load_config(args.preset, [*base, "methods=[simclr_fixed_warp]", f"problem.warp.init_magnitude={g}"])
            runs[f"fold{k}_magnitude{g:g}"] = grid_summary = run_or_reuse(
                ROOT / "runs" / name / f"fold{k}_magnitude{g:g}", gc, commit)
            grid_scores[g] = fold_scores(grid_summary, "simclr_fixed_warp")
        if "simclr_fixed_warp" in methods:  # φ₀'s own magnitude is in the grid too
            grid_scores[config.problem.warp.init_magnitude] = scores["simclr_fixed_warp"]
        picked: dict[str, dict[str, float]] = {}
        if grid_scores:
            best: dict[str, dict[str, dict[str, float]]] = {}
            for mode, by_fraction in next(iter(grid_scores.values())).items():
                for f in by_fraction:
                    g = max(grid_scores, key=lambda m: grid_scores[m][mode][f]["valid"])
                    best.setdefault(mode, {})[f] = {**grid_scores[g][mode][f], "magnitude": g}
                    picked.setdefault(mode, {})[f] = g
            scores["fixed_best"] = best
        data = summary["settings"]["ecg"]["data"]["groups"]
        learned = summary["settings"]["ecg"].get("learned", {})
        folds.append({"fold": k, "pretrain_seed": k, "test_records": data["test"]["record_ids"],
                      "test_beats": data["test"]["examples"], "test_positives": data["test"]["positives"][0],
                      "ft_train_records": data["ft_train"]["record_ids"], "metaval_records": data["metaval"]["record_ids"],
                      "scores": scores, "picked_magnitude": picked,
                      "run_seconds": round(sum(r.get("wall_seconds", 0.0) for r in runs.values()), 1),
                      "made_at_commits": sorted({str(made_at(ROOT / "runs" / name / d)) for d in runs}),
                      "learned": {m: v for m, v in learned.items()}})

    if only:
        print(f"folds {only} done in runs/{name}/; run again without --only-folds for the table")
        return
    rows = [(key, label) for key, label in ROWS if all(key in f["scores"] for f in folds)]
    modes = list(folds[0]["scores"][rows[0][0]])
    fractions = list(folds[0]["scores"][rows[0][0]][modes[0]])
    table: dict[str, Any] = {}
    for key, label in rows:
        for mode in modes:
            for f in fractions:
                per_fold = [fd["scores"][key][mode][f]["test"] for fd in folds]
                mean, ci = mean_ci95(per_fold)
                table.setdefault(label, {}).setdefault(mode, {})[f] = {"mean": mean, "ci95": ci, "per_fold": per_fold}
    gains: dict[str, Any] = {}
    present = {key for key, _ in rows}
    for better, base in GAINS:
        if better in present and base in present:
            label = f"{dict(ROWS)[better]} − {dict(ROWS)[base]}"
            for mode in modes:
                for f in fractions:
                    diff = [fd["scores"][better][mode][f]["test"] - fd["scores"][base][mode][f]["test"] for fd in folds]
                    mean, ci = mean_ci95(diff)
                    gains.setdefault(label, {}).setdefault(mode, {})[f] = {"mean": mean, "ci95": ci, "per_fold": diff}
    result = {**source, "folds": args.folds, "methods": methods, "preset": args.preset,
              "grid": sorted({*grid, *([config.problem.warp.init_magnitude] if "simclr_fixed_warp" in methods else [])}),
              "overrides": args.set, "wall_seconds": round(time.perf_counter() - start, 1),
              "table": table, "gains": gains, "per_fold": folds}
    write(name, result, markdown(result))


def _fmt(cell: dict[str, float], points: bool = False) -> str:
    scale, sign = (100, "+") if points else (1, "")
    mean, ci = cell["mean"] * scale, cell["ci95"] * scale
    return f"{mean:{sign}.{1 if points else 3}f} ± {ci:.{1 if points else 3}f}"


def markdown(r: dict[str, Any]) -> str:
    modes = list(next(iter(r["table"].values())))
    fractions = list(next(iter(r["table"].values()))[modes[0]])
    cols = [(m, f) for m in modes for f in fractions]
    head = "| | " + " | ".join(f"{m}, {float(f):.0%} labels" for m, f in cols) + " |\n|---|" + "---|" * len(cols) + "\n"
    lines = [f"# ECG: record-wise cross-validation over {r['folds']} folds of the MIT-BIH records", "",
             f"Each fold tests on its own records and pre-trains (seed = fold) on every other record; "
             f"test AUROC, mean ± 95 % CI over the {r['folds']} folds (each fold's value is its mean over "
             "fine-tuning seeds)." + (" 'Magnitude picked on valid': per fold, the frozen warp whose initial magnitude "
                                      f"(grid {r['grid']}) scores best on the downstream valid split." if r["grid"] else ""), "",
             "## Test AUROC", "", head.rstrip("\n")]
    lines += [f"| {label} | " + " | ".join(_fmt(by_mode[m][f]) for m, f in cols) + " |" for label, by_mode in r["table"].items()]
    lines += ["", "## Paired differences per fold (AUROC points)", "", head.rstrip("\n")]
    lines += [f"| {label} | " + " | ".join(_fmt(by_mode[m][f], True) for m, f in cols) + " |" for label, by_mode in r["gains"].items()]
    lines += ["", "## Folds", "", "| fold | test records | test beats (PVC) | FT-train records | MetaFT-val records | "
              "learned warp magnitude | learned noise amplitude, mean over bands |", "|---|---|---|---|---|---|---|"]
    for fd in r["per_fold"]:
        mag = fd["learned"].get("simclr_meta_warp", {}).get("magnitude")
        amp = fd["learned"].get("simclr_meta_noise", {}).get("band_noise_mean")
        lines.append(f"| {fd['fold']} | {', '.join(fd['test_records'])} | {fd['test_beats']} ({fd['test_positives']}) | "
                     f"{', '.join(fd['ft_train_records'])} | {', '.join(fd['metaval_records'])} | "
                     f"{'' if mag is None else f'{mag:.4f}'} | {'' if amp is None else f'{amp:.4f}'} |")
    folds_min = sum(fd.get("run_seconds", 0.0) for fd in r["per_fold"]) / 60
    made = sorted({c for fd in r["per_fold"] for c in fd.get("made_at_commits", [])})
    lines += ["", f"Fold runs: {folds_min:.1f} min in all (wall time of each run, summed), made at commit(s) "
              + ", ".join("not noted (before the note existed)" if c == "None" else c for c in made)
              + f"; this table: {r['wall_seconds'] / 60:.1f} min. Command: `{r['command']}` at commit {r['commit']}.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
