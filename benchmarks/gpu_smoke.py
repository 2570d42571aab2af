"""Run every shipped job briefly on CUDA; skip cleanly where there is none.

    .venv/bin/python benchmarks/gpu_smoke.py [--data ../shared/data/mitbih] [--out runs/gpu-smoke]

Each job (synthetic, molecules-test, ecg-quick if a data folder is given) runs with
``device=cuda`` through the same runner as on the CPU: the runner's device check fails
the run if θ, ψ, φ, an optimiser state or a batch is not on the GPU. Then each run is
killed-free resumed from its newest checkpoint (``metapt eval``) to exercise loading on
CUDA. Prints one line per job and exits non-zero if any failed. Writes nothing to
benchmarks/results: it is a check, not a measurement.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=None, help="WFDB folder for the ECG job (skipped without it)")
    parser.add_argument("--out", type=Path, default=Path("runs/gpu-smoke"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_smoke: no CUDA device on this machine; skipped")
        return 0
    from metapt.config import load_config
    from metapt.jobs import execute
    from metapt.runs import RunFolder

    jobs = [("synthetic", ["pretrain.steps=150"]), ("molecules-test", [])]
    if args.data is not None:
        jobs.append(("ecg-quick", [f"data_dir={args.data.resolve()}"]))
    failed = 0
    for preset, overrides in jobs:
        started = time.perf_counter()
        try:
            config = load_config(preset, [*overrides, "device=cuda"])
            folder = RunFolder.create(args.out / preset, "job: pending\n", overwrite=True)
            summary = execute(folder, config)
            assert summary["device"].startswith("cuda"), summary["device"]
            again = execute(folder, config, resume=True, reevaluate=True)  # checkpoint loading on CUDA
            assert again["settings"].keys() == summary["settings"].keys()
            print(f"{preset}: ok on {summary['device']} in {time.perf_counter() - started:.1f} s")
        except Exception as err:  # report every job, then fail
            failed += 1
            print(f"{preset}: FAILED: {type(err).__name__}: {err}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
