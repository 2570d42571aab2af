"""SMILES -> graph encoding (Hu et al. 2020 features), invalid-input handling and the cache."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import torch
from rdkit import Chem
from torch_geometric.data import Batch

from metapt.domains.molecules import load_chembl_pretraining
from metapt.domains.molecules.featurize import (
    NUM_ATOM_TYPES,
    NUM_BOND_DIRECTIONS,
    NUM_BOND_TYPES,
    NUM_CHIRALITY_TAGS,
    OTHER_ATOM_TYPE,
    OTHER_BOND_TYPE,
    _mol_arrays,
    _smiles_arrays,
    default_cache_dir,
    featurize_smiles,
    mol_to_graph,
    smiles_to_graph,
)

C, N, O, F = 5, 6, 7, 8  # atom type index = atomic number - 1


def _edge_set(data):
    return {
        (int(s), int(d), int(t), int(r))
        for (s, d), (t, r) in zip(data.edge_index.t().tolist(), data.edge_attr.tolist())
    }


def test_ethanol():
    g = smiles_to_graph("CCO")
    assert g.x.dtype == g.edge_index.dtype == g.edge_attr.dtype == torch.long
    assert g.x.tolist() == [[C, 0], [C, 0], [O, 0]]
    assert g.edge_index.shape == (2, 4) and g.edge_attr.shape == (4, 2)
    assert _edge_set(g) == {(0, 1, 0, 0), (1, 0, 0, 0), (1, 2, 0, 0), (2, 1, 0, 0)}


def test_benzene_is_aromatic_both_directions():
    g = smiles_to_graph("c1ccccc1")
    assert g.num_nodes == 6 and g.edge_index.shape == (2, 12)
    assert (g.edge_attr[:, 0] == 3).all() and (g.edge_attr[:, 1] == 0).all()
    pairs = set(map(tuple, g.edge_index.t().tolist()))
    assert all((d, s) in pairs for s, d in pairs)


def test_double_triple_and_bond_direction():
    g = smiles_to_graph("F/C=C/C#N")
    edges = _edge_set(g)
    assert (1, 2, 1, 0) in edges and (2, 1, 1, 0) in edges  # C=C double, no direction
    assert (3, 4, 2, 0) in edges  # C#N triple
    assert {(0, 1, 0, 1), (1, 0, 0, 1), (2, 3, 0, 1)} <= edges  # "/" -> ENDUPRIGHT
    down = _edge_set(smiles_to_graph("F/C=C\\F"))
    assert (2, 3, 0, 2) in down  # "\" -> ENDDOWNRIGHT
    only_down = _edge_set(smiles_to_graph("F\\C=C\\F"))
    assert {(0, 1, 0, 2), (2, 3, 0, 2)} <= only_down


def test_chiral_centre():
    ccw = smiles_to_graph("C[C@H](N)O").x[:, 1].tolist()
    cw = smiles_to_graph("C[C@@H](N)O").x[:, 1].tolist()
    assert ccw == [0, 2, 0, 0] and cw == [0, 1, 0, 0]


def test_single_atom_has_empty_edges_of_the_right_shape():
    for g in (smiles_to_graph("C"), featurize_smiles(["C"], cache=False)[0]):
        assert g.x.tolist() == [[C, 0]]
        assert g.edge_index.shape == (2, 0) and g.edge_index.dtype == torch.long
        assert g.edge_attr.shape == (0, 2) and g.edge_attr.dtype == torch.long
    batch = Batch.from_data_list([smiles_to_graph("C"), smiles_to_graph("CC")])
    assert batch.edge_index.tolist() == [[1, 2], [2, 1]]


def test_unusual_rdkit_enums_use_the_other_slots():
    assert smiles_to_graph("*CC").x[0, 0] == OTHER_ATOM_TYPE
    assert (smiles_to_graph("C$C").edge_attr[:, 0] == OTHER_BOND_TYPE).all()  # quadruple
    assert (smiles_to_graph("[NH3]->[Cu+2]").edge_attr[:, 0] == OTHER_BOND_TYPE).all()  # dative
    for s in ["*CC", "C$C", "[NH3]->[Cu+2]", "C[C@H](N)O", "F/C=C/F"]:
        g = smiles_to_graph(s)
        assert g.x[:, 0].max() < NUM_ATOM_TYPES and g.x[:, 1].max() < NUM_CHIRALITY_TAGS
        assert g.edge_attr[:, 0].max() < NUM_BOND_TYPES and g.edge_attr[:, 1].max() < NUM_BOND_DIRECTIONS


FAST_PATH_CASES = [
    "CCO", "c1ccccc1", "C", "[Na+].[Cl-]", "F/C=C/F", "F/C=C\\F", "F\\C=C\\F", "C/C=C/C=C\\C", "C[C@H](N)O",
    "N[C@@H](C)C(=O)O", "C$C", "[NH3]->[Cu+2]", "[Cu+2]<-[NH3]", "C~C", "*CC", "[2H]C([2H])O",
    "c1ccc2[nH]ccc2c1", "O=S(=O)(O)c1ccccc1", "C1CC[C@H]2CCCC[C@@H]2C1", "C#N", "[O-][N+](=O)c1ccccc1",
]  # fmt: skip


@pytest.mark.parametrize("smiles", FAST_PATH_CASES)
def test_fast_path_matches_reference_loop(smiles):
    mol = Chem.MolFromSmiles(smiles)
    ref, fast = _mol_arrays(mol), _smiles_arrays(smiles, mol)
    np.testing.assert_array_equal(ref[0], fast[0])
    ref_edges = sorted(zip(*ref[1].tolist(), map(tuple, ref[2].tolist())))
    fast_edges = sorted(zip(*fast[1].tolist(), map(tuple, fast[2].tolist())))
    assert ref_edges == fast_edges
    assert _edge_set(mol_to_graph(mol)) == _edge_set(smiles_to_graph(smiles))


def test_fast_path_matches_reference_on_shipped_sample():
    smiles = load_chembl_pretraining().smiles[::97]  # ~370 real molecules, incl. stereo
    for s in smiles:
        mol = Chem.MolFromSmiles(s)
        ref, fast = _mol_arrays(mol), _smiles_arrays(s, mol)
        np.testing.assert_array_equal(ref[0], fast[0])
        assert sorted(zip(*ref[1].tolist(), map(tuple, ref[2].tolist()))) == sorted(
            zip(*fast[1].tolist(), map(tuple, fast[2].tolist()))
        )


def test_invalid_smiles_are_skipped_counted_and_reported():
    smiles = ["CCO", "not a smiles", "C1CC", "", "c1ccccc1", None]
    with pytest.warns(UserWarning, match="4 invalid SMILES skipped"):
        out = featurize_smiles(smiles, torch.arange(6.0), cache=False)
    assert len(out) == 2 and out.index.tolist() == [0, 4]
    assert out.report.num_input == 6 and out.report.num_valid == 2 and out.report.num_invalid == 4
    assert [i for i, _, _ in out.report.invalid] == [1, 2, 3, 5]
    assert out[1].y.tolist() == [[4.0]] and out[1].idx.tolist() == [4]
    with pytest.raises(ValueError, match="invalid SMILES"):
        smiles_to_graph("not a smiles")
    with pytest.raises(ValueError, match="sequence"):
        featurize_smiles("CCO")
    with pytest.raises(ValueError, match="rows"):
        featurize_smiles(["CCO"], torch.zeros(2), cache=False)


def test_labels_batches_and_fast_collate():
    smiles = ["CCO", "C", "c1ccccc1", "F/C=C/F", "C[C@H](N)O"]
    labels = torch.tensor([[1.0, float("nan")], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0], [float("nan"), 0.0]])
    graphs = featurize_smiles(smiles, labels, cache=False)
    ks = [4, 1, 2, 0]
    slow = Batch.from_data_list([graphs[k] for k in ks])
    fast = graphs.batch(torch.tensor(ks))
    for key in ["x", "edge_index", "edge_attr", "batch", "ptr", "idx"]:
        assert torch.equal(slow[key], fast[key]), key
    assert torch.equal(slow.y.nan_to_num(-1), fast.y.nan_to_num(-1)) and fast.y.shape == (4, 2)
    assert fast.num_graphs == 4 and fast.idx.tolist() == ks
    for a, b in zip(fast.to_data_list(), (graphs[k] for k in ks)):
        assert torch.equal(a.x, b.x) and torch.equal(a.edge_index, b.edge_index)
    assert len(graphs.graphs) == 5


def _graphs_equal(a, b):
    assert len(a) == len(b) and torch.equal(a.index, b.index)
    for ga, gb in zip(a, b):
        for key in ["x", "edge_index", "edge_attr", "idx"]:
            assert torch.equal(ga[key], gb[key])


CACHE_SMILES = ["CCO", "c1ccccc1", "C", "bad(", "C[C@H](N)O", "F/C=C/F", "CC(=O)Nc1ccc(O)cc1"]


def test_cache_round_trip(tmp_path):
    with pytest.warns(UserWarning, match="1 invalid"):
        first = featurize_smiles(CACHE_SMILES, cache_dir=tmp_path)
    assert not first.report.from_cache
    files = os.listdir(tmp_path)
    assert len(files) == 1 and files[0].endswith(".npz")  # no temp file left behind
    with np.load(tmp_path / files[0], allow_pickle=False) as npz:  # no pickle inside
        assert {"x", "edge_index", "edge_attr", "node_ptr", "edge_ptr"} <= set(npz.files)
    with pytest.warns(UserWarning, match="1 invalid"):
        second = featurize_smiles(CACHE_SMILES, cache_dir=tmp_path)
    assert second.report.from_cache and second.report.invalid == first.report.invalid
    _graphs_equal(first, second)
    featurize_smiles(CACHE_SMILES[:3], cache_dir=tmp_path)  # another list -> another key
    assert len(os.listdir(tmp_path)) == 2


@pytest.mark.parametrize("damage", ["garbage", "truncate", "empty"])
def test_corrupt_cache_is_rebuilt(tmp_path, damage):
    smiles = [s for s in CACHE_SMILES if s != "bad("]
    fresh = featurize_smiles(smiles, cache_dir=tmp_path)
    (path,) = tmp_path.iterdir()
    data = path.read_bytes()
    path.write_bytes({"garbage": b"not an npz" * 10, "truncate": data[: len(data) // 2], "empty": b""}[damage])
    with pytest.warns(UserWarning, match="rebuilding"):
        rebuilt = featurize_smiles(smiles, cache_dir=tmp_path)
    assert not rebuilt.report.from_cache
    _graphs_equal(fresh, rebuilt)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = featurize_smiles(smiles, cache_dir=tmp_path)
    assert again.report.from_cache


def test_unwritable_cache_dir_warns_and_continues(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.warns(UserWarning, match="could not write"):
        out = featurize_smiles(["CCO"], cache_dir=blocker / "sub")
    assert len(out) == 1 and out.report.cache_path is None


def test_default_cache_dir_honours_metapt_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("METAPT_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path / "molecules"
    monkeypatch.delenv("METAPT_CACHE")
    assert default_cache_dir().parts[-3:] == (".cache", "metapt", "molecules")
