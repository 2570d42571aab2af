"""PNG plots of a run: curves from the step log, bars with confidence intervals."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never a window
import matplotlib.pyplot as plt  # noqa: E402


#: Axis labels in words for the step log's keys (``phi/NAME`` becomes "φ: NAME" otherwise).
LABELS = {
    "pt_loss": "pre-training loss",
    "meta_loss": "meta-loss\n(FT loss on MetaFT-val.)",
    "hypergrad_norm": "hypergradient norm\n‖dL_V/dφ‖",
    "solver_residual": "inverse-HVP solver\nresidual ‖Hx − g‖",
}


def label(key: str) -> str:
    """The words for a step-log key on an axis."""
    if key in LABELS:
        return LABELS[key]
    if key.startswith("phi/"):
        return "φ: " + key[4:].replace("_", " ")
    return key.replace("_", " ")


def plotted_keys(rows: Sequence[Mapping], keys: Sequence[str]) -> tuple[list[str], dict[str, float]]:
    """The keys :func:`plot_curves` draws (logged, and not the same value at every step), and the
    constant ones with their value (named under the figure instead of drawn as a flat line)."""
    drawn, constant = [], {}
    for k in keys:
        values = {r[k] for r in rows if r.get(k) is not None and not (isinstance(r[k], float) and math.isnan(r[k]))}
        if len(values) > 1:
            drawn.append(k)
        elif len(values) == 1:
            constant[k] = values.pop()
    return drawn, constant


def plot_curves(rows: Sequence[Mapping], keys: Sequence[str], path: str | Path, title: str = "") -> Path | None:
    """One panel per metric key, one line per phase, against the step; smoothed by a running mean.

    Axes are labelled in words (:data:`LABELS`); a key whose value never changes gets no panel but
    is named under the figure; the legend sits below the panels, clear of the title. A quantity
    spanning more than two decades is drawn on a log scale. Returns None (and writes nothing)
    when no row has any of the keys.
    """
    keys, constant = plotted_keys(rows, keys)
    if not keys:
        return None
    fig, axes = plt.subplots(len(keys), 1, figsize=(7, 1.9 * len(keys) + 0.6), sharex=True, squeeze=False)
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
        values = [r[key] for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        if values and min(values) > 0 and max(values) / min(values) > 100:
            ax.set_yscale("log")
        ax.set_ylabel(label(key), fontsize=8)
        ax.grid(alpha=0.3)
    handles = {l: h for ax in axes[:, 0] for h, l in zip(*ax.get_legend_handles_labels())}
    axes[-1, 0].set_xlabel("pre-training step")
    # the title heads the legend above the first panel: nothing can overlap it
    axes[0, 0].legend(handles.values(), handles.keys(), fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.02),
                      ncol=min(len(handles), 2), title=(f"{title}\n" if title else "") + "one line per phase (setting/method)",
                      title_fontsize=10, frameon=False)
    notes = "; ".join(f"{label(k)} = {v:.3g} throughout" for k, v in constant.items()).replace("\n", " ")
    if notes:
        axes[-1, 0].annotate(notes, xy=(0.5, 0), xycoords="axes fraction", xytext=(0, -36), textcoords="offset points",
                             ha="center", va="top", fontsize=7, wrap=True)
    fig.tight_layout()
    return save_figure(fig, path, constant={k: v for k, v in constant.items()})


def plot_bars(
    categories: Sequence[str],
    series: Mapping[str, Sequence[tuple[float, float]]],
    path: str | Path,
    *,
    ylabel: str = "",
    title: str = "",
    ylim: tuple[float, float] | None = None,
    rotate: bool = False,
    reference: tuple[float, str] | None = None,
    bounds: tuple[float, float] | None = None,
) -> Path:
    """Grouped bars: one group per category, one bar per series, (mean, CI half-width) each.

    Without ``ylim`` the axis fits the data (bars and CIs, with a margin; from 0 when every value
    is positive and the smallest is under 40 % of the largest); ``reference`` = (value, words)
    draws a dashed line such as chance level, when it falls in that range; ``bounds`` are the
    values the metric can take (AUROC: 0 to 1), which the axis does not pass for a wide CI.
    """
    n = max(len(series), 1)
    width = 0.8 / n
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(categories) * n + 2), 3.6))
    for i, (name, values) in enumerate(series.items()):
        xs = [j + (i - (n - 1) / 2) * width for j in range(len(categories))]
        means = [m for m, _ in values]
        errs = [0.0 if (e is None or math.isnan(e)) else e for _, e in values]
        ax.bar(xs, means, width, yerr=errs if any(errs) else None, capsize=3, label=name)
    ax.set_xticks(range(len(categories)))
    import textwrap

    shown = categories if rotate else ["\n".join(textwrap.wrap(str(c), 14)) or str(c) for c in categories]  # no overlap
    ax.set_xticklabels(shown, rotation=70 if rotate else 0, ha="right" if rotate else "center", fontsize=8)
    ax.set_ylabel(ylabel)
    lows = [m - (e if e == e else 0) for values in series.values() for m, e in values if m == m]
    highs = [m + (e if e == e else 0) for values in series.values() for m, e in values if m == m]
    if ylim:
        ax.set_ylim(*ylim)
    elif lows:
        lo, hi = min(lows), max(highs)
        if lo >= 0 and (hi <= 0 or min(m for v in series.values() for m, _ in v if m == m) < 0.4 * hi):
            lo = 0.0
        pad = 0.08 * (hi - lo) if hi > lo else 0.05 * abs(hi) + 1e-3
        lo, hi = lo - (pad if lo else 0), hi + pad
        if bounds is not None:
            lo, hi = max(lo, bounds[0]), min(hi, bounds[1])
        ax.set_ylim(lo, hi)
    if reference is not None and ax.get_ylim()[0] <= reference[0] <= ax.get_ylim()[1]:
        ax.axhline(reference[0], color="k", lw=0.8, ls="--", label=reference[1])
        ax.set_ylim(ax.get_ylim())  # the line does not widen the axis
    if len(series) > 1 or reference is not None:  # beside the axes, never over a bar
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.grid(axis="y", alpha=0.3)
    if title:
        ax.set_title(title)
    return save_figure(fig, path, means={name: [m for m, _ in values] for name, values in series.items()})


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
    return save_figure(fig, path)


def axes_record(fig, **extra) -> dict:
    """What a figure shows, in words and numbers: per axes its title, axis labels, limits and the
    range of its data, and the legend's entries; written into the PNG's metadata (text chunk
    ``metapt``) so that tests can check the plots without looking at pixels."""
    axes = []
    for ax in fig.axes:
        legend = ax.get_legend()
        data = ax.dataLim
        axes.append({"title": ax.get_title(), "xlabel": ax.get_xlabel(), "ylabel": ax.get_ylabel(),
                     "xlim": list(ax.get_xlim()), "ylim": list(ax.get_ylim()), "yscale": ax.get_yscale(),
                     "data_y": [data.y0, data.y1] if data.height == data.height else None,
                     "legend": [t.get_text() for t in legend.get_texts()] if legend else [],
                     "legend_title": legend.get_title().get_text() if legend else ""})
    return {"axes": axes, "suptitle": fig._suptitle.get_text() if fig._suptitle else "", **extra}


def save_figure(fig, path: str | Path, **extra) -> Path:
    """Save and close ``fig`` with its :func:`axes_record` in the PNG (every figure a report shows)."""
    import json

    fig.tight_layout()
    record = json.dumps(axes_record(fig, **extra), default=float)
    fig.savefig(path, dpi=110, bbox_inches="tight", metadata={"metapt": record})  # bbox: a legend beside the axes
    plt.close(fig)
    return Path(path)
