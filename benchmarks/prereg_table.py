"""The pre-registered primary table (benchmarks/preregistration.md), from its four results files only.

    .venv/bin/python benchmarks/prereg_table.py

Reads benchmarks/results/{molecules_auroc_prereg_molecules, molecules_auroc_prereg_motifs,
ecg_cv_prereg_warp, ecg_cv_prereg_noise}.json (each written by the command the pre-registration
names) and writes benchmarks/results/prereg_table.{json,md}: per primary cell the paired gain
(test AUROC points, full fine-tuning, 100 % labels) with its 95 % t-CI over pre-training seeds or
folds, the two-sided p-value, Holm's step-down correction over the 12 cells, the CI at the level of
the cell's Holm step, and the verdict the pre-registration defines; then per setting the verdict on
"meta-learning improves pre-training here" (both cells support and the learned φ's leave-one-out
seed agreement has a CI above 0), and the secondary figures. A missing results file leaves its
cells "not run", never dropped.
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

import numpy as np

from _results import RESULTS, provenance, write

from metapt.domains.ecg.job import METHODS as ECG_METHODS
from metapt.domains.molecules.job import METHODS as MOL_METHODS
from metapt.evaluation import holm, mean_ci95, seed_agreement, t_test

ALPHA = 0.05
FILES = {"molecules": "molecules_auroc_prereg_molecules", "motifs": "molecules_auroc_prereg_motifs",
         "warp": "ecg_cv_prereg_warp", "noise": "ecg_cv_prereg_noise"}
#: (cell, results file, setting in it, method, control, the setting's row label)
CELLS = (
    ("P1", "molecules", "heldout", "meta_label_noise", "uniform", "held-out ChEMBL targets"),
    ("P2", "molecules", "heldout", "meta_label_noise", "frozen_label_noise", "held-out ChEMBL targets"),
    ("P3", "molecules", "heldout", "meta_task_weights", "uniform", "held-out ChEMBL targets"),
    ("P4", "molecules", "heldout", "meta_task_weights", "random_task_weights", "held-out ChEMBL targets"),
    ("P5", "molecules", "b3db", "meta_label_noise", "uniform", "B3DB"),
    ("P6", "molecules", "b3db", "meta_label_noise", "frozen_label_noise", "B3DB"),
    ("P7", "molecules", "b3db", "meta_task_weights", "uniform", "B3DB"),
    ("P8", "molecules", "b3db", "meta_task_weights", "random_task_weights", "B3DB"),
    ("P9", "warp", "ecg", "simclr_meta_warp", "simclr_fixed_warp", "ECG, record-wise folds"),
    ("P10", "noise", "ecg", "simclr_meta_noise", "simclr_fixed_noise", "ECG, record-wise folds"),
    ("P11", "motifs", "heldout", "meta_task_weights", "uniform", "many tasks, held-out targets"),
    ("P12", "motifs", "heldout", "meta_task_weights", "random_task_weights", "many tasks, held-out targets"),
)
MODE, FRACTION = "full fine-tuning", 1.0


def label(method: str) -> str:
    return (MOL_METHODS.get(method) or ECG_METHODS[method]).label


def _fraction(cells: dict[str, Any], fraction: float) -> Any:
    return next((v for k, v in cells.items() if math.isclose(float(k), fraction)), None)


def diffs(result: dict[str, Any], setting: str, method: str, control: str, mode: str = MODE,
          fraction: float = FRACTION) -> list[float] | None:
    """Per pre-training seed (molecules: mean over fine-tuning seeds) or per fold, method − control."""
    if "per_fold" in result:  # ecg_cv.py: per fold, the fold's mean over fine-tuning seeds
        out = []
        for fold in result["per_fold"]:
            a, b = (_fraction(fold["scores"][m][mode], fraction) for m in (method, control))
            out.append(a["test"] - b["test"])
        return out
    gain = result["settings"][setting]["gains"].get(f"{label(method)} − {label(control)}")
    cell = _fraction(gain[mode], fraction) if gain else None
    return None if cell is None else [math.nan if d is None else d for d in cell["diff"]]


def agreement(result: dict[str, Any] | None, setting: str, method: str) -> dict[str, Any] | None:
    """The learned φ's seed agreement: the run's own figure (molecules), or Spearman ρ of the folds'
    learned band amplitudes (ECG noise); None where φ has no entries to rank (the warp network)."""
    if result is None:
        return None
    if "per_fold" in result:
        bands = [{k: v for k, v in fold["learned"].get(method, {}).items() if k.startswith("band_noise/")}
                 for fold in result["per_fold"]]
        if not bands or not all(len(b) >= 2 for b in bands):
            return None
        keys = sorted(bands[0])
        return {"band_noise": seed_agreement([[b[k] for k in keys] for b in bands])}
    return result["settings"][setting].get("agreement", {}).get(label(method))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--allow-dirty", action="store_true")
    args = ap.parse_args()
    source = provenance(args.allow_dirty)
    results = {k: json.loads((RESULTS / f"{f}.json").read_text()) if (RESULTS / f"{f}.json").is_file() else None
               for k, f in FILES.items()}
    rows = []
    for cell, file, setting, method, control, where in CELLS:
        r = results[file]
        d = diffs(r, setting, method, control) if r is not None else None
        rows.append({"cell": cell, "source": file, "file": FILES[file], "setting": where, "results_setting": setting,
                     "method": method, "control": control,
                     "diffs": d, **(t_test(d) if d else {"mean": math.nan, "n": 0, "p": math.nan}),
                     "results_commit": r and r.get("commit"),
                     "preregistration_commit": r and r.get("preregistration_commit")})
    for row, h in zip(rows, holm([row["p"] for row in rows], ALPHA)):
        row.update(holm_rank=h["rank"], holm_level=h["level"], p_holm=h["p_adjusted"])
        if row["n"] >= 2:
            row["holm_half_width"] = t_test(row["diffs"], 1 - h["level"])["half_width"]
            row["verdict"] = ("supports" if row["mean"] > 0 else "contradicts") if h["reject"] else "inconclusive"
        else:
            row["verdict"] = "not run"
    settings = []
    for where in dict.fromkeys(c[5] for c in CELLS):
        cells = [r for r in rows if r["setting"] == where]
        for m in sorted({r["method"] for r in cells}):
            mine = [r for r in cells if r["method"] == m]
            agree = agreement(results[mine[0]["source"]], mine[0]["results_setting"], m)
            loo = list((agree or {}).values())
            agrees = bool(loo) and all(a["leave_one_out_mean"] is not None and a["leave_one_out_ci95"] is not None
                                       and a["leave_one_out_mean"] - a["leave_one_out_ci95"] > 0 for a in loo)
            both = all(r["verdict"] == "supports" for r in mine)
            settings.append({"setting": where, "method": m, "cells": [r["cell"] for r in mine],
                             "both_support": both, "agreement": agree, "agreement_ci_above_0": agrees,
                             "success": both and agrees})
    result = {**source, "alpha": ALPHA, "mode": MODE, "label_fraction": FRACTION, "files": FILES,
              "present": {k: v is not None for k, v in results.items()}, "cells": rows, "settings": settings,
              "secondary": secondary(results)}
    write("prereg_table", result, markdown(result))


def secondary(results: dict[str, Any]) -> dict[str, Any]:
    """Reported, not tested: the linear probe's gains of the primary pairs, the many-tasks
    setting's group controls and group weights, on both settings."""
    out: dict[str, Any] = {"linear_probe": [], "many_tasks": []}
    for cell, file, setting, method, control, where in CELLS:
        r = results[file]
        d = diffs(r, setting, method, control, "linear probe") if r is not None else None
        if d:
            out["linear_probe"].append({"cell": cell, **t_test(d)})
    motifs = results["motifs"]
    for setting in (motifs or {}).get("settings", {}):
        for method, control in (("meta_task_weights", "uniform"), ("meta_task_weights", "random_task_weights"),
                                ("chembl_only", "uniform"), ("motifs_only", "uniform"),
                                ("meta_task_weights", "chembl_only"), ("meta_task_weights", "motifs_only")):
            d = diffs(motifs, setting, method, control)
            if d is None and method == "chembl_only":  # the runner's gains list uniform − chembl_only
                d = [-x for x in diffs(motifs, setting, control, method) or []] or None
            if d:
                out["many_tasks"].append({"setting": setting, "method": method, "control": control, **t_test(d)})
        by_seed = motifs["settings"][setting].get("learned", {}).get("meta_task_weights", {}).get("by_pretrain_seed", {})
        groups = [s.get("task_group_weights", {}) for s in by_seed.values()]
        if groups and groups[0]:
            out.setdefault("group_weights", {})[setting] = {
                g: dict(zip(("mean", "ci95"), mean_ci95([w[g] for w in groups]))) for g in groups[0]}
            # which group the weights favour, per seed: does every seed rank the groups alike?
            order = [sorted(w, key=w.get, reverse=True) for w in groups]
            out.setdefault("group_order", {})[setting] = {"per_seed": order,
                                                           "seeds_agreeing_with_first": sum(o == order[0] for o in order)}
    return out


def _pts(x: float | None) -> str:
    return "—" if x is None or not math.isfinite(x) else f"{100 * x:+.1f}"


def markdown(r: dict[str, Any]) -> str:
    lines = ["# Pre-registered primary table (benchmarks/preregistration.md)", "",
             f"Gain = test AUROC points of the method minus its control, {r['mode']}, {r['label_fraction']:.0%} "
             "labels; per pre-training seed (molecules: mean over fine-tuning seeds) or per record-wise fold (ECG). "
             f"95 % t-CI over units; Holm's step-down correction over the {len(r['cells'])} cells at family-wise "
             f"{r['alpha']}; 'Holm CI' is the CI at the level of the cell's Holm step. A cell supports its hypothesis "
             "when Holm rejects 'no gain' with a positive mean (then its Holm CI lies above 0), contradicts it with a "
             "negative mean, and is inconclusive otherwise.", "",
             "| cell | setting | method − control | units | gain | 95 % CI | p | Holm p | Holm CI | verdict |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for c in r["cells"]:
        ci = lambda h: "—" if h is None or not math.isfinite(h) else f"[{_pts(c['mean'] - h)}, {_pts(c['mean'] + h)}]"  # noqa: E731
        p = lambda v: "—" if v is None or not math.isfinite(v) else f"{v:.3g}"  # noqa: E731
        lines.append(f"| {c['cell']} | {c['setting']} | {label(c['method'])} − {label(c['control'])} | {c['n']} | "
                     f"{_pts(c['mean'])} | {ci(c.get('half_width'))} | {p(c['p'])} | {p(c.get('p_holm'))} | "
                     f"{ci(c.get('holm_half_width'))} | {c['verdict']} |")
    lines += ["", "## Per setting: does a learned φ beat both its controls and agree across seeds?", "",
              "| setting | learned φ | cells | both support | seed agreement (leave-one-out ρ, 95 % CI) | success |",
              "|---|---|---|---|---|---|"]
    for s in r["settings"]:
        agree = "; ".join(f"{k}: {a['leave_one_out_mean']:+.2f} ± {a['leave_one_out_ci95']:.2f} "
                          f"(pairs {a['pairwise_mean']:+.2f}, {a['seeds']} seeds)"
                          for k, a in (s["agreement"] or {}).items()
                          if a["leave_one_out_mean"] is not None and a["leave_one_out_ci95"] is not None) or "not measurable"
        lines.append(f"| {s['setting']} | {label(s['method'])} | {', '.join(s['cells'])} | "
                     f"{'yes' if s['both_support'] else 'no'} | {agree} | {'yes' if s['success'] else 'no'} |")
    success = [s for s in r["settings"] if s["success"]]
    lines += ["", "By the pre-registered rule: " + (
        "meta-learning improves pre-training in " + ", ".join(f"{s['setting']} ({label(s['method'])})" for s in success)
        if success else "no setting in which a learned φ supports both of its hypotheses with agreeing seeds: "
        "counted as failure of 'meta-learning improves pre-training here'") + "."]
    if not all(r["present"].values()):
        lines += ["", "Not run yet: " + ", ".join(r["files"][k] for k, v in r["present"].items() if not v) + "."]
    sec = r["secondary"]
    lines += ["", "## Secondary (reported, not tested for the claim)", "", "Linear probe, same pairs (points, 95 % CI):", ""]
    lines += [f"- {x['cell']}: {_pts(x['mean'])} ± {100 * x['half_width']:.1f}" for x in sec["linear_probe"]] or ["- none"]
    if sec["many_tasks"]:
        lines += ["", "Many-tasks setting, full fine-tuning (points, 95 % CI):", ""]
        lines += [f"- {x['setting']}: {label(x['method'])} − {label(x['control'])}: {_pts(x['mean'])} ± "
                  f"{100 * x['half_width']:.1f}" for x in sec["many_tasks"]]
    for setting, groups in sec.get("group_weights", {}).items():
        order = sec["group_order"][setting]
        lines += ["", f"Learned task weights' mean per group, {setting} (mean ± 95 % CI over seeds): "
                  + ", ".join(f"{g} {v['mean']:.3f} ± {v['ci95']:.3f}" for g, v in groups.items())
                  + f"; {order['seeds_agreeing_with_first']} of {len(order['per_seed'])} seeds order the groups "
                  f"as seed 1 does ({' > '.join(order['per_seed'][0])})."]
    commits = sorted({c["results_commit"] for c in r["cells"] if c["results_commit"]})
    prereg = sorted({c["preregistration_commit"] for c in r["cells"] if c["preregistration_commit"]})
    lines += ["", f"Results made at commit(s) {', '.join(commits) or '—'}; pre-registration commit "
              f"{', '.join(prereg) or '—'}. Command: `{r['command']}` at commit {r['commit']}.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
