"""Algorithm 1 end to end on the synthetic problem, and the trainer's bookkeeping."""

import math

import pytest
import torch

from metapt.domains.synthetic.problem import SyntheticConfig, SyntheticTaskWeighting
from metapt.hypergrad import ConjugateGradient, Identity, Neumann, sgd
from metapt.strategy import Strategy
from metapt.trainer import MetaPretrainer, MetaSchedule, NonFiniteLossError


class _Mapped(Strategy):
    """A strategy that changes every hypergradient before the φ update (test controls)."""

    def __init__(self, fn):
        self.fn = fn

    def reduce_hypergrad(self, h):
        return self.fn(h)


def _trainer(problem, meta_lr=0.1, schedule=MetaSchedule(interval=5, warmup_steps=100), **kw):
    return MetaPretrainer(
        problem, problem.initial_params(0), problem.initial_head(), problem.initial_metaparams(),
        pt_optimizer=lambda ps: torch.optim.Adam(ps, lr=0.01),
        meta_optimizer=lambda ps: torch.optim.Adam(ps, lr=meta_lr),
        inner_optimizer=sgd(0.1), solver=kw.pop("solver", Neumann(5, 0.01)), schedule=schedule, **kw,
    )


class Recorder:
    def __init__(self):
        self.rows = []

    def log(self, step, metrics):
        self.rows.append((step, dict(metrics)))


@pytest.mark.parametrize("seed", [0, 2])
def test_noise_tasks_are_down_weighted_and_transfer_improves(seed):
    problem = SyntheticTaskWeighting(SyntheticConfig(seed=seed))
    meta = _trainer(problem)
    meta.run_until(1000)
    w = problem.describe_metaparams(meta.metaparams)
    assert w["noise_weight"] < 0.8 and w["helpful_weight"] > 1.0 and w["helpful_weight"] - w["noise_weight"] > 0.4, w

    uniform = _trainer(problem, meta_lr=1e-12)
    uniform.run_until(1000)
    assert problem.probe_test_mse(meta.params) < 0.5 * problem.probe_test_mse(uniform.params)


def test_flipped_hypergradient_sign_learns_the_opposite():
    # The end-to-end test above must fail if the sign were wrong: negating the
    # hypergradient drives the weights the other way.
    problem = SyntheticTaskWeighting(SyntheticConfig(seed=0))
    flipped = _trainer(problem, strategy=_Mapped(lambda h: {k: -v for k, v in h.items()}))
    flipped.run_until(1000)
    w = problem.describe_metaparams(flipped.metaparams)
    assert w["noise_weight"] > w["helpful_weight"], w


def test_schedule_and_metrics():
    problem = SyntheticTaskWeighting(SyntheticConfig(seed=1))
    rec = Recorder()
    t = _trainer(problem, schedule=MetaSchedule(interval=4, warmup_steps=8, batches=2), loggers=[rec])
    t.run_until(24)
    assert [s for s, _ in rec.rows] == list(range(1, 25))
    meta_steps = [s for s, m in rec.rows if "meta_loss" in m]
    assert meta_steps == [12, 16, 20, 24]  # none during warm-up
    assert all("warmup_ft_loss" in m for s, m in rec.rows if s <= 8)
    m = dict(rec.rows)[12]
    for key in ("pt_loss", "meta_loss", "hypergrad_norm", "solver_residual", "phi/noise_weight"):
        assert math.isfinite(m[key]), key
    assert t.meta_step_count == 4 and t.skipped == 0


def test_unrolling_the_encoder_differentiates_through_the_joint_fine_tuning_step():
    # One meta-step with K = 1 joint SGD step on (θ, ψ): its hypergradient equals the implicit
    # formula with a meta-loss written out by hand, θ' = θ − η ∂L_FT/∂θ, ψ' = ψ − η ∂L_FT/∂ψ, L_V(θ', ψ').
    from metapt.hypergrad import Estimator, pretraining_hypergradient

    problem = SyntheticTaskWeighting(SyntheticConfig(seed=2), dtype=torch.float64)
    record = []

    class Recording(Strategy):
        def reduce_hypergrad(self, h):
            record.append({k: v.clone() for k, v in h.items()})
            return h

    solver = Neumann(3, 0.01)
    g = torch.Generator().manual_seed(0)
    head = {k: torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in problem.initial_head().items()}  # ψ ≠ 0
    t = MetaPretrainer(problem, problem.initial_params(0), head, problem.initial_metaparams(),
                       pt_optimizer=lambda ps: torch.optim.SGD(ps, lr=0.01),
                       meta_optimizer=lambda ps: torch.optim.SGD(ps, lr=0.0), inner_optimizer=sgd(0.1),
                       estimator=Estimator(solver=solver),
                       schedule=MetaSchedule(interval=1, unroll_steps=1, unroll_encoder=True),
                       strategy=Recording(), inner_lr_cap="off")  # the formula's η as given (the cap would bind)
    theta0 = {k: v.detach().clone() for k, v in t.params.items()}
    head0 = {k: v.clone() for k, v in t.head.items()}
    t.pretrain_step()
    theta1 = {k: v.detach().clone() for k, v in t.params.items()}
    t.meta_step()

    def meta_loss(theta):
        batch = problem.finetune_batch(0)
        head = {k: v.detach().clone().requires_grad_(True) for k, v in head0.items()}
        loss = problem.finetune_loss(theta, head, batch)
        gt = torch.autograd.grad(loss, list(theta.values()) + list(head.values()), create_graph=True, allow_unused=True)
        theta_ft = {k: v if g is None else v - 0.1 * g for (k, v), g in zip(theta.items(), gt[:len(theta)])}
        head_ft = {k: v - 0.1 * g for (k, v), g in zip(head.items(), gt[len(theta):])}
        return problem.finetune_loss(theta_ft, head_ft, problem.metaval_batch(0))

    pt_loss = lambda th, ph: problem.pretrain_loss(th, ph, problem.pretrain_batch(0))  # noqa: E731
    expected, _ = pretraining_hypergradient(pt_loss, meta_loss, theta1, problem.initial_metaparams(), solver)
    torch.testing.assert_close(record[0]["task_logits"], expected["task_logits"], rtol=1e-10, atol=1e-14)
    head_only = MetaSchedule(interval=1, unroll_steps=1)
    t2 = MetaPretrainer(problem, theta0, head0, problem.initial_metaparams(),
                        pt_optimizer=lambda ps: torch.optim.SGD(ps, lr=0.01),
                        meta_optimizer=lambda ps: torch.optim.SGD(ps, lr=0.0), inner_optimizer=sgd(0.1),
                        estimator=Estimator(solver=solver), schedule=head_only, strategy=Recording())
    t2.pretrain_step()
    t2.meta_step()
    assert (record[1]["task_logits"] - expected["task_logits"]).abs().max() > 1e-8  # the head-only unroll differs


def test_unroll_encoder_and_other_solvers_run():
    problem = SyntheticTaskWeighting(SyntheticConfig(seed=1))
    for solver in (Identity(0.01), ConjugateGradient(5, damping=1.0)):
        t = _trainer(problem, solver=solver, schedule=MetaSchedule(interval=2, unroll_steps=2, unroll_encoder=True))
        before = t.metaparams["task_logits"].clone()
        t.run_until(6)
        assert t.skipped == 0, solver
        assert t.meta_step_count == 3 and not torch.equal(before, t.metaparams["task_logits"])


def test_unusable_hypergradient_skips_the_update():
    problem = SyntheticTaskWeighting(SyntheticConfig(seed=1))
    t = _trainer(problem, schedule=MetaSchedule(interval=1), strategy=_Mapped(lambda h: {k: v * float("nan") for k, v in h.items()}))
    before = t.metaparams["task_logits"].clone()
    t.run_until(3)
    assert t.skipped == 3 and torch.equal(before, t.metaparams["task_logits"])


def test_non_finite_pretraining_loss_stops_the_run():
    problem = SyntheticTaskWeighting(SyntheticConfig(seed=1))
    t = _trainer(problem)
    with torch.no_grad():
        t.params["encoder"].fill_(float("inf"))
    with pytest.raises(NonFiniteLossError, match="step 0"):
        t.run_until(2)


def test_state_dict_round_trip_continues_identically():
    problem = SyntheticTaskWeighting(SyntheticConfig(seed=1))
    sched = MetaSchedule(interval=3, warmup_steps=2)
    a = _trainer(problem, schedule=sched)
    a.run_until(7)
    b = _trainer(problem, schedule=sched)
    b.load_state_dict(a.state_dict())
    a.run_until(20)
    b.run_until(20)
    for k in a.params:
        assert torch.equal(a.params[k], b.params[k])
    assert torch.equal(a.metaparams["task_logits"], b.metaparams["task_logits"])


def test_head_catch_up_steps_then_unroll_give_the_persisted_head():
    # head_steps plain SGD steps on FT-train batches 0..H-1, then the K unrolled steps:
    # the head kept for the next meta-step is exactly that sequence of SGD steps.
    problem = SyntheticTaskWeighting(SyntheticConfig(seed=1))
    t = _trainer(problem, schedule=MetaSchedule(interval=1, unroll_steps=1, head_steps=2))
    head0 = {k: v.clone() for k, v in t.head.items()}
    t.run_until(1)
    theta = {k: v.detach() for k, v in t.params.items()}
    head = head0
    for index in (0, 1, 0):  # catch-up batches 0, 1; the unroll's batch 0
        batch = problem.finetune_batch(index)
        h = {k: v.clone().requires_grad_(True) for k, v in head.items()}
        grads = torch.autograd.grad(problem.finetune_loss(theta, h, batch), list(h.values()))
        head = {k: (v - 0.1 * g).detach() for (k, v), g in zip(h.items(), grads)}
    for k in head:
        torch.testing.assert_close(t.head[k], head[k], rtol=1e-6, atol=1e-7)


def test_non_finite_unrolled_head_is_not_kept():
    problem = SyntheticTaskWeighting(SyntheticConfig(seed=1))
    t = _trainer(problem, schedule=MetaSchedule(interval=1))
    head0 = {k: v.clone() for k, v in t.head.items()}
    clean = problem.finetune_loss
    problem.finetune_loss = lambda params, head, batch: clean(params, head, batch) * float("nan")
    t.run_until(2)
    assert t.skipped == 2
    for k in head0:
        assert torch.equal(t.head[k], head0[k])


def test_a_non_finite_unrolled_head_is_rejected_and_counted():
    problem = SyntheticTaskWeighting(SyntheticConfig(seed=1))

    class NanHead(Strategy):
        def reduce_head(self, head):
            return {k: v * float("nan") for k, v in head.items()}

    rec = Recorder()
    t = _trainer(problem, schedule=MetaSchedule(interval=1), strategy=NanHead(), loggers=[rec])
    head0 = {k: v.clone() for k, v in t.head.items()}
    t.run_until(3)
    assert t.rejected_heads == 3 and t.skipped == 0  # the hypergradient was fine; only the head was refused
    assert all(torch.equal(t.head[k], head0[k]) for k in head0)
    assert [m["rejected_heads"] for _, m in rec.rows] == [1.0, 2.0, 3.0]
    assert t.state_dict()["counters"]["rejected_heads"] == 3


def test_a_diverging_fine_tuning_head_is_named_and_the_advice_fits(caplog):
    # too high an inner rate blows the head up: its meta-steps are skipped (their hypergradient is
    # about the explosion), the head is not kept, and the advice names the inner rate, not the solver
    problem = SyntheticTaskWeighting(SyntheticConfig(seed=0))
    diverging = MetaPretrainer(
        problem, problem.initial_params(0), problem.initial_head(), problem.initial_metaparams(),
        pt_optimizer=lambda ps: torch.optim.Adam(ps, lr=0.01), meta_optimizer=lambda ps: torch.optim.Adam(ps, lr=0.1),
        inner_optimizer=sgd(3.0), schedule=MetaSchedule(interval=5, warmup_steps=20), inner_lr_cap="off")
    with caplog.at_level("WARNING", logger="metapt"):
        diverging.run_until(120)
    assert diverging.skipped > 0 and diverging.rejected_heads > 0
    assert diverging.last_skip_reason.startswith("the fine-tuned head diverged")
    assert "meta.inner_lr" in diverging.skip_advice() and "alpha" not in diverging.skip_advice()
    assert any("meta.inner_lr" in r.getMessage() for r in caplog.records)
    assert all(bool(torch.isfinite(v).all()) for v in (*diverging.metaparams.values(), *diverging.head.values()))
    fine = MetaPretrainer(
        problem, problem.initial_params(0), problem.initial_head(), problem.initial_metaparams(),
        pt_optimizer=lambda ps: torch.optim.Adam(ps, lr=0.01), meta_optimizer=lambda ps: torch.optim.Adam(ps, lr=0.1),
        inner_optimizer=sgd(0.1), schedule=MetaSchedule(interval=5, warmup_steps=20))
    fine.run_until(120)
    assert fine.skipped == 0 and fine.rejected_heads == 0
    # a Neumann estimator whose hypergradient is unusable gets the solver's advice
    paper = _trainer(problem, solver=Neumann(5, 0.01))
    paper.last_skip_reason = "the inverse-HVP solve diverged"
    assert "meta.estimator.alpha" in paper.skip_advice()
