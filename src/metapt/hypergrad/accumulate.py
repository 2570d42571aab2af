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

__all__ = ["directional_mixed_term"]


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
    if not relative_step > 0:
        raise ValueError(f"directional_mixed_term: relative_step must be > 0, got {relative_step}")
    theta_norm = math.sqrt(sum(float(v.detach().double().pow(2).sum()) for v in theta.values()))
    u_norm = math.sqrt(sum(float(v.detach().double().pow(2).sum()) for v in direction.values()))
    keys = list(phi)
    if u_norm == 0.0 or not math.isfinite(u_norm):
        fill = 0.0 if u_norm == 0.0 else math.nan
        return {k: torch.full_like(phi[k], fill) for k in keys}
    h = relative_step * max(theta_norm, 1.0) / u_norm
    shifted = [{k: (v.detach() + sign * h * direction[k].to(v.dtype)) if k in direction else v.detach()
                for k, v in theta.items()} for sign in (1.0, -1.0)]
    devices = sorted({v.device.index for v in theta.values() if v.device.type == "cuda"})
    flipped = [v for v in phi.values() if not v.requires_grad]
    for v in flipped:
        v.requires_grad_(True)
    try:
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            cpu_state = torch.get_rng_state()
            cuda_states = [torch.cuda.get_rng_state(d) for d in devices]
            losses = []
            for th in shifted:  # the same random draws (dropout masks) at both points
                torch.set_rng_state(cpu_state)
                for d, s in zip(devices, cuda_states):
                    torch.cuda.set_rng_state(s, d)
                losses.append(pretrain_loss(th, phi))
            diff = (losses[0] - losses[1]) / (2.0 * h)
            grads = torch.autograd.grad(diff, [phi[k] for k in keys], allow_unused=True) \
                if diff.requires_grad else [None] * len(keys)
    finally:
        for v in flipped:
            v.requires_grad_(False)
    return {k: torch.zeros_like(phi[k]) if g is None else g.detach() for k, g in zip(keys, grads)}
