"""benchmarks/_results.py: a results file names the code that made it, and a benchmark never throws
away a run's work on the user's behalf. Both once went wrong together: a worktree borrowing the
main checkout's venv ran main's code under the worktree's commit, and when main's config format
moved on, the worktree's re-run silently replaced three hours of pre-registered runs."""

import importlib
import sys
import types
from pathlib import Path

import pytest

from metapt.config import load_config, to_yaml
from metapt.runs import RunFolder

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture()
def results(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    module = importlib.import_module("_results")
    calls = []
    monkeypatch.setattr(module, "execute", lambda folder, config, resume=False: calls.append(resume) or {"ran": resume})
    module.calls = calls
    return module


def test_metapt_is_imported_from_this_tree(results):
    results.check_imported_tree()  # the test process imports this checkout's src/
    elsewhere = types.SimpleNamespace(__file__="/elsewhere/checkout/src/metapt/__init__.py")
    with pytest.raises(SystemExit, match="PYTHONPATH=.*src"):
        results.check_imported_tree(elsewhere)
    assert str(ROOT / "src") in sys.path  # put first by the import, before metapt is imported


def _folder(path: Path, config, commit: str, checkpoint: bool) -> None:
    folder = RunFolder.create(path, to_yaml(config))
    folder.commit()
    (path / "made_at_commit").write_text(commit + "\n")
    if checkpoint:
        folder.checkpoint_dir.mkdir(exist_ok=True)
        (folder.checkpoint_dir / "ckpt-000003-0123456789abcdef.pt").write_bytes(b"work")
    folder.unlock()


def test_a_run_with_checkpoints_of_another_config_is_refused_not_replaced(results, tmp_path):
    config = load_config("synthetic")
    _folder(tmp_path / "run", load_config("synthetic", ["pretrain.steps=777"]), "c0", checkpoint=True)
    with pytest.raises(SystemExit, match=r"another config .*pretrain\.steps"):
        results.run_or_reuse(tmp_path / "run", config, "c0")
    assert (tmp_path / "run" / "checkpoints" / "ckpt-000003-0123456789abcdef.pt").read_bytes() == b"work"
    assert results.calls == []


def test_an_unfinished_run_of_another_commit_is_refused(results, tmp_path):
    config = load_config("synthetic")
    _folder(tmp_path / "run", config, "c0", checkpoint=True)
    with pytest.raises(SystemExit, match="made at commit c0"):
        results.run_or_reuse(tmp_path / "run", config, "c1")
    assert results.calls == []
    assert results.run_or_reuse(tmp_path / "run", config, "c0") == {"ran": True}  # same commit: resumed


def test_a_folder_with_nothing_computed_is_replaced_and_a_finished_run_reused(results, tmp_path, capsys):
    config = load_config("synthetic")
    _folder(tmp_path / "run", load_config("synthetic", ["pretrain.steps=777"]), "c0", checkpoint=False)
    assert results.run_or_reuse(tmp_path / "run", config, "c1") == {"ran": False}
    assert "holds no checkpoint" in capsys.readouterr().err
    assert (tmp_path / "run" / "made_at_commit").read_text() == "c1\n"
    (tmp_path / "run" / "summary.json").write_text('{"done": 1}')
    assert results.run_or_reuse(tmp_path / "run", config, "c2") == {"done": 1}  # reused, made_at says c1
    assert results.calls == [False]


def test_the_premise_table_groups_alignment_by_loss_quintile(monkeypatch):
    import numpy as np

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    pn = importlib.import_module("planted_noise")
    loss = np.arange(10, dtype=float)  # quintiles {0,1}, {2,3}, … {8,9}
    flags = np.array([True, False] * 5)  # the even-loss molecule of each quintile is corrupted
    align = np.where(flags, -1.0, 1.0) * (1 + loss)
    got = pn.alignment_by_loss(align, loss, flags)
    assert got["by_loss_quintile"]["corrupted"] == [-1.0, -3.0, -5.0, -7.0, -9.0]
    assert got["by_loss_quintile"]["clean"] == [2.0, 4.0, 6.0, 8.0, 10.0]
    assert got["by_loss_quintile"]["corrupted_share"] == [0.5] * 5
    assert got["corrupted_positive_share"] == 0.0 and got["clean_positive_share"] == 1.0
    # ranks of alignment along the loss order 5,6,4,7,3,8,2,9,1,10: Σd² = 140, ρ = 1 − 6·140/(10·99)
    assert got["spearman_with_loss"] == pytest.approx(1 - 6 * 140 / 990, abs=1e-4)


def test_out_of_fold_loss_scores_each_molecule_with_a_model_that_never_saw_it(monkeypatch):
    import types

    import numpy as np
    import torch

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    pn = importlib.import_module("planted_noise")
    positions = torch.arange(100, 130)
    data = types.SimpleNamespace(pretrain_positions=positions, pretrain_labels=torch.zeros(30, 2))
    # a "model" is the set of positions it was pre-trained on; its "loss" of a molecule is 1 if it saw it
    monkeypatch.setattr(pn.dataclasses, "replace", lambda d, **kw: types.SimpleNamespace(**kw))
    monkeypatch.setattr(pn, "MoleculesProblem", lambda d, *a, **kw: d)
    monkeypatch.setattr(pn, "_encoder", lambda args, seed: None)
    monkeypatch.setattr(pn, "pretrain", lambda args, part, seed: {"params": set(part.pretrain_positions.tolist())})
    monkeypatch.setattr(pn, "current_losses", lambda scorer, seen: np.array(
        [float(p in seen) for p in scorer.pretrain_positions.tolist()]))
    args = types.SimpleNamespace(batch=8)
    for folds in (2, 3):
        loss = pn.out_of_fold_loss(args, data, seed=0, folds=folds)
        assert loss.shape == (30,) and not np.isnan(loss).any()  # every molecule scored once
        assert (loss == 0).all()  # and never by a model that pre-trained on it


def test_min_labels_plants_the_noise_among_molecules_with_that_many_labels(monkeypatch):
    import types

    import torch

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    pn = importlib.import_module("planted_noise")
    args = types.SimpleNamespace(pretrain=300, clean_val=100, downstream=200, cache=None, min_labels=4, corrupt=0.4)
    datas, flagged, clean = pn.planted_data(args, 0)
    observed = ~torch.isnan(clean.pretrain_labels)
    assert len(flagged) == 300 and int(flagged.sum()) == 120 and int(observed.sum(1).min()) >= 4
    # every observed label of a flagged molecule is flipped, and no other label
    y, noisy = clean.pretrain_labels, datas["b3db"].pretrain_labels
    assert torch.equal(torch.isnan(noisy), ~observed)
    assert bool((noisy[observed] != y[observed]).eq(flagged[:, None].expand_as(y)[observed]).all())
    val = datas["chembl"].downstream_labels[datas["chembl"].split["ft_train"]]
    assert int((~torch.isnan(val)).sum(1).min()) >= 4  # the clean held-out molecules come from the same pool
    args.min_labels = 99
    with pytest.raises(SystemExit, match="--min-labels 99"):
        pn.planted_data(args, 0)


@pytest.mark.parametrize("flag", [["--detectability", "1"], ["--detectability", "-2"], ["--min-labels", "0"],
                                  ["--influence", "0.1,0"], ["--influence", "inf"]])
def test_planted_noise_refuses_bad_premise_flags(monkeypatch, capsys, flag):
    import sys

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    pn = importlib.import_module("planted_noise")
    monkeypatch.setattr(sys, "argv", ["planted_noise.py", *flag])
    with pytest.raises(SystemExit) as exit_:
        pn.main()
    assert exit_.value.code == 2 and flag[0] in capsys.readouterr().err


def test_planted_noise_runs_end_to_end_at_a_small_size(tmp_path, monkeypatch):
    # the committed benchmark at CI size, with the options that fixed the sign (fresh head,
    # averaged v) and the sign check; its known answer: the run's fused forward-difference draw
    # and the estimator's central-difference draw estimate the same mixed term at the same state
    import importlib
    import json
    import sys

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    pn = importlib.import_module("planted_noise")
    out = tmp_path / "planted.json"
    monkeypatch.setattr(sys, "argv", [
        "planted_noise.py", "--pretrain", "400", "--clean-val", "200", "--corrupt", "0.4", "--steps", "130",
        "--warmup", "20", "--targets", "chembl_pt", "--optimizers", "lazy_adam", "--estimator", "accumulated",
        "--normalize", "--head-start", "initial", "--direction-decay", "0.9", "--no-downstream",
        "--seeds", "0", "--probe-steps", "120", "--sign-check", "1", "--detectability", "2",
        "--influence", "1e6,0.1", "--out", str(out)])
    pn.main()
    result = json.loads(out.read_text())
    assert result["config"]["head_start"] == "initial" and result["config"]["direction_decay"] == 0.9
    uniform, learned = result["runs"]
    assert 0.0 <= uniform["loss_ranking_auroc"] <= 1.0 and 0.0 <= learned["weight_auroc"] <= 1.0
    assert 0.0 <= uniform["out_of_fold_loss_auroc"] <= 1.0 and uniform["out_of_fold_folds"] == 2
    # the influence probe's known answer: damped by 10⁶·λmax, (H + λI)⁻¹ is I/λ to 10⁻⁶, so it ranks
    # the molecules as the one-step alignment probe does; less damped, it is a different ranking
    influence = uniform["influence_probe"]
    assert influence["1000000.0"]["auroc"] == pytest.approx(uniform["alignment_probe_auroc"], abs=2e-3)
    assert uniform["influence_probe_solve"]["spectrum"]["lambda_max"] > 0
    assert 0.0 <= influence["0.1"]["auroc"] <= 1.0 and influence["0.1"]["within_loss_quintiles"]["mean"] is not None
    check = learned["sign_check_at_step"]["120"]
    assert check["molecules"] > 0
    assert check["spearman_accumulated_draw_vs_derivative"] > 0.9
    assert check["spearman_fused_fresh_draw_vs_derivative"] > 0.9
    assert "Sign check" in out.with_suffix(".md").read_text()


def test_auroc_within_loss_quintiles_is_half_for_a_score_that_only_repeats_the_loss(monkeypatch):
    import numpy as np

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    pn = importlib.import_module("planted_noise")
    loss = np.arange(20, dtype=float)  # quintiles of 4: {0..3}, {4..7}, …
    flags = np.array([False, True, False, True] * 5)
    # the loss itself: within each quintile the corrupted are 1 and 3, the clean 0 and 2 → AUROC 0.75
    got = pn.auroc_within_loss_quintiles(flags, loss, loss)
    assert got["by_loss_quintile"] == [0.75] * 5 and got["mean"] == 0.75
    # a score separating the flag perfectly inside every quintile: 1.0; its negation 0.0
    assert pn.auroc_within_loss_quintiles(flags, flags + 0.01 * loss, loss)["mean"] == 1.0
    assert pn.auroc_within_loss_quintiles(flags, -(flags + 0.01 * loss), loss)["mean"] == 0.0
    # a quintile with one class only is left out of the mean (weighted by the molecules of the rest)
    flags2 = flags.copy()
    flags2[:4] = False
    got = pn.auroc_within_loss_quintiles(flags2, flags2 + 0.01 * loss, loss)
    assert got["by_loss_quintile"][0] is None and got["mean"] == 1.0
