"""The WFDB loader on generated records: both layouts, every error, caching and splits."""

import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import wfdb

from metapt.domains.ecg.data import (
    SUPERCLASSES,
    ECGDataError,
    detect_layout,
    load_beat_folder,
    load_ecg_folder,
    load_ptbxl,
    parse_scp_codes,
)
from metapt.domains.ecg.splits import ptbxl_fold_indices, split_dataset, split_records

FS = 360


def write_record(folder: Path, name: str, n: int = 3000, fs: int = FS, leads=("MLII",),
                 beats=None, pvc=None, seed: int = 0) -> np.ndarray:
    """A WFDB record (format 16) of spiky beat-like signal, plus its beats CSV (if beats given)."""
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    sig = 0.1 * rng.standard_normal((n, len(leads)))
    for b in beats if beats is not None else []:
        sig += 2.0 * np.exp(-0.5 * ((t - b) / 4.0) ** 2)[:, None]
    wfdb.wrsamp(name, fs=fs, units=["mV"] * len(leads), sig_name=list(leads), p_signal=sig,
                fmt=["16"] * len(leads), write_dir=str(folder))
    if beats is not None:
        pd.DataFrame({"sample": beats, "pvc": pvc if pvc is not None else [0] * len(beats)}).to_csv(
            folder / f"{name}_beats.csv", index=False)
    return wfdb.rdrecord(str(folder / name)).p_signal.astype(np.float32)


@pytest.fixture
def beat_folder(tmp_path: Path) -> Path:
    # record a: 7 beats, the first (50) and last (2950) too close to the edges for 256 samples
    write_record(tmp_path, "a", beats=[50, 400, 800, 1200, 1600, 2000, 2950],
                 pvc=[0, 1, 0, 0, 1, 0, 1])
    write_record(tmp_path, "b", beats=[300, 700, 1100, 1500], pvc=[0, 0, 1, 0], seed=1)
    return tmp_path


# ---------------------------------------------------------------- beat layout


def test_beat_windows_labels_and_ids(beat_folder):
    ds = load_ecg_folder(beat_folder)
    assert detect_layout(beat_folder) == "beats" and ds.layout == "beats"
    assert ds.signals.shape == (9, 1, 256) and ds.signals.dtype == torch.float32
    assert ds.class_names == ("PVC",) and ds.lead_names == ("MLII",) and ds.fs == FS
    assert ds.labels[:, 0].tolist() == [1, 0, 0, 1, 0, 0, 0, 1, 0]
    assert list(ds.record_ids) == ["a"] * 5 + ["b"] * 4
    assert list(ds.patient_ids) == list(ds.record_ids)
    assert list(ds.centers) == [400, 800, 1200, 1600, 2000, 300, 700, 1100, 1500]
    assert ds.info["beats_in_files"] == 11 and ds.info["pvc_in_files"] == 4
    assert ds.info["dropped_at_edges"] == 2 and ds.info["dropped_per_record"] == {"a": 2, "b": 0}
    # per-window, per-lead z-score
    torch.testing.assert_close(ds.signals.mean(-1), torch.zeros(9, 1), atol=1e-5, rtol=0)
    torch.testing.assert_close(ds.signals.std(-1, unbiased=False), torch.ones(9, 1), atol=1e-4,
                               rtol=0)
    x, y = ds[3]
    assert x.shape == (1, 256) and y.tolist() == [1.0]


def test_windows_are_centred_on_the_beat(beat_folder):
    sig = wfdb.rdrecord(str(beat_folder / "a")).p_signal.astype(np.float32)
    ds = load_beat_folder(beat_folder, normalize=False, window=100)
    assert list(ds.centers[:2]) == [50, 400]  # [0, 100) and [2900, 3000) fit exactly
    assert ds.info["dropped_at_edges"] == 0
    np.testing.assert_array_equal(ds.signals[1, 0].numpy(), sig[400 - 50:400 + 50, 0])
    assert ((ds.signals[:, 0].argmax(dim=-1) - 50).abs() <= 2).all()  # peak at window // 2
    wider = load_beat_folder(beat_folder, normalize=False, window=102)
    assert wider.info["dropped_at_edges"] == 2 and wider.centers[0] == 400


def test_records_option_and_lead_selection(tmp_path):
    write_record(tmp_path, "x", leads=("MLII", "V1"), beats=[500, 1000], pvc=[1, 0])
    write_record(tmp_path, "y", leads=("MLII", "V1"), beats=[600], pvc=[0], seed=2)
    both = load_beat_folder(tmp_path, normalize=False)
    assert both.signals.shape == (3, 2, 256) and both.lead_names == ("MLII", "V1")
    v1 = load_beat_folder(tmp_path, leads=["V1"], records=["x"], normalize=False)
    assert v1.signals.shape == (2, 1, 256) and v1.lead_names == ("V1",)
    torch.testing.assert_close(v1.signals[:, 0], both.signals[:2, 1])
    with pytest.raises(ECGDataError, match="V5"):
        load_beat_folder(tmp_path, leads=["V5"])
    with pytest.raises(ECGDataError, match="not found"):
        load_beat_folder(tmp_path, records=["z"])


def test_resampling_keeps_beats_centred(beat_folder):
    ds = load_beat_folder(beat_folder, resample_fs=180, window=64, normalize=False)
    assert ds.fs == 180 and ds.signals.shape[2] == 64 and ds.info["record_fs"] == FS
    assert list(ds.centers[:2]) == [400, 800]  # in the record's own samples; 50 -> 25 < 32
    peaks = ds.signals[:, 0].argmax(dim=-1)
    assert ((peaks - 32).abs() <= 1).all()


def test_cache_round_trip_without_pickle(beat_folder, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    first = load_beat_folder(beat_folder, cache_dir=cache)
    files = list(cache.glob("*.npz"))
    assert len(files) == 1 and "from_cache" not in first.info
    with np.load(files[0], allow_pickle=False) as z:  # plain arrays only
        assert z["signals"].shape == (9, 1, 256)
    second = load_beat_folder(beat_folder, cache_dir=cache)
    assert second.info["from_cache"] == str(files[0])
    assert torch.equal(first.signals, second.signals) and torch.equal(first.labels, second.labels)
    assert list(first.record_ids) == list(second.record_ids)
    assert second.info["dropped_per_record"] == first.info["dropped_per_record"]
    load_beat_folder(beat_folder, cache_dir=cache, window=128)  # other options: another entry
    assert len(list(cache.glob("*.npz"))) == 2
    csv = beat_folder / "b_beats.csv"  # edited labels must not be served from the cache
    pd.DataFrame({"sample": [300, 700], "pvc": [1, 1]}).to_csv(csv, index=False)
    os.utime(csv, ns=(1, 1))
    third = load_beat_folder(beat_folder, cache_dir=cache)
    assert len(third) == 7 and "from_cache" not in third.info


# ---------------------------------------------------------------- errors


def expect_error(folder: Path, culprit: Path, match: str, **kwargs) -> ECGDataError:
    """The load fails with one ECGDataError naming ``culprit``; ``match`` is searched in the
    problem text only (tmp_path folder names contain the test's name, e.g. 'truncated')."""
    with pytest.raises(ECGDataError) as info:
        load_ecg_folder(folder, **kwargs)
    err = info.value
    assert isinstance(err, ValueError) and err.path == culprit and str(culprit) in str(err)
    assert re.search(match, err.problem), err.problem
    return err


def test_missing_dat(beat_folder):
    (beat_folder / "b.dat").unlink()
    expect_error(beat_folder, beat_folder / "b.dat", "not found")


@pytest.mark.parametrize("text", ["garbage header\nno numbers\n", "", "b 1 -360 3000\n"])
def test_corrupt_header(beat_folder, text):
    (beat_folder / "b.hea").write_text(text)
    expect_error(beat_folder, beat_folder / "b.hea", "corrupt WFDB header")


def test_wrong_sampling_rate(beat_folder):
    write_record(beat_folder, "c", fs=250, beats=[1000], pvc=[0])
    expect_error(beat_folder, beat_folder / "c.hea", "250 Hz, expected 360 Hz", expected_fs=360)
    # without expected_fs, disagreeing records are still an error
    expect_error(beat_folder, beat_folder / "c.hea", "differs")


def test_truncated_dat(beat_folder):
    dat = beat_folder / "a.dat"
    with open(dat, "r+b") as f:
        f.truncate(dat.stat().st_size - 100)
    expect_error(beat_folder, dat, "truncated signal file: 5900 bytes, the header needs 6000")


def test_beat_beyond_the_signal(beat_folder):
    pd.DataFrame({"sample": [300, 3000], "pvc": [0, 1]}).to_csv(beat_folder / "b_beats.csv",
                                                               index=False)
    expect_error(beat_folder, beat_folder / "b_beats.csv", "outside the record's 3000 samples")


@pytest.mark.parametrize(
    "frame,match",
    [
        ({"sample": [300], "label": [0]}, r"missing column\(s\) \['pvc'\]"),
        ({"sample": [300.5], "pvc": [0]}, "non-integer"),
        ({"sample": [300, None], "pvc": [0, 1]}, "non-integer"),
        ({"sample": [-1], "pvc": [0]}, "outside"),
        ({"sample": [300], "pvc": [2]}, "0 or 1"),
    ],
)
def test_malformed_beats_file(beat_folder, frame, match):
    pd.DataFrame(frame).to_csv(beat_folder / "b_beats.csv", index=False)
    expect_error(beat_folder, beat_folder / "b_beats.csv", match)


def test_beats_file_without_record_and_record_without_beats(beat_folder):
    pd.DataFrame({"sample": [1], "pvc": [0]}).to_csv(beat_folder / "zz_beats.csv", index=False)
    expect_error(beat_folder, beat_folder / "zz_beats.csv", "without a record")
    (beat_folder / "zz_beats.csv").unlink()
    (beat_folder / "a_beats.csv").unlink()
    expect_error(beat_folder, beat_folder / "a.hea", "without labels")
    assert set(load_beat_folder(beat_folder, records=["b"]).record_ids) == {"b"}


def test_unrecognised_folder(tmp_path):
    with pytest.raises(ECGDataError, match="no ECG layout"):
        load_ecg_folder(tmp_path)
    with pytest.raises(ECGDataError, match="not a folder"):
        detect_layout(tmp_path / "missing")


# ---------------------------------------------------------------- PTB-XL layout

STATEMENTS = pd.DataFrame(
    {"diagnostic": [1, 1, 1, 1, 1, None], "diagnostic_class": ["NORM", "MI", "STTC", "CD", "HYP",
                                                               None]},
    index=pd.Index(["NORM", "IMI", "NDT", "CLBBB", "LVH", "SR"], name=""),
)
#: (scp_codes, superclasses with the benchmark rule, with min_likelihood=15)
PTBXL_ROWS = [
    ("{'NORM': 100.0, 'SR': 0.0}", {"NORM"}, {"NORM"}),
    ("{'IMI': 15.0, 'LVH': 0.0, 'SR': 0.0}", {"MI", "HYP"}, {"MI"}),
    ("{'SR': 0.0}", set(), set()),
    ("{'CLBBB': 100.0, 'NDT': 50.0}", {"CD", "STTC"}, {"CD", "STTC"}),
    ("{'LVH': 35.0}", {"HYP"}, {"HYP"}),
    ("{'NORM': 80.0}", {"NORM"}, {"NORM"}),
]


def make_ptbxl(folder: Path, fs: int = 100, rows=PTBXL_ROWS) -> Path:
    """A PTB-XL-shaped folder: 12-lead 10 s records under records100/ and records500/."""
    leads = ("I", "II", "III", "AVR", "AVL", "AVF", "V1", "V2", "V3", "V4", "V5", "V6")
    entries = []
    for i, (codes, _, _) in enumerate(rows, start=1):
        for rate, suffix in ((100, "lr"), (500, "hr")):
            sub = folder / f"records{rate}" / "00000"
            sub.mkdir(parents=True, exist_ok=True)
            write_record(sub, f"{i:05d}_{suffix}", n=10 * rate, fs=fs if rate == 100 else rate,
                         leads=leads, seed=i)
        entries.append({"ecg_id": i, "patient_id": float(100 + i // 2), "scp_codes": codes,
                        "strat_fold": [1, 9, 3, 10, 8, 10][i - 1],
                        "filename_lr": f"records100/00000/{i:05d}_lr",
                        "filename_hr": f"records500/00000/{i:05d}_hr"})
    pd.DataFrame(entries).to_csv(folder / "ptbxl_database.csv", index=False)
    STATEMENTS.to_csv(folder / "scp_statements.csv")
    return folder


def multi_hot(classes: set[str]) -> list[float]:
    return [1.0 if c in classes else 0.0 for c in SUPERCLASSES]


def test_ptbxl_superclass_mapping_and_folds(tmp_path):
    ds = load_ecg_folder(make_ptbxl(tmp_path))
    assert detect_layout(tmp_path) == "ptbxl" and ds.layout == "ptbxl"
    assert ds.class_names == SUPERCLASSES == ("NORM", "MI", "STTC", "CD", "HYP")
    assert ds.signals.shape == (5, 12, 1000) and ds.fs == 100 and len(ds.lead_names) == 12
    assert list(ds.record_ids) == ["1", "2", "4", "5", "6"]  # record 3 has no superclass
    assert ds.info["dropped_unlabelled"] == 1
    expected = [multi_hot(b) for _, b, _ in PTBXL_ROWS if b]
    assert ds.labels.tolist() == expected
    assert list(ds.patient_ids) == ["100", "101", "102", "102", "103"]
    assert list(ds.folds) == [1, 9, 10, 8, 10]
    split = ptbxl_fold_indices(ds)
    assert [list(split[k]) for k in ("train", "valid", "test")] == [[0, 3], [1], [2, 4]]


def test_ptbxl_likelihood_threshold_and_unlabelled(tmp_path):
    make_ptbxl(tmp_path)
    strict = load_ptbxl(tmp_path, min_likelihood=15)
    assert strict.labels.tolist() == [multi_hot(s) for _, _, s in PTBXL_ROWS if s]
    kept = load_ptbxl(tmp_path, drop_unlabelled=False, max_records=3)
    assert kept.labels.tolist() == [multi_hot(b) for _, b, _ in PTBXL_ROWS[:3]]


def test_ptbxl_500hz_and_cache(tmp_path, tmp_path_factory):
    make_ptbxl(tmp_path)
    cache = tmp_path_factory.mktemp("cache")
    hr = load_ptbxl(tmp_path, sampling_rate=500, cache_dir=cache)
    assert hr.signals.shape == (5, 12, 5000) and hr.fs == 500
    again = load_ptbxl(tmp_path, sampling_rate=500, cache_dir=cache)
    assert "from_cache" in again.info and torch.equal(again.signals, hr.signals)
    assert list(again.folds) == list(hr.folds) and list(again.patient_ids) == list(hr.patient_ids)


def test_ptbxl_errors(tmp_path):
    make_ptbxl(tmp_path, fs=250)  # records100/ holding 250 Hz records
    hea = tmp_path / "records100" / "00000" / "00001_lr.hea"
    expect_error(tmp_path, hea, "250 Hz, expected 100 Hz")
    db = pd.read_csv(tmp_path / "ptbxl_database.csv")
    db.loc[0, "scp_codes"] = "__import__('os').getcwd()"
    db.to_csv(tmp_path / "ptbxl_database.csv", index=False)
    with pytest.raises(ECGDataError, match="not a dict"):
        load_ptbxl(tmp_path, sampling_rate=500)
    db.drop(columns=["strat_fold"]).to_csv(tmp_path / "ptbxl_database.csv", index=False)
    expect_error(tmp_path, tmp_path / "ptbxl_database.csv", "strat_fold")


def test_parse_scp_codes_never_evaluates():
    assert parse_scp_codes("{'NORM': 100.0, 'SR': 0}") == {"NORM": 100.0, "SR": 0.0}
    for bad in ["[1, 2]", "{'A': 'x'}", "os.system('true')", "{1: 2.0}", None]:
        with pytest.raises(ECGDataError):
            parse_scp_codes(bad)  # type: ignore[arg-type]


# ---------------------------------------------------------------- splits


IDS = [f"r{i}" for i in range(11)]


def test_split_is_deterministic_disjoint_and_complete():
    a, b = split_records(IDS, seed=3), split_records(IDS, seed=3)
    assert a == b
    groups = a.groups()
    assert [len(g) for g in groups.values()] == [5, 3, 3]
    assert sorted(sum(groups.values(), ())) == sorted(IDS)
    assert len({split_records(IDS, seed=s) for s in range(10)}) > 5


def test_split_puts_positives_in_finetune_and_test():
    positives = {"r0": 800, "r1": 500, "r2": 100, **{f"r{i}": 2 for i in range(3, 11)}}
    for seed in range(20):
        s = split_records(IDS, seed=seed, positives=positives, min_positive_fraction=0.2)
        for group in (s.finetune, s.test):
            assert sum(positives[r] for r in group) >= 0.2 * 1416
    with pytest.raises(ValueError, match="no split"):
        split_records(IDS, positives={"r0": 1}, max_tries=50)
    with pytest.raises(ValueError, match="no record"):
        split_records(IDS, positives={})


def test_split_with_empty_group_and_too_few_records():
    s = split_records(IDS[:4], fractions=(0, 0.7, 0.3), seed=0)
    assert s.pretrain == () and len(s.finetune) == 3 and len(s.test) == 1
    with pytest.raises(ValueError, match="cannot fill"):
        split_records(["a", "b"], fractions=(1, 1, 1))


def test_split_dataset_never_shares_a_patient(beat_folder):
    for name, seed in (("c", 2), ("d", 3), ("e", 4)):
        write_record(beat_folder, name, beats=[500, 900, 1300], pvc=[1, 0, 0], seed=seed)
    ds = load_beat_folder(beat_folder)
    split = split_dataset(ds, fractions=(0.4, 0.3, 0.3), seed=0)
    idx = split.indices(ds)
    assert sum(len(v) for v in idx.values()) == len(ds)
    owners = {k: set(ds.patient_ids[v]) for k, v in idx.items()}
    assert not owners["pretrain"] & owners["finetune"]
    assert not owners["finetune"] & owners["test"] and not owners["pretrain"] & owners["test"]
    assert all(ds.subset(idx[k]).labels.sum() > 0 for k in ("finetune", "test"))
    sub = ds.subset(idx["test"])
    assert set(sub.record_ids) == set(split.test) and len(sub.centers) == len(sub)
