#!/usr/bin/env python
"""Rebuild metapt's shipped molecule data from the two upstream wheels.

    python scripts/build_molecule_data.py                      # downloads the wheels with pip
    python scripts/build_molecule_data.py --moleculeace-wheel MoleculeACE-3.0.0-py3-none-any.whl \
        --b3db-wheel qc_b3db-1.1.1-py3-none-any.whl

Writes (deterministically: gzip mtime 0, sorted rows) into src/metapt/domains/molecules/data/:

* chembl_pretrain.csv.gz: smiles, scaffold, then one column per MoleculeACE target file
  (e.g. CHEMBL1862_Ki) with 1 (mean Ki/EC50 <= ACTIVE_THRESHOLD_NM), 0 (above) or empty
  (not measured). Rows: unique RDKit-canonical SMILES, sorted; a molecule measured twice
  on one target gets the mean of its exp_mean values before thresholding.
* b3db_classification.csv.gz: b3db_no, smiles, label (BBB+ = 1), scaffold, split
  (Bemis-Murcko scaffold split 80/10/10, largest scaffold groups to train, as Hu et al.).

The wheels are read as zip files; their (heavy) dependencies are never installed. Canonical
SMILES depend on the RDKit version, so byte-identical output needs the same RDKit.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pandas as pd
from rdkit import Chem, rdBase

from metapt.domains.molecules.data import ACTIVE_THRESHOLD_NM, murcko_scaffold, scaffold_split

MOLECULEACE = ("MoleculeACE", "3.0.0", "c2028c9a75281eab53d3b3e7dc11cbc8ac970d008bac4a0d3927f11ac2024bdc")
B3DB = ("qc-b3db", "1.1.1", "c929f601951e4b0ed56326c94d2cdc2f6b0c24711fbc1e0d7f67e88e330fc959")
TARGET_FILE = re.compile(r"^MoleculeACE/Data/benchmark_data/(CHEMBL\d+_(?:Ki|EC50))\.csv$")
B3DB_MEMBER = "B3DB/B3DB_classification.tsv"
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "src" / "metapt" / "domains" / "molecules" / "data"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def download_wheels(dest: Path) -> tuple[Path, Path]:
    """pip download --no-deps both pinned wheels into ``dest``."""
    specs = [f"{MOLECULEACE[0]}=={MOLECULEACE[1]}", f"{B3DB[0]}=={B3DB[1]}"]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(dest), *specs]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    mace = next(dest.glob("[Mm]olecule[Aa][Cc][Ee]-3.0.0-*.whl"))
    b3db = next(dest.glob("qc_[Bb]3[Dd][Bb]-1.1.1-*.whl"))
    return mace, b3db


def check_hash(path: Path, expected: str, skip: bool) -> None:
    got = sha256(path)
    print(f"{path.name}: sha256 {got}")
    if got != expected and not skip:
        raise SystemExit(
            f"{path} has sha256 {got}, expected {expected}; use the pinned PyPI wheel or pass --skip-hash-check"
        )


def canonical(smiles: str) -> str | None:
    with rdBase.BlockLogs():
        mol = Chem.MolFromSmiles(smiles)
    return None if mol is None else Chem.MolToSmiles(mol)


def build_chembl(wheel: Path) -> pd.DataFrame:
    with zipfile.ZipFile(wheel) as zf:
        members = sorted((m.group(1), name) for name in zf.namelist() if (m := TARGET_FILE.match(name)))
        if len(members) != 30:
            raise SystemExit(f"expected 30 MoleculeACE target files in {wheel}, found {len(members)}")
        frames = []
        for target, name in members:
            df = pd.read_csv(zf.open(name))
            if not {"smiles", "exp_mean [nM]"} <= set(df.columns):
                raise SystemExit(f"{name} lacks the columns smiles / exp_mean [nM]: {list(df.columns)}")
            frames.append(df[["smiles", "exp_mean [nM]"]].assign(target=target))
    raw = pd.concat(frames, ignore_index=True).rename(columns={"exp_mean [nM]": "exp_mean"})
    print(f"MoleculeACE: {len(raw)} rows, {raw.smiles.nunique()} unique SMILES strings, {len(members)} targets")

    canon = {s: canonical(s) for s in raw.smiles.unique()}
    bad = [s for s, c in canon.items() if c is None]
    if bad:
        print(f"  dropped {len(bad)} SMILES RDKit rejects: {bad[:5]}")
    raw["smiles"] = raw.smiles.map(canon)
    raw = raw.dropna(subset=["smiles"])
    mean = raw.groupby(["smiles", "target"], sort=True).exp_mean.mean()
    n_dup = len(raw) - len(mean)
    print(f"  {n_dup} (molecule, target) duplicates after canonicalisation averaged")
    active = (mean <= ACTIVE_THRESHOLD_NM).astype("Int8")
    matrix = active.unstack("target").reindex(columns=[t for t, _ in members]).sort_index()
    matrix = matrix.astype("Int8")
    out = pd.DataFrame({"smiles": matrix.index})
    out["scaffold"] = [murcko_scaffold(s) for s in out.smiles]
    out = pd.concat([out, matrix.reset_index(drop=True)], axis=1)

    values = matrix.to_numpy(dtype="float64", na_value=float("nan"))
    filled = (~pd.isna(values)).sum()
    print(
        f"ChEMBL matrix: {len(out)} molecules x {matrix.shape[1]} targets, fill {filled / values.size:.4f}, "
        f"actives {pd.Series(values.ravel()).dropna().mean():.4f} (threshold {ACTIVE_THRESHOLD_NM:g} nM)"
    )
    return out


def build_b3db(wheel: Path) -> pd.DataFrame:
    with zipfile.ZipFile(wheel) as zf:
        df = pd.read_csv(zf.open(B3DB_MEMBER), sep="\t")
    counts = df["BBB+/BBB-"].value_counts().to_dict()
    print(f"B3DB: {len(df)} rows, labels {counts}")
    if set(counts) != {"BBB+", "BBB-"}:
        raise SystemExit(f"unexpected B3DB labels {sorted(counts)}")
    df["canonical"] = [canonical(s) for s in df.SMILES]
    bad = df[df.canonical.isna()]
    for _, row in bad.iterrows():
        print(f"  dropped invalid SMILES (NO. {row['NO.']}, {row['BBB+/BBB-']}): {row.SMILES}")
    df = df.dropna(subset=["canonical"])
    dup = df.canonical.duplicated(keep="first")
    if dup.any():
        print(f"  dropped {int(dup.sum())} duplicate molecules (kept the first)")
        df = df[~dup]
    out = pd.DataFrame(
        {
            "b3db_no": df["NO."].astype(int).to_numpy(),
            "smiles": df.canonical.to_numpy(),
            "label": (df["BBB+/BBB-"] == "BBB+").astype(int).to_numpy(),
        }
    )
    out["scaffold"] = [murcko_scaffold(s) for s in out.smiles]
    split = scaffold_split(out.scaffold.tolist(), (0.8, 0.1, 0.1))
    out["split"] = ""
    for name, idx in split.items():
        out.loc[idx.numpy(), "split"] = name
    sizes = {name: len(idx) for name, idx in split.items()}
    pos = {name: float(out.label.to_numpy()[idx.numpy()].mean()) for name, idx in split.items()}
    print(
        f"B3DB kept {len(out)} molecules ({int(out.label.sum())} BBB+ / {int((1 - out.label).sum())} BBB-), "
        f"{out.scaffold.nunique()} scaffolds, split {sizes}, BBB+ rate {({k: round(v, 3) for k, v in pos.items()})}"
    )
    return out


def write_csv_gz(df: pd.DataFrame, path: Path) -> None:
    """Byte-reproducible gzip (mtime 0), written atomically."""
    buf = io.StringIO()
    df.to_csv(buf, index=False, lineterminator="\n")
    data = gzip.compress(buf.getvalue().encode(), compresslevel=9, mtime=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, 0o644)  # mkstemp makes it private; these files ship in the package
    os.replace(tmp, path)
    print(f"wrote {path} ({len(data) / 1e6:.2f} MB, sha256 {hashlib.sha256(data).hexdigest()})")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--moleculeace-wheel", type=Path, help="MoleculeACE-3.0.0-py3-none-any.whl (default: pip download)")
    parser.add_argument("--b3db-wheel", type=Path, help="qc_b3db-1.1.1-py3-none-any.whl (default: pip download)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    parser.add_argument("--skip-hash-check", action="store_true", help="accept wheels whose sha256 differs")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        mace, b3db = args.moleculeace_wheel, args.b3db_wheel
        if mace is None or b3db is None:
            got_mace, got_b3db = download_wheels(Path(tmp))
            mace, b3db = mace or got_mace, b3db or got_b3db
        check_hash(mace, MOLECULEACE[2], args.skip_hash_check)
        check_hash(b3db, B3DB[2], args.skip_hash_check)
        chembl = build_chembl(mace)
        bbb = build_b3db(b3db)
    overlap = len(set(chembl.smiles) & set(bbb.smiles))
    print(f"{overlap} B3DB molecules also appear in the ChEMBL pre-training set")
    write_csv_gz(chembl, args.out / "chembl_pretrain.csv.gz")
    write_csv_gz(bbb, args.out / "b3db_classification.csv.gz")


if __name__ == "__main__":
    main()
