"""Plots of the ECG job: beats with one draw of the learned warp, and the warp's magnitude over a run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ...metrics import read_jsonl
from ...plots import save_figure
from ...problem import Params
from .problem import ECGSimCLRProblem

__all__ = ["plot_magnitude", "plot_warp_examples"]


def plot_warp_examples(problem: ECGSimCLRProblem, phi: Params, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ex = problem.warp_examples(phi, count=4)
    fig, axes = plt.subplots(2, 4, figsize=(14, 5), sharex=True)
    t = np.arange(ex["beats"].shape[-1])
    for j in range(4):
        axes[0, j].plot(t, ex["beats"][j, 0].numpy(), label="beat", lw=1)
        axes[0, j].plot(t, ex["warped"][j, 0].numpy(), label="learned warp", lw=1)
        axes[1, j].plot(t, (ex["positions"][j] - torch.arange(len(t))).numpy(), color="C2")
        axes[1, j].axhline(0, color="k", lw=0.5)
    axes[0, 0].legend(fontsize=8)
    for j in range(4):  # every panel says what it shows (the report's readers look at one at a time)
        axes[0, j].set_title(f"beat {j + 1}", fontsize=9)
        axes[0, j].set_ylabel("z-scored signal")
        axes[1, j].set_ylabel("displacement (samples)")
        axes[1, j].set_xlabel("sample")
    fig.suptitle(f"Beats and one draw of the learned warp (magnitude {float(phi['log_magnitude'].exp()):.4f})")
    save_figure(fig, path)


def plot_magnitude(metrics: Path, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in read_jsonl(metrics) if r.get("phi/magnitude") is not None]
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    steps = [r["step"] for r in rows]
    ax[0].plot(steps, [r["phi/magnitude"] for r in rows])
    ax[0].set_title("learned global magnitude")
    ax[1].plot(steps, [r["phi/mean_abs_shift"] for r in rows], color="C1")
    ax[1].set_title("mean |displacement| on 32 fixed beats (samples)")
    ax[0].set_ylabel("warp magnitude φ\n(velocity std / window length)")
    ax[1].set_ylabel("mean |displacement| (samples)")
    for a in ax:
        a.set_xlabel("pre-training step")
    save_figure(fig, path)
