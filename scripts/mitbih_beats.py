"""Turn PhysioNet's MIT-BIH Arrhythmia Database (mitdb) into the folder the ECG job reads.

    python scripts/mitbih_beats.py SOURCE OUT [--records 100 102 ...]

SOURCE holds PhysioNet's files, ``REC.hea``, ``REC.dat`` and ``REC.atr`` per record
(https://physionet.org/content/mitdb/1.0.0/, Open Data Commons Attribution License v1.0), fetched
with either of

    wget -r -N -c -np -nH --cut-dirs=3 -P mitdb https://physionet.org/files/mitdb/1.0.0/
    python -c "import wfdb; wfdb.dl_database('mitdb', 'mitdb')"

OUT receives, per record, the beat layout of ``metapt run ecg --data OUT``:

* ``REC.hea`` + ``REC.dat``: a one-lead WFDB record (format 16, 360 Hz, in mV): lead MLII where
  the record has it, else its first lead (records 102 and 104 have no MLII), named ``ECG`` in
  every record, since the loader wants the same lead name throughout;
* ``REC_beats.csv``: columns ``sample`` (the beat annotation's 0-based sample index, at the R peak)
  and ``pvc`` (1 for annotation ``V``, a premature ventricular contraction; 0 for every other
  beat annotation). Non-beat annotations (rhythm changes ``+``, noise ``~``, comments, ...) are
  dropped.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

#: WFDB annotation codes that mark a beat (wfdb's ``ann_label_table``, the "beat" group).
BEAT_SYMBOLS = frozenset("NLRBAaJSVrFejnE/fQ?")


def convert(source: Path, out: Path, records: list[str] | None = None) -> list[str]:
    """Write the beat layout of ``records`` (default: every ``*.atr`` in ``source``) to ``out``."""
    import wfdb

    names = records or sorted(p.stem for p in Path(source).glob("*.atr"))
    if not names:
        raise SystemExit(f"{source}: no REC.atr annotation files; download mitdb first (see --help)")
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        header = wfdb.rdheader(str(source / name))
        channel = header.sig_name.index("MLII") if "MLII" in header.sig_name else 0
        rec = wfdb.rdrecord(str(source / name), channels=[channel], physical=True)
        wfdb.wrsamp(name, fs=rec.fs, units=[rec.units[0]], sig_name=["ECG"], p_signal=rec.p_signal,
                    fmt=["16"], write_dir=str(out))
        ann = wfdb.rdann(str(source / name), "atr")
        with open(out / f"{name}_beats.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["sample", "pvc"])
            for sample, symbol in zip(ann.sample, ann.symbol):
                if symbol in BEAT_SYMBOLS:
                    writer.writerow([int(sample), int(symbol == "V")])
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="folder with PhysioNet's REC.hea, REC.dat, REC.atr")
    parser.add_argument("out", type=Path, help="folder to write the beat layout to")
    parser.add_argument("--records", nargs="*", help="record names (default: every REC.atr in SOURCE)")
    args = parser.parse_args()
    names = convert(args.source, args.out, args.records)
    print(f"{len(names)} records written to {args.out}: metapt run ecg --data {args.out}")


if __name__ == "__main__":
    main()
