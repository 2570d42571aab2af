"""The shipped ChEMBL / B3DB files, their loaders, and the scaffold / held-out-task splits."""

from __future__ import annotations

import gzip
import re

import pytest
import torch

from metapt.domains.molecules import (
    held_out_split,
    load_b3db,
    load_chembl_pretraining,
    murcko_scaffold,
    scaffold_split,
    split_targets,
)


@pytest.fixture(scope="module")
def chembl():
    return load_chembl_pretraining()


@pytest.fixture(scope="module")
def b3db():
    return load_b3db()


def test_chembl_matrix(chembl):
    assert len(chembl) == 35_633 and chembl.labels.shape == (35_633, 30) and chembl.num_tasks == 30
    assert chembl.labels.dtype == torch.float32
    assert len(set(chembl.target_names)) == 30
    assert all(re.fullmatch(r"CHEMBL\d+_(Ki|EC50)", t) for t in chembl.target_names)
    assert len(set(chembl.smiles)) == len(chembl.smiles) == len(chembl.scaffolds)
    observed = ~chembl.labels.isnan()
    assert int(observed.sum()) == 48_714  # every MoleculeACE row, no within-target duplicates
    assert 0.044 < chembl.fill_fraction < 0.047
    assert set(chembl.labels[observed].unique().tolist()) == {0.0, 1.0}
    assert 0.53 < float(chembl.labels[observed].mean()) < 0.56  # actives at <= 100 nM
    assert observed.any(dim=1).all()  # each molecule has at least one label


def test_every_pretraining_target_has_its_sourced_name(chembl):
    from metapt.domains.molecules.data import target_name

    names = {t: target_name(t) for t in chembl.target_names}
    assert all(n != t and n.endswith(f"({t.replace('_', ', ')})") for t, n in names.items()), names
    # spot checks against the source (data/README.md): the three PPARs are told apart
    assert names["CHEMBL235_EC50"].startswith("Peroxisome proliferator-activated receptor gamma")
    assert names["CHEMBL3979_EC50"].startswith("Peroxisome proliferator-activated receptor delta")
    assert names["CHEMBL239_EC50"].startswith("Peroxisome proliferator-activated receptor alpha")
    assert names["CHEMBL204_Ki"] == "Prothrombin (CHEMBL204, Ki)"
    assert target_name("BBB+") == "BBB+" and target_name("CHEMBL1_Ki") == "CHEMBL1_Ki"  # unknown: unchanged


def test_b3db(b3db):
    assert len(b3db) == 7_807 - 2  # two SMILES RDKit rejects are dropped at build time
    assert b3db.labels.dtype == torch.float32 and int(b3db.labels.sum()) == 4_956
    sizes = {k: len(v) for k, v in b3db.split.items()}
    assert sum(sizes.values()) == len(b3db)
    assert torch.cat(list(b3db.split.values())).unique().numel() == len(b3db)
    for name, frac in {"train": 0.8, "valid": 0.1, "test": 0.1}.items():
        assert abs(sizes[name] / len(b3db) - frac) < 0.01, sizes
    scaffolds = {name: {b3db.scaffolds[i] for i in idx.tolist()} for name, idx in b3db.split.items()}
    assert not scaffolds["train"] & scaffolds["test"]
    assert not scaffolds["train"] & scaffolds["valid"] and not scaffolds["valid"] & scaffolds["test"]
    for i in range(0, len(b3db), 157):  # the stored scaffolds are the RDKit ones
        assert b3db.scaffolds[i] == murcko_scaffold(b3db.smiles[i])


def test_scaffold_split_is_hu_et_al():
    # groups: a x4 (idx 0,2,4,6), b x3, c x1 (idx 3), d x1 (idx 8), e x1 (idx 9)
    scaffolds = ["a", "b", "a", "c", "a", "b", "a", "b", "d", "e"]
    split = scaffold_split(scaffolds, (0.8, 0.1, 0.1))
    # largest first: a (4) + b (3) -> 7 <= 8; then e (idx 9 > 8 > 3: larger first index first) -> 8
    assert split["train"].tolist() == [0, 1, 2, 4, 5, 6, 7, 9]
    assert split["valid"].tolist() == [8] and split["test"].tolist() == [3]
    assert {k: v.tolist() for k, v in scaffold_split(scaffolds).items()} == {k: v.tolist() for k, v in split.items()}
    with pytest.raises(ValueError, match="sum"):
        scaffold_split(scaffolds, (0.5, 0.1, 0.1))


def test_murcko_scaffold():
    assert murcko_scaffold("CCO") == ""
    assert murcko_scaffold("Cc1ccccc1") == "c1ccccc1"
    with pytest.raises(ValueError, match="invalid SMILES"):
        murcko_scaffold("not a smiles")


def test_split_targets():
    names = [f"T{i}" for i in range(30)]
    pre, held = split_targets(names, 20, seed=0)
    assert len(pre) == 20 and len(held) == 10 and sorted(pre + held, key=names.index) == names
    assert split_targets(names, 20, seed=0) == (pre, held)
    assert split_targets(names, 20, seed=1) != (pre, held)
    with pytest.raises(ValueError, match="n_pretrain"):
        split_targets(names, 30)


def test_held_out_split(chembl):
    s = held_out_split(chembl, n_pretrain=20, seed=0)
    assert len(s.pretrain_tasks) == 20 and len(s.finetune_tasks) == 10
    assert not set(s.pretrain_tasks.tolist()) & set(s.finetune_tasks.tolist())
    assert [chembl.target_names[j] for j in s.finetune_tasks.tolist()] == s.finetune_targets
    observed = ~chembl.labels.isnan()
    ft_rows = torch.cat(list(s.finetune_split.values()))
    assert ft_rows.unique().numel() == len(ft_rows) == int(observed[:, s.finetune_tasks].any(1).sum())
    assert observed[s.pretrain_rows][:, s.pretrain_tasks].any(1).all()
    evaluation = set(s.finetune_split["valid"].tolist()) | set(s.finetune_split["test"].tolist())
    assert not evaluation & set(s.pretrain_rows.tolist())
    train_scaffolds = {chembl.scaffolds[i] for i in s.finetune_split["train"].tolist()}
    assert not train_scaffolds & {chembl.scaffolds[i] for i in s.finetune_split["test"].tolist()}
    assert abs(len(s.finetune_split["train"]) / len(ft_rows) - 0.8) < 0.01


def test_loaders_take_a_path_and_explain_bad_files(tmp_path):
    good = tmp_path / "chembl.csv.gz"
    with gzip.open(good, "wt") as f:
        f.write("smiles,scaffold,CHEMBL1_Ki,CHEMBL2_EC50\nCCO,,1,\nc1ccccc1,c1ccccc1,,0\n")
    data = load_chembl_pretraining(good)
    assert data.smiles == ["CCO", "c1ccccc1"] and data.target_names == ["CHEMBL1_Ki", "CHEMBL2_EC50"]
    assert torch.equal(data.labels.isnan(), torch.tensor([[False, True], [True, False]]))
    bad = tmp_path / "b3db.csv"
    bad.write_text("smiles,label\nCCO,1\n")
    with pytest.raises(ValueError, match="build_molecule_data"):
        load_b3db(bad)
