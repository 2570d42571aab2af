"""Loaders for the molecule data shipped with metapt, and the splits used on them.

* ChEMBL pre-training (``data/chembl_pretrain.csv.gz``): 35,633 molecules x 30 binary
  activity tasks from MoleculeACE (active = Ki/EC50 <= :data:`ACTIVE_THRESHOLD_NM`), about
  4.6 % of the entries observed, NaN elsewhere.
* B3DB (``data/b3db_classification.csv.gz``): blood-brain-barrier permeability (BBB+ = 1) with
  a deterministic Bemis-Murcko scaffold split 80/10/10 as in Hu et al. (2020).

``scripts/build_molecule_data.py`` rebuilds both files from the upstream wheels; see
``data/README.md`` for licences and attribution. The files are read with the standard
library (gzip + csv), so loading needs neither pandas nor pickle.
"""

from __future__ import annotations

import csv
import functools
import gzip
import importlib.resources
import io
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rdkit import Chem, rdBase
from rdkit.Chem.Scaffolds import MurckoScaffold

from ...errors import DataError

__all__ = [
    "ACTIVE_THRESHOLD_NM",
    "CHEMBL_FILE",
    "B3DB_FILE",
    "ChemblPretraining",
    "B3DB",
    "HeldOutSplit",
    "load_chembl_pretraining",
    "load_b3db",
    "murcko_scaffold",
    "scaffold_split",
    "split_targets",
    "held_out_split",
]

#: A ChEMBL measurement (mean Ki or EC50 of a molecule on a target) counts as active when it
#: is at or below this concentration; 100 nM is a common potency cut-off and gives ~55 % actives.
ACTIVE_THRESHOLD_NM = 100.0

CHEMBL_FILE = "chembl_pretrain.csv.gz"
B3DB_FILE = "b3db_classification.csv.gz"
SPLIT_NAMES = ("train", "valid", "test")


@contextmanager
def _open_text(path: str | os.PathLike[str] | None, default_name: str) -> Iterator[io.TextIOBase]:
    """Open a shipped (or user-given) gzipped CSV as text."""
    if path is None:
        resource = importlib.resources.files("metapt.domains.molecules").joinpath("data").joinpath(default_name)
        with importlib.resources.as_file(resource) as real_path:
            if not real_path.exists():
                raise FileNotFoundError(
                    f"{real_path} is missing from the installed package; rebuild it with "
                    "`python scripts/build_molecule_data.py` or reinstall metapt"
                )
            with gzip.open(real_path, "rt", newline="") as f:
                yield f
    else:
        p = Path(path)
        opener = gzip.open if p.suffix == ".gz" else open
        with opener(p, "rt", newline="") as f:  # type: ignore[operator]
            yield f


def _read_columns(path: str | os.PathLike[str] | None, default_name: str) -> dict[str, list[str]]:
    with _open_text(path, default_name) as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise DataError(f"{path or default_name} is empty: a CSV with a header row is expected")
        rows = list(reader)
    return {name: [row[j] for row in rows] for j, name in enumerate(header)}


def _require(columns: dict[str, list[str]], names: Sequence[str], what: str) -> None:
    missing = [n for n in names if n not in columns]
    if missing:
        raise ValueError(
            f"{what} lacks columns {missing}; regenerate it with `python scripts/build_molecule_data.py`"
        )


# --------------------------------------------------------------------------------------------
# ChEMBL pre-training matrix
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ChemblPretraining:
    """Multitask pre-training data: one row per unique molecule, one column per ChEMBL target."""

    smiles: list[str]  # RDKit canonical SMILES
    labels: torch.Tensor  # float32 [N, T]: 1 active, 0 inactive, NaN not measured
    target_names: list[str]  # e.g. "CHEMBL1862_Ki"
    scaffolds: list[str]  # Bemis-Murcko scaffold SMILES (with chirality), "" when acyclic

    def __len__(self) -> int:
        return len(self.smiles)

    @property
    def num_tasks(self) -> int:
        return len(self.target_names)

    @property
    def fill_fraction(self) -> float:
        return float((~self.labels.isnan()).float().mean())


def load_chembl_pretraining(path: str | os.PathLike[str] | None = None) -> ChemblPretraining:
    """Load the shipped ChEMBL/MoleculeACE label matrix (or the CSV at ``path``)."""
    cols = _read_columns(path, CHEMBL_FILE)
    _require(cols, ["smiles", "scaffold"], "the ChEMBL pre-training CSV")
    targets = [c for c in cols if c not in ("smiles", "scaffold")]
    if not targets:
        raise ValueError("the ChEMBL pre-training CSV has no target columns; rebuild it with scripts/build_molecule_data.py")
    raw = np.array([cols[t] for t in targets], dtype=np.str_).T  # [N, T] of "", "0", "1"
    labels = np.where(raw == "", "nan", raw).astype(np.float32)
    return ChemblPretraining(
        smiles=cols["smiles"], labels=torch.from_numpy(labels), target_names=targets, scaffolds=cols["scaffold"]
    )


TARGETS_FILE = "chembl_targets.csv"


@functools.cache
def _target_names() -> dict[str, str]:
    resource = importlib.resources.files("metapt.domains.molecules").joinpath("data").joinpath(TARGETS_FILE)
    with resource.open("r", encoding="utf-8", newline="") as f:
        return {row["chembl_id"]: row["target_name"] for row in csv.DictReader(f)}


def target_name(task: str) -> str:
    """The readable name of a pre-training column or held-out task: ``"CHEMBL235_EC50"`` →
    ``"Peroxisome proliferator-activated receptor gamma (CHEMBL235, EC50)"``.

    From the shipped fact table (``data/chembl_targets.csv``, sourced in ``data/README.md``);
    an ID it does not list comes back unchanged.
    """
    chembl_id, _, measure = task.partition("_")
    name = _target_names().get(chembl_id)
    if name is None:
        return task
    return f"{name} ({chembl_id}{', ' + measure if measure else ''})"


# --------------------------------------------------------------------------------------------
# B3DB downstream task
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class B3DB:
    """Blood-brain-barrier permeability classification with a fixed scaffold split."""

    smiles: list[str]  # RDKit canonical SMILES
    labels: torch.Tensor  # float32 [N], 1 = BBB+ (permeable)
    split: dict[str, torch.Tensor]  # "train" / "valid" / "test" -> long row indices
    scaffolds: list[str]

    def __len__(self) -> int:
        return len(self.smiles)


def load_b3db(path: str | os.PathLike[str] | None = None) -> B3DB:
    """Load the shipped B3DB classification set (or the CSV at ``path``)."""
    cols = _read_columns(path, B3DB_FILE)
    _require(cols, ["smiles", "label", "scaffold", "split"], "the B3DB CSV")
    split_col = np.array(cols["split"], dtype=np.str_)
    unknown = set(split_col.tolist()) - set(SPLIT_NAMES)
    if unknown:
        raise ValueError(f"the B3DB CSV has unknown split names {sorted(unknown)}; expected {SPLIT_NAMES}")
    return B3DB(
        smiles=cols["smiles"],
        labels=torch.tensor([float(v) for v in cols["label"]], dtype=torch.float32),
        split={name: torch.from_numpy(np.flatnonzero(split_col == name)) for name in SPLIT_NAMES},
        scaffolds=cols["scaffold"],
    )


# --------------------------------------------------------------------------------------------
# Scaffold split (Hu et al. 2020, chem/splitters.py)
# --------------------------------------------------------------------------------------------
def murcko_scaffold(smiles: str, include_chirality: bool = True) -> str:
    """Bemis-Murcko scaffold SMILES ("" for acyclic molecules); ValueError if RDKit rejects it."""
    with rdBase.BlockLogs():
        mol = Chem.MolFromSmiles(smiles)
    if mol is None:
        raise ValueError(f"invalid SMILES {smiles!r}: drop invalid molecules before splitting by scaffold")
    return MurckoScaffold.MurckoScaffoldSmiles(mol=mol, includeChirality=include_chirality)


def scaffold_split(
    scaffolds: Sequence[str],
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
) -> dict[str, torch.Tensor]:
    """Deterministic scaffold split, as Hu et al. (and DeepChem) do it.

    Molecules are grouped by scaffold; groups go, largest first (ties: larger first index
    first), to train while train stays within its share, then to valid, then to test. No
    scaffold is shared between splits, and the test set holds the rarest scaffolds.
    Pass scaffolds (e.g. ``[murcko_scaffold(s) for s in smiles]``); the shipped files store them.
    """
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"fractions must be three non-negative numbers summing to 1, got {fractions}")
    groups: dict[str, list[int]] = {}
    for i, scaffold in enumerate(scaffolds):
        groups.setdefault(scaffold, []).append(i)
    ordered = sorted(groups.values(), key=lambda g: (len(g), g[0]), reverse=True)
    n = len(scaffolds)
    train_cut, valid_cut = fractions[0] * n, (fractions[0] + fractions[1]) * n
    train: list[int] = []
    valid: list[int] = []
    test: list[int] = []
    for group in ordered:
        if len(train) + len(group) <= train_cut:
            train += group
        elif len(train) + len(valid) + len(group) <= valid_cut:
            valid += group
        else:
            test += group
    return {name: torch.tensor(sorted(idx), dtype=torch.long) for name, idx in zip(SPLIT_NAMES, (train, valid, test))}


# --------------------------------------------------------------------------------------------
# Held-out-task setting: pre-train on 20 ChEMBL targets, fine-tune on the other 10
# --------------------------------------------------------------------------------------------
def split_targets(target_names: Sequence[str], n_pretrain: int = 20, seed: int = 0) -> tuple[list[str], list[str]]:
    """Randomly choose ``n_pretrain`` pre-training targets; the rest are held out.

    Both lists keep the order of ``target_names``.
    """
    names = list(target_names)
    if not 0 < n_pretrain < len(names):
        raise ValueError(f"n_pretrain must be between 1 and {len(names) - 1} for {len(names)} targets, got {n_pretrain}")
    chosen = set(np.random.default_rng(seed).permutation(len(names))[:n_pretrain].tolist())
    return [t for i, t in enumerate(names) if i in chosen], [t for i, t in enumerate(names) if i not in chosen]


@dataclass(frozen=True)
class HeldOutSplit:
    """Rows and columns of the ChEMBL matrix for the held-out-task setting.

    Pre-train on ``labels[pretrain_rows][:, pretrain_tasks]``; fine-tune and evaluate on
    ``labels[finetune_split[s]][:, finetune_tasks]`` (multitask, NaN = missing).
    """

    pretrain_targets: list[str]
    finetune_targets: list[str]
    pretrain_tasks: torch.Tensor  # long column indices
    finetune_tasks: torch.Tensor  # long column indices
    pretrain_rows: torch.Tensor  # long row indices
    finetune_split: dict[str, torch.Tensor]  # "train"/"valid"/"test" -> long row indices


def held_out_split(
    chembl: ChemblPretraining,
    n_pretrain: int = 20,
    seed: int = 0,
    *,
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
    exclude_eval_from_pretrain: bool = True,
) -> HeldOutSplit:
    """The paper's held-out-task setting on ChEMBL.

    ``seed`` picks the ``n_pretrain`` pre-training targets (:func:`split_targets`). The
    fine-tuning data are the molecules with at least one label on a held-out target, split by
    scaffold (:func:`scaffold_split`). Pre-training uses the molecules with at least one label
    on a pre-training target, minus (by default) the fine-tuning valid/test molecules: several
    targets are near-duplicates (e.g. CHEMBL237 Ki and EC50), so an evaluation molecule's
    pre-training label could otherwise leak its answer.
    """
    pre_names, ft_names = split_targets(chembl.target_names, n_pretrain, seed)
    col = {t: j for j, t in enumerate(chembl.target_names)}
    pre_tasks = torch.tensor([col[t] for t in pre_names], dtype=torch.long)
    ft_tasks = torch.tensor([col[t] for t in ft_names], dtype=torch.long)
    observed = ~chembl.labels.isnan()

    ft_rows = torch.nonzero(observed[:, ft_tasks].any(dim=1)).flatten()
    local = scaffold_split([chembl.scaffolds[i] for i in ft_rows.tolist()], fractions)
    ft_split = {name: ft_rows[idx] for name, idx in local.items()}

    pre_mask = observed[:, pre_tasks].any(dim=1)
    if exclude_eval_from_pretrain:
        pre_mask[ft_split["valid"]] = False
        pre_mask[ft_split["test"]] = False
    return HeldOutSplit(
        pretrain_targets=pre_names,
        finetune_targets=ft_names,
        pretrain_tasks=pre_tasks,
        finetune_tasks=ft_tasks,
        pretrain_rows=torch.nonzero(pre_mask).flatten(),
        finetune_split=ft_split,
    )
