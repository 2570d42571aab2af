"""Estimators against dense closed forms: the preconditioned solve, the truncated horizon, the PT optimiser twin."""

import pytest
import torch

from metapt.hypergrad import (
    ConjugateGradient,
    Estimator,
    Identity,
    Neumann,
    adam_preconditioner,
    differentiable_pt_optimizer,
    estimate_hypergradient,
    pretrain_lookahead,
    pretraining_hypergradient,
    unrolled_pretraining_hypergradient,
)

D, P = 5, 3


def _quadratic(seed=0):
    """L_PT = ½θᵀAθ + θᵀCφ (∇θ = Aθ + Cφ, ∂²L/∂θ∂φ = C); L_V = ½‖θ − t‖² (g = θ − t)."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))
    a = q @ torch.diag(torch.linspace(0.5, 3.0, D, dtype=torch.float64)) @ q.T
    c = torch.randn(D, P, generator=g, dtype=torch.float64)
    t = torch.randn(D, generator=g, dtype=torch.float64)
    theta = {"w": torch.randn(D, generator=g, dtype=torch.float64)}
    phi = {"p": torch.randn(P, generator=g, dtype=torch.float64)}
    pre = {"w": torch.rand(D, generator=g, dtype=torch.float64) + 0.5}

    def pretrain_loss(th, ph):
        return 0.5 * th["w"] @ a @ th["w"] + th["w"] @ (c @ ph["p"])

    def meta_loss(th):
        return 0.5 * ((th["w"] - t) ** 2).sum()

    return a, c, t, theta, phi, pre, pretrain_loss, meta_loss


def test_identity_with_preconditioner_is_alpha_p_g():
    a, c, t, theta, phi, pre, lpt, lv = _quadratic()
    hyper, _ = pretraining_hypergradient(lpt, lv, theta, phi, Identity(0.1), preconditioner=pre)
    g = theta["w"] - t
    torch.testing.assert_close(hyper["p"], -c.T @ (0.1 * pre["w"] * g), rtol=1e-12, atol=0)


def test_neumann_with_preconditioner_is_m_steps_of_the_preconditioned_update():
    a, c, t, theta, phi, pre, lpt, lv = _quadratic(1)
    alpha, m = 0.2, 4
    hyper, _ = pretraining_hypergradient(lpt, lv, theta, phi, Neumann(steps=m, alpha=alpha), preconditioner=pre)
    p_mat, g = torch.diag(pre["w"]), theta["w"] - t
    step = torch.eye(D, dtype=torch.float64) - alpha * a @ p_mat
    x = alpha * p_mat @ sum(torch.linalg.matrix_power(step, j) @ g for j in range(m + 1))
    torch.testing.assert_close(hyper["p"], -c.T @ x, rtol=1e-11, atol=0)
    # and it is the derivative of L_V along M + 1 steps of θ ← θ − αP∇L_PT, g held at θ
    # (θ_{M+1} − θ is linear in φ with slope −Σ_j (I − αPA)^j αP C)
    slope = -sum(torch.linalg.matrix_power(torch.eye(D, dtype=torch.float64) - alpha * p_mat @ a, j)
                 for j in range(m + 1)) @ (alpha * p_mat @ c)
    torch.testing.assert_close(hyper["p"], slope.T @ g, rtol=1e-11, atol=0)


def test_exact_solve_ignores_the_preconditioner():
    a, c, t, theta, phi, pre, lpt, lv = _quadratic(2)
    hyper, _ = pretraining_hypergradient(lpt, lv, theta, phi, ConjugateGradient(max_iter=50, tol=1e-14),
                                         preconditioner=pre)
    torch.testing.assert_close(hyper["p"], -c.T @ torch.linalg.solve(a, theta["w"] - t), rtol=1e-10, atol=0)


def test_truncated_horizon_equals_the_dense_sgd_unroll():
    a, c, t, theta, phi, _, lpt, lv = _quadratic(3)
    lr, steps = 0.1, 7
    opt = torch.optim.SGD([theta["w"].clone().requires_grad_(True)], lr=lr)
    inner, state = differentiable_pt_optimizer(opt, {"w": opt.param_groups[0]["params"][0]})
    hyper, info = unrolled_pretraining_hypergradient(lambda th, ph, k: lpt(th, ph), lv, theta, phi, inner, state, steps)
    # θ_T = (I − ηA)^T θ_0 − η Σ_{j<T} (I − ηA)^j C φ
    m = torch.eye(D, dtype=torch.float64) - lr * a
    theta_t = torch.linalg.matrix_power(m, steps) @ theta["w"] - lr * sum(
        torch.linalg.matrix_power(m, j) for j in range(steps)) @ c @ phi["p"]
    jac = -lr * sum(torch.linalg.matrix_power(m, j) for j in range(steps)) @ c
    torch.testing.assert_close(hyper["p"], jac.T @ (theta_t - t), rtol=1e-11, atol=0)
    assert info.solver.iterations == steps


def _nonlinear(seed=0):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(8, 3, generator=g, dtype=torch.float64) for _ in range(4)]
    ys = [torch.randn(8, generator=g, dtype=torch.float64) for _ in range(4)]
    theta = {"w1": torch.randn(3, 4, generator=g, dtype=torch.float64) * 0.5,
             "w2": torch.randn(4, generator=g, dtype=torch.float64) * 0.5}
    phi = {"p": torch.randn(8, generator=g, dtype=torch.float64) * 0.1}
    xv, yv = torch.randn(8, 3, generator=g, dtype=torch.float64), torch.randn(8, generator=g, dtype=torch.float64)

    def loss_at(th, ph, k):
        r = torch.tanh(xs[k] @ th["w1"]) @ th["w2"] - ys[k]
        return (2 * torch.sigmoid(ph["p"]) * r**2).mean()

    def meta_loss(th):
        return ((torch.tanh(xv @ th["w1"]) @ th["w2"] - yv) ** 2).mean()

    return theta, phi, loss_at, meta_loss


def test_truncated_horizon_through_adam_matches_finite_differences():
    theta, phi, loss_at, meta_loss = _nonlinear()
    params = {k: v.clone().requires_grad_(True) for k, v in theta.items()}
    opt = torch.optim.Adam(list(params.values()), lr=0.05)
    for k in range(2):  # a PT optimiser with some state
        opt.zero_grad()
        loss_at(params, phi, k).backward()
        opt.step()
    start = {k: v.detach().clone() for k, v in params.items()}
    inner, state = differentiable_pt_optimizer(opt, params)
    hyper, _ = unrolled_pretraining_hypergradient(loss_at, meta_loss, start, phi, inner, state, 4)

    def f(p):
        inner_, state_ = differentiable_pt_optimizer(opt, params)
        return float(meta_loss(pretrain_lookahead(loss_at, start, {"p": p}, inner_, state_, 4)))

    eps = 1e-6
    fd = torch.tensor([(f(phi["p"] + eps * e) - f(phi["p"] - eps * e)) / (2 * eps)
                       for e in torch.eye(8, dtype=torch.float64)], dtype=torch.float64)
    torch.testing.assert_close(hyper["p"], fd, rtol=1e-6, atol=1e-10)


def test_pt_optimizer_twin_reproduces_torch_adam():
    theta, phi, loss_at, _ = _nonlinear(1)
    params = {k: v.clone().requires_grad_(True) for k, v in theta.items()}
    opt = torch.optim.Adam(list(params.values()), lr=0.03, betas=(0.8, 0.99), eps=1e-7)
    for k in range(3):
        opt.zero_grad()
        loss_at(params, phi, k % 4).backward()
        opt.step()
    inner, state = differentiable_pt_optimizer(opt, params)
    twin = pretrain_lookahead(lambda th, ph, k: loss_at(th, ph, (k + 3) % 4), params, phi, inner, state, 5)
    for k in range(5):
        opt.zero_grad()
        loss_at(params, phi, (k + 3) % 4).backward()
        opt.step()
    for k in params:
        torch.testing.assert_close(twin[k], params[k].detach(), rtol=1e-12, atol=1e-14)


def test_adam_preconditioner_reads_the_bias_corrected_second_moment():
    theta, phi, loss_at, _ = _nonlinear(2)
    params = {k: v.clone().requires_grad_(True) for k, v in theta.items()}
    opt = torch.optim.Adam(list(params.values()), lr=0.01, betas=(0.9, 0.95), eps=1e-6)
    grads_sq = {k: torch.zeros_like(v) for k, v in params.items()}
    for k in range(3):
        opt.zero_grad()
        loss_at(params, phi, k).backward()
        for n, v in params.items():
            grads_sq[n] = 0.95 * grads_sq[n] + 0.05 * v.grad.detach() ** 2
        opt.step()
    pre = adam_preconditioner(opt, params)
    for n in params:
        torch.testing.assert_close(pre[n], 1 / ((grads_sq[n] / (1 - 0.95**3)).sqrt() + 1e-6), rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="not Adam"):
        adam_preconditioner(torch.optim.SGD(list(params.values()), lr=0.1), params)


def test_estimate_takes_the_batches_the_estimator_names():
    a, c, t, theta, phi, pre, lpt, lv = _quadratic(4)
    seen = []

    def loss_at(th, ph, k):
        seen.append(k)
        return lpt(th, ph)

    opt = torch.optim.Adam([theta["w"].clone().requires_grad_(True)], lr=0.1)
    params = {"w": opt.param_groups[0]["params"][0]}
    for est, expect in ((Estimator(), [-1]), (Estimator(pt_batches=3, upcoming=True), [0, 1, 2]), (Estimator(pt_batches=2), [-1, -2]), (Estimator(horizon=2), [0, 1])):
        seen.clear()
        estimate_hypergradient(est, loss_at, lv, theta, phi, opt, params)
        assert seen == expect
    with pytest.raises(ValueError, match="horizon"):
        Estimator(horizon=2, upcoming=True)


class _BCEProblem:
    """A tiny MLP multitask BCE problem exposing its PT loss as outputs + a loss convex in them."""

    def __init__(self, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(4, 6, 3, generator=g, dtype=torch.float64)  # 4 batches of 6
        self.y = (torch.rand(4, 6, 2, generator=g) > 0.5).to(torch.float64)
        self.xv = torch.randn(6, 3, generator=g, dtype=torch.float64)
        self.yv = (torch.rand(6, 1, generator=g) > 0.5).to(torch.float64)
        self.theta = {"w1": torch.randn(3, 4, generator=g, dtype=torch.float64),
                      "w2": torch.randn(4, 2, generator=g, dtype=torch.float64)}
        self.phi = {"logits": torch.randn(2, generator=g, dtype=torch.float64)}

    def pretrain_outputs(self, params, metaparams, batch):
        return torch.tanh(self.x[batch] @ params["w1"]) @ params["w2"]

    def pretrain_output_loss(self, outputs, metaparams, batch):
        bce = torch.nn.functional.binary_cross_entropy_with_logits(outputs, self.y[batch], reduction="none")
        return (2 * torch.sigmoid(metaparams["logits"]) * bce).mean()

    def pretrain_loss(self, params, metaparams, batch):
        return self.pretrain_output_loss(self.pretrain_outputs(params, metaparams, batch), metaparams, batch)

    def finetune_loss(self, params, head, batch):
        z = torch.tanh(self.xv @ params["w1"]) @ head["w"]
        return torch.nn.functional.binary_cross_entropy_with_logits(z, self.yv)

    def pretrain_batch(self, index):
        return index % 4

    def finetune_batch(self, index):
        return None

    def metaval_batch(self, index):
        return None

    def describe_metaparams(self, metaparams):
        return {}


def test_gauss_newton_estimator_matches_the_dense_gauss_newton_hypergradient():
    prob = _BCEProblem()
    head = {"w": torch.full((4, 1), 0.3, dtype=torch.float64)}
    lv = lambda th: prob.finetune_loss(th, head, None)  # noqa: E731
    opt = torch.optim.Adam([v.clone().requires_grad_(True) for v in prob.theta.values()], lr=0.1)
    est = Estimator(solver=ConjugateGradient(max_iter=200, tol=1e-13, damping=1e-2), pt_batches=2, upcoming=True,
                    gauss_newton=True)
    gn_at = lambda t: (lambda th: prob.pretrain_outputs(th, prob.phi, t), lambda o: prob.pretrain_output_loss(  # noqa: E731
        o, {k: v.detach() for k, v in prob.phi.items()}, t))
    hyper, _ = estimate_hypergradient(est, lambda th, ph, t: prob.pretrain_loss(th, ph, t), lv, prob.theta, prob.phi,
                                      opt, dict(zip(prob.theta, opt.param_groups[0]["params"])), gauss_newton_at=gn_at)
    flat = torch.cat([v.reshape(-1) for v in prob.theta.values()])

    def unflat(f):
        return {"w1": f[:12].reshape(3, 4), "w2": f[12:].reshape(4, 2)}

    gmat = torch.zeros(20, 20, dtype=torch.float64)
    for t in (0, 1):  # mean over the two upcoming batches of JᵀH_ℓJ
        jac = torch.autograd.functional.jacobian(lambda f: prob.pretrain_outputs(unflat(f), prob.phi, t).reshape(-1), flat)
        out = prob.pretrain_outputs(prob.theta, prob.phi, t)
        h_out = torch.autograd.functional.hessian(
            lambda o: prob.pretrain_output_loss(o.reshape(out.shape), prob.phi, t), out.reshape(-1))
        gmat += jac.T @ h_out @ jac / 2
    gmat += 1e-2 * torch.eye(20, dtype=torch.float64)
    mixed = torch.autograd.functional.jacobian(
        lambda p: torch.autograd.functional.jacobian(
            lambda f: sum(prob.pretrain_loss(unflat(f), {"logits": p}, t) for t in (0, 1)) / 2, flat, create_graph=True),
        prob.phi["logits"])
    g = torch.autograd.functional.jacobian(lambda f: lv(unflat(f)), flat)
    torch.testing.assert_close(hyper["logits"], -mixed.T @ torch.linalg.solve(gmat, g), rtol=1e-7, atol=1e-12)


def test_trainer_takes_gauss_newton_products_from_the_problem_or_says_why_not():
    from metapt import MetaPretrainer, MetaSchedule
    from metapt.hypergrad import sgd

    prob = _BCEProblem(1)
    est = Estimator(solver=ConjugateGradient(max_iter=10, damping=0.1), upcoming=True, gauss_newton=True)
    make = lambda p: MetaPretrainer(  # noqa: E731
        p, prob.theta, {"w": torch.zeros(4, 1, dtype=torch.float64)}, prob.phi,
        pt_optimizer=lambda ps: torch.optim.Adam(ps, lr=0.01), meta_optimizer=lambda ps: torch.optim.Adam(ps, lr=0.1),
        inner_optimizer=sgd(0.1), schedule=MetaSchedule(interval=2, warmup_steps=0), estimator=est)
    trainer = make(prob)
    trainer.run_until(4)
    assert trainer.meta_step_count == 2 and trainer.skipped == 0
    assert not torch.equal(trainer.metaparams["logits"].detach(), prob.phi["logits"])

    class Plain:  # the same losses, without the outputs/loss split
        def __init__(self):
            self.base = _BCEProblem(1)

        def __getattr__(self, name):
            if name in ("pretrain_outputs", "pretrain_output_loss"):
                raise AttributeError(name)
            return getattr(self.base, name)

    with pytest.raises(ValueError, match="pretrain_outputs"):
        make(Plain()).run_until(2)
