"""The many-auxiliary-tasks setting (issue 24): RDKit motif tasks of the pre-training molecules,
task groups, the one-group controls, and the setting end to end from the CLI."""

import json

import pytest
import torch
import yaml
from rdkit import Chem
from rdkit.Chem import Fragments
from typer.testing import CliRunner

from metapt.cli import app
from metapt.config import load_config
from metapt.domains.molecules import problem as problem_module
from metapt.domains.molecules.data import B3DB, load_chembl_pretraining
from metapt.domains.molecules.featurize import smiles_to_graph
from metapt.domains.molecules.job import VARIANTS, group_means
from metapt.domains.molecules.models import GINEncoder
from metapt.domains.molecules.motifs import fragment_names, motif_presence, motif_tasks
from metapt.domains.molecules.problem import (MoleculesProblem, add_junk_tasks, keep_task_groups, load_molecule_data,
                                              task_group)


@pytest.fixture(scope="module")
def chembl():
    return load_chembl_pretraining()


def test_motif_labels_are_rdkit_fragment_presence_and_deterministic(chembl, tmp_path):
    smiles = chembl.smiles[:150]
    first = motif_tasks(smiles, cache_dir=tmp_path)
    cached = motif_tasks(smiles, cache_dir=tmp_path)
    fresh = motif_tasks(smiles, cache=False)
    assert not first.from_cache and cached.from_cache
    for other in (cached, fresh):
        assert other.names == first.names and other.dropped == first.dropped
        assert torch.equal(other.labels, first.labels)
    assert first.labels.dtype == torch.float32 and not first.labels.isnan().any()
    # presence is RDKit's own fr_* count > 0, column by column
    mols = [Chem.MolFromSmiles(s) for s in smiles[:40]]
    for j, name in enumerate(first.names):
        assert name.startswith("motif:fr_")
        fn = getattr(Fragments, name.removeprefix("motif:"))
        assert first.labels[:40, j].tolist() == [float(fn(m) > 0) for m in mols], name
    # a cache entry that does not match is rebuilt, with a warning
    (path,) = tmp_path.glob("motifs-*.npz")
    path.write_bytes(b"not a zip")
    with pytest.warns(UserWarning, match="unreadable"):
        again = motif_tasks(smiles, cache_dir=tmp_path)
    assert torch.equal(again.labels, first.labels) and not again.from_cache


def test_constant_rare_and_duplicate_motifs_are_dropped():
    # every molecule has a benzene ring, one of ten an azide, none a nitro group; two are phenols
    smiles = ["c1ccccc1O", "c1ccccc1CO", "c1ccccc1CCN", "c1ccccc1C(=O)O", "c1ccccc1OC", "c1ccccc1CN=[N+]=[N-]",
              "c1ccccc1Cl", "c1ccccc1CC(=O)N", "Oc1ccc(C)cc1", "c1ccccc1CCCC"]
    tasks = motif_tasks(smiles, min_fraction=0.15, cache=False)  # at least 2 molecules must have, and lack, it
    assert tasks.min_count == 2
    assert tasks.dropped["fr_benzene"].startswith("constant: every molecule")
    assert tasks.dropped["fr_azide"].startswith("rare: 1 of 10")
    assert tasks.dropped["fr_nitro"].startswith("constant: no molecule")
    # the phenols: fr_Ar_OH, fr_phenol and fr_phenol_noOrthoHbond mark the same two molecules here
    assert tasks.dropped["fr_phenol"] == tasks.dropped["fr_phenol_noOrthoHbond"] == "duplicate of fr_Ar_OH"
    assert "motif:fr_Ar_OH" in tasks.names
    assert len(tasks.names) + len(tasks.dropped) == len(fragment_names()) == 85
    counts = tasks.labels.sum(0)
    assert ((counts >= 2) & (counts <= 8)).all()
    columns = {tuple(c) for c in tasks.labels.T.tolist()}
    assert len(columns) == len(tasks.names)  # no two tasks alike
    with pytest.raises(ValueError, match="invalid SMILES"):
        motif_presence(["c1ccccc1", "not a molecule"], cache=False)


def _fake_b3db(rows: int) -> B3DB:
    """A downstream set whose molecules carry fragments the pre-training subset lacks (azide, nitroso,
    isothiocyanate), with labels: pre-training must not change when it replaces B3DB."""
    base = ["CCN=[N+]=[N-]", "CCCN=O", "CCN=C=S", "c1ccccc1N=[N+]=[N-]", "CC(C)N=O", "OCCN=C=S"]
    smiles = ["C" * (i // len(base)) + base[i % len(base)] for i in range(rows)]
    split = {"train": torch.arange(0, rows - 20), "valid": torch.arange(rows - 20, rows - 10),
             "test": torch.arange(rows - 10, rows)}
    return B3DB(smiles=smiles, labels=torch.tensor([float(i % 2) for i in range(rows)]), split=split,
                scaffolds=["" if "c1" not in s else "c1ccccc1" for s in smiles])


def _key(graph) -> tuple:
    return tuple(graph[k].numpy().tobytes() for k in ("x", "edge_index", "edge_attr"))


def test_motif_tasks_see_only_the_pretraining_molecules(tmp_path, monkeypatch):
    seen = []
    real = problem_module.compute_motif_tasks

    def spy(smiles, *args, **kwargs):
        seen.append(list(smiles))
        return real(smiles, *args, **kwargs)

    monkeypatch.setattr(problem_module, "compute_motif_tasks", spy)
    for setting in ("heldout", "b3db"):
        seen.clear()
        data = load_molecule_data(setting, max_pretrain=150, max_downstream=60, motif_tasks=True, cache_dir=tmp_path)
        (pt_smiles,) = seen  # the motif tasks were made from exactly the pre-training molecules, row by row
        assert [_key(smiles_to_graph(s)) for s in pt_smiles] == [_key(data.pretrain[int(k)])
                                                                 for k in data.pretrain_positions]
        if setting == "heldout":  # held-out evaluation molecules are ChEMBL molecules: none of them
            evaluation = {_key(data.downstream[int(k)]) for part in ("valid", "test") for k in data.split[part]}
            assert evaluation and not evaluation & {_key(smiles_to_graph(s)) for s in pt_smiles}
        motif = [j for j, n in enumerate(data.pretrain_task_names) if task_group(n) == "motif"]
        expected = motif_tasks(pt_smiles, cache_dir=tmp_path)
        assert [data.pretrain_task_names[j] for j in motif] == expected.names
        assert torch.equal(data.pretrain_labels[:, motif], expected.labels)
        assert not set(data.downstream_task_names) & set(data.pretrain_task_names)

    # other downstream molecules and labels (rich in fragments pre-training lacks) change nothing
    reference = load_molecule_data("b3db", max_pretrain=150, max_downstream=60, motif_tasks=True, cache_dir=tmp_path)
    monkeypatch.setattr(problem_module, "load_b3db", lambda: _fake_b3db(90))
    swapped = load_molecule_data("b3db", max_pretrain=150, max_downstream=60, motif_tasks=True, cache_dir=tmp_path)
    assert swapped.downstream_labels.shape[0] != 0 and swapped.downstream.index.numel() != 0
    assert swapped.pretrain_task_names == reference.pretrain_task_names
    assert torch.equal(swapped.pretrain_labels.nan_to_num(-1), reference.pretrain_labels.nan_to_num(-1))
    assert "fr_azide" in swapped.motifs["dropped"]


def _tiny_data(tmp_path):
    data = load_molecule_data("b3db", max_pretrain=80, max_downstream=40, motif_tasks=True, cache_dir=tmp_path)
    return add_junk_tasks(data, 2, seed=0)


def test_task_groups_and_the_one_group_controls(tmp_path):
    data = _tiny_data(tmp_path)
    groups = [task_group(n) for n in data.pretrain_task_names]
    assert groups == sorted(groups, key=["chembl", "motif", "junk"].index) and set(groups) == {"chembl", "motif", "junk"}
    assert groups.count("chembl") == 30 and groups.count("junk") == 2
    observed = ~data.pretrain_labels.isnan()
    for variant, group in (("chembl_only", "chembl"), ("motifs_only", "motif")):
        enc = GINEncoder(num_layers=1, emb_dim=8, dropout=0.0)
        p = MoleculesProblem(data, enc, VARIANTS[variant], pt_batch_size=16)
        kept = torch.tensor([g == group for g in groups])
        labels = p.data.pretrain_labels
        assert torch.equal(~labels.isnan(), observed & kept)  # the other groups' labels are masked ...
        assert torch.equal(labels[:, kept].nan_to_num(-1), data.pretrain_labels[:, kept].nan_to_num(-1))  # ... only
        assert torch.equal(p.pretrain_batch(0)[0].y.isnan(), ~(observed & kept)[p.pretrain_batch(0)[1]])
        assert p.initial_metaparams()["task_logits"].shape == (len(groups),)
    assert data.pretrain_labels.isnan().sum() == (~observed).sum()  # the data itself is untouched
    without = load_molecule_data("b3db", max_pretrain=80, max_downstream=40, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="motif_tasks=true"):
        keep_task_groups(without, ("motif",))
    assert group_means({"CHEMBL1_Ki": 1.5, "CHEMBL2_Ki": 0.5, "motif:fr_benzene": 0.2, "junk0:motif:fr_benzene": 0.1}) \
        == {"chembl": 1.0, "motif": 0.2, "junk": 0.1}


def test_config_knows_the_many_tasks_setting():
    config = load_config("molecules-motifs")
    assert config.data.motif_tasks and config.data.junk_tasks > 0 and set(config.data.settings) == {"b3db", "heldout"}
    assert {"uniform", "meta_task_weights", "random_task_weights", "chembl_only", "motifs_only"} <= set(config.methods)
    with pytest.raises(Exception, match="data.motif_tasks=true"):
        load_config("molecules-test", ["methods=[uniform,motifs_only]"])
    load_config("molecules-test", ["methods=[uniform,chembl_only]"])  # ChEMBL-only needs no motif tasks


def test_many_tasks_setting_runs_end_to_end_from_the_cli(tmp_path):
    out = tmp_path / "many"
    res = CliRunner().invoke(app, [
        "run", "molecules-test", "--out", str(out), "--threads", "1",
        "--set", "data.settings=[heldout]", "--set", "data.motif_tasks=true", "--set", "data.junk_tasks=2",
        "--set", "methods=[uniform,meta_task_weights,random_task_weights,chembl_only,motifs_only]",
        "--set", "evaluation.linear_probe=null", "--set", "evaluation.seeds=1"])
    assert res.exit_code == 0, res.output
    assert "motif tasks:" in res.output and "(20 chembl," in res.output
    summary = json.loads((out / "summary.json").read_text())
    res_ = summary["settings"]["heldout"]
    assert set(res_["scores"]) == {"uniform weights", "meta task weights", "random task weights", "ChEMBL tasks only",
                                   "motif tasks only"}
    assert "meta task weights − ChEMBL tasks only" in res_["gains"] and "meta task weights − motif tasks only" in res_["gains"]
    groups = res_["data"]["task_groups"]
    assert groups["chembl"] == 20 and groups["junk"] == 2 and groups["motif"] == res_["data"]["motifs"]["kept"] > 20
    learned = res_["learned"]["meta_task_weights"]
    assert set(learned["task_group_weights"]) == {"chembl", "motif", "junk"}
    assert any(t.startswith("motif:fr_") for t in learned["task_weights"])
    assert (out / "task_weights_by_group_heldout.png").is_file()
    assert yaml.safe_load((out / "config.yaml").read_text())["data"]["motif_tasks"] is True
