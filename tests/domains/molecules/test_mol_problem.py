"""The molecules meta-problem: data assembly, determinism, and hypergradients against finite differences."""

import json

import pytest
import torch

from metapt.config import load_config
from metapt.domains.molecules.models import GINEncoder
from metapt.domains.molecules.problem import MoleculesProblem, NoiseModelConfig, WeightingConfig, load_molecule_data
from metapt.hypergrad import Identity, pretraining_hypergradient, sgd, unrolled_finetune


@pytest.fixture(scope="module")
def b3db_small():
    return load_molecule_data("b3db", max_pretrain=200, max_downstream=100)


def test_splits_are_disjoint_and_sized(b3db_small):
    d = b3db_small
    sets = {k: set(v.tolist()) for k, v in d.split.items()}
    names = list(sets)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not sets[a] & sets[b], (a, b)
    assert len(d.split["ft_train"]) + len(d.split["metaval"]) == 100
    assert 0.15 < len(d.split["metaval"]) / 100 < 0.25  # 80/20 by scaffold
    assert d.pretrain_labels.shape == (200, 30) and d.downstream_labels.shape[1] == 1
    assert d.pretrain_batch(torch.arange(5)).y.shape == (5, 30)


def test_heldout_setting_keeps_evaluation_molecules_out_of_pretraining():
    d = load_molecule_data("heldout", max_pretrain=300, max_downstream=60)
    assert d.pretrain_labels.shape[1] == 20 and d.downstream_labels.shape[1] == 10
    assert not set(d.pretrain_task_names) & set(d.downstream_task_names)
    # same graph store: positions are comparable
    pre = set(d.pretrain_positions.tolist())
    assert not pre & set(d.split["valid"].tolist()) and not pre & set(d.split["test"].tolist())


def test_unknown_setting_is_a_clear_error():
    with pytest.raises(ValueError, match="choose 'b3db' or 'heldout'"):
        load_molecule_data("tox21")


def _problem(data, weighting, dtype=torch.float64):
    torch.manual_seed(0)
    enc = GINEncoder(num_layers=2, emb_dim=8, dropout=0.0, norm="layer").to(dtype)
    p = MoleculesProblem(data, enc, weighting, pt_batch_size=16, ft_batch_size=16)
    th = {k: v.to(dtype) for k, v in p.initial_params().items()}
    head = {k: (0.1 * torch.randn_like(v)).to(dtype) for k, v in p.initial_head().items()}
    phi = {k: (0.3 * torch.randn_like(v)).to(dtype) for k, v in p.initial_metaparams().items()}
    return p, th, head, phi


def test_batches_are_a_function_of_their_index(b3db_small):
    p, *_ = _problem(b3db_small, WeightingConfig())
    a, b = p.pretrain_batch(7), p.pretrain_batch(7)
    assert torch.equal(a[1], b[1]) and torch.equal(a[0].x, b[0].x)
    assert not torch.equal(p.pretrain_batch(8)[1], a[1])


@pytest.mark.parametrize("weighting, key", [(WeightingConfig(True, False), "task_logits"),
                                            (WeightingConfig(False, True), "example_logits"),
                                            (WeightingConfig(False, False, label_noise=True), "label_flip"),
                                            (WeightingConfig(False, False, feature_noise=True), "feature_noise"),
                                            (WeightingConfig(False, False, example_weight_net=True), "wnet.b1")])
def test_hypergradient_matches_finite_differences_of_the_mixed_term(b3db_small, weighting, key):
    # With H⁻¹ ≈ α I the hypergradient is −α ∂/∂φ ⟨∇θ L_PT(θ, φ), g⟩, g = dL_V/dθ after one
    # unrolled head step; check it on the real GIN and losses by central differences in φ.
    p, theta, head, phi = _problem(b3db_small, weighting)
    pt_batch, ft_batch, val_batch = p.pretrain_batch(0), p.finetune_batch(0), p.metaval_batch(0)

    def meta_loss(th):
        h = unrolled_finetune(lambda hh, k: p.finetune_loss(th, hh, ft_batch), head, sgd(0.5), 1)
        return p.finetune_loss(th, h, val_batch)

    alpha = 0.7
    hyper, info = pretraining_hypergradient(
        lambda th, ph: p.pretrain_loss(th, ph, pt_batch), meta_loss, theta, phi, Identity(alpha)
    )
    assert info.usable
    th = {k: v.detach().requires_grad_(True) for k, v in theta.items()}
    g = torch.autograd.grad(meta_loss(th), list(th.values()), allow_unused=True)  # None: the PT head

    def directional(ph):
        th2 = {k: v.detach().requires_grad_(True) for k, v in theta.items()}
        grads = torch.autograd.grad(p.pretrain_loss(th2, ph, pt_batch), list(th2.values()), allow_unused=True)
        return sum((gg * gi).sum() for gg, gi in zip(grads, g) if gg is not None and gi is not None)

    if hyper[key].is_sparse:  # example weights: only the batch's rows, as a sparse COO tensor
        assert key == "example_logits" and hyper[key]._nnz() <= len(pt_batch[1])
        hyper = {k: v.to_dense() for k, v in hyper.items()}
    coords = pt_batch[1][:3].tolist() if key == "example_logits" else [0, 5, 7]
    eps = 1e-6
    for j in coords:
        plus = {k: v.clone() for k, v in phi.items()}
        minus = {k: v.clone() for k, v in phi.items()}
        plus[key][j] += eps
        minus[key][j] -= eps
        fd = -alpha * (directional(plus) - directional(minus)) / (2 * eps)
        assert hyper[key][j].item() == pytest.approx(fd.item(), rel=1e-5, abs=1e-12)
    if key == "example_logits":  # molecules outside the PT batch get exactly zero
        outside = torch.ones(len(phi[key]), dtype=torch.bool)
        outside[pt_batch[1]] = False
        assert torch.count_nonzero(hyper[key][outside]) == 0


def test_test_preset_runs_end_to_end(tmp_path):
    from metapt.jobs import execute
    from metapt.runs import RunFolder

    summary = execute(RunFolder.create(tmp_path / "run", "job: molecules\n"),
                      load_config("molecules-test", ["evaluation.seeds=2"]))
    out = tmp_path / "run"
    for name in ("metrics.jsonl", "summary.json", "summary.md", "losses.png", "scores_b3db.png", "task_weights_b3db.png"):
        assert (out / name).exists(), name
    res = summary["settings"]["b3db"]
    assert list(res["scores"]) == ["no pre-training", "uniform weights", "meta task weights", "meta example weights"]
    assert all(len(v["test"]) == 2 for by_mode in res["scores"].values() for by_fr in by_mode.values()
               for v in by_fr.values())
    learned = json.loads((out / "summary.json").read_text())["settings"]["b3db"]["learned"]
    assert set(learned) == {"meta_task_weights", "meta_example_weights"}  # uniform's φ is frozen, not learned
    assert len(learned["meta_task_weights"]["task_weights"]) == 30
    assert set(learned["meta_task_weights"]["task_weights"].values()) != {1.0}
    assert summary["pretraining"]["b3db/uniform"]["meta_steps"] == 0


def test_label_noise_is_the_expected_bce_over_flips(b3db_small):
    # ỹ = y(1 − ρ) + (1 − y)ρ: BCE(z, ỹ) = (1 − ρ)·BCE(z, y) + ρ·BCE(z, 1 − y), exactly
    from metapt.losses import masked_bce

    p, theta, _, phi = _problem(b3db_small, WeightingConfig(False, False, label_noise=True))
    graphs, rows = p.pretrain_batch(2)
    flips = p.families[0]
    rho = flips.rates(phi)
    z = p.embed(theta, graphs, train=True) @ theta["pt.weight"].T + theta["pt.bias"]
    y = graphs.y.double()
    observed = ~torch.isnan(y)
    keep = lambda t: torch.where(observed, t, torch.nan)
    mixture = masked_bce(z, keep(y), 1 - rho) + masked_bce(z, keep(1 - y), rho)
    torch.testing.assert_close(p.pretrain_loss(theta, phi, (graphs, rows)), mixture, rtol=1e-12, atol=1e-12)
    # sign: on labels the model already fits (z agrees with y), more flips cost more
    leaf = phi["label_flip"].clone().requires_grad_(True)
    fit = graphs.clone()
    fit.y = torch.where(observed, (z.detach() > 0).double(), torch.nan)
    (grad,) = torch.autograd.grad(p.pretrain_loss(theta, {"label_flip": leaf}, (fit, rows)), leaf)
    measured = observed.any(0)
    assert (grad[measured] > 0).all() and (grad[~measured] == 0).all()


def test_feature_noise_is_reparameterised_and_seeded_by_the_batch(b3db_small):
    p, theta, _, phi = _problem(b3db_small, WeightingConfig(False, False, feature_noise=True))
    a, b = p.pretrain_batch(4), p.pretrain_batch(4)
    assert torch.equal(a[0].embedding_noise, b[0].embedding_noise)
    assert not torch.equal(a[0].embedding_noise, p.pretrain_batch(5)[0].embedding_noise)
    leaf = phi["feature_noise"].clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(p.pretrain_loss(theta, {"feature_noise": leaf}, a), leaf)
    h = 1e-6
    for j in (0, 3, 7):
        e = torch.zeros_like(leaf)
        e[j] = h
        fd = (p.pretrain_loss(theta, {"feature_noise": phi["feature_noise"] + e}, a)
              - p.pretrain_loss(theta, {"feature_noise": phi["feature_noise"] - e}, a)) / (2 * h)
        assert grad[j].item() == pytest.approx(fd.item(), rel=1e-6, abs=1e-10)
    # σ → 0 is the noiseless loss
    zero = {"feature_noise": torch.full_like(leaf, -60.0)}
    plain, *_ = _problem(b3db_small, WeightingConfig(True, False))
    torch.testing.assert_close(p.pretrain_loss(theta, zero, a),
                               plain.pretrain_loss(theta, {"task_logits": torch.zeros(30, dtype=torch.float64)}, a),
                               rtol=1e-12, atol=1e-12)


def test_summary_names_every_family(b3db_small):
    p, _, _, phi = _problem(b3db_small, WeightingConfig(True, True, example_weight_net=True, label_noise=True,
                                                        feature_noise=True))
    assert set(phi) == {"task_logits", "example_logits", "wnet.w1", "wnet.b1", "wnet.w2", "wnet.b2", "label_flip",
                        "feature_noise"}
    summary = p.describe_metaparams(phi)
    for key in ("task_weight_min", "task_weight_std", "example_weight_max", "wnet_weight_at_loss_+2", "wnet_loss_slope",
                "label_flip_mean", "feature_noise_mean"):
        assert key in summary
    with pytest.raises(ValueError, match="label_flip_init"):
        NoiseModelConfig(label_flip_init=0.7)


@pytest.mark.parametrize("variant, key", [("label_noise", "label_flip"), ("feature_noise", "feature_noise")])
def test_frozen_noise_controls_pretrain_with_the_noise_held_at_its_initial_value(b3db_small, variant, key):
    # the control for a learned noise model: the same noise in the PT loss, φ never moved
    from metapt.domains.molecules.job import DOMAIN, METHODS
    from metapt.runner import build_trainer

    config = load_config("molecules-test", ["meta.interval=2", "meta.warmup_steps=0"])
    frozen, learned = METHODS[f"frozen_{variant}"], METHODS[f"meta_{variant}"]
    assert frozen.variant == learned.variant == variant and frozen.phi == "frozen"
    built = DOMAIN.pretraining(config, b3db_small, frozen, 0, torch.device("cpu"))
    assert key in built.metaparams
    phi0 = {k: v.detach().clone() for k, v in built.metaparams.items()}
    trainer = build_trainer(built, config, frozen, seed=0)
    trainer.run_until(6)
    assert trainer.meta_step_count == 0
    assert all(torch.equal(trainer.metaparams[k].detach(), phi0[k]) for k in phi0)
    # the noise acts: the PT loss at φ₀ differs from the same batch's loss without the noise model
    uniform = DOMAIN.pretraining(config, b3db_small, METHODS["uniform"], 0, torch.device("cpu"))
    batch = built.problem.pretrain_batch(0)
    noisy = built.problem.pretrain_loss(built.params, phi0, batch)
    plain = uniform.problem.pretrain_loss(uniform.params, uniform.metaparams, batch)
    assert not torch.allclose(noisy, plain)


def test_example_weight_net_reads_the_batchs_own_losses_and_starts_as_uniform(b3db_small):
    # the weights come from the PT logits of the same forward; with per-molecule logits too they multiply
    from metapt.losses import masked_bce

    p, theta, _, phi = _problem(b3db_small, WeightingConfig(False, True, example_weight_net=True))
    graphs, rows = batch = p.pretrain_batch(1)
    logits = p.pretrain_outputs(theta, phi, batch)
    net = p.families[1]
    w = phi["example_logits"][rows].sigmoid() * 2 * net.weights(phi, net.features(logits, graphs.y))
    assert w.std() > 0.01
    torch.testing.assert_close(p.pretrain_output_loss(logits, phi, batch), masked_bce(logits, graphs.y, None, w),
                               rtol=1e-12, atol=0)
    uniform, *_ = _problem(b3db_small, WeightingConfig(True, False))
    start, *_ = _problem(b3db_small, WeightingConfig(False, False, example_weight_net=True))
    torch.testing.assert_close(start.pretrain_output_loss(logits, start.initial_metaparams(), batch),
                               uniform.pretrain_output_loss(logits, uniform.initial_metaparams(), batch), rtol=0, atol=0)


def test_example_weight_net_method_runs_from_the_cli_and_summarises_the_net(tmp_path):
    from typer.testing import CliRunner

    from metapt.cli import app

    out = tmp_path / "wnet"
    res = CliRunner().invoke(app, [
        "run", "molecules-test", "--out", str(out), "--threads", "1",
        "--set", "methods=[uniform, meta_example_weight_net]",
        "--set", "evaluation.linear_probe=null", "--set", "evaluation.seeds=1"])
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "summary.json").read_text())
    res_ = summary["settings"]["b3db"]
    assert set(res_["scores"]) == {"uniform weights", "meta example weight net"}
    assert "meta example weight net − uniform weights" in res_["gains"]
    described = res_["learned"]["meta_example_weight_net"]["example_weight_net"]
    assert set(described) == {"wnet_weight_at_loss_-2", "wnet_weight_at_loss_-1", "wnet_weight_at_loss_0",
                              "wnet_weight_at_loss_+1", "wnet_weight_at_loss_+2", "wnet_loss_slope",
                              "wnet_observed_slope", "wnet_decreasing_in_loss"}
    assert described["wnet_weight_at_loss_0"] != 1.0  # meta-steps moved the net
    assert summary["pretraining"]["b3db/meta_example_weight_net"]["meta_steps"] > 0
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("phi/wnet_loss_slope" in r for r in logged)
