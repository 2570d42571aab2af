"""ECG data for the runner: load either layout, split it by record, cap the labelled beats,
set the downstream 'valid' split aside, summarise.

Plots of the learned warp live here too.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import Field

from ...metrics import read_jsonl
from ...problem import Params
from ...schema import MAX_SEED, schema
from .data import ECGDataset, detect_layout, load_beat_folder, load_ptbxl
from .problem import (ECGSimCLRProblem, ECGSplit, PTBXLFolds, RecordFractions, split_beats_cross_validation,
                      split_ecg)


@schema
class DataConfig:
    """How the folder becomes the four groups.

    Attributes:
        window, resample_fs: beat layout: samples per beat window and optional resampling.
        record_fractions: beat layout: shares of the records per group (split by record).
        min_positives: beat layout: positives each of FT-train, MetaFT-val and test must hold.
        split_seed: seed of the record split, the labelled-beat cap and the downstream 'valid'
            split (not of θ₀ or the batch order: ``pretrain.seed``).
        valid_fraction: share of the FT-train examples set aside, before meta-learning sees
            them, as the downstream 'valid' split on which evaluation picks its epoch
            (MetaFT-validation and test never pick anything).
        max_labelled_per_record: cap on the FT-train, MetaFT-validation and test beats per
            record (a seeded uniform subsample, so each record keeps its PVC share; None keeps
            all). It bounds the cost of fine-tuning and of the per-epoch validation on a CPU, and
            weights the test records more evenly. Pre-training keeps every beat.
        cap_keeps_positives: under the cap, keep a record's positive beats first (up to half
            the cap) and fill with the rest, so a small cap still leaves both classes to score
            (the ``quick`` preset; the uniform subsample keeps each record's PVC share).
        cv_folds, cv_fold: beat layout: record-wise cross-validation. With ``cv_folds: K`` the
            records are dealt into K test folds (each record in exactly one, positives spread
            evenly) and this run tests on fold ``cv_fold``; it pre-trains on every other record
            (SimCLR reads no labels) and splits those records between FT-train and
            MetaFT-validation in the ratio of ``record_fractions`` (its ``pretrain`` and
            ``test`` shares are then unused). Run K folds for a CI over patients:
            ``benchmarks/ecg_cv.py``.
        ptbxl_folds: PTB-XL: strat_fold groups.
        ptbxl_sampling_rate, ptbxl_max_records: PTB-XL: records100/ or records500/, and a cap
            on records for quick runs.
        cache_dir: where the loader keeps its npz cache (None: no cache).
    """

    window: int = 256
    resample_fs: float | None = None
    record_fractions: RecordFractions = RecordFractions()
    min_positives: int = 20
    split_seed: int = Field(default=0, ge=0, le=MAX_SEED)
    max_labelled_per_record: int | None = None
    cap_keeps_positives: bool = False
    cv_folds: int | None = Field(default=None, ge=2)
    cv_fold: int = Field(default=0, ge=0)
    ptbxl_folds: PTBXLFolds = PTBXLFolds()
    ptbxl_sampling_rate: int = 100
    ptbxl_max_records: int | None = None
    cache_dir: str | None = None
    valid_fraction: float = Field(default=0.25, gt=0, lt=1)

    def __post_init__(self) -> None:
        if self.cv_folds is not None and self.cv_fold >= self.cv_folds:
            raise ValueError(f"data.cv_fold must be below data.cv_folds ({self.cv_folds}), got {self.cv_fold}")
        if self.cv_folds is None and self.cv_fold != 0:
            raise ValueError("data.cv_fold needs data.cv_folds (the number of folds)")


def load_and_split(folder: Path, config: DataConfig) -> tuple[ECGDataset, ECGSplit]:
    """Load either layout and cut it into pre-train / FT-train / MetaFT-validation / test."""
    if detect_layout(folder) == "ptbxl":
        ds = load_ptbxl(folder, sampling_rate=config.ptbxl_sampling_rate,  # type: ignore[arg-type]
                        max_records=config.ptbxl_max_records, cache_dir=config.cache_dir)
    else:
        ds = load_beat_folder(folder, window=config.window, resample_fs=config.resample_fs, cache_dir=config.cache_dir)
    if config.cv_folds is not None:
        if ds.folds is not None:
            raise ValueError("data.cv_folds is for the beat layout; PTB-XL is split by its own strat_fold "
                             "(data.ptbxl_folds)")
        split = split_beats_cross_validation(ds, config.cv_folds, config.cv_fold, config.record_fractions,
                                             seed=config.split_seed, min_positives=config.min_positives)
    else:
        split = split_ecg(ds, config.record_fractions, config.ptbxl_folds, seed=config.split_seed,
                          min_positives=config.min_positives)
    if config.max_labelled_per_record is not None:
        split = _cap_labelled(ds, split, config.max_labelled_per_record, config.split_seed,
                              keep_positives=config.cap_keeps_positives)
    return ds, split


def carve_valid(ds: ECGDataset, split: ECGSplit, fraction: float, seed: int) -> tuple[ECGSplit, np.ndarray]:
    """Set a seeded, label-stratified ``fraction`` of FT-train aside as the downstream 'valid' split.

    Returns the split without those examples (what meta-learning and fine-tuning train on)
    and the valid indices. Every class keeps at least one positive on each side when it has two.
    """
    ft = split.ft_train
    positive = ds.labels[torch.from_numpy(ft)].amax(1).numpy() > 0.5
    rng = np.random.default_rng(seed + 104_729)
    valid = []
    for group in (ft[positive], ft[~positive]):
        k = int(round(fraction * len(group)))
        k = min(max(k, 1 if len(group) >= 2 else 0), len(group) - 1 if len(group) >= 2 else len(group))
        valid.append(rng.choice(group, size=k, replace=False))
    valid_idx = np.sort(np.concatenate(valid)).astype(np.int64)
    return replace(split, ft_train=np.setdiff1d(ft, valid_idx)), valid_idx


def _cap_labelled(ds: ECGDataset, split: ECGSplit, cap: int, seed: int, keep_positives: bool = False) -> ECGSplit:
    """At most ``cap`` examples per record in each labelled group (seeded, order kept)."""
    if cap < 1:
        raise ValueError(f"max_labelled_per_record must be >= 1 or None, got {cap}")
    rng = np.random.default_rng(seed + 7919)
    capped = {}
    for name in ("ft_train", "metaval", "test"):
        idx, keep = getattr(split, name), []
        for rec in np.unique(ds.patient_ids[idx]):
            mine = idx[ds.patient_ids[idx] == rec]
            if len(mine) <= cap:
                keep.append(mine)
            elif keep_positives:
                positive = ds.labels[torch.from_numpy(mine)].amax(1).numpy() > 0
                pos, neg = mine[positive], mine[~positive]
                pos = pos if len(pos) <= cap // 2 else rng.choice(pos, size=cap // 2, replace=False)
                neg = rng.choice(neg, size=min(cap - len(pos), len(neg)), replace=False)
                keep.append(np.sort(np.concatenate([pos, neg])))
            else:
                keep.append(np.sort(rng.choice(mine, size=cap, replace=False)))
        capped[name] = np.sort(np.concatenate(keep))
    return replace(split, **capped)


def data_summary(ds: ECGDataset, split: ECGSplit, folder: Path) -> dict[str, Any]:
    groups = {}
    for name, idx in split.groups().items():
        y = ds.labels[torch.from_numpy(idx)]
        groups[name] = {"examples": int(len(idx)), "positives": [int(v) for v in y.sum(0)],
                        "records": len(split.records.get(name, ())),
                        "record_ids": list(split.records.get(name, ()))[:50]}
    return {"folder": str(folder), "layout": ds.layout, "classes": list(ds.class_names), "fs": ds.fs,
            "leads": list(ds.lead_names), "length": ds.length, "groups": groups}


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
    axes[0, 0].set_ylabel("z-scored signal")
    axes[1, 0].set_ylabel("displacement (samples)")
    for ax in axes[1]:
        ax.set_xlabel("sample")
    fig.suptitle(f"Beats and one draw of the learned warp (magnitude {float(phi['log_magnitude'].exp()):.4f})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


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
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
