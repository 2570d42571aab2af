"""Differentiable inner optimisers as pure step functions.

Each factory returns an :class:`InnerOptimizer`, a pair of pure functions
``init(params) -> state`` and ``update(params, grads, state) -> (params, state)``
in the style of optax. Nothing is updated in place, so the new parameters are
differentiable functions of the old ones, of the gradients and of anything the
gradients depend on; that is what unrolled fine-tuning needs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import NamedTuple

import torch
from torch import Tensor

from ._tree import Params


class InnerOptimizer(NamedTuple):
    """A pure, differentiable optimiser: ``init`` and ``update``.

    ``lr`` and ``with_lr`` (the same optimiser at another rate) are set by :func:`sgd` only: a
    plain gradient step's stability is a matter of its rate against the loss's curvature, which
    is what the trainer's inner-rate cap (``MetaPretrainer(inner_lr_cap=...)``) checks.
    Optimisers without them are used as given.
    """

    init: Callable[[Mapping[str, Tensor]], tuple]
    update: Callable[[Mapping[str, Tensor], Mapping[str, Tensor], tuple], tuple[Params, tuple]]
    lr: float | None = None
    with_lr: Callable[[float], InnerOptimizer] | None = None


class SGDState(NamedTuple):
    momentum: Params | None


class AdamState(NamedTuple):
    count: int
    mu: Params
    nu: Params


def sgd(lr: float, momentum: float = 0.0) -> InnerOptimizer:
    """Stochastic gradient descent, optionally with heavy-ball momentum.

    ``b <- momentum * b + g``;  ``p <- p - lr * b``  (PyTorch's convention).
    """
    if lr <= 0:
        raise ValueError(f"sgd: lr must be > 0, got {lr}")
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"sgd: momentum must be in [0, 1), got {momentum}")

    def init(params: Mapping[str, Tensor]) -> SGDState:
        if momentum == 0.0:
            return SGDState(None)
        return SGDState({k: torch.zeros_like(v) for k, v in params.items()})

    def update(params, grads, state: SGDState):
        if state.momentum is None:
            return {k: params[k] - lr * grads[k] for k in params}, state
        buf = {k: momentum * state.momentum[k] + grads[k] for k in params}
        return {k: params[k] - lr * buf[k] for k in params}, SGDState(buf)

    return InnerOptimizer(init, update, lr, lambda rate: sgd(rate, momentum))


def _safe_sqrt(x: Tensor) -> Tensor:
    """sqrt whose derivative at 0 is 0 instead of inf.

    d sqrt(v)/dv = 1/(2 sqrt v) is infinite at v = 0, and multiplied by the zero
    that d v/d g = 2 g gives there it turns into NaN in the second derivative of
    Adam wherever a gradient is exactly zero. The subgradient 0 is the limit of
    d|g|/dg's symmetric average, and keeps the value unchanged.
    """
    positive = x > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, x, torch.ones_like(x))), torch.zeros_like(x))


def adam(lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> InnerOptimizer:
    """Adam (Kingma & Ba, 2015) with bias correction, differentiable to second order.

    ``m <- b1 m + (1-b1) g``, ``v <- b2 v + (1-b2) g^2``,
    ``p <- p - lr * m_hat / (sqrt(v_hat) + eps)``.
    """
    b1, b2 = betas
    if lr <= 0:
        raise ValueError(f"adam: lr must be > 0, got {lr}")
    if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
        raise ValueError(f"adam: betas must be in [0, 1), got {betas}")
    if eps <= 0:
        raise ValueError(f"adam: eps must be > 0, got {eps}")

    def init(params: Mapping[str, Tensor]) -> AdamState:
        zeros = {k: torch.zeros_like(v) for k, v in params.items()}
        return AdamState(0, zeros, dict(zeros))

    def update(params, grads, state: AdamState):
        count = state.count + 1
        mu = {k: b1 * state.mu[k] + (1 - b1) * grads[k] for k in params}
        nu = {k: b2 * state.nu[k] + (1 - b2) * grads[k] * grads[k] for k in params}
        c1, c2 = 1 - b1**count, 1 - b2**count
        new = {k: params[k] - lr * (mu[k] / c1) / (_safe_sqrt(nu[k] / c2) + eps) for k in params}
        return new, AdamState(count, mu, nu)

    return InnerOptimizer(init, update)
