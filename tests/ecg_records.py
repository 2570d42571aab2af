"""Generated WFDB records for the ECG tests: narrow normal beats and wide, inverted 'PVCs'.

On the path of every test (``tests/`` holds the root ``conftest.py``): ``from ecg_records import ...``.
"""

import warnings
from pathlib import Path

import numpy as np
import pandas as pd

with warnings.catch_warnings():  # wfdb trips pandas deprecation warnings at import time
    warnings.simplefilter("ignore")
    import wfdb

FS = 360


def write_beat_record(folder: Path, name: str, seed: int, seconds: int = 20, pvc_every: int = 4) -> None:
    """A WFDB record of narrow normal beats and wide, inverted 'PVCs', plus its beats CSV."""
    rng = np.random.default_rng(seed)
    n = seconds * FS
    t = np.arange(n)
    centres = np.arange(200, n - 200, 280) + rng.integers(-20, 20, size=len(np.arange(200, n - 200, 280)))
    pvc = (np.arange(len(centres)) % pvc_every == 1).astype(int)
    sig = 0.05 * rng.standard_normal(n) + 0.2 * np.sin(2 * np.pi * t / (3 * FS) + seed)
    for c, p in zip(centres, pvc):
        sig += (-1.5 if p else 2.0) * np.exp(-0.5 * ((t - c) / (12.0 if p else 4.0)) ** 2)
    wfdb.wrsamp(name, fs=FS, units=["mV"], sig_name=["MLII"], p_signal=sig[:, None], fmt=["16"],
                write_dir=str(folder))
    pd.DataFrame({"sample": centres, "pvc": pvc}).to_csv(folder / f"{name}_beats.csv", index=False)


def write_beat_folder(folder: Path, records: int = 8) -> Path:
    """``records`` beat records named 100, 101, ... in ``folder``."""
    for i in range(records):
        write_beat_record(folder, f"{100 + i}", seed=i)
    return folder
