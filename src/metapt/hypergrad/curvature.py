"""Curvature of the pre-training loss, matrix-free: Lanczos extreme eigenvalues and Gauss–Newton products.

Both work on the same contract as the solvers: a symmetric operator given as a function
``v ↦ A v`` over dict[str, Tensor] (``hvp`` for the Hessian H = ∂²L_PT/∂θ², or
:func:`gauss_newton_product` for G = Jᵀ H_ℓ J).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from ._tree import Params, tree_add, tree_dot, tree_scale

Operator = Callable[[Params], Params]


@dataclass(frozen=True)
class Spectrum:
    """Extreme eigenvalue estimates of a symmetric operator from k Lanczos steps.

    Attributes:
        lambda_max: the largest Ritz value (a lower bound on λmax(A), tight after a few dozen steps).
        lambda_min: the smallest Ritz value (an upper bound on λmin(A)).
        ritz_values: every Ritz value, ascending.
        iterations: operator products spent.
    """

    lambda_max: float
    lambda_min: float
    ritz_values: tuple[float, ...]
    iterations: int


def lanczos(matvec: Operator, like: Mapping[str, Tensor], steps: int = 20, *, seed: int = 0,
            start: Mapping[str, Tensor] | None = None) -> Spectrum:
    """Extreme eigenvalues of a symmetric operator by the Lanczos process (Lanczos, 1950).

    Builds the tridiagonal T_k = Q_kᵀ A Q_k with full re-orthogonalisation (k ≤ a few dozen, so
    storing Q_k is cheap) and returns the eigenvalues of T_k, the Ritz values. With k = dim(A)
    they are A's eigenvalues; with k ≪ dim(A) the extreme ones converge first.

    Args:
        matvec: ``v ↦ A v`` for dicts shaped like ``like``; A symmetric.
        like: a dict whose keys, shapes and dtypes the vectors take.
        steps: k, operator products to spend (at most dim(A) are used).
        seed: seeds the random start vector.
        start: a start vector instead of a random one.

    Returns:
        :class:`Spectrum`.
    """
    if steps < 1:
        raise ValueError(f"lanczos: steps must be >= 1, got {steps}")
    dim = sum(v.numel() for v in like.values())
    steps = min(steps, dim)
    if start is None:
        g = torch.Generator().manual_seed(seed)
        q = {k: torch.randn(v.shape, generator=g, dtype=v.dtype).to(v.device) for k, v in like.items()}
    else:
        q = {k: v.detach().clone() for k, v in start.items()}
    q = tree_scale(q, 1.0 / float(torch.sqrt(tree_dot(q, q))))
    basis: list[Params] = []
    alphas: list[float] = []
    betas: list[float] = []
    for _ in range(steps):
        basis.append(q)
        w = {k: v.detach() for k, v in matvec(q).items()}
        a = float(tree_dot(w, q))
        alphas.append(a)
        for u in basis:  # full re-orthogonalisation: w ← w − Σ ⟨w, u⟩ u, twice for stability
            w = tree_add(w, u, -float(tree_dot(w, u)))
        for u in basis:
            w = tree_add(w, u, -float(tree_dot(w, u)))
        b = float(torch.sqrt(tree_dot(w, w)))
        if len(basis) == steps or not math.isfinite(b) or b <= 1e-12 * max(abs(a), 1.0):
            break
        betas.append(b)
        q = tree_scale(w, 1.0 / b)
    n = len(alphas)
    t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if n > 1:
        off = torch.tensor(betas[: n - 1], dtype=torch.float64)
        t = t + torch.diag(off, 1) + torch.diag(off, -1)
    ritz = torch.linalg.eigvalsh(t)
    return Spectrum(float(ritz[-1]), float(ritz[0]), tuple(float(r) for r in ritz), n)


def hessian_spectrum(loss_fn: Callable[[Params], Tensor], params: Mapping[str, Tensor], steps: int = 10, *,
                     seed: int = 0) -> Spectrum:
    """Extreme eigenvalues of ∂²loss/∂params² at ``params``: :func:`lanczos` on Hessian-vector products.

    Lanczos, not plain power iteration: for the same products its top Ritz value is closer to
    λmax (exact once ``steps`` reaches the dimension), and it too is a lower bound. The start
    vector comes from its own seeded generator, so the global RNG is untouched.

    Args:
        loss_fn: ``params ↦ scalar`` (the batch and anything frozen captured by the closure).
        params: the point; entries are detached and made differentiable here.
        steps: Hessian-vector products to spend (at most the dimension are used).
        seed: seeds the random start vector.

    Returns:
        :class:`Spectrum`.
    """
    return lanczos(hessian_vector_product(loss_fn, params), params, steps, seed=seed)


def hessian_vector_product(loss_fn: Callable[[Params], Tensor], params: Mapping[str, Tensor]) -> Callable[[Params], Params]:
    """v ↦ (∂²loss/∂params²) v at ``params``, for solvers and spectra.

    One forward and one gradient with ``create_graph=True`` here; each product is then a backward
    through that gradient's graph only (for a fine-tuning head on a frozen encoder: the head's
    ops, not the encoder's). Entries the loss does not reach have zero curvature.
    """
    point = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    keys = list(point)
    with torch.enable_grad():
        loss = loss_fn(point)
        grads = torch.autograd.grad(loss, [point[k] for k in keys], create_graph=True, allow_unused=True)
    live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]  # others: zero curvature

    def hvp(v: Params) -> Params:
        out = {k: torch.zeros_like(point[k]) for k in keys}
        if live:
            products = torch.autograd.grad([grads[i] for i in live], [point[k] for k in keys],
                                           grad_outputs=[v[keys[i]] for i in live], retain_graph=True,
                                           allow_unused=True)
            out.update({k: p.detach() for k, p in zip(keys, products) if p is not None})
        return out

    return hvp


def gauss_newton_product(
    outputs: Callable[[Params], Tensor],
    output_loss: Callable[[Tensor], Tensor],
    theta: Mapping[str, Tensor],
) -> Operator:
    """v ↦ G v with G = Jᵀ H_ℓ J, the Gauss–Newton matrix of L(θ) = ℓ(f(θ)) (Schraudolph, 2002).

    J = ∂f/∂θ is the Jacobian of the network outputs and H_ℓ = ∂²ℓ/∂f² the Hessian of a loss
    convex in the outputs (for a masked weighted BCE on logits: diag(w·σ(1−σ)) ≥ 0), so G is
    positive semi-definite where H is not: the curvature to use off a stationary point. Costs one
    JVP, one output-space HVP and one VJP per product; nothing of size dim(θ)² is formed.

    Args:
        outputs: ``θ ↦ f(θ)``, a tensor of outputs (torch.func-compatible).
        output_loss: ``f ↦ ℓ(f)``, a scalar (closing over φ detached and the batch).
        theta: the point θ.

    Returns:
        ``gnvp(v)`` for dicts shaped like θ.
    """
    primal = {k: v.detach() for k, v in theta.items()}
    out, vjp_fn = torch.func.vjp(outputs, primal)
    out = out.detach()
    grad_loss = torch.func.grad(output_loss)

    def gnvp(v: Params) -> Params:
        _, jv = torch.func.jvp(outputs, (primal,), ({k: v[k].detach() for k in primal},))  # J v
        _, hjv = torch.func.jvp(grad_loss, (out,), (jv,))  # H_ℓ J v
        (res,) = vjp_fn(hjv)  # Jᵀ H_ℓ J v
        return {k: r.detach() for k, r in res.items()}

    return gnvp
