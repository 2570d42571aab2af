"""The inner optimisers against torch.optim and against hand-written steps."""

import pytest
import torch

from metapt.hypergrad import adam, sgd, unrolled_finetune
from tests.conftest import assert_trees_close


def _quadratic(a, b):
    def loss(params, step):
        w = params["w"]
        return 0.5 * (w @ a @ w) + b @ w + 0.1 * (w**4).sum()

    return loss


@pytest.mark.parametrize(
    "make, reference",
    [
        (lambda: sgd(0.1), lambda p: torch.optim.SGD(p, lr=0.1)),
        (lambda: sgd(0.05, momentum=0.9), lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9)),
        (lambda: adam(0.01, (0.8, 0.95), 1e-6), lambda p: torch.optim.Adam(p, lr=0.01, betas=(0.8, 0.95), eps=1e-6)),
    ],
)
def test_matches_torch_optim_values(make, reference):
    a = torch.randn(5, 5, dtype=torch.float64)
    a = a @ a.T + torch.eye(5, dtype=torch.float64)
    b = torch.randn(5, dtype=torch.float64)
    loss = _quadratic(a, b)
    w0 = torch.randn(5, dtype=torch.float64)

    ours = unrolled_finetune(loss, {"w": w0.clone()}, make(), steps=7)

    w = w0.clone().requires_grad_(True)
    opt = reference([w])
    for k in range(7):
        opt.zero_grad()
        loss({"w": w}, k).backward()
        opt.step()
    torch.testing.assert_close(ours["w"].detach(), w.detach(), rtol=1e-12, atol=1e-12)


def test_adam_second_derivative_finite_at_zero_gradient():
    # One coordinate's gradient is exactly zero at the start: the naive sqrt(v)
    # gives d²/dθ² = 0·inf = NaN there.
    x = torch.tensor([0.0, 1.5], dtype=torch.float64, requires_grad=True)
    theta = torch.tensor([0.3, -0.2], dtype=torch.float64, requires_grad=True)

    def loss(params, step):
        return ((params["w"] * x) ** 2).sum() * theta.sum() ** 2

    out = unrolled_finetune(loss, {"w": torch.tensor([1.0, 1.0], dtype=torch.float64)}, adam(0.1), steps=3)
    meta = (out["w"] ** 2).sum()
    (g,) = torch.autograd.grad(meta, theta, create_graph=True)
    (h,) = torch.autograd.grad(g.sum(), theta)
    assert torch.isfinite(g).all() and torch.isfinite(h).all()


def test_adam_value_unchanged_by_safe_sqrt():
    # With v exactly 0 the update is m/(0+eps) = 0; with v > 0 it is the usual one.
    opt = adam(0.1)
    params = {"w": torch.tensor([1.0, 2.0])}
    new, _ = opt.update(params, {"w": torch.tensor([0.0, 3.0])}, opt.init(params))
    torch.testing.assert_close(new["w"], torch.tensor([1.0, 2.0 - 0.1 * 3.0 / (3.0 + 1e-8)]))


def _sgd_momentum_by_hand(w, grads):
    buf = torch.zeros_like(w)
    for gk in grads(w):
        buf = 0.5 * buf + gk
        w = w - 0.2 * buf
        yield w


def _adam_by_hand(w, grads):
    m = v = torch.zeros_like(w)
    for k, gk in enumerate(grads(w), start=1):
        m = 0.9 * m + 0.1 * gk
        v = 0.999 * v + 0.001 * gk**2
        w = w - 0.05 * (m / (1 - 0.9**k)) / (torch.sqrt(v / (1 - 0.999**k)) + 1e-8)
        yield w


@pytest.mark.parametrize("opt, by_hand", [(sgd(0.2, momentum=0.5), _sgd_momentum_by_hand), (adam(0.05), _adam_by_hand)])
def test_unroll_equals_autograd_through_explicit_steps(opt, by_hand):
    # Gradient of the unrolled result w.r.t. the initial params and a captured tensor,
    # against the same K steps written out by hand.
    feat = torch.randn(8, 3, dtype=torch.float64, requires_grad=True)  # plays the encoder output
    y = torch.randn(8, dtype=torch.float64)
    w0 = torch.randn(3, dtype=torch.float64, requires_grad=True)

    def loss(params, step):
        return ((feat[step::2] @ params["w"] - y[step::2]) ** 2).mean()

    out = unrolled_finetune(loss, {"w": w0}, opt, steps=4)
    got = torch.autograd.grad((out["w"] ** 3).sum(), (feat, w0))

    state = {"w": w0}

    def grads(_):
        for k in range(4):
            (gk,) = torch.autograd.grad(loss(state, k), state["w"], create_graph=True)
            yield gk

    for w in by_hand(w0, grads):
        state["w"] = w
    want = torch.autograd.grad((state["w"] ** 3).sum(), (feat, w0))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_zero_steps_is_identity_and_bad_args_raise():
    p = {"w": torch.ones(2)}
    assert_trees_close(unrolled_finetune(lambda q, k: q["w"].sum(), p, sgd(0.1), 0), p, rtol=0)
    with pytest.raises(ValueError, match="lr"):
        sgd(-1.0)
    with pytest.raises(ValueError, match="betas"):
        adam(0.1, betas=(1.0, 0.9))
    with pytest.raises(ValueError, match="scalar"):
        unrolled_finetune(lambda q, k: q["w"], p, sgd(0.1), 1)
