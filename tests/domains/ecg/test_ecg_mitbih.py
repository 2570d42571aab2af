"""The loader on the real MIT-BIH subset in ../shared/data/mitbih (skipped where it is absent)."""

import time
from pathlib import Path

import numpy as np
import pytest

from metapt.domains.ecg.data import ECGDataset, load_ecg_folder
from metapt.domains.ecg.splits import split_dataset

MITBIH = Path(__file__).resolve().parents[3].parent / "shared" / "data" / "mitbih"
RECORDS = ["100", "102", "104", "105", "106", "108", "114", "116", "121", "123", "200"]
#: PVC counts per record quoted in the folder's README.md
README_PVCS = {"106": 520, "200": 826, "116": 109, "100": 1, "121": 1, "104": 2, "123": 3,
               "102": 4}

pytestmark = pytest.mark.skipif(
    not (MITBIH / "README.md").is_file(),
    reason=f"MIT-BIH subset not found at {MITBIH} (the repository's sibling shared/data/mitbih)",
)


@pytest.fixture(scope="module")
def mitbih() -> ECGDataset:
    start = time.perf_counter()
    ds = load_ecg_folder(MITBIH, expected_fs=360)
    print(f"\nloaded {MITBIH} in {time.perf_counter() - start:.2f} s: {len(ds)} windows, "
          f"{ds.info['dropped_at_edges']} beats dropped at record edges")
    return ds


def test_counts_match_the_readme(mitbih):
    info = mitbih.info
    assert info["beats_in_files"] == 23_324 and info["pvc_in_files"] == 1_567
    dropped = info["dropped_at_edges"]
    assert len(mitbih) + dropped == 23_324
    assert dropped < 20  # only beats within 128 samples of a record's start or end
    assert 1_567 - dropped <= int(mitbih.labels.sum()) <= 1_567
    pvcs = mitbih.positives_per_patient()
    for rec, n in README_PVCS.items():
        assert n - info["dropped_per_record"][rec] <= pvcs[rec] <= n


def test_shape_rate_and_patients(mitbih):
    assert mitbih.signals.shape[1:] == (1, 256) and mitbih.fs == 360
    assert mitbih.lead_names == ("MLII",)
    assert sorted(set(mitbih.record_ids)) == RECORDS
    assert mitbih.info["load_seconds"] < 30


def test_windows_are_centred_on_the_r_peaks(mitbih):
    profile = mitbih.signals[:, 0].abs().mean(dim=0)  # mean |z-score| at each offset
    assert int(profile.argmax()) in range(124, 133)
    assert profile[128] > 5 * profile[:32].mean()


def test_patient_split_puts_pvcs_in_finetune_and_test(mitbih):
    total = int(mitbih.labels.sum())
    for seed in range(5):
        split = split_dataset(mitbih, seed=seed)
        assert split == split_dataset(mitbih, seed=seed)
        idx = split.indices(mitbih)
        assert sorted(np.concatenate(list(idx.values()))) == list(range(len(mitbih)))
        for group in ("finetune", "test"):
            assert mitbih.subset(idx[group]).labels.sum() >= 0.1 * total
        assert not set(split.test) & (set(split.pretrain) | set(split.finetune))
