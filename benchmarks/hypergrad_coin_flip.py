"""What each estimator does to coin-flip pre-training tasks (the problem of tests/hypergrad/test_coin_flip.py).

An MLP encoder with per-task heads pre-trains on 3 real tasks (thresholds of directions in the
downstream task's subspace) and 3 coin-flip tasks (labels independent of the input); the task
weights are meta-learned for 400 PT steps (meta-step every 5). For each estimator and seed it
prints the mean learned weight of the coin-flip tasks minus that of the real tasks, once
descending the meta-objective (should be < 0) and once ascending it (``maximize=True``, should be
> 0). Writes JSON and Markdown.

    OMP_NUM_THREADS=1 python benchmarks/hypergrad_coin_flip.py --out benchmarks/results/hypergrad_coin_flip.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "hypergrad"))
import test_coin_flip as coin  # noqa: E402

from metapt.hypergrad import ConjugateGradient, Estimator, Identity, Neumann  # noqa: E402
from _results import source_commit  # noqa: E402  (HEAD; refused if metapt comes from another tree)

PT_LR = 1e-2
OPTIONS = {
    "default (trainer)": None,
    "neumann1_past (paper)": Estimator(solver=Neumann(1, PT_LR)),
    "identity_past (T1-T2)": Estimator(solver=Identity(PT_LR)),
    "identity_past_adam": Estimator(solver=Identity(PT_LR), adam_preconditioner=True),
    "identity_next": Estimator(solver=Identity(PT_LR), upcoming=True),
    "identity_next_adam": Estimator(solver=Identity(PT_LR), upcoming=True, adam_preconditioner=True),
    "identity_next4_adam": Estimator(solver=Identity(PT_LR), pt_batches=4, upcoming=True, adam_preconditioner=True),
    "cg20_damping1_past": Estimator(solver=ConjugateGradient(max_iter=20, damping=1.0)),
    "cg10_spectral_next": Estimator(solver=ConjugateGradient(max_iter=10, spectrum_steps=10), upcoming=True),
    "neumann20_alpha0.1_past": Estimator(solver=Neumann(20, 0.1)),
    "unrolled_T5": Estimator(horizon=5),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/hypergrad_coin_flip.json")
    ap.add_argument("--seeds", type=int, default=4)
    args = ap.parse_args()
    rows = {}
    for name, est in OPTIONS.items():
        kw = {} if est is None else {"estimator": est}
        start = time.perf_counter()
        gaps = {"descend": [], "ascend": []}
        for seed in range(args.seeds):
            for mode, maximize in (("descend", False), ("ascend", True)):
                w = coin.learned_weights(seed, maximize=maximize, **kw)
                gaps[mode].append(float(w[coin.N_REAL:].mean() - w[:coin.N_REAL].mean()))
        rows[name] = {**gaps, "right_seeds": sum(d < 0 < a for d, a in zip(gaps["descend"], gaps["ascend"])),
                      "seconds": time.perf_counter() - start}
        print(name, rows[name], file=sys.stderr, flush=True)
    result = {"command": "OMP_NUM_THREADS=1 python " + " ".join(sys.argv),
              "commit": source_commit(),
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                          "threads": torch.get_num_threads(), "torch": torch.__version__},
              "threads": torch.get_num_threads(), "seeds": args.seeds, "options": rows}
    out = Path(args.out)
    out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    lines = ["# Coin-flip tasks: learned weight of coin-flip minus real tasks", "",
             f"Command: `{result['command']}`; commit `{result['commit']}`", "",
             "Descending the meta-objective should give < 0, ascending it (maximize=True) > 0.", "",
             "| estimator | descend, per seed | ascend, per seed | seeds right both ways |", "|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {' '.join(f'{g:+.3f}' for g in r['descend'])} | "
                     f"{' '.join(f'{g:+.3f}' for g in r['ascend'])} | {r['right_seeds']}/{args.seeds} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
