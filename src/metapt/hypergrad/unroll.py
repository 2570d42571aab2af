"""Unrolled fine-tuning: K differentiable optimiser steps."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from ._tree import Params
from .optim import InnerOptimizer


def unrolled_finetune(
    loss_fn: Callable[[Params, int], Tensor],
    params: Mapping[str, Tensor],
    optimizer: InnerOptimizer,
    steps: int,
    *,
    state: tuple | None = None,
    return_state: bool = False,
):
    """Take ``steps`` optimiser steps on ``loss_fn`` and keep the whole graph.

    ψ_{k+1} = update(ψ_k, ∇ψ loss_fn(ψ_k, k)) for k = 0..K-1, each gradient taken
    with ``create_graph=True`` so that ψ_K is a differentiable function of ψ_0 and
    of every tensor ``loss_fn`` closes over (the pre-trained encoder θ, typically).

    Args:
        loss_fn: ``loss_fn(params, step) -> scalar``; the FT-train loss on the
            step's batch. Frozen parameters are captured by the closure.
        params: the parameters fine-tuning updates (the head, or head and encoder).
            Entries that do not require grad are made differentiable copies.
        optimizer: an :class:`InnerOptimizer` (``sgd``, ``adam``).
        steps: K >= 0.
        state: optimiser state to start from (default ``optimizer.init(params)``).
        return_state: also return the final optimiser state.

    Returns:
        The final params ψ_K (and the optimiser state if ``return_state``).
    """
    if steps < 0:
        raise ValueError(f"unrolled_finetune: steps must be >= 0, got {steps}")
    params = {k: v if v.requires_grad else v.detach().requires_grad_(True) for k, v in params.items()}
    if state is None:
        state = optimizer.init(params)
    keys = list(params)
    with torch.enable_grad():
        for k in range(steps):
            loss = loss_fn(params, k)
            if loss.dim() != 0:
                raise ValueError(f"unrolled_finetune: loss_fn must return a scalar, got shape {tuple(loss.shape)}")
            grads = torch.autograd.grad(loss, [params[n] for n in keys], create_graph=True, allow_unused=True)
            grads = {n: torch.zeros_like(params[n]) if g is None else g for n, g in zip(keys, grads)}
            params, state = optimizer.update(params, grads, state)
    return (params, state) if return_state else params
