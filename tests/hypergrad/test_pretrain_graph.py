"""Reusing the PT step's gradient graph for the hypergradient (pretrain_graph / graph=).

The reused path must give the hypergradient of the plain path when the graph was built at the
same θ, and H and the mixed term at the graph's θ (with dL_V/dθ at the θ given) when it was not;
the trainer must wire it so that a meta-step takes the second derivatives at the θ of the PT
step just taken, and fall back to the plain path whenever that graph is stale.
"""

import pytest
import torch

from metapt.domains.synthetic.problem import SyntheticConfig, SyntheticTaskWeighting
from metapt.hypergrad import (
    ConjugateGradient,
    Identity,
    Neumann,
    PretrainGraph,
    pretrain_graph,
    pretraining_hypergradient,
    sgd,
    unrolled_finetune,
)
from metapt.trainer import MetaPretrainer, MetaSchedule
from metapt.strategy import ReusePTGraph, Strategy
from tests.hypergrad.test_core import _logistic_problem, _ridge_problem


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("solver", [ConjugateGradient(50, 1e-14), Neumann(3, 0.05), Identity(0.25)], ids=repr)
def test_graph_at_the_same_theta_gives_the_plain_hypergradient(solver):
    pretrain_loss, solve, meta_loss_of = _ridge_problem()
    logits = torch.tensor([0.3, -0.5, 1.0, 0.0], dtype=torch.float64)
    theta, phi = {"w": solve(logits)}, {"logits": logits}
    meta_loss = lambda th: meta_loss_of(th["w"])
    plain, info_p = pretraining_hypergradient(pretrain_loss, meta_loss, theta, phi, solver)
    graph = pretrain_graph(pretrain_loss, theta, phi)
    reused, info_r = pretraining_hypergradient(pretrain_loss, meta_loss, theta, phi, solver, graph=graph)
    assert _rel(reused["logits"], plain["logits"]) <= 1e-12
    assert info_r.pretrain_loss == info_p.pretrain_loss and info_r.solver.iterations == info_p.solver.iterations
    assert not logits.requires_grad  # φ restored after both


def test_graph_with_example_weights_and_forward_over_reverse():
    pretrain_loss, solve, meta_loss_of, n = _logistic_problem()
    logits = torch.linspace(-1, 1, n, dtype=torch.float64)
    theta, phi = {"w": solve(logits)}, {"example_logits": logits}
    meta_loss = lambda th: meta_loss_of(th["w"])
    plain, _ = pretraining_hypergradient(pretrain_loss, meta_loss, theta, phi, Neumann(5, 0.5))
    graph = pretrain_graph(pretrain_loss, theta, phi)
    for kw in ({}, {"forward_over_reverse": True}):
        reused, _ = pretraining_hypergradient(pretrain_loss, meta_loss, theta, phi, Neumann(5, 0.5), graph=graph, **kw)
        assert _rel(reused["example_logits"], plain["example_logits"]) <= 1e-10, kw


def test_graph_from_another_theta_takes_second_derivatives_there():
    # graph at θ_a, meta-loss at θ_b: −Jᵀ(θ_a) · α Σ_j (I − αH(θ_a))^j · g(θ_b), with dense H and J.
    pretrain_loss, solve, meta_loss_of = _ridge_problem(seed=4)
    logits = torch.tensor([0.2, 0.1, -0.3, 0.4], dtype=torch.float64)
    theta_a = solve(logits) + 0.05 * torch.randn(6, dtype=torch.float64)
    theta_b = theta_a + 0.1 * torch.randn(6, dtype=torch.float64)
    alpha, m = 0.05, 4
    f = lambda th, lg: pretrain_loss({"w": th}, {"logits": lg})
    hess = torch.func.hessian(f, argnums=0)(theta_a, logits)
    jac = torch.autograd.functional.jacobian(lambda lg: torch.func.grad(f, argnums=0)(theta_a, lg), logits)  # [D, T]
    tb = theta_b.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(meta_loss_of(tb), tb)
    term, total = g, g.clone()
    for _ in range(m):
        term = term - alpha * hess @ term
        total = total + term
    expected = -jac.T @ (alpha * total)

    graph = pretrain_graph(pretrain_loss, {"w": theta_a}, {"logits": logits})
    hyper, info = pretraining_hypergradient(
        pretrain_loss, lambda th: meta_loss_of(th["w"]), {"w": theta_b}, {"logits": logits}, Neumann(m, alpha), graph=graph
    )
    torch.testing.assert_close(hyper["logits"], expected, rtol=1e-10, atol=1e-14)
    assert info.meta_loss == pytest.approx(float(meta_loss_of(theta_b).detach()), rel=1e-14)  # L_V at θ_b


def test_graph_survives_an_in_place_update_of_the_theta_it_was_built_from():
    pretrain_loss, solve, meta_loss_of = _ridge_problem(seed=5)
    logits = torch.zeros(4, dtype=torch.float64)
    w = solve(logits).requires_grad_(True)
    phi = {"logits": logits}
    graph = pretrain_graph(pretrain_loss, {"w": w}, phi)
    expected, _ = pretraining_hypergradient(pretrain_loss, lambda th: meta_loss_of(th["w"]), {"w": graph.theta["w"].detach()},
                                            phi, ConjugateGradient(30), graph=graph)
    with torch.no_grad():
        w.sub_(0.3)  # what an optimiser step does to the PT parameters
    again, _ = pretraining_hypergradient(pretrain_loss, lambda th: meta_loss_of(th["w"]), {"w": graph.theta["w"].detach()},
                                         phi, ConjugateGradient(30), graph=graph)
    torch.testing.assert_close(again["logits"], expected["logits"], rtol=0, atol=0)


def test_pretrain_graph_gradient_is_the_plain_gradient_and_none_where_unused():
    x = torch.randn(5, 3, dtype=torch.float64)
    loss = lambda th, ph: ((x @ th["w"]) ** 2 * torch.sigmoid(ph["p"])).sum()
    theta = {"w": torch.randn(3, dtype=torch.float64), "unused": torch.ones(2, dtype=torch.float64)}
    phi = {"p": torch.zeros(5, dtype=torch.float64)}
    graph = pretrain_graph(loss, theta, phi)
    assert isinstance(graph, PretrainGraph) and graph.grad["unused"] is None
    w = theta["w"].clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(loss({"w": w}, phi), w)
    torch.testing.assert_close(graph.grad["w"].detach(), expected, rtol=1e-14, atol=0)
    assert graph.grad["w"].requires_grad and graph.theta["w"] is not theta["w"]


def test_graph_built_with_other_phi_tensors_is_rejected():
    pretrain_loss, solve, meta_loss_of = _ridge_problem()
    logits = torch.zeros(4, dtype=torch.float64)
    theta = {"w": solve(logits)}
    graph = pretrain_graph(pretrain_loss, theta, {"logits": logits.clone()})
    with pytest.raises(ValueError, match="other phi"):
        pretraining_hypergradient(pretrain_loss, lambda th: meta_loss_of(th["w"]), theta, {"logits": logits},
                                  Identity(1.0), graph=graph)


# ---- the trainer -------------------------------------------------------------------------------


def _recording(base):
    """A strategy that records every hypergradient it reduces."""

    class Recording(base):
        def __init__(self):
            super().__init__()
            self.record = []

        def reduce_hypergrad(self, h):
            self.record.append({k: v.clone() for k, v in h.items()})
            return h

    return Recording()


def _trainer(problem, *, reuse, pt_lr=0.01, schedule=MetaSchedule(interval=3, warmup_steps=4)):
    return MetaPretrainer(
        problem, problem.initial_params(0), problem.initial_head(), problem.initial_metaparams(),
        pt_optimizer=lambda ps: torch.optim.Adam(ps, lr=pt_lr),
        meta_optimizer=lambda ps: torch.optim.Adam(ps, lr=0.1),
        inner_optimizer=sgd(0.1), solver=Neumann(2, 0.01), schedule=schedule,
        strategy=_recording(ReusePTGraph if reuse else Strategy),
    )


def test_reusing_trainer_follows_the_plain_phi_trajectory_when_theta_stands_still():
    # With a PT learning rate of 0 the PT step's θ is the meta-step's θ: the reused graph and a
    # second PT forward/backward differentiate the same L_PT at the same point.
    problem = SyntheticTaskWeighting(SyntheticConfig(seed=1), dtype=torch.float64)
    a = _trainer(problem, reuse=True, pt_lr=0.0)
    b = _trainer(problem, reuse=False, pt_lr=0.0)
    rec_a, rec_b = a.strategy.record, b.strategy.record
    a.run_until(25)
    b.run_until(25)
    assert len(rec_a) == len(rec_b) == 7
    for ha, hb in zip(rec_a, rec_b):
        assert _rel(ha["task_logits"], hb["task_logits"]) <= 1e-10
    torch.testing.assert_close(a.metaparams["task_logits"], b.metaparams["task_logits"], rtol=1e-10, atol=1e-12)
    for k in a.head:
        torch.testing.assert_close(a.head[k], b.head[k], rtol=1e-10, atol=1e-12)


def test_reusing_trainer_takes_second_derivatives_at_the_pt_step_theta():
    # One meta-step after one PT step: g = dL_V/dθ at θ₁ (after the step), H and the mixed term at
    # θ₀ on batch 0 (the step's own point and batch).
    problem = SyntheticTaskWeighting(SyntheticConfig(seed=2), dtype=torch.float64)
    t = _trainer(problem, reuse=True, schedule=MetaSchedule(interval=1))
    rec = t.strategy.record
    theta0 = {k: v.detach().clone() for k, v in t.params.items()}
    head0 = {k: v.clone() for k, v in t.head.items()}
    t.run_until(1)
    theta1 = {k: v.detach().clone() for k, v in t.params.items()}
    assert not torch.equal(theta0["encoder"], theta1["encoder"])

    def meta_loss(theta):
        head = unrolled_finetune(lambda h, k: problem.finetune_loss(theta, h, problem.finetune_batch(k)), head0, sgd(0.1), 1)
        return problem.finetune_loss(theta, head, problem.metaval_batch(0))

    pt_loss = lambda th, ph: problem.pretrain_loss(th, ph, problem.pretrain_batch(0))
    phi0 = {"task_logits": torch.zeros_like(t.metaparams["task_logits"])}  # φ before its update
    graph = pretrain_graph(pt_loss, theta0, phi0)
    expected, _ = pretraining_hypergradient(pt_loss, meta_loss, theta1, phi0, Neumann(2, 0.01), graph=graph)
    assert _rel(rec[0]["task_logits"], expected["task_logits"]) <= 1e-10
    plain_at_theta1, _ = pretraining_hypergradient(pt_loss, meta_loss, theta1, phi0, Neumann(2, 0.01))
    assert _rel(rec[0]["task_logits"], plain_at_theta1["task_logits"]) > 1e-8  # it is a different point


def test_graph_is_dropped_when_the_trainer_state_is_replaced():
    # load_state_dict between the PT step and the meta-step (θ replaced): the meta-step must not
    # use the kept graph, and its hypergradient equals a plain trainer's at the loaded state.
    problem = SyntheticTaskWeighting(SyntheticConfig(seed=3), dtype=torch.float64)
    sched = MetaSchedule(interval=2)
    a = _trainer(problem, reuse=True, schedule=sched)
    b = _trainer(problem, reuse=False, schedule=sched)
    for t in (a, b):
        t.pretrain_step()
        t.pretrain_step()  # a keeps its graph here
        state = t.state_dict()
        state["params"]["encoder"] = state["params"]["encoder"] * 0.5
        t.load_state_dict(state)
        t.meta_step()
    assert _rel(a.strategy.record[0]["task_logits"], b.strategy.record[0]["task_logits"]) <= 1e-12
    assert a.strategy.pt_graph(a) is None  # released


def test_graph_kept_only_before_a_meta_step():
    problem = SyntheticTaskWeighting(SyntheticConfig(seed=4), dtype=torch.float64)
    t = _trainer(problem, reuse=True, schedule=MetaSchedule(interval=3))
    t.pretrain_step()
    assert t.strategy.pt_graph(t) is None  # step 1: no meta-step follows
    t.pretrain_step()
    t.pretrain_step()
    assert t.strategy.pt_graph(t) is not None  # step 3: one does
