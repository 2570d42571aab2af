"""The inner-rate cap (issue 22 §1): the fine-tuning rate is capped to 1/λ of the head's curvature
where it would diverge, and left exactly alone where it would not."""

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.utils.data import TensorDataset, default_collate

import metapt
from metapt.domains.synthetic.problem import SyntheticConfig, SyntheticTaskWeighting
from metapt.hypergrad import ConjugateGradient, Estimator, Neumann, adam, hessian_spectrum, sgd


def _toy(seed, **trainer_kw):
    """Issue 22's toy, written from the docs: four regression pre-training tasks on the same inputs,
    two of them pure noise (as large as the real targets), and a regression task downstream.
    Everything at its default but the schedule's interval, as in the task-weighting example."""
    torch.manual_seed(seed)
    dim = 16
    directions = torch.randn(dim, 2)
    x = torch.randn(2048, dim)
    real = x @ directions
    pretrain_data = TensorDataset(x, torch.cat([real, torch.randn(len(x), 2) * real.std(0)], dim=1))

    def downstream_data(n):
        x = torch.randn(n, dim)
        return TensorDataset(x, x @ directions.sum(1))

    finetune_data, metaval_data = downstream_data(256), downstream_data(256)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = nn.Sequential(nn.Linear(dim, 32), nn.ReLU(), nn.Linear(32, 8))
            self.task_heads = nn.Linear(8, 4)

        def forward(self, x):
            features = self.encoder(x)
            return features, self.task_heads(features)

    net, finetune_head = Net(), nn.Linear(8, 1)
    tasks = metapt.TaskWeights(4, names=["a", "b", "noise1", "noise2"])

    class Toy(metapt.MetaProblem):
        def __init__(self):
            self.pretrain_order = metapt.EpochShuffler(len(pretrain_data), 64, seed=0)
            self.finetune_order = metapt.EpochShuffler(len(finetune_data), 64, seed=1)
            self.metaval_order = metapt.EpochShuffler(len(metaval_data), 64, seed=2)

        def pretrain_loss(self, params, metaparams, batch):
            x, y = batch
            _, out = functional_call(net, params, (x,))
            return (tasks.weights(metaparams) * ((out - y) ** 2).mean(0)).mean()

        def finetune_loss(self, params, head, batch):
            x, y = batch
            features, _ = functional_call(net, params, (x,))
            return F.mse_loss(functional_call(finetune_head, head, (features,)).squeeze(1), y)

        def pretrain_batch(self, index):
            return default_collate([pretrain_data[i] for i in self.pretrain_order.indices(index)])

        def finetune_batch(self, index):
            return default_collate([finetune_data[i] for i in self.finetune_order.indices(index)])

        def metaval_batch(self, index):
            return default_collate([metaval_data[i] for i in self.metaval_order.indices(index)])

        def describe_metaparams(self, metaparams):
            return tasks.summary(metaparams)

    trainer = metapt.MetaPretrainer(
        Toy(), params=dict(net.named_parameters()), head=dict(finetune_head.named_parameters()),
        metaparams=tasks.init(), pt_optimizer=lambda θ: torch.optim.Adam(θ, lr=1e-2),
        meta_optimizer=lambda φ: torch.optim.Adam(φ, lr=0.05),
        schedule=trainer_kw.pop("schedule", metapt.MetaSchedule(interval=5)), **trainer_kw)
    return trainer, tasks


class Recorder:
    def __init__(self):
        self.rows = []

    def log(self, step, metrics):
        self.rows.append((step, dict(metrics)))


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a) and a.keys() == b.keys()


# ---- the estimate -----------------------------------------------------------------------------


def test_the_curvature_estimate_is_the_closed_form_top_eigenvalue_of_a_least_squares_head():
    # L(w, b) = mean((Xw + b − y)²) has the constant Hessian 2·X̃ᵀX̃/n, X̃ = [X, 1]
    g = torch.Generator().manual_seed(0)
    n, d = 50, 6
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.linspace(0.5, 3.0, d, dtype=torch.float64)
    y = torch.randn(n, generator=g, dtype=torch.float64)
    head = {"w": torch.randn(d, generator=g, dtype=torch.float64), "b": torch.zeros((), dtype=torch.float64)}
    loss = lambda h: ((x @ h["w"] + h["b"] - y) ** 2).mean()  # noqa: E731
    xt = torch.cat([x, torch.ones(n, 1, dtype=torch.float64)], dim=1)
    exact = torch.linalg.eigvalsh(2 * xt.T @ xt / n)
    spectrum = hessian_spectrum(loss, head, steps=d + 1)
    assert spectrum.lambda_max == pytest.approx(float(exact[-1]), rel=1e-10)
    assert spectrum.lambda_min == pytest.approx(float(exact[0]), rel=1e-8)
    few = hessian_spectrum(loss, head, steps=3)  # fewer products than the dimension: a lower bound, close
    assert float(exact[-1]) * 0.9 < few.lambda_max <= float(exact[-1]) * (1 + 1e-12)


def test_the_trainer_caps_at_one_over_the_exact_curvature_of_the_batch():
    # a linear regression head on fixed features: the cap is 1/λ of 2·F̃ᵀF̃/n of the meta-step's FT batch
    trainer, _ = _toy(0, schedule=metapt.MetaSchedule(interval=1), loggers=[rec := Recorder()])
    trainer.run_until(40)
    step, metrics = rec.rows[-1]
    theta = {k: v.detach() for k, v in trainer.params.items()}
    batch = trainer.problem.finetune_batch(trainer.meta_step_count - 1)  # the meta-step's first FT batch
    # the head before the last meta-step is gone; the Hessian of MSE in a linear head does not depend on it
    net_features = _features(trainer, theta, batch[0])
    ft = torch.cat([net_features, torch.ones(len(net_features), 1)], dim=1).double()
    exact = float(torch.linalg.eigvalsh(2 * ft.T @ ft / len(ft))[-1])
    assert metrics["inner_curvature"] == pytest.approx(exact, rel=1e-4)
    assert exact * 0.1 > 1.9 and metrics["inner_lr"] == pytest.approx(1 / exact, rel=1e-4)


def _features(trainer, theta, x):
    """The toy's encoder output at θ (the layers of its nn.Sequential, by name)."""
    h = torch.relu(x @ theta["encoder.0.weight"].T + theta["encoder.0.bias"])
    return h @ theta["encoder.2.weight"].T + theta["encoder.2.bias"]


# ---- issue 22's toy -----------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_toy_works_at_default_settings(seed, caplog):
    # the default inner rate (0.1) is above 2/λ of this head: without the cap most meta-steps are skipped
    trainer, tasks = _toy(seed, loggers=[rec := Recorder()])
    with caplog.at_level(logging.WARNING, logger="metapt"):
        trainer.run_until(1000)
    assert trainer.skipped == 0 and trainer.rejected_heads == 0
    assert max(m.get("inner_curvature", 0) for _, m in rec.rows) > 20  # the guide's figure: 0.1 is past 2/λ
    assert trainer.snapshot().inner_lr_capped == trainer.inner_lr_capped > 0  # ran below the rate asked, said so
    said = [r.getMessage() for r in caplog.records if "inner_lr_cap" in r.getMessage()]
    assert len(said) == 1 and "1/λ" in said[0]
    w = tasks.weights(trainer.metaparams).tolist()
    assert max(w[2:]) < min(w[:2]), w  # the noise tasks end lowest


def test_without_the_cap_the_toy_diverges_as_before():
    trainer, _ = _toy(0, inner_lr_cap="off")
    trainer.run_until(300)
    assert trainer.skipped > 30 and trainer.rejected_heads > 30 and trainer.inner_lr_capped == 0
    assert trainer.last_skip_reason.startswith("the fine-tuned head diverged")


@pytest.mark.parametrize("estimator", ["accumulated", "neumann", "cg", "unroll_encoder"])
def test_the_cap_holds_under_every_estimator(estimator):
    kw = {"accumulated": {"estimator": Estimator(accumulate=1)},
          "neumann": {"solver": Neumann(1, alpha=1e-2)},
          "cg": {"solver": ConjugateGradient(3, damping=1.0)},
          "unroll_encoder": {"schedule": metapt.MetaSchedule(interval=5, unroll_encoder=True)}}[estimator]
    capped, _ = _toy(0, **kw)
    capped.run_until(300)
    assert capped.rejected_heads == 0 and capped.inner_lr_capped > 0, capped.last_skip_reason
    off, _ = _toy(0, inner_lr_cap="off", **kw)  # the same estimator as given: the head blows up
    off.run_until(300)
    assert off.rejected_heads > 0


def test_a_capped_run_resumes_exactly():
    whole, _ = _toy(1)
    whole.run_until(400)
    first, _ = _toy(1)
    first.run_until(200)
    state = first.state_dict()
    assert state["counters"]["inner_lr_capped"] == first.inner_lr_capped > 0
    second, _ = _toy(1)
    second.load_state_dict(state)
    second.run_until(400)
    assert second.inner_lr_capped == whole.inner_lr_capped
    for part in ("params", "metaparams", "head"):
        assert _same(getattr(second, part), getattr(whole, part)), part


# ---- where it must not act ----------------------------------------------------------------------


def test_a_stable_rate_is_used_as_given_bit_for_bit():
    # on the synthetic problem sgd(0.1) is stable (λ·lr ≤ 0.8): the cap must not bind, and the run must be
    # the one without it; a cap applied always (lr → 1/λ) would make these runs differ
    class WithDropout(SyntheticTaskWeighting):  # fine-tuning draws random numbers: the estimate must not
        def finetune_loss(self, params, head, batch):
            x, y = batch
            return super().finetune_loss(params, head, (torch.nn.functional.dropout(x, 0.1), y))

    problem = WithDropout(SyntheticConfig(seed=0))

    def run(cap):
        torch.manual_seed(0)  # the same dropout draws for both runs, unless the estimate took some
        rec = Recorder()
        t = metapt.MetaPretrainer(
            problem, problem.initial_params(0), problem.initial_head(), problem.initial_metaparams(),
            pt_optimizer=lambda ps: torch.optim.Adam(ps, lr=0.01), meta_optimizer=lambda ps: torch.optim.Adam(ps, lr=0.1),
            inner_optimizer=sgd(0.1), schedule=metapt.MetaSchedule(interval=5, warmup_steps=20),
            loggers=[rec], inner_lr_cap=cap)
        t.run_until(150)
        return t, rec

    auto, rec = run("auto")
    off, rec_off = run("off")
    curvatures = [m["inner_curvature"] for _, m in rec.rows if "inner_curvature" in m]
    assert len(curvatures) == 20 + 26 and 0.3 < max(curvatures) * 0.1 <= 1.9  # every step estimated, none binds
    assert auto.inner_lr_capped == 0 and all(m["inner_lr"] == 0.1 for _, m in rec.rows if "inner_lr" in m)
    for part in ("params", "metaparams", "head"):
        assert _same(getattr(auto, part), getattr(off, part)), part
    assert not any("inner_lr" in m for _, m in rec_off.rows)  # off: no estimate, the old metrics


def test_an_optimiser_without_a_rate_is_used_as_given():
    trainer, _ = _toy(0, inner_optimizer=adam(0.01), loggers=[rec := Recorder()])
    trainer.run_until(20)
    assert trainer.inner_lr_capped == 0 and not any("inner_lr" in m for _, m in rec.rows)


def test_the_switch_is_checked_and_reaches_the_trainer_from_a_config():
    from metapt.config import load_config
    from metapt.errors import ConfigError
    from metapt.runner import trainer_from_config

    with pytest.raises(ValueError, match="inner_lr_cap"):
        _toy(0, inner_lr_cap="on")
    with pytest.raises(ConfigError, match="inner_lr_cap"):
        load_config("synthetic", ["meta.inner_lr_cap=on"])
    assert load_config("synthetic").meta.inner_lr_cap == "auto"
    meta = load_config("synthetic", ["meta.inner_lr_cap=off"]).meta
    problem = SyntheticTaskWeighting(SyntheticConfig(seed=0))
    t = trainer_from_config(problem, problem.initial_params(0), problem.initial_head(), problem.initial_metaparams(),
                            pt_lr=1e-3, meta=meta)
    assert t.inner_lr_cap == "off"


def test_diagnostics_unroll_at_the_rate_the_next_meta_step_would():
    from metapt.diagnostics import StateProbe

    trainer, _ = _toy(0)
    trainer.run_until(100)
    inner, metrics = trainer.meta_step_inner()
    assert inner.lr < 0.1 and inner.lr == pytest.approx(1 / metrics["inner_curvature"])
    assert StateProbe(trainer).inner.lr == inner.lr


def test_the_command_says_when_the_cap_binds(tmp_path):
    # on the synthetic preset λ·0.1 stays below 0.8; at meta.inner_lr=5 every fine-tuning step is capped
    import json

    from typer.testing import CliRunner

    from metapt.cli import app

    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["run", "synthetic", "--out", str(out), "--set", "pretrain.steps=110",
                                   "--set", "meta.inner_lr=5", "--set", "evaluation.seeds=1", "--threads", "1"])
    assert res.exit_code == 0, res.output
    assert res.output.count("ran below meta.inner_lr") == 1 and "meta.inner_lr_cap" in res.output  # once a phase
    health = json.loads((out / "summary.json").read_text())["pretraining"]["synthetic/meta_task_weights"]
    assert health["inner_lr_capped"] == 100 + 2 and health["skipped_meta_steps"] == 0  # warm-up + meta-steps
    assert "Fine-tuning steps run below meta.inner_lr" in (out / "summary.md").read_text()
    assert "fine-tuning steps ran below meta.inner_lr" in (out / "report.html").read_text()
