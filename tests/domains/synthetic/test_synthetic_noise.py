"""The synthetic noise-model problem: its noise is reparameterised, and the learned σ moves the known way."""

import pytest
import torch

from metapt import MetaPretrainer, MetaSchedule
from metapt.domains.synthetic.noise import FeatureNoiseConfig, SyntheticFeatureNoise
from metapt.hypergrad import Identity, Neumann, pretraining_hypergradient, sgd


class NegatedMetaObjective:
    """The same problem with L_V replaced by −L_V (MetaFT-validation batches only)."""

    def __init__(self, problem):
        self.problem = problem

    def __getattr__(self, name):
        return getattr(self.problem, name)

    def metaval_batch(self, index):
        return ("negated", self.problem.metaval_batch(index))

    def finetune_loss(self, params, head, batch):
        if isinstance(batch[0], str):
            return -self.problem.finetune_loss(params, head, batch[1])
        return self.problem.finetune_loss(params, head, batch)


def _train(problem, steps=250, meta_lr=0.05, frozen=False):
    base = problem.problem if isinstance(problem, NegatedMetaObjective) else problem
    trainer = MetaPretrainer(
        problem, base.initial_params(), base.initial_head(), base.initial_metaparams(),
        pt_optimizer=lambda ps: torch.optim.Adam(ps, lr=0.01),
        meta_optimizer=lambda ps: torch.optim.Adam(ps, lr=meta_lr) if not frozen else torch.optim.SGD(ps, lr=0.0),
        inner_optimizer=sgd(0.1), solver=Neumann(steps=5, alpha=0.01),
        schedule=MetaSchedule(interval=5, warmup_steps=50),
    )
    trainer.run_until(steps)
    return base.describe_metaparams(trainer.metaparams), trainer.params


def test_pretrain_loss_gradient_in_the_noise_scales_matches_finite_differences():
    p = SyntheticFeatureNoise(FeatureNoiseConfig(), torch.float64)
    theta = p.initial_params()
    phi = {k: v + 0.2 * torch.randn(v.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
           for k, v in p.initial_metaparams().items()}
    batch = p.pretrain_batch(3)
    leaf = phi["feature_noise"].clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(p.pretrain_loss(theta, {"feature_noise": leaf}, batch), leaf)
    h = 1e-6
    for j in range(p.dim):
        e = torch.zeros_like(leaf)
        e[j] = h
        fd = (p.pretrain_loss(theta, {"feature_noise": phi["feature_noise"] + e}, batch)
              - p.pretrain_loss(theta, {"feature_noise": phi["feature_noise"] - e}, batch)) / (2 * h)
        assert float(grad[j]) == pytest.approx(float(fd), rel=1e-6, abs=1e-9)
    # the noise is the batch's: same index, same ε
    assert torch.equal(p.pretrain_batch(3)[1], batch[1]) and not torch.equal(p.pretrain_batch(4)[1], batch[1])


def test_hypergradient_matches_finite_differences_of_the_mixed_term():
    # H⁻¹ ≈ αI: dL_V/dφ = −α ∂/∂φ ⟨∇θ L_PT(θ, φ), g⟩ with g = dL_V/dθ fixed
    p = SyntheticFeatureNoise(FeatureNoiseConfig(), torch.float64)
    theta, head, phi = p.initial_params(), p.initial_head(), p.initial_metaparams()
    head = {k: v + 0.3 for k, v in head.items()}
    pt_batch, val_batch = p.pretrain_batch(0), p.metaval_batch(0)
    alpha = 0.5
    hyper, info = pretraining_hypergradient(lambda th, ph: p.pretrain_loss(th, ph, pt_batch),
                                            lambda th: p.finetune_loss(th, head, val_batch), theta, phi, Identity(alpha))
    th = {k: v.clone().requires_grad_(True) for k, v in theta.items()}
    g = torch.autograd.grad(p.finetune_loss(th, head, val_batch), list(th.values()), allow_unused=True)
    g = [torch.zeros_like(v) if gi is None else gi for gi, v in zip(g, th.values())]  # the PT head: no FT use

    def mixed(ph):
        t = {k: v.clone().requires_grad_(True) for k, v in theta.items()}
        grads = torch.autograd.grad(p.pretrain_loss(t, ph, pt_batch), list(t.values()))
        return sum((a * b).sum() for a, b in zip(grads, g))

    h = 1e-6
    for j in range(p.dim):
        e = torch.zeros(p.dim, dtype=torch.float64)
        e[j] = h
        fd = (mixed({"feature_noise": phi["feature_noise"] + e}) - mixed({"feature_noise": phi["feature_noise"] - e})) / (2 * h)
        assert float(hyper["feature_noise"][j]) == pytest.approx(-alpha * float(fd), rel=1e-6, abs=1e-12)


def test_learned_noise_rises_on_nuisance_features_and_falls_on_informative_ones():
    config = FeatureNoiseConfig()
    learned, params = _train(SyntheticFeatureNoise(config, torch.float64))
    assert learned["nuisance_noise"] > 2 * config.init_std
    assert learned["informative_noise"] < config.init_std
    frozen, params_frozen = _train(SyntheticFeatureNoise(config, torch.float64), frozen=True)
    p = SyntheticFeatureNoise(config, torch.float64)
    assert p.nuisance_share(params) < 0.5 * p.nuisance_share(params_frozen)  # the shortcut is dropped
    assert p.probe_test_mse(params) < p.probe_test_mse(params_frozen)


def test_a_negated_meta_objective_moves_the_noise_the_wrong_way():
    config = FeatureNoiseConfig()
    learned, _ = _train(NegatedMetaObjective(SyntheticFeatureNoise(config, torch.float64)))
    assert learned["nuisance_noise"] < config.init_std
    assert learned["informative_noise"] > 2 * config.init_std


def test_the_bottleneck_must_force_a_choice():
    with pytest.raises(ValueError, match="width"):
        SyntheticFeatureNoise(FeatureNoiseConfig(informative=2, nuisance=1, width=3))
