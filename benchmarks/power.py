"""Seeds needed for the pre-registered re-test (issue 24), from the committed paired differences.

For every cell of the committed pre-training-seed studies (molecules: one paired difference per
pre-training seed; ECG: per record-wise fold), the standard deviation of the paired differences
and the smallest effect a paired two-sided t-test detects with 80 % power at Holm's strictest
level (0.05 / the number of primary cells), for n units. The SDs come from 5 seeds (6 folds), so
they are themselves uncertain: read the table as orders of magnitude, not as exact powers.

    .venv/bin/python benchmarks/power.py --cells 12 --n 10 --out power
"""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
from _results import RESULTS, provenance, write
from scipy import stats

MOLECULES = ["molecules_auroc_heldout_pretraining_seeds", "molecules_auroc_heldout_example_noise_pretraining_seeds",
             "molecules_auroc_pretraining_seeds", "molecules_auroc_b3db_example_noise_pretraining_seeds"]
ECG = ["ecg_cv", "ecg_cv_noise"]


def detectable(sd: float, n: int, alpha: float, power: float = 0.8) -> float:
    """The smallest mean difference a paired two-sided t-test at ``alpha`` finds with ``power`` (n units)."""
    df = n - 1
    return (stats.t.ppf(1 - alpha / 2, df) + stats.t.ppf(power, df)) * sd / math.sqrt(n)


def cells() -> list[dict]:
    out = []
    for name in MOLECULES:
        result = json.loads((RESULTS / f"{name}.json").read_text())
        for setting, s in result["settings"].items():
            for gain, modes in s["gains"].items():
                for mode, fractions in modes.items():
                    for fraction, g in fractions.items():
                        out.append({"file": name, "setting": setting, "gain": gain, "mode": mode,
                                    "fraction": fraction, "diff": [100 * d for d in g["diff"]], "unit": "pre-training seed"})
    for name in ECG:
        result = json.loads((RESULTS / f"{name}.json").read_text())
        for gain, modes in result["gains"].items():
            for mode, fractions in modes.items():
                for fraction, g in fractions.items():
                    out.append({"file": name, "setting": "ecg", "gain": gain, "mode": mode, "fraction": fraction,
                                "diff": [100 * d for d in g["per_fold"]], "unit": "record-wise fold"})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cells", type=int, default=12, help="primary cells (Holm's strictest level: 0.05 / cells)")
    ap.add_argument("--n", type=int, default=10, help="units (pre-training seeds) per molecules cell")
    ap.add_argument("--out")
    ap.add_argument("--allow-dirty", action="store_true")
    args = ap.parse_args()
    prov = provenance(args.allow_dirty) if args.out else None
    alpha = 0.05 / args.cells
    rows = []
    for c in cells():
        d = np.array(c["diff"])
        sd = float(d.std(ddof=1))
        n = args.n if c["unit"] == "pre-training seed" else len(d)  # ECG: the folds there are
        rows.append({**{k: c[k] for k in ("file", "setting", "gain", "mode", "fraction", "unit")},
                     "committed_n": len(d), "mean": float(d.mean()), "sd": sd, "n": n,
                     "detectable_holm": detectable(sd, n, alpha), "detectable_unadjusted": detectable(sd, n, 0.05)})
    result = {"benchmark": "power", **(prov or {}), "primary_cells": args.cells, "alpha_strictest": alpha,
              "rows": rows}
    lines = ["# Effects the pre-registered re-test can detect (AUROC points)", "",
             f"`{result.get('command', '')}` (commit {str(result.get('commit', '?'))[:10]})", "",
             f"Paired two-sided t-test, power 0.8, at Holm's strictest level 0.05/{args.cells} = {alpha:.4f} "
             "and unadjusted; SD of the committed paired differences (points of AUROC).", "",
             "| setting | gain | mode | label fraction | committed mean ± SD (n) | n planned | detectable, Holm | "
             "detectable, unadjusted |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['setting']} | {r['gain']} | {r['mode']} | {r['fraction']} | {r['mean']:+.2f} ± "
                     f"{r['sd']:.2f} ({r['committed_n']}) | {r['n']} | {r['detectable_holm']:.2f} | "
                     f"{r['detectable_unadjusted']:.2f} |")
    md = "\n".join(lines) + "\n"
    print(md)
    if args.out:
        write(args.out, result, md)


if __name__ == "__main__":
    main()
