"""Which ChEMBL targets the learned task weights favour, by name, and whether pre-training seeds agree.

    .venv/bin/python benchmarks/task_weights.py                 # the committed 5-seed molecules results

Reads molecules results files (``molecules_auroc*.json``, runs with ``pretrain.seeds`` > 1) and
writes, per setting, the learned weight of every pre-training target (mean ± 95 % CI over
pre-training seeds, and each seed's), the targets fine-tuned on, and the agreement between seeds
(Spearman rank correlation of their weight vectors, every pair). Target names come from the
shipped fact table (``metapt/domains/molecules/data/chembl_targets.csv``, sourced in its README).
Writes benchmarks/results/task_weights.{json,md} and task_weights_SETTING.png.
"""

from __future__ import annotations

import argparse
import itertools
import json
from typing import Any

from _results import RESULTS, provenance, write
from scipy import stats

from metapt.domains.molecules.data import target_name
from metapt.evaluation import mean_ci95
from metapt.plots import plot_hbars

DEFAULT = ("molecules_auroc_heldout_pretraining_seeds", "molecules_auroc_pretraining_seeds")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("results", nargs="*", default=list(DEFAULT), help="results file names (without .json)")
    ap.add_argument("--allow-dirty", action="store_true")
    args = ap.parse_args()
    source = provenance(args.allow_dirty)
    out: dict[str, Any] = {**source, "inputs": {}, "settings": {}}
    lines = ["# Learned task weights by target, over pre-training seeds", "",
             "Weight 2·sigmoid(logit): 1 is uniform. Mean ± 95 % CI over pre-training seeds; seed agreement is the "
             "Spearman rank correlation between two seeds' weight vectors (every pair).", ""]
    for name in args.results:
        result = json.loads((RESULTS / f"{name}.json").read_text())
        out["inputs"][name] = result["commit"]
        for setting, res in result["settings"].items():
            learned = res["learned"].get("meta_task_weights", {}).get("by_pretrain_seed")
            if not learned:
                continue
            seeds = sorted(learned, key=int)
            by_seed = [learned[s]["task_weights"] for s in seeds]
            targets = sorted(by_seed[0], key=lambda t: -mean_ci95([w[t] for w in by_seed])[0])
            rows = [{"target": t, "name": target_name(t), "mean": mean_ci95([w[t] for w in by_seed])[0],
                     "ci95": mean_ci95([w[t] for w in by_seed])[1], "by_seed": [w[t] for w in by_seed]}
                    for t in targets]
            rho = [float(stats.spearmanr([a[t] for t in targets], [b[t] for t in targets])[0])
                   for a, b in itertools.combinations(by_seed, 2)]
            above = [r["target"] for r in rows if r["mean"] - r["ci95"] > 1]
            below = [r["target"] for r in rows if r["mean"] + r["ci95"] < 1]
            out["settings"][setting] = {"source": name, "seeds": seeds, "rows": rows, "seed_rank_correlation": rho,
                                        "ci_above_1": above, "ci_below_1": below,
                                        "downstream": {t: target_name(t) for t in res["data"]["downstream_tasks"]}}
            png = RESULTS / f"task_weights_{setting}.png"
            plot_hbars([r["name"] for r in rows], [(r["mean"], r["ci95"]) for r in rows], png,
                       points=[r["by_seed"] for r in rows], reference=1.0,
                       xlabel="learned task weight 2·sigmoid(logit) (1 = uniform)",
                       title=f"{setting}: learned task weights\nmean ± 95 % CI over {len(seeds)} pre-training seeds "
                             "(dots: each seed)")
            rho_mean, rho_ci = mean_ci95(rho)
            lines += [f"## {setting} (`{name}.json`, commit {result['commit'][:10]})", "",
                      f"Fine-tuned on: {', '.join(target_name(t) for t in res['data']['downstream_tasks'])}.", "",
                      f"Seed agreement: Spearman ρ {rho_mean:+.2f} (mean of {len(rho)} pairs; range {min(rho):+.2f} to "
                      f"{max(rho):+.2f}). Targets whose CI lies above 1: {len(above)}; below 1: {len(below)}, of "
                      f"{len(rows)}.", "", f"![]({png.name})", "",
                      "| target | column | weight, mean ± 95 % CI | " + " | ".join(f"seed {s}" for s in seeds) + " |",
                      "|---|---|---|" + "---|" * len(seeds)]
            lines += [f"| {r['name'].rsplit(' (', 1)[0]} | {r['target']} | {r['mean']:.2f} ± {r['ci95']:.2f} | "
                      + " | ".join(f"{v:.2f}" for v in r["by_seed"]) + " |" for r in rows]
            lines.append("")
    lines += [f"Command: `{source['command']}` at commit {source['commit']}.", ""]
    write("task_weights", out, "\n".join(lines))


if __name__ == "__main__":
    main()
