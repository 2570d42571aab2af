"""The trainer as a library user meets it: run_until, snapshot, logging, checks at construction, the control."""

import logging

import pytest
import torch

import metapt
from metapt.domains.synthetic.problem import SyntheticConfig, SyntheticTaskWeighting
from metapt.hypergrad import Neumann, sgd
from metapt.strategy import Strategy
from metapt.trainer import MetaPretrainer, MetaSchedule, NonFiniteLossError


def _trainer(problem, schedule=MetaSchedule(interval=2), meta_optimizer=None, **kw):
    return MetaPretrainer(
        problem, problem.initial_params(0), problem.initial_head(), problem.initial_metaparams(),
        pt_optimizer=lambda ps: torch.optim.Adam(ps, lr=0.01),
        meta_optimizer=meta_optimizer or (lambda ps: torch.optim.Adam(ps, lr=0.1)),
        inner_optimizer=sgd(0.1), solver=kw.pop("solver", Neumann(2, 0.01)), schedule=schedule, **kw,
    )


class _Negated(Strategy):
    def reduce_hypergrad(self, h):
        return {k: -v for k, v in h.items()}


def test_public_api_is_listed_once_and_importable():
    assert metapt.__all__ == sorted(set(metapt.__all__))  # one name each, in order: a readable list
    for name in metapt.__all__:
        assert getattr(metapt, name).__doc__, f"metapt.{name} has no docstring"


def test_run_until_is_a_total():
    t = _trainer(SyntheticTaskWeighting(SyntheticConfig(seed=1)))
    t.run_until(5)
    t.run_until(5)
    assert t.step == 5
    t.run_until(t.step + 3)
    assert t.step == 8 and t.meta_step_count == 4


def test_snapshot_is_detached_copies_and_counters():
    t = _trainer(SyntheticTaskWeighting(SyntheticConfig(seed=1)))
    t.run_until(4)
    snap = t.snapshot()
    assert (snap.step, snap.meta_step_count, snap.skipped, snap.rejected_heads) == (4, 2, 0, 0)
    for mine, theirs in ((snap.params, t.params), (snap.metaparams, t.metaparams), (snap.head, t.head)):
        assert mine.keys() == theirs.keys()
        for k in mine:
            assert not mine[k].requires_grad and torch.equal(mine[k], theirs[k].detach())
            mine[k].add_(1.0)  # a copy: the trainer's tensors do not move
            assert not torch.equal(mine[k], theirs[k].detach())


def test_inputs_are_copied_not_updated():
    problem = SyntheticTaskWeighting(SyntheticConfig(seed=1))
    theta0 = problem.initial_params(0)
    before = {k: v.clone() for k, v in theta0.items()}
    t = MetaPretrainer(problem, theta0, problem.initial_head(), problem.initial_metaparams(),
                       pt_optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1),
                       meta_optimizer=lambda ps: torch.optim.Adam(ps, lr=0.1))
    t.run_until(3)
    for k in before:
        assert torch.equal(theta0[k], before[k]) and not torch.equal(t.params[k].detach(), before[k])


def test_describe_metaparams_gets_detached_phi():
    problem = SyntheticTaskWeighting(SyntheticConfig(seed=1))
    seen = []
    describe = problem.describe_metaparams
    problem.describe_metaparams = lambda phi: seen.append(any(v.requires_grad for v in phi.values())) or describe(phi)
    _trainer(problem).run_until(2)
    assert seen == [False]


def test_metaparameter_that_misses_the_pretraining_loss_is_refused_at_construction():
    problem = SyntheticTaskWeighting(SyntheticConfig(seed=1))
    phi = {**problem.initial_metaparams(), "unused": torch.zeros(3)}
    rng = torch.get_rng_state()
    with pytest.raises(ValueError, match=r"\['unused'\].*pretrain_batch\(0\)"):
        MetaPretrainer(problem, problem.initial_params(0), problem.initial_head(), phi,
                       pt_optimizer=lambda ps: torch.optim.Adam(ps, lr=0.01),
                       meta_optimizer=lambda ps: torch.optim.Adam(ps, lr=0.1))
    assert torch.equal(torch.get_rng_state(), rng)
    # a frozen-φ baseline (no meta-steps) is not checked
    MetaPretrainer(problem, problem.initial_params(0), problem.initial_head(), phi,
                   pt_optimizer=lambda ps: torch.optim.Adam(ps, lr=0.01),
                   meta_optimizer=lambda ps: torch.optim.Adam(ps, lr=0.1), schedule=MetaSchedule(learn_phi=False))


def test_construction_check_does_not_change_the_run():
    # the check evaluates L_PT once; with the RNG restored, two trainers built in a row agree
    problem = SyntheticTaskWeighting(SyntheticConfig(seed=1))
    a = _trainer(problem)
    a.run_until(6)
    b = _trainer(problem)
    b.run_until(6)
    assert torch.equal(a.metaparams["task_logits"], b.metaparams["task_logits"])


def _skips_logged(caplog, trainer, steps):
    caplog.set_level(logging.DEBUG, logger="metapt")
    trainer.run_until(steps)
    return [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "metapt.trainer"]


def test_skipped_meta_steps_are_logged_at_warning_on_doubling_counts(caplog):
    class _NaN(Strategy):
        def reduce_hypergrad(self, h):
            return {k: v * float("nan") for k, v in h.items()}

    t = _trainer(SyntheticTaskWeighting(SyntheticConfig(seed=1)), schedule=MetaSchedule(interval=1),
                 strategy=_NaN())
    records = _skips_logged(caplog, t, 5)
    assert t.skipped == 5 and len(records) == 5
    assert [lvl for lvl, _ in records] == [logging.WARNING, logging.WARNING, logging.DEBUG, logging.WARNING,
                                           logging.DEBUG]
    assert "not finite" in records[0][1] and "5 skipped so far" in records[4][1]


def test_diverged_solve_is_logged_with_its_reason(caplog):
    t = _trainer(SyntheticTaskWeighting(SyntheticConfig(seed=1)), schedule=MetaSchedule(interval=1),
                 solver=Neumann(steps=5, alpha=1e4))
    records = _skips_logged(caplog, t, 1)
    assert t.skipped == 1 and "solve diverged" in records[0][1] and records[0][0] == logging.WARNING


def test_rejected_head_is_logged(caplog):
    problem = SyntheticTaskWeighting(SyntheticConfig(seed=1))
    t = _trainer(problem, schedule=MetaSchedule(interval=1))
    clean = problem.finetune_loss
    problem.finetune_loss = lambda params, head, batch: clean(params, head, batch) * float("nan")
    records = _skips_logged(caplog, t, 1)
    assert t.rejected_heads == 1
    assert any("head is not finite" in m and lvl == logging.WARNING for lvl, m in records)


def test_a_healthy_run_logs_nothing(caplog):
    records = _skips_logged(caplog, _trainer(SyntheticTaskWeighting(SyntheticConfig(seed=1))), 6)
    assert records == []


def test_maximize_is_the_negated_meta_objective_exactly():
    problem = SyntheticTaskWeighting(SyntheticConfig(seed=1))
    maximize = _trainer(problem, meta_optimizer=lambda ps: torch.optim.Adam(ps, lr=0.1, maximize=True))
    negated = _trainer(problem, strategy=_Negated())
    plain = _trainer(problem)
    for t in (maximize, negated, plain):
        t.run_until(20)
    assert torch.equal(maximize.metaparams["task_logits"], negated.metaparams["task_logits"])
    assert not torch.allclose(maximize.metaparams["task_logits"], plain.metaparams["task_logits"])


def test_non_finite_loss_error_gives_library_advice_and_keeps_the_last_good_state():
    t = _trainer(SyntheticTaskWeighting(SyntheticConfig(seed=1)))
    t.run_until(2)
    with torch.no_grad():
        t.params["encoder"].fill_(float("inf"))
    with pytest.raises(NonFiniteLossError) as err:
        t.run_until(4)
    assert "step 2" in str(err.value) and "checkpoint" not in str(err.value)
    assert t.step == 2


def test_problem_protocol_default_and_isinstance():
    class Minimal(metapt.MetaProblem):
        pass

    assert Minimal().describe_metaparams({}) == {}
    assert isinstance(SyntheticTaskWeighting(SyntheticConfig(seed=1)), metapt.MetaProblem)


@pytest.mark.parametrize("cap", ["auto", "off"])
def test_batch_indices_are_the_documented_ones(cap):
    # MetaProblem's docstring and the guide state which index each stream asks for; record them
    base = SyntheticTaskWeighting(SyntheticConfig(seed=1))
    asked = []

    class Recording(metapt.MetaProblem):
        def pretrain_loss(self, params, metaparams, batch):
            return base.pretrain_loss(params, metaparams, batch)

        def finetune_loss(self, params, head, batch):
            return base.finetune_loss(params, head, batch)

        def pretrain_batch(self, index):
            asked.append(("pt", index))
            return base.pretrain_batch(index)

        def finetune_batch(self, index):
            asked.append(("ft", index))
            return base.finetune_batch(index)

        def metaval_batch(self, index):
            asked.append(("val", index))
            return base.metaval_batch(index)

    W, I, B, K, C, steps = 2, 3, 2, 2, 2, 9
    schedule = MetaSchedule(interval=I, warmup_steps=W, batches=B, unroll_steps=K, head_steps=C)
    t = MetaPretrainer(Recording(), base.initial_params(0), base.initial_head(), base.initial_metaparams(),
                       pt_optimizer=lambda ps: torch.optim.Adam(ps, lr=0.01),
                       meta_optimizer=lambda ps: torch.optim.Adam(ps, lr=0.1), schedule=schedule,
                       inner_lr_cap=cap)
    assert asked == [("pt", 0)]  # the construction check
    asked.clear()
    t.run_until(steps)

    expected, m = [], 0
    for s in range(steps):
        n = s + 1
        expected.append(("pt", s))
        if n <= W:
            expected.append(("ft", n))
        elif n % I == 0:
            # the inner-rate cap's curvature estimate asks once more for the first FT batch of the
            # catch-up steps and of the unroll (the warm-up step's batch it shares)
            estimate = cap == "auto"
            expected += [("ft", m * C)] * estimate + [("ft", m * C + c) for c in range(C)]
            expected += [("ft", m * B * K)] * estimate
            for j in range(B):  # the default estimator: reverse-mode through the next PT step's batch
                expected.append(("val", m * B + j))
                expected.append(("pt", n + j))
                expected += [("ft", (m * B + j) * K + k) for k in range(K)]
            m += 1
    assert m == 3
    assert asked == expected
