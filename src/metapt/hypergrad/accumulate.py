"""The accumulated estimator: every PT batch contributes its mixed term, not one batch per meta-step.

A single meta-step's hypergradient is mostly batch noise (benchmarks/results/hypergrad_quality.md:
pairwise cosine 0.04–0.2 between independent draws), so an estimate from one PT batch every
``interval`` steps wastes the batches in between. The one-step (identity, Adam-preconditioned)
hypergradient of a PT step on batch b is

    h_b = −α · ∂/∂φ ⟨∇θ L_PT(θ, φ; b), P ⊙ v⟩,      v = ∇θ L_V,  P = 1/(√v̂ + ε) (Adam's scaling)

and the only expensive part, v, changes slowly. So each PT step takes h_b against the latest v
(from the last meta-step, one interval old) and the meta-step averages them: ``interval`` times
as many PT draws per update, all on batches pre-training takes anyway.

⟨∇θ L_PT, u⟩ is the directional derivative of L_PT along u; :func:`directional_mixed_term` takes
it by a central difference, (L_PT(θ + hu) − L_PT(θ − hu)) / 2h, whose φ-gradient needs two
forwards at fixed θ and a backward that stops where φ enters: no second-order graph through the
network. Both forwards replay one RNG state, so dropout draws the same mask in each.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from ._tree import Params
from .core import HypergradInfo, differentiable
from .solvers import SolverInfo

__all__ = ["accumulated_hypergradient", "directional_mixed_term", "pretrain_backward_with_mixed_term"]


def _step_size(theta: Mapping[str, Tensor], direction: Mapping[str, Tensor], relative_step: float) -> float:
    """h = relative_step · max(‖θ‖, 1) / ‖u‖; 0 for a zero u, NaN for a non-finite one."""
    if not relative_step > 0:
        raise ValueError(f"relative_step must be > 0, got {relative_step}")
    theta_norm = math.sqrt(sum(float(v.detach().double().pow(2).sum()) for v in theta.values()))
    u_norm = math.sqrt(sum(float(v.detach().double().pow(2).sum()) for v in direction.values()))
    if u_norm == 0.0 or not math.isfinite(u_norm):
        return 0.0 if u_norm == 0.0 else math.nan
    return relative_step * max(theta_norm, 1.0) / u_norm


def _shifted(theta: Mapping[str, Tensor], direction: Mapping[str, Tensor], step: float) -> Params:
    return {k: (v.detach() + step * direction[k].to(v.dtype)) if k in direction else v.detach() for k, v in theta.items()}


def _rng_devices(theta: Mapping[str, Tensor]) -> list[int]:
    return sorted({v.device.index for v in theta.values() if v.device.type == "cuda"})


def _rng_state(devices: list[int]) -> tuple:
    return torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in devices]


def _set_rng_state(state: tuple, devices: list[int]) -> None:
    torch.set_rng_state(state[0])
    for d, s in zip(devices, state[1]):
        torch.cuda.set_rng_state(s, d)


def _phi_grads(loss: Tensor, leaves: Mapping[str, Tensor]) -> list[Tensor | None]:
    keys = list(leaves)
    return list(torch.autograd.grad(loss, [leaves[k] for k in keys], allow_unused=True)) if loss.requires_grad \
        else [None] * len(keys)


def pretrain_backward_with_mixed_term(
    pretrain_loss: Callable[[Params, Mapping[str, Tensor]], Tensor],
    theta: Mapping[str, Tensor],
    phi: Mapping[str, Tensor],
    direction: Mapping[str, Tensor],
    *,
    relative_step: float = 1e-3,
) -> tuple[Tensor, Params | None]:
    """A PT step's backward and, for one forward more, ∂/∂φ ⟨∇θ L_PT, u⟩ by a forward difference.

    Runs L_PT(θ, φ) and its backward exactly as a PT step would (θ's ``.grad`` receives ∇θ L_PT;
    the global RNG advances as that forward advances it), keeping ∂L_PT/∂φ of the same forward,
    then L_PT(θ + hu, φ) with the same random draws. Returns (L_PT detached, the mixed term);
    the mixed term is None when L_PT is not finite (no backward is run then, as a PT step) or
    u is not finite. The error is O(h) (:func:`directional_mixed_term` is O(h²) at two forwards).
    """
    h = _step_size(theta, direction, relative_step)
    devices = _rng_devices(theta)
    state = _rng_state(devices)
    leaves = {k: v.detach().requires_grad_(True) for k, v in phi.items()}
    with torch.enable_grad():
        loss = pretrain_loss(theta, leaves)
        if not bool(torch.isfinite(loss)):
            return loss.detach(), None
        loss.backward()
    keys = list(phi)
    if h == 0.0:
        return loss.detach(), {k: torch.zeros_like(phi[k]) for k in keys}
    if not math.isfinite(h):
        return loss.detach(), None
    base = [leaves[k].grad for k in keys]
    plus_leaves = {k: v.detach().requires_grad_(True) for k, v in phi.items()}
    with torch.random.fork_rng(devices=devices), torch.enable_grad():
        _set_rng_state(state, devices)
        plus = _phi_grads(pretrain_loss(_shifted(theta, direction, h), plus_leaves), plus_leaves)
    out = {}
    for k, b, p in zip(keys, base, plus):
        if b is None or p is None:
            out[k] = torch.zeros_like(phi[k])
        else:
            out[k] = (p - b) / h
    return loss.detach(), out


def directional_mixed_term(
    pretrain_loss: Callable[[Params, Mapping[str, Tensor]], Tensor],
    theta: Mapping[str, Tensor],
    phi: Mapping[str, Tensor],
    direction: Mapping[str, Tensor],
    *,
    relative_step: float = 1e-3,
) -> Params:
    """∂/∂φ ⟨∇θ L_PT(θ, φ), u⟩ for a fixed direction u, by a central difference along u.

    Exact for L_PT quadratic in θ; otherwise the error is O(h²) with h = ``relative_step`` ·
    ‖θ‖ / ‖u‖ (a step of that relative size in θ). Entries of φ that L_PT does not reach get
    zeros; a row-sparse read of φ (:func:`metapt.metaparams.gather_rows`) keeps its sparse
    gradient. Nothing is differentiated through θ, and the global RNG is left as it was.

    Args:
        pretrain_loss: ``(θ, φ) -> scalar`` on one PT batch.
        theta: θ (read only; detached copies are perturbed).
        phi: φ, leaf tensors (they are made to require grad for the call).
        direction: u, keyed like θ (entries missing from u are not moved).
        relative_step: the step's size relative to ‖θ‖ (float32: 1e-3 keeps the difference of
            the losses well above their rounding).
    """
    h = _step_size(theta, direction, relative_step)
    keys = list(phi)
    if h == 0.0 or not math.isfinite(h):
        return {k: torch.full_like(phi[k], 0.0 if h == 0.0 else math.nan) for k in keys}
    devices = _rng_devices(theta)
    flipped = [v for v in phi.values() if not v.requires_grad]
    for v in flipped:
        v.requires_grad_(True)
    try:
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            state = _rng_state(devices)
            losses = []
            for sign in (1.0, -1.0):  # the same random draws (dropout masks) at both points
                _set_rng_state(state, devices)
                losses.append(pretrain_loss(_shifted(theta, direction, sign * h), phi))
            grads = _phi_grads((losses[0] - losses[1]) / (2.0 * h), phi)
    finally:
        for v in flipped:
            v.requires_grad_(False)
    return {k: torch.zeros_like(phi[k]) if g is None else g.detach() for k, g in zip(keys, grads)}


def accumulated_hypergradient(
    pretrain_loss_at: Callable[[Params, Mapping[str, Tensor], int], Tensor],
    meta_loss: Callable[[Params], Tensor],
    theta: Mapping[str, Tensor],
    phi: Mapping[str, Tensor],
    *,
    alpha: float,
    preconditioner: Mapping[str, Tensor] | None = None,
    fresh: bool = True,
) -> tuple[dict[str, Tensor | None], HypergradInfo]:
    """A meta-step sample of the accumulated estimator: its validation direction, its direct term
    and, if ``fresh``, one mixed-term draw of its own.

        v = ∇θ L_V(θ),   h = ∂L_V/∂φ  [ − α ∂/∂φ ⟨∇θ L_PT(θ, φ; b₀), P ⊙ v⟩  if fresh ]

    with b₀ the upcoming PT batch (``pretrain_loss_at(θ, φ, 0)``). The PT steps' draws against the
    previous v are added by the caller, which keeps them between meta-steps; ``fresh`` is for a
    meta-step that no PT step drew for (its two forwards cost about an interval's PT-step draws).

    Args:
        pretrain_loss_at: ``(θ, φ, t) -> scalar``, L_PT on the t-th upcoming PT batch.
        meta_loss: ``θ -> scalar``, L_V (may read φ: the direct term).
        theta: θ (read only).
        phi: φ, leaf tensors.
        alpha: α of the one-step hypergradient.
        preconditioner: P, keyed like θ (Adam's 1/(√v̂ + ε)); None: the identity.
        fresh: take the mixed-term draw on b₀.

    Returns:
        ``(h, info)``: h keyed like φ, None for an entry neither L_V nor a draw reaches (so a
        row-sparse entry stays sparse when the caller adds the PT steps' draws); ``info.direction`` is v.
    """
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in theta.items()}
    keys_t, keys_p = list(leaves), list(phi)
    with differentiable(phi), torch.enable_grad():  # φ may come detached (the diagnostics' copies)
        lv = meta_loss(leaves)
        grads = torch.autograd.grad(lv, [leaves[k] for k in keys_t] + [phi[k] for k in keys_p], allow_unused=True)
    direction = {k: torch.zeros_like(leaves[k]) if g is None else g.detach() for k, g in zip(keys_t, grads)}
    direct = {k: d.detach() for k, d in zip(keys_p, grads[len(keys_t):]) if d is not None}
    if fresh:
        u = direction if preconditioner is None else {k: v * preconditioner[k] for k, v in direction.items()}
        mixed = directional_mixed_term(lambda th, ph: pretrain_loss_at(th, ph, 0), theta, phi, u)
        hyper: dict[str, Tensor | None] = {k: -alpha * v for k, v in mixed.items()}
        hyper = {k: v + direct[k] if k in direct else v for k, v in hyper.items()}
    else:  # φ that L_V does not read stays None (sparse once the PT steps' draws are added)
        hyper = {k: direct.get(k) for k in keys_p}
    norm = math.sqrt(sum(float(torch.sum((v.coalesce().values() if v.is_sparse else v) ** 2))
                         for v in hyper.values() if v is not None))
    info = HypergradInfo(solver=SolverInfo(0, None, 0.0, False), meta_loss=float(lv.detach()),
                         pretrain_loss=float("nan"), norm=norm,
                         direct_norm=math.sqrt(sum(float(torch.sum(d ** 2)) for d in direct.values())),
                         finite=math.isfinite(norm), direction=direction)
    return hyper, info
