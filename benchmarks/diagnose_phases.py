"""Hypergradient health of finished benchmark runs: `metapt diagnose` on their learned phases.

    .venv/bin/python benchmarks/diagnose_phases.py runs/molecules_auroc_heldout_pretraining_seeds \
        --phase heldout/meta_task_weights/seed0 --tag heldout

For each phase: sign agreement and cosine of every estimator with the exact derivative of the
meta-objective T PT steps ahead (T = the run's meta.interval), signal-to-noise over independent
hypergradients, the Hessian's extreme eigenvalues, at the phase's final θ and φ. It explains a
gain or its absence; it does not change the run. Writes benchmarks/results/diagnostics_TAG.{json,md}.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from _results import provenance, write

from metapt.config import load_config
from metapt.diagnostics import DiagnoseOptions
from metapt.run_diagnosis import diagnose_run, format_table
from metapt.runs import RunFolder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--phase", action="append", required=True, help="SETTING/METHOD[/seedN] (repeatable)")
    ap.add_argument("--directions", type=int, default=8)
    ap.add_argument("--tag", required=True)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--allow-dirty", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    source = provenance(args.allow_dirty)
    config = load_config(RunFolder.open(args.run_dir).config_file)
    options = DiagnoseOptions(horizon=config.meta.interval, directions=args.directions)
    results = {phase: diagnose_run(args.run_dir, phase=phase, options=options) for phase in args.phase}
    lines = [f"# Hypergradient diagnostics of {args.run_dir.name}", ""]
    for phase, r in results.items():
        lines += [f"## {phase}", "", r["source"], "", format_table(r), ""]
    lines += [f"Command: `{source['command']}` at commit {source['commit']}.", ""]
    write(f"diagnostics_{args.tag}", {**source, "run": args.run_dir.name, "phases": results}, "\n".join(lines))


if __name__ == "__main__":
    main()
