"""PNG plots of a run: curves from the step log, bars with confidence intervals."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never a window
import matplotlib.pyplot as plt  # noqa: E402


def plot_curves(rows: Sequence[Mapping], keys: Sequence[str], path: str | Path, title: str = "") -> Path | None:
    """One panel per metric key, one line per phase, against the step; smoothed by a running mean.

    Returns None (and writes nothing) when no row has any of the keys.
    """
    keys = [k for k in keys if any(r.get(k) is not None for r in rows)]
    if not keys:
        return None
    fig, axes = plt.subplots(len(keys), 1, figsize=(7, 2.4 * len(keys)), sharex=True, squeeze=False)
    phases = list(dict.fromkeys(r.get("phase", "") for r in rows))
    colour = {phase: f"C{i}" for i, phase in enumerate(phases)}  # one colour per phase in every panel
    for ax, key in zip(axes[:, 0], keys):
        for phase in phases:
            pts = [(r["step"], r[key]) for r in rows if r.get("phase", "") == phase and r.get(key) is not None]
            if not pts:
                continue
            steps, vals = zip(*pts)
            window = max(1, len(vals) // 50)
            smooth = [sum(vals[max(0, i - window + 1) : i + 1]) / len(vals[max(0, i - window + 1) : i + 1]) for i in range(len(vals))]
            ax.plot(steps, smooth, label=phase, lw=1.2, color=colour[phase])
        ax.set_ylabel(key, fontsize=8)
        ax.grid(alpha=0.3)
    handles = {l: h for ax in axes[:, 0] for h, l in zip(*ax.get_legend_handles_labels())}
    axes[0, 0].legend(handles.values(), handles.keys(), fontsize=8)
    axes[-1, 0].set_xlabel("pre-training step")
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_bars(
    categories: Sequence[str],
    series: Mapping[str, Sequence[tuple[float, float]]],
    path: str | Path,
    *,
    ylabel: str = "",
    title: str = "",
    ylim: tuple[float, float] | None = None,
    rotate: bool = False,
) -> Path:
    """Grouped bars: one group per category, one bar per series, (mean, CI half-width) each."""
    n = max(len(series), 1)
    width = 0.8 / n
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(categories) * n + 2), 3.6))
    for i, (name, values) in enumerate(series.items()):
        xs = [j + (i - (n - 1) / 2) * width for j in range(len(categories))]
        means = [m for m, _ in values]
        errs = [0.0 if (e is None or math.isnan(e)) else e for _, e in values]
        ax.bar(xs, means, width, yerr=errs if any(errs) else None, capsize=3, label=name)
    ax.set_xticks(range(len(categories)))
    ax.set_xticklabels(categories, rotation=70 if rotate else 0, ha="right" if rotate else "center", fontsize=8)
    ax.set_ylabel(ylabel)
    if ylim:
        ax.set_ylim(*ylim)
    if len(series) > 1:
        ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    if title:
        ax.set_title(title)
    return _save(fig, path)


def plot_hbars(
    labels: Sequence[str],
    values: Sequence[tuple[float, float]],
    path: str | Path,
    *,
    points: Sequence[Sequence[float]] | None = None,
    reference: float | None = None,
    xlabel: str = "",
    title: str = "",
) -> Path:
    """Horizontal bars (mean, CI half-width) for long category names, top to bottom in the given
    order; ``points`` adds each category's individual values (e.g. one per seed) as dots."""
    n = len(labels)
    fig, ax = plt.subplots(figsize=(11, 0.28 * n + 1.6))
    ys = list(range(n))[::-1]
    means = [m for m, _ in values]
    errs = [0.0 if (e is None or math.isnan(e)) else e for _, e in values]
    ax.barh(ys, means, xerr=errs if any(errs) else None, capsize=2, color="C0", alpha=0.7)
    if points is not None:
        for y, vals in zip(ys, points):
            ax.plot(list(vals), [y] * len(vals), "o", color="k", ms=2.5, alpha=0.6)
    if reference is not None:
        ax.axvline(reference, color="k", lw=0.8, ls="--")
    ax.set_yticks(ys)
    ax.set_yticklabels(labels, fontsize=7)
    ax.set_xlabel(xlabel)
    ax.grid(axis="x", alpha=0.3)
    if title:
        ax.set_title(title, fontsize=9)
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
