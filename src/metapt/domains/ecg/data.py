"""ECG datasets from folders of WFDB records, split by patient.

Two layouts are recognised (see :func:`detect_layout`):

* **beat layout** (``../shared/data/mitbih``): ``REC.hea`` + ``REC.dat`` per record and
  ``REC_beats.csv`` with columns ``sample`` (R-peak index) and ``pvc`` (0/1). Each annotated beat
  becomes a window centred on it; the label is PVC vs any other beat.
* **PTB-XL layout**: ``ptbxl_database.csv`` + ``scp_statements.csv`` + ``records100/`` or
  ``records500/``; each 10 s record gets multi-hot labels over the 5 diagnostic superclasses.

Every problem with the files raises :class:`ECGDataError` naming the file and saying how to fix
it, instead of a deep wfdb/pandas traceback or, worse, silently wrong windows.
"""

from __future__ import annotations

import ast
import hashlib
import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from torch.utils.data import Dataset

from ...errors import DataError

with warnings.catch_warnings():  # wfdb 4.x trips pandas deprecation warnings at import time
    warnings.simplefilter("ignore")
    import wfdb

__all__ = [
    "ECGDataError",
    "ECGDataset",
    "SUPERCLASSES",
    "detect_layout",
    "load_ecg_folder",
    "load_beat_folder",
    "load_ptbxl",
    "read_wfdb_record",
    "parse_scp_codes",
    "superclass_map",
    "superclass_labels",
]

Layout = Literal["beats", "ptbxl"]

#: PTB-XL's diagnostic superclasses, in the order of the label columns.
SUPERCLASSES: tuple[str, ...] = ("NORM", "MI", "STTC", "CD", "HYP")

_CACHE_VERSION = 1
#: Bytes per sample of the WFDB storage formats, for the truncation check.
_FORMAT_BYTES = {"8": 1.0, "16": 2.0, "24": 3.0, "32": 4.0, "61": 2.0, "80": 1.0, "160": 2.0,
                 "212": 1.5, "310": 4 / 3, "311": 4 / 3}


class ECGDataError(DataError):
    """A data file is missing, corrupt or inconsistent; ``path`` is the file at fault."""

    def __init__(self, path: str | os.PathLike[str], problem: str, fix: str = "") -> None:
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" + (f". {fix}" if fix else ""))


@dataclass(eq=False)
class ECGDataset(Dataset):
    """Examples as one float32 tensor, with the patient of each example for leak-free splits.

    ``labels`` is always a float32 multi-hot ``[n, n_classes]`` (``("PVC",)`` for the beat
    layout, :data:`SUPERCLASSES` for PTB-XL), ready for ``BCEWithLogitsLoss`` and per-class
    AUROC. ``patient_ids`` is the grouping key for splits: in the beat layout each MIT-BIH record
    is one patient (true of the 11-record subset; in the full database 201/202 share a patient),
    in PTB-XL it is the ``patient_id`` column. ``folds`` is PTB-XL's ``strat_fold`` (else None),
    ``centers`` the beat's R-peak index in the original record (else None).
    """

    signals: Tensor
    labels: Tensor
    record_ids: np.ndarray
    patient_ids: np.ndarray
    class_names: tuple[str, ...]
    lead_names: tuple[str, ...]
    fs: float
    layout: Layout
    folds: np.ndarray | None = None
    centers: np.ndarray | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = self.signals.shape[0]
        if self.signals.dim() != 3 or self.signals.dtype != torch.float32:
            raise ValueError(f"signals must be float32 [n, leads, length], got "
                             f"{self.signals.dtype} {tuple(self.signals.shape)}")
        if self.labels.shape != (n, len(self.class_names)):
            raise ValueError(f"labels must be [n, n_classes] = {(n, len(self.class_names))}, "
                             f"got {tuple(self.labels.shape)}")
        if self.signals.shape[1] != len(self.lead_names):
            raise ValueError(f"{len(self.lead_names)} lead names for {self.signals.shape[1]} leads")
        for name in ("record_ids", "patient_ids", "folds", "centers"):
            arr = getattr(self, name)
            if arr is not None and len(arr) != n:
                raise ValueError(f"{name} has {len(arr)} entries for {n} examples")

    def __len__(self) -> int:
        return self.signals.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.signals[index], self.labels[index]

    @property
    def n_leads(self) -> int:
        return self.signals.shape[1]

    @property
    def length(self) -> int:
        return self.signals.shape[2]

    def subset(self, index: np.ndarray | Sequence[int] | Tensor) -> "ECGDataset":
        """The examples at ``index`` (integer indices or a boolean mask), metadata included."""
        idx = np.asarray(index.cpu() if isinstance(index, Tensor) else index)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        idx = idx.astype(np.int64)
        t = torch.from_numpy(idx)
        return ECGDataset(
            self.signals[t], self.labels[t], self.record_ids[idx], self.patient_ids[idx],
            self.class_names, self.lead_names, self.fs, self.layout,
            None if self.folds is None else self.folds[idx],
            None if self.centers is None else self.centers[idx], dict(self.info),
        )

    def positives_per_patient(self, class_index: int = 0) -> dict[str, int]:
        """How many examples of each patient have class ``class_index`` (PVCs by default)."""
        pos = self.labels[:, class_index].numpy() > 0.5
        patients, inverse = np.unique(self.patient_ids, return_inverse=True)
        counts = np.bincount(inverse, weights=pos, minlength=len(patients))
        return {str(p): int(c) for p, c in zip(patients, counts)}


# --------------------------------------------------------------------------- WFDB records


@dataclass
class WfdbSignal:
    """One record read and checked: ``signal`` is float32 ``[length, leads]`` in physical units."""

    signal: np.ndarray
    fs: float
    lead_names: tuple[str, ...]
    path: Path


def _hea(record: Path) -> Path:
    return Path(str(record) + ".hea")  # not with_suffix: PTB-XL names contain no dot, some do


def read_wfdb_record(
    record: str | os.PathLike[str],
    expected_fs: float | None = None,
    leads: Sequence[str] | None = None,
) -> WfdbSignal:
    """Read a WFDB record (path without extension), checking every way it can be broken.

    Checks, each with its own :class:`ECGDataError`: the header exists and parses; its sampling
    rate is a positive number equal to ``expected_fs`` (when given); every signal file it names
    exists and is long enough for ``sig_len`` samples; the samples are finite; ``leads`` exist.
    """
    record = Path(record)
    hea = _hea(record)
    if not hea.is_file():
        raise ECGDataError(hea, "WFDB header not found",
                           f"each record needs {record.name}.hea next to its .dat file")
    try:
        header = wfdb.rdheader(str(record))
    except Exception as exc:  # wfdb raises many types for bad headers
        raise ECGDataError(hea, f"corrupt WFDB header ({type(exc).__name__}: {exc})",
                           "re-download the record or rewrite it with wfdb.wrsamp") from exc
    fs, sig_len, n_sig = header.fs, header.sig_len, header.n_sig
    if not isinstance(fs, (int, float)) or not math.isfinite(fs) or fs <= 0:
        raise ECGDataError(hea, f"corrupt WFDB header: sampling rate {fs!r} is not a positive "
                           "number", "re-download the record")
    if not n_sig or not sig_len or not header.file_name:
        raise ECGDataError(hea, f"corrupt WFDB header: {n_sig!r} signals of {sig_len!r} samples "
                           f"in files {header.file_name!r}", "re-download the record")
    if expected_fs is not None and not math.isclose(fs, expected_fs, rel_tol=1e-6):
        raise ECGDataError(hea, f"sampling rate is {fs:g} Hz, expected {expected_fs:g} Hz",
                           "pass the folder's real rate as expected_fs (and resample_fs to "
                           "resample), or remove the record")
    fmts = list(header.fmt or [])
    offsets = list(header.byte_offset or [None] * n_sig)
    for fname in dict.fromkeys(header.file_name):
        dat = record.parent / fname
        if not dat.is_file():
            raise ECGDataError(dat, f"signal file named in {hea.name} not found",
                               "copy the record's .dat file next to its header")
        chans = [i for i, f in enumerate(header.file_name) if f == fname]
        fmt = str(fmts[chans[0]]) if fmts else ""
        if fmt in _FORMAT_BYTES:
            needed = int(math.ceil(sig_len * len(chans) * _FORMAT_BYTES[fmt]))
            needed += int(offsets[chans[0]] or 0)
            size = dat.stat().st_size
            if size < needed:
                raise ECGDataError(dat, f"truncated signal file: {size} bytes, the header needs "
                                   f"{needed} ({sig_len} samples x {len(chans)} signals, format "
                                   f"{fmt})", "re-download the record")
    try:
        rec = wfdb.rdrecord(str(record))
    except Exception as exc:
        raise ECGDataError(record.parent / header.file_name[0],
                           f"could not read the signal ({type(exc).__name__}: {exc})",
                           "re-download the record") from exc
    signal = np.asarray(rec.p_signal, dtype=np.float32)
    names = tuple(str(s) for s in (rec.sig_name or [f"ch{i}" for i in range(n_sig)]))
    if signal.shape != (sig_len, n_sig):
        raise ECGDataError(record.parent / header.file_name[0],
                           f"read {signal.shape} samples, the header says {(sig_len, n_sig)}",
                           "re-download the record")
    if not np.isfinite(signal).all():
        bad = int((~np.isfinite(signal)).sum())
        raise ECGDataError(record.parent / header.file_name[0],
                           f"{bad} invalid (NaN) samples, WFDB's marker for missing data",
                           "drop the record or fill the gap before loading")
    if leads is not None:
        missing = [lead for lead in leads if lead not in names]
        if missing:
            raise ECGDataError(hea, f"lead(s) {missing} not in the record's leads {list(names)}",
                               "choose leads present in every record")
        signal = signal[:, [names.index(lead) for lead in leads]]
        names = tuple(leads)
    return WfdbSignal(signal, float(fs), names, record)


def _normalize_windows(x: np.ndarray, eps: float = 1e-3) -> np.ndarray:
    """Z-score each window and lead over time: ``(x - mean) / max(std, eps)``.

    Per-window normalisation removes baseline wander offsets and gain differences between
    patients and recorders, so neither the encoder nor the noise augmentation (relative to the
    lead's std) depends on units. ``eps`` (1 uV for mV records) keeps flat, lead-off windows at
    0 instead of amplifying quantisation noise.
    """
    mean = x.mean(axis=-1, keepdims=True)
    std = x.std(axis=-1, keepdims=True)
    return ((x - mean) / np.maximum(std, eps)).astype(np.float32)


# --------------------------------------------------------------------------- layouts


def detect_layout(folder: str | os.PathLike[str]) -> Layout:
    """``"ptbxl"`` if the folder has ``ptbxl_database.csv``, ``"beats"`` if it has
    ``*_beats.csv`` files, else an :class:`ECGDataError` saying what was expected."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ECGDataError(folder, "not a folder", "pass the folder that holds the ECG records")
    if (folder / "ptbxl_database.csv").is_file():
        return "ptbxl"
    if any(folder.glob("*_beats.csv")):
        return "beats"
    raise ECGDataError(folder, "no ECG layout recognised",
                       "expected ptbxl_database.csv + scp_statements.csv + records100/ (PTB-XL) "
                       "or REC.hea, REC.dat and REC_beats.csv per record (beat layout)")


def load_ecg_folder(folder: str | os.PathLike[str], **options: Any) -> ECGDataset:
    """Load either layout, detected from the folder; ``options`` go to :func:`load_beat_folder`
    or :func:`load_ptbxl` (an option of the other layout is a ``TypeError``)."""
    layout = detect_layout(folder)
    if layout == "ptbxl":
        return load_ptbxl(folder, **options)
    return load_beat_folder(folder, **options)


def _file_stamp(paths: Iterable[Path]) -> list[tuple[str, int, int]]:
    out = []
    for p in sorted(paths):
        st = p.stat()
        out.append((p.name, st.st_size, st.st_mtime_ns))
    return out


def _cache_path(cache_dir: Path, kind: str, config: dict[str, Any], files: Iterable[Path]) -> Path:
    blob = json.dumps({"v": _CACHE_VERSION, "kind": kind, "config": config,
                       "files": _file_stamp(files)}, sort_keys=True, default=str)
    return cache_dir / f"ecg_{kind}_{hashlib.sha256(blob.encode()).hexdigest()[:20]}.npz"


def _save_cache(path: Path, ds: ECGDataset) -> None:
    """npz of plain arrays (strings as unicode, info as JSON): loads with allow_pickle=False."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {
        "signals": ds.signals.numpy(), "labels": ds.labels.numpy(),
        "record_ids": ds.record_ids.astype(str), "patient_ids": ds.patient_ids.astype(str),
        "class_names": np.array(ds.class_names, dtype=str),
        "lead_names": np.array(ds.lead_names, dtype=str),
        "fs": np.array(ds.fs), "layout": np.array(ds.layout),
        "info": np.array(json.dumps(ds.info)),
    }
    if ds.folds is not None:
        arrays["folds"] = ds.folds
    if ds.centers is not None:
        arrays["centers"] = ds.centers
    tmp = path.with_name(path.name + f".tmp{os.getpid()}.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def _load_cache(path: Path) -> ECGDataset | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            info = json.loads(str(z["info"]))
            info["from_cache"] = str(path)
            return ECGDataset(
                torch.from_numpy(z["signals"].copy()), torch.from_numpy(z["labels"].copy()),
                z["record_ids"].copy(), z["patient_ids"].copy(),
                tuple(str(s) for s in z["class_names"]), tuple(str(s) for s in z["lead_names"]),
                float(z["fs"]), str(z["layout"]),  # type: ignore[arg-type]
                z["folds"].copy() if "folds" in z else None,
                z["centers"].copy() if "centers" in z else None, info,
            )
    except (OSError, ValueError, KeyError):  # unreadable or stale cache: rebuild it
        return None


def _read_beats(csv: Path, sig_len: int) -> tuple[np.ndarray, np.ndarray]:
    """``(sample, pvc)`` int64 arrays of a beats file, checked against the record's length."""
    try:
        df = pd.read_csv(csv)
    except Exception as exc:
        raise ECGDataError(csv, f"unreadable beats CSV ({type(exc).__name__}: {exc})",
                           "it must be a CSV with columns sample,pvc") from exc
    missing = [c for c in ("sample", "pvc") if c not in df.columns]
    if missing:
        raise ECGDataError(csv, f"missing column(s) {missing}; found {list(df.columns)}",
                           "a beats file needs columns sample (R-peak sample index) and pvc (0/1)")
    out = []
    for col in ("sample", "pvc"):
        values = pd.to_numeric(df[col], errors="coerce").to_numpy(dtype=np.float64)
        bad = np.flatnonzero(~np.isfinite(values) | (values != np.round(values)))
        if len(bad):
            raise ECGDataError(csv, f"column {col!r} has a non-integer value "
                               f"{df[col].iloc[bad[0]]!r} at data row {bad[0] + 1}",
                               "fix or remove that row")
        out.append(values.astype(np.int64))
    sample, pvc = out
    bad = np.flatnonzero((sample < 0) | (sample >= sig_len))
    if len(bad):
        raise ECGDataError(csv, f"beat at sample {sample[bad[0]]} (data row {bad[0] + 1}) is "
                           f"outside the record's {sig_len} samples; {len(bad)} such beats",
                           "the labels do not match the record: check the beats file belongs to "
                           "it and uses 0-based sample indices at the record's own rate")
    bad = np.flatnonzero((pvc != 0) & (pvc != 1))
    if len(bad):
        raise ECGDataError(csv, f"pvc must be 0 or 1, got {pvc[bad[0]]} at data row {bad[0] + 1}",
                           "fix the labels")
    return sample, pvc


def load_beat_folder(
    folder: str | os.PathLike[str],
    *,
    window: int = 256,
    expected_fs: float | None = None,
    resample_fs: float | None = None,
    leads: Sequence[str] | None = None,
    records: Sequence[str] | None = None,
    normalize: bool = True,
    cache_dir: str | os.PathLike[str] | None = None,
) -> ECGDataset:
    """Windows of ``window`` samples centred on every annotated beat; label 1 = PVC.

    The window covers ``[c - window // 2, c - window // 2 + window)`` around the R-peak ``c`` (at
    ``resample_fs`` when given, resampling each whole record with a polyphase filter first).
    Beats whose window would cross the start or end of the record are dropped and counted in
    ``info["dropped_at_edges"]``. Every record needs a beats file and every beats file a record;
    all records must share one sampling rate (checked against ``expected_fs`` when given) and the
    same leads (or choose them with ``leads``). ``normalize`` z-scores each window and lead (see
    :func:`_normalize_windows`). ``cache_dir`` keeps the windows as an npz keyed by the options
    and the files' sizes and mtimes.
    """
    start_time = time.perf_counter()
    folder = Path(folder)
    if detect_layout(folder) != "beats":
        raise ECGDataError(folder, "this is a PTB-XL folder, not the beat layout",
                           "use load_ptbxl or load_ecg_folder")
    if window < 2:
        raise ValueError(f"window must be at least 2 samples, got {window}")
    if resample_fs is not None and not (math.isfinite(resample_fs) and resample_fs > 0):
        raise ValueError(f"resample_fs must be a positive number of Hz, got {resample_fs}")
    beats = {p.name[: -len("_beats.csv")]: p for p in folder.glob("*_beats.csv")}
    headers = {p.name[: -len(".hea")]: p for p in folder.glob("*.hea")}
    names = sorted(set(beats) | set(headers))
    if records is not None:
        unknown = sorted(set(records) - set(names))
        if unknown:
            raise ECGDataError(folder, f"record(s) {unknown} not found; available: {names}")
        names = sorted(set(records))
    for name in names:
        if name not in headers:
            raise ECGDataError(beats[name], f"beats file without a record: {name}.hea not found",
                               "add the record or remove its beats file")
        if name not in beats:
            raise ECGDataError(headers[name], f"record without labels: {name}_beats.csv not "
                               "found", "add the beats file, remove the record, or pass "
                               "records=[...] without it")
    if not names:
        raise ECGDataError(folder, "no records selected", "pass at least one record name")

    config = {"window": window, "expected_fs": expected_fs, "resample_fs": resample_fs,
              "leads": list(leads) if leads else None, "records": names, "normalize": normalize}
    cache = None
    if cache_dir is not None:
        files = [p for n in names for p in (beats[n], headers[n], *folder.glob(f"{n}.dat"))]
        cache = _cache_path(Path(cache_dir), "beats", config, files)
        if cache.is_file() and (ds := _load_cache(cache)) is not None:
            ds.info["load_seconds"] = time.perf_counter() - start_time
            return ds

    half = window // 2
    win_list, lab_list, rec_list, ctr_list = [], [], [], []
    fs0: float | None = None
    leads0: tuple[str, ...] | None = None
    n_beats = n_pvc = 0
    dropped: dict[str, int] = {}
    for name in names:
        rec = read_wfdb_record(folder / name, expected_fs, leads)
        if fs0 is None:
            fs0, leads0 = rec.fs, rec.lead_names
        elif not math.isclose(rec.fs, fs0, rel_tol=1e-6):
            raise ECGDataError(_hea(rec.path), f"sampling rate {rec.fs:g} Hz differs from the "
                               f"folder's {fs0:g} Hz", "pass expected_fs to say which is right")
        elif rec.lead_names != leads0:
            raise ECGDataError(_hea(rec.path), f"leads {list(rec.lead_names)} differ from "
                               f"{list(leads0 or ())} in the first record",
                               "choose with leads=[...]")
        sample, pvc = _read_beats(beats[name], rec.signal.shape[0])
        n_beats += len(sample)
        n_pvc += int(pvc.sum())
        signal, center = rec.signal, sample
        if resample_fs is not None and not math.isclose(resample_fs, rec.fs, rel_tol=1e-9):
            from scipy.signal import resample_poly

            ratio = Fraction(resample_fs / rec.fs).limit_denominator(10_000)
            signal = resample_poly(signal, ratio.numerator, ratio.denominator, axis=0)
            center = np.round(sample * (resample_fs / rec.fs)).astype(np.int64)
        start = center - half
        keep = (start >= 0) & (start + window <= signal.shape[0])
        dropped[name] = int((~keep).sum())
        idx = start[keep, None] + np.arange(window)
        win_list.append(np.ascontiguousarray(signal[idx].transpose(0, 2, 1), dtype=np.float32))
        lab_list.append(pvc[keep])
        rec_list.append(np.full(int(keep.sum()), name))
        ctr_list.append(sample[keep])

    x = np.concatenate(win_list)
    if normalize:
        x = _normalize_windows(x)
    rec_ids = np.concatenate(rec_list).astype(str)
    info = {"source": str(folder), "records": names, "beats_in_files": n_beats,
            "pvc_in_files": n_pvc, "dropped_at_edges": sum(dropped.values()),
            "dropped_per_record": dropped, "window": window, "record_fs": fs0,
            "normalize": normalize}
    ds = ECGDataset(
        torch.from_numpy(x), torch.from_numpy(np.concatenate(lab_list)[:, None].astype(np.float32)),
        rec_ids, rec_ids.copy(), ("PVC",), leads0 or (), float(resample_fs or fs0 or 0.0),
        "beats", None, np.concatenate(ctr_list).astype(np.int64), info,
    )
    if cache is not None:
        _save_cache(cache, ds)
    ds.info["load_seconds"] = time.perf_counter() - start_time
    return ds


# --------------------------------------------------------------------------- PTB-XL


def parse_scp_codes(text: str, where: str | os.PathLike[str] = "scp_codes") -> dict[str, float]:
    """PTB-XL's ``scp_codes`` cell, a dict literal such as ``"{'NORM': 100.0, 'SR': 0.0}"``.

    Parsed with ``ast.literal_eval`` (never ``eval``): the file is data, not code.
    """
    try:
        value = ast.literal_eval(text) if isinstance(text, str) else None
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        value = None
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool)
        for k, v in value.items()
    ):
        raise ECGDataError(where, f"scp_codes {text!r} is not a dict of code -> likelihood",
                           "expected e.g. \"{'NORM': 100.0, 'SR': 0.0}\"")
    return {k: float(v) for k, v in value.items()}


def superclass_map(statements: pd.DataFrame) -> dict[str, str]:
    """scp code -> diagnostic superclass, from ``scp_statements.csv`` (index = code).

    Only codes whose ``diagnostic_class`` is one of :data:`SUPERCLASSES` map; rhythm and form
    statements have no diagnostic class and are ignored, as in the PTB-XL benchmark.
    """
    if "diagnostic_class" not in statements.columns:
        raise ValueError("scp_statements needs a diagnostic_class column")
    cls = statements["diagnostic_class"]
    return {str(code): str(c) for code, c in cls.items()
            if isinstance(c, str) and c in SUPERCLASSES}


def superclass_labels(codes: Mapping[str, float], code_to_class: Mapping[str, str],
                      min_likelihood: float = 0.0) -> np.ndarray:
    """Multi-hot float32 ``[5]``: class c is present if any code of class c has likelihood
    ``>= min_likelihood``.

    The default 0 counts every listed code, which is the PTB-XL benchmark's rule (Strodthoff et
    al. 2020, ``aggregate_diagnostic``) that the paper's fine-tuning task follows: in PTB-XL a
    likelihood of 0 means "not stated", not "absent". Pass e.g. 15 (the smallest stated
    likelihood) to keep only codes with a stated likelihood.
    """
    y = np.zeros(len(SUPERCLASSES), dtype=np.float32)
    for code, likelihood in codes.items():
        c = code_to_class.get(code)
        if c is not None and likelihood >= min_likelihood:
            y[SUPERCLASSES.index(c)] = 1.0
    return y


def load_ptbxl(
    folder: str | os.PathLike[str],
    *,
    sampling_rate: Literal[100, 500] = 100,
    min_likelihood: float = 0.0,
    drop_unlabelled: bool = True,
    leads: Sequence[str] | None = None,
    max_records: int | None = None,
    normalize: bool = True,
    cache_dir: str | os.PathLike[str] | None = None,
) -> ECGDataset:
    """PTB-XL records with multi-hot superclass labels (see :func:`superclass_labels`).

    Reads ``filename_lr`` (records100/, 100 Hz) or ``filename_hr`` (records500/, 500 Hz), each
    checked to be at ``sampling_rate``. Records with no diagnostic superclass are dropped (the
    benchmark's choice; count in ``info["dropped_unlabelled"]``) unless ``drop_unlabelled`` is
    False. ``max_records`` keeps the first n records after that (quick runs). ``folds`` holds
    ``strat_fold``; use :func:`ptbxl_fold_indices` for the benchmark's 1-8 / 9 / 10 split, which
    PTB-XL already stratified by patient. ``normalize`` z-scores each record and lead. The whole
    of PTB-XL at 100 Hz is ~1 GB as float32 and slow to parse (21,799 files): use ``cache_dir``
    (keyed by the options and the two CSVs' sizes and mtimes, not by the 21,799 record files).
    """
    start_time = time.perf_counter()
    folder = Path(folder)
    db_path, st_path = folder / "ptbxl_database.csv", folder / "scp_statements.csv"
    if sampling_rate not in (100, 500):
        raise ValueError(f"sampling_rate must be 100 or 500 (PTB-XL's two versions), "
                         f"got {sampling_rate}")
    for p in (db_path, st_path):
        if not p.is_file():
            raise ECGDataError(p, "not found", "a PTB-XL folder needs ptbxl_database.csv and "
                               "scp_statements.csv at its top level")
    fname_col = "filename_lr" if sampling_rate == 100 else "filename_hr"
    try:
        db = pd.read_csv(db_path)
        st = pd.read_csv(st_path, index_col=0)
    except Exception as exc:
        raise ECGDataError(folder, f"unreadable PTB-XL tables ({type(exc).__name__}: {exc})",
                           "re-download PTB-XL") from exc
    missing = [c for c in ("ecg_id", "patient_id", "scp_codes", "strat_fold", fname_col)
               if c not in db.columns]
    if missing:
        raise ECGDataError(db_path, f"missing column(s) {missing}", "re-download PTB-XL")
    if "diagnostic_class" not in st.columns:
        raise ECGDataError(st_path, "missing column 'diagnostic_class'", "re-download PTB-XL")
    code_to_class = superclass_map(st)

    labels, keep = [], []
    for i, row in enumerate(db.itertuples(index=False)):
        codes = parse_scp_codes(row.scp_codes, f"{db_path} (ecg_id {row.ecg_id})")
        y = superclass_labels(codes, code_to_class, min_likelihood)
        if y.any() or not drop_unlabelled:
            labels.append(y)
            keep.append(i)
    n_unlabelled = len(db) - len(keep)
    db = db.iloc[keep].reset_index(drop=True)
    y_all = np.stack(labels) if labels else np.zeros((0, len(SUPERCLASSES)), np.float32)
    if max_records is not None:
        db, y_all = db.iloc[:max_records], y_all[:max_records]
    if len(db) == 0:
        raise ECGDataError(db_path, "no record has a diagnostic superclass",
                           "check scp_statements.csv and min_likelihood")
    folds = pd.to_numeric(db["strat_fold"], errors="coerce").to_numpy()
    if not np.isin(folds, np.arange(1, 11)).all():
        bad = db["ecg_id"].to_numpy()[~np.isin(folds, np.arange(1, 11))][0]
        raise ECGDataError(db_path, f"strat_fold of ecg_id {bad} is not in 1..10",
                           "re-download PTB-XL")
    patients = pd.to_numeric(db["patient_id"], errors="coerce").to_numpy()
    if not np.isfinite(patients).all():
        raise ECGDataError(db_path, "patient_id has missing values", "re-download PTB-XL")

    config = {"sampling_rate": sampling_rate, "min_likelihood": min_likelihood,
              "drop_unlabelled": drop_unlabelled, "leads": list(leads) if leads else None,
              "max_records": max_records, "normalize": normalize}
    cache = None
    if cache_dir is not None:
        cache = _cache_path(Path(cache_dir), "ptbxl", config, [db_path, st_path])
        if cache.is_file() and (ds := _load_cache(cache)) is not None:
            ds.info["load_seconds"] = time.perf_counter() - start_time
            return ds

    x: np.ndarray | None = None
    lead_names: tuple[str, ...] = ()
    for i, rel in enumerate(db[fname_col].astype(str)):
        rec = read_wfdb_record(folder / rel, float(sampling_rate), leads)
        sig = rec.signal.T
        if x is None:
            x = np.empty((len(db), *sig.shape), dtype=np.float32)
            lead_names = rec.lead_names
        elif sig.shape != x.shape[1:] or rec.lead_names != lead_names:
            raise ECGDataError(_hea(rec.path), f"{sig.shape[0]} leads {list(rec.lead_names)} x "
                               f"{sig.shape[1]} samples differ from the first record's "
                               f"{x.shape[1]} leads {list(lead_names)} x {x.shape[2]}",
                               "every PTB-XL record should be 12 leads x 10 s")
        x[i] = sig
    assert x is not None
    if normalize:
        x = _normalize_windows(x)
    info = {"source": str(folder), "records_in_database": int(len(db) + n_unlabelled),
            "dropped_unlabelled": int(n_unlabelled), "min_likelihood": min_likelihood,
            "normalize": normalize}
    ds = ECGDataset(
        torch.from_numpy(x), torch.from_numpy(y_all.astype(np.float32)),
        db["ecg_id"].astype(int).astype(str).to_numpy(), patients.astype(np.int64).astype(str),
        SUPERCLASSES, lead_names, float(sampling_rate), "ptbxl", folds.astype(np.int64), None, info,
    )
    if cache is not None:
        _save_cache(cache, ds)
    ds.info["load_seconds"] = time.perf_counter() - start_time
    return ds
