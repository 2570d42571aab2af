"""The ECG protocol through the runner on real MIT-BIH records (preset ecg-benchmark).

    .venv/bin/python benchmarks/ecg_auroc.py [--data ../shared/data/mitbih] [--set key=value ...]

Writes benchmarks/results/ecg_auroc.json and .md (summary, command, commit, machine); the
run folder goes to runs/ecg_auroc (git-ignored).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from _results import ROOT, provenance, write

from metapt.config import load_config
from metapt.jobs import execute
from metapt.runs import RunFolder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "mitbih")
    ap.add_argument("--preset", default="ecg-benchmark")
    ap.add_argument("--set", action="append", default=[], help="override a config key")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--allow-dirty", action="store_true")
    args = ap.parse_args()
    if not any(args.data.glob("*_beats.csv")) and not (args.data / "ptbxl_database.csv").is_file():
        ap.error(f"no ECG data folder at {args.data}; pass --data DIR")
    torch.set_num_threads(args.threads)
    source = provenance(args.allow_dirty)
    config = load_config(args.preset, [f"data_dir={args.data.resolve()}", *args.set])
    folder = RunFolder.create(ROOT / "runs" / "ecg_auroc", "job: ecg\n", overwrite=True)
    summary = execute(folder, config)
    md = (folder.path / "summary.md").read_text() + f"\nCommand: `{source['command']}` at commit {source['commit']}.\n"
    write("ecg_auroc", {**source, **summary}, md)


if __name__ == "__main__":
    main()
