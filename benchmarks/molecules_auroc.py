"""The molecules protocol through the runner, on one or both downstream settings.

    .venv/bin/python benchmarks/molecules_auroc.py                      # preset molecules, b3db and heldout
    .venv/bin/python benchmarks/molecules_auroc.py --set meta.lr=0.1 --tag lr0.1

Writes benchmarks/results/molecules_auroc[_TAG].json and .md (summary, command, commit,
machine); the run folder goes to runs/ (git-ignored). A re-run with the same config reuses a finished
run and resumes an interrupted one from its newest checkpoint.
"""

from __future__ import annotations

import argparse
import time

import torch

from _results import ROOT, made_at, provenance, run_or_reuse, write

from metapt.config import load_config


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="molecules", help="a molecules preset or YAML config")
    ap.add_argument("--settings", default="b3db,heldout")
    ap.add_argument("--set", action="append", default=[], help="override a config key, e.g. meta.lr=0.1")
    ap.add_argument("--tag", default="", help="suffix of the result files")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the metapt command's default: 1)")
    ap.add_argument("--allow-dirty", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    source = provenance(args.allow_dirty)
    config = load_config(args.preset, [f"data.settings=[{args.settings}]", *args.set])
    name = "molecules_auroc" + (f"_{args.tag}" if args.tag else "")
    path = ROOT / "runs" / name
    cpu = time.process_time()
    summary = run_or_reuse(path, config, source["commit"])
    cpu = round(time.process_time() - cpu, 1)  # this process's CPU seconds: the run's cost on an idle core
    made = made_at(path)  # a reused or resumed run may have been started by older code
    md = (path / "summary.md").read_text() + (f"\nCPU time of this invocation: {cpu} s (wall time moves with the "
                                              f"machine's other load). Command: `{source['command']}` at commit "
                                              f"{source['commit']}" + (f"; the run was started at commit {made}"
                                                                        if made != source["commit"] else "") + ".\n")
    write(name, {**source, **summary, "cpu_seconds": cpu, "run_made_at_commit": made}, md)


if __name__ == "__main__":
    main()
