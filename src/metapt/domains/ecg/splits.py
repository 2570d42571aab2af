"""How an ECG folder becomes the four groups: pre-train, FT-train, MetaFT-validation, test.

Every split is by record (patient): no record's beats are in two groups. The beat layout is
split by a seeded permutation of the records (or, with ``data.cv_folds``, record-wise
cross-validation); PTB-XL by its own ``strat_fold``. :func:`load_and_split` loads either layout
and splits it as :class:`DataConfig` says, then caps the labelled beats per record;
:func:`carve_valid` sets the downstream 'valid' split aside from FT-train.
:func:`split_records` and :func:`split_dataset` are the three-group split (pre-train /
fine-tune / test) of the data-loading API.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import Field

from ...errors import DataError  # a ValueError too
from ...schema import MAX_SEED, schema
from .data import ECGDataset, detect_layout, load_beat_folder, load_ptbxl

__all__ = [
    "DataConfig",
    "ECGSplit",
    "PTBXLFolds",
    "RecordFractions",
    "RecordSplit",
    "cap_labelled",
    "carve_valid",
    "cross_validation_folds",
    "data_summary",
    "group_sizes",
    "load_and_split",
    "ptbxl_fold_indices",
    "split_beats_by_record",
    "split_beats_cross_validation",
    "split_dataset",
    "split_ecg",
    "split_ptbxl_by_fold",
    "split_records",
]


# --------------------------------------------------------------------------- configuration


@schema
class RecordFractions:
    """Shares of the records (patients) in each group of the beat layout.

    Attributes:
        pretrain: share of the records whose beats pre-train (SimCLR, no labels).
        ft_train: share whose labelled beats fine-tune (and give the downstream 'valid' split).
        metaval: share that makes the MetaFT-validation set of the meta-objective.
        test: share held out for the test scores.
    """

    pretrain: float = 0.4
    ft_train: float = 0.2
    metaval: float = 0.15
    test: float = 0.25

    def __post_init__(self) -> None:
        values = (self.pretrain, self.ft_train, self.metaval, self.test)
        if any(not math.isfinite(v) or v <= 0 for v in values):
            raise ValueError(f"RecordFractions: every share must be > 0 (each group needs a record), got {values}")

    def as_tuple(self) -> tuple[float, float, float, float]:
        return (self.pretrain, self.ft_train, self.metaval, self.test)


@schema
class PTBXLFolds:
    """PTB-XL's strat_fold groups (already stratified by patient).

    The default follows the paper and the PTB-XL benchmark: pre-train on the unlabelled
    ECGs of folds 1-8, fine-tune on (a label fraction of) the same folds, MetaFT-validation on
    fold 9, test on fold 10, which no pre-training, fine-tuning or meta-step ever sees.

    Attributes:
        pretrain: strat_folds whose ECGs pre-train.
        ft_train: strat_folds whose labelled ECGs fine-tune.
        metaval: strat_folds of the MetaFT-validation set.
        test: strat_folds held out for the test scores.
    """

    pretrain: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 8)
    ft_train: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 8)
    metaval: tuple[int, ...] = (9,)
    test: tuple[int, ...] = (10,)

    def __post_init__(self) -> None:
        held_out = set(self.test)
        if held_out & (set(self.pretrain) | set(self.ft_train) | set(self.metaval)) or set(self.metaval) & (
            set(self.pretrain) | set(self.ft_train)
        ):
            raise ValueError(
                f"PTBXLFolds: the test folds {self.test} and MetaFT-validation folds {self.metaval} must not be "
                "used by any other group; choose disjoint folds"
            )


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


# --------------------------------------------------------------------------- the four groups


@dataclass(frozen=True)
class ECGSplit:
    """Example indices of the four groups, and the records (patients) behind them."""

    pretrain: np.ndarray
    ft_train: np.ndarray
    metaval: np.ndarray
    test: np.ndarray
    records: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def groups(self) -> dict[str, np.ndarray]:
        return {"pretrain": self.pretrain, "ft_train": self.ft_train, "metaval": self.metaval, "test": self.test}


def split_beats_by_record(
    ds: ECGDataset,
    fractions: RecordFractions = RecordFractions(),
    *,
    seed: int = 0,
    min_positives: int = 20,
    class_index: int = 0,
    max_tries: int = 10_000,
) -> ECGSplit:
    """Four disjoint groups of records: pre-train, FT-train, MetaFT-validation, test.

    The first seeded permutation of the records whose FT-train, MetaFT-validation and test
    groups each hold at least ``min_positives`` positives of ``class_index`` (PVCs cluster
    in a few MIT-BIH records, so an unconstrained split can leave a group without any).
    """
    unique = sorted({str(p) for p in ds.patient_ids})
    if len(unique) < 4:
        raise DataError(f"{len(unique)} records cannot fill 4 disjoint groups; the beat layout needs at least 4")
    sizes = group_sizes(len(unique), fractions.as_tuple())
    positives = ds.positives_per_patient(class_index)
    rng = np.random.default_rng(seed)
    for _ in range(max_tries):
        order = [str(r) for r in rng.permutation(unique)]
        bounds = np.cumsum([0, *sizes])
        groups = [tuple(sorted(order[a:b])) for a, b in zip(bounds[:-1], bounds[1:])]
        if all(sum(positives.get(r, 0) for r in g) >= min_positives for g in groups[1:]):
            names = ("pretrain", "ft_train", "metaval", "test")
            index = {n: np.flatnonzero(np.isin(ds.patient_ids, np.array(g, dtype=str))) for n, g in zip(names, groups)}
            return ECGSplit(**index, records=dict(zip(names, groups)))
    raise DataError(
        f"no split of the {len(unique)} records in {max_tries} seeded draws gives FT-train, MetaFT-validation and "
        f"test {min_positives} positives each (positives per record: {positives}); lower min_positives or "
        "change the record fractions"
    )


def cross_validation_folds(ds: ECGDataset, folds: int, *, seed: int = 0, class_index: int = 0) -> list[tuple[str, ...]]:
    """Every record in exactly one of ``folds`` test folds, the positives spread evenly.

    Records are dealt in snake order (0…K−1, K−1…0, …) from most to fewest positives (a
    seeded draw breaks ties), so each fold gets one of the records that hold most positives
    and every fold can be scored. A fold without positives is an error: AUROC needs both classes.
    """
    unique = sorted({str(p) for p in ds.patient_ids})
    if not 2 <= folds <= len(unique) - 2:
        raise DataError(f"data.cv_folds must be between 2 and {len(unique) - 2} with {len(unique)} records "
                         f"(the other folds must fill FT-train and MetaFT-validation), got {folds}")
    positives = ds.positives_per_patient(class_index)
    tiebreak = np.random.default_rng(seed).permutation(len(unique))
    order = sorted(range(len(unique)), key=lambda i: (-positives.get(unique[i], 0), tiebreak[i]))
    groups: list[list[str]] = [[] for _ in range(folds)]
    for rank, i in enumerate(order):
        lap, pos = divmod(rank, folds)
        groups[pos if lap % 2 == 0 else folds - 1 - pos].append(unique[i])
    empty = [k for k, g in enumerate(groups) if sum(positives.get(r, 0) for r in g) == 0]
    if empty:
        raise DataError(f"data.cv_folds={folds}: test fold(s) {empty} would hold no positives (positives per "
                         f"record: {positives}); choose fewer folds")
    return [tuple(sorted(g)) for g in groups]


def split_beats_cross_validation(
    ds: ECGDataset,
    folds: int,
    fold: int,
    fractions: RecordFractions = RecordFractions(),
    *,
    seed: int = 0,
    min_positives: int = 20,
    class_index: int = 0,
    max_tries: int = 10_000,
) -> ECGSplit:
    """Test on fold ``fold`` of :func:`cross_validation_folds`; pre-train on every other record.

    Self-supervised pre-training reads no labels, so it takes every record not tested
    (FT-train's and MetaFT-validation's too). The other records are split by record between
    FT-train and MetaFT-validation in the ratio of ``fractions``, the first seeded
    permutation that gives each ``min_positives`` positives.
    """
    groups = cross_validation_folds(ds, folds, seed=seed, class_index=class_index)
    if not 0 <= fold < folds:
        raise ValueError(f"data.cv_fold must be in [0, {folds}), got {fold}")
    test = groups[fold]
    rest = sorted(r for g in groups for r in g if r not in test)
    n_meta = min(len(rest) - 1, max(1, round(len(rest) * fractions.metaval / (fractions.ft_train + fractions.metaval))))
    positives = ds.positives_per_patient(class_index)
    rng = np.random.default_rng(seed * 1009 + fold)
    for _ in range(max_tries):
        order = [str(r) for r in rng.permutation(rest)]
        metaval, ft_train = tuple(sorted(order[:n_meta])), tuple(sorted(order[n_meta:]))
        if all(sum(positives.get(r, 0) for r in g) >= min_positives for g in (ft_train, metaval)):
            records = {"pretrain": tuple(rest), "ft_train": ft_train, "metaval": metaval, "test": test}
            index = {n: np.flatnonzero(np.isin(ds.patient_ids, np.array(g, dtype=str))) for n, g in records.items()}
            return ECGSplit(**index, records=records)
    raise DataError(
        f"cross-validation fold {fold}: no split of the other {len(rest)} records in {max_tries} seeded draws gives "
        f"FT-train and MetaFT-validation {min_positives} positives each (positives per record: {positives}); lower "
        "data.min_positives"
    )


def split_ptbxl_by_fold(ds: ECGDataset, folds: PTBXLFolds = PTBXLFolds()) -> ECGSplit:
    """The four groups from PTB-XL's ``strat_fold`` (see :class:`PTBXLFolds`)."""
    idx = ptbxl_fold_indices(ds, folds.ft_train, folds.metaval, folds.test)
    pretrain = np.flatnonzero(np.isin(ds.folds, folds.pretrain))
    groups = {"pretrain": pretrain, "ft_train": idx["train"], "metaval": idx["valid"], "test": idx["test"]}
    records = {name: tuple(sorted({str(p) for p in ds.patient_ids[i]})) for name, i in groups.items()}
    split = ECGSplit(**groups, records=records)
    for name, i in split.groups().items():
        if len(i) == 0:
            raise DataError(f"PTB-XL group {name!r} is empty with folds {folds}; choose folds present in the data")
    return split


def split_ecg(
    ds: ECGDataset,
    fractions: RecordFractions = RecordFractions(),
    folds: PTBXLFolds = PTBXLFolds(),
    *,
    seed: int = 0,
    min_positives: int = 20,
) -> ECGSplit:
    """By record for the beat layout, by strat_fold for PTB-XL (the dataset's own ``layout``)."""
    if ds.folds is not None:
        return split_ptbxl_by_fold(ds, folds)
    return split_beats_by_record(ds, fractions, seed=seed, min_positives=min_positives)


def ptbxl_fold_indices(
    ds: ECGDataset,
    train_folds: Sequence[int] = (1, 2, 3, 4, 5, 6, 7, 8),
    valid_folds: Sequence[int] = (9,),
    test_folds: Sequence[int] = (10,),
) -> dict[str, np.ndarray]:
    """The PTB-XL benchmark split by ``strat_fold``: 1-8 train, 9 validation, 10 test."""
    if ds.folds is None:
        raise ValueError("this dataset has no strat_fold (not PTB-XL); use split_dataset")
    sets = {"train": set(train_folds), "valid": set(valid_folds), "test": set(test_folds)}
    if (sets["train"] & sets["valid"]) or (sets["train"] & sets["test"]) or \
            (sets["valid"] & sets["test"]):
        raise ValueError(f"fold groups overlap: {sets}")
    return {k: np.flatnonzero(np.isin(ds.folds, sorted(v))) for k, v in sets.items()}


# --------------------------------------------------------------------------- loading, capping, 'valid'


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
        split = cap_labelled(ds, split, config.max_labelled_per_record, config.split_seed,
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


def cap_labelled(ds: ECGDataset, split: ECGSplit, cap: int, seed: int, keep_positives: bool = False) -> ECGSplit:
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


# --------------------------------------------------------------------------- three groups (the data API)


@dataclass(frozen=True)
class RecordSplit:
    """Disjoint groups of patient (record) ids; examples follow their patient."""

    pretrain: tuple[str, ...]
    finetune: tuple[str, ...]
    test: tuple[str, ...]

    def groups(self) -> dict[str, tuple[str, ...]]:
        return {"pretrain": self.pretrain, "finetune": self.finetune, "test": self.test}

    def indices(self, ids: np.ndarray | ECGDataset) -> dict[str, np.ndarray]:
        """Example indices of each group, given per-example patient ids or a dataset."""
        ids = ids.patient_ids if isinstance(ids, ECGDataset) else np.asarray(ids)
        return {k: np.flatnonzero(np.isin(ids, np.array(v, dtype=str)))
                for k, v in self.groups().items()}


def group_sizes(n: int, fractions: Sequence[float]) -> list[int]:
    """Largest-remainder sizes summing to n; a group with fraction > 0 gets at least one id."""
    total = float(sum(fractions))
    raw = [f / total * n for f in fractions]
    sizes = [int(math.floor(r)) for r in raw]
    for i in sorted(range(len(raw)), key=lambda i: sizes[i] - raw[i])[: n - sum(sizes)]:
        sizes[i] += 1
    for i, f in enumerate(fractions):
        if f > 0 and sizes[i] == 0:
            sizes[max(range(len(sizes)), key=lambda j: sizes[j])] -= 1
            sizes[i] = 1
    return sizes


def split_records(
    ids: Iterable[str],
    *,
    fractions: tuple[float, float, float] = (0.5, 0.25, 0.25),
    seed: int = 0,
    positives: Mapping[str, float] | None = None,
    min_positive_fraction: float = 0.1,
    max_tries: int = 10_000,
) -> RecordSplit:
    """Split patient ids into pre-train / fine-tune / test groups, deterministically from ``seed``.

    Without ``positives`` the split is one seeded permutation, cut by ``fractions`` (a fraction
    of 0 gives an empty group, so ``(0, 0.7, 0.3)`` splits fine-tune records into FT-train and
    MetaFT-validation). With ``positives`` (id -> number of positive examples, e.g. PVCs), it is
    the first seeded permutation whose fine-tune and test groups each hold at least
    ``min_positive_fraction`` of all positives, so both can train and score a PVC detector
    (PVCs are concentrated in a few MIT-BIH records: 200, 106 and 116 hold 93 %).
    """
    unique = sorted({str(i) for i in ids})
    if len(fractions) != 3 or any(not math.isfinite(f) or f < 0 for f in fractions) or \
            sum(fractions) <= 0:
        raise ValueError(f"fractions must be 3 non-negative numbers, not all 0; got {fractions}")
    needed = sum(f > 0 for f in fractions)
    if len(unique) < needed:
        raise ValueError(f"{len(unique)} records cannot fill {needed} non-empty groups; "
                         "add records or set some fractions to 0")
    sizes = group_sizes(len(unique), fractions)
    rng = np.random.default_rng(seed)

    def cut(order: np.ndarray) -> RecordSplit:
        a, b = sizes[0], sizes[0] + sizes[1]
        return RecordSplit(*(tuple(sorted(str(i) for i in order[s:e]))
                             for s, e in ((0, a), (a, b), (b, len(order)))))

    if positives is None:
        return cut(rng.permutation(unique))
    if not 0 <= min_positive_fraction <= 1:
        raise ValueError(f"min_positive_fraction must be in [0, 1], got {min_positive_fraction}")
    pos = {i: float(positives.get(i, 0)) for i in unique}
    total = sum(pos.values())
    if total <= 0:
        raise ValueError("no record has any positive example: the test set could not be scored")
    need = min_positive_fraction * total
    for _ in range(max_tries):
        split = cut(rng.permutation(unique))
        if all(sum(pos[i] for i in group) >= need
               for group in (split.finetune, split.test) if group):
            return split
    raise ValueError(
        f"no split in {max_tries} seeded draws gives the fine-tune and test groups "
        f"{min_positive_fraction:.0%} of the {total:g} positives each; lower "
        f"min_positive_fraction or change fractions"
    )


def split_dataset(
    ds: ECGDataset,
    *,
    fractions: tuple[float, float, float] = (0.5, 0.25, 0.25),
    seed: int = 0,
    class_index: int | None = 0,
    min_positive_fraction: float = 0.1,
) -> RecordSplit:
    """:func:`split_records` over the dataset's patients, requiring positives of class
    ``class_index`` (PVC for the beat layout) in the fine-tune and test groups; ``None`` drops
    that requirement."""
    positives = None if class_index is None else ds.positives_per_patient(class_index)
    return split_records(ds.patient_ids, fractions=fractions, seed=seed, positives=positives,
                         min_positive_fraction=min_positive_fraction)
