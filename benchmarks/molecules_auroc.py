"""The molecules protocol on both downstream settings: no pre-training, uniform task weights,
meta-learned task weights, meta-learned example weights; full fine-tuning and linear probe over
seeds; test AUROC mean ± 95 % CI. Writes JSON and Markdown to benchmarks/results/.

    python benchmarks/molecules_auroc.py                 # the default preset, both settings
    python benchmarks/molecules_auroc.py --set meta.lr=0.1 --tag lr0.1
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
from pathlib import Path

import torch

from metapt.config import load_config
from metapt.domains.molecules.job import run_molecules

RESULTS = Path(__file__).parent / "results"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="molecules", help="a molecules preset or YAML config")
    ap.add_argument("--settings", default="b3db,heldout")
    ap.add_argument("--set", action="append", default=[], help="override a config key, e.g. meta.lr=0.1")
    ap.add_argument("--tag", default="", help="suffix of the result files")
    args = ap.parse_args()
    job = load_config(args.preset, [f"data.settings=[{args.settings}]", *args.set])
    name = "molecules_auroc" + (f"_{args.tag}" if args.tag else "")
    run_dir = RESULTS / name
    shutil.rmtree(run_dir, ignore_errors=True)
    summary = run_molecules(run_dir, job)
    (run_dir / "metrics.jsonl").unlink()  # large; the plots keep its story
    shutil.rmtree(run_dir / "checkpoints")  # the run's state; not a result
    shutil.rmtree(run_dir / "tensorboard")
    gains = {}
    for setting, res in summary["settings"].items():
        s = res["scores"]
        gains[setting] = {
            mode: {m: round(s[m][mode]["test_auroc_mean"] - s["uniform weights"][mode]["test_auroc_mean"], 4)
                   for m in ("meta task weights", "meta example weights") if m in s}
            for mode in s["uniform weights"]
        }
    result = {
        "command": "python " + " ".join(sys.argv),
        "machine": {"platform": platform.platform(), "threads": torch.get_num_threads(), "torch": torch.__version__},
        "gain_over_uniform_auroc": gains,
        **summary,
    }
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    md = (run_dir / "summary.md").read_text()
    md += f"\nCommand: `{result['command']}`\n\nGain over uniform weights (test AUROC, mean over seeds):\n\n"
    md += "```json\n" + json.dumps(gains, indent=2) + "\n```\n"
    (RESULTS / f"{name}.md").write_text(md)
    print(json.dumps({"gain_over_uniform_auroc": gains, "wall_seconds": summary["wall_seconds"]}, indent=2))


if __name__ == "__main__":
    main()
