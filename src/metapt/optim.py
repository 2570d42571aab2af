"""Optimisers for meta-parameters whose hypergradient is row-sparse (per-example weights).

A meta-step's batch reads B of N example-weight logits, so its hypergradient has at most B
non-zero rows (:func:`metapt.metaparams.gather_rows` returns it as a sparse COO tensor). A dense
optimiser then (a) spends O(N) time and memory per step, and (b) for Adam, keeps moving every
row it ever touched, by about 5·lr after a single touch whatever the size of that gradient.
Both optimisers here update only the rows a gradient holds and cost O(B) per step; given a dense
gradient they update every entry (so a φ dict mixing dense and row-sparse entries needs one
optimiser).

* :class:`LazyAdam` — Adam with a step count per row: a row's moments and bias corrections
  advance only when the row is touched (dense gradients: exactly ``torch.optim.Adam``).
* :class:`LazySGD` — SGD whose step is divided by a running root-mean-square of the gradient
  entries it has seen, one scalar per tensor: scale-free like Adam (the hypergradient of one
  example logit is tiny), but each row moves in proportion to its own gradient, so the
  magnitude of the evidence about an example is kept.

Both are plain ``torch.optim.Optimizer`` subclasses: ``state_dict``/``load_state_dict`` and
so checkpoints work as for any torch optimiser.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["LazyAdam", "LazySGD", "accepts_sparse_grad"]


def _rows(grad: Tensor) -> tuple[Tensor | None, Tensor]:
    """(row indices, values) of a sparse COO gradient (coalesced), or (None, grad) for a dense one."""
    if not grad.is_sparse:
        return None, grad
    grad = grad.coalesce()
    if grad.sparse_dim() != 1:
        raise ValueError(f"row-sparse gradients must have one sparse dimension (rows), got {grad.sparse_dim()}")
    return grad.indices()[0], grad.values()


class LazyAdam(torch.optim.Optimizer):
    r"""Adam that updates only the rows a (sparse) gradient touches, with a step count per row.

    For a touched row r with gradient g_r, its own step count k_r ← k_r + 1 and

    .. math::
        m_r ← β_1 m_r + (1 − β_1) g_r,\quad v_r ← β_2 v_r + (1 − β_2) g_r^2,\quad
        φ_r ← φ_r − \mathrm{lr}\,\frac{m_r / (1 − β_1^{k_r})}{\sqrt{v_r / (1 − β_2^{k_r})} + ε}

    Untouched rows keep φ, m, v and k. With dense gradients every row is touched every step and
    this is ``torch.optim.Adam``, to the bit (same state layout: ``step`` a scalar tensor there; a
    tensor with dense steps that then gets row-sparse ones starts every row's count at that scalar).

    Args:
        params: tensors (or param groups).
        lr: step size (default: 1e-3).
        betas: (β₁, β₂) (default: (0.9, 0.999)).
        eps: ε (default: 1e-8).
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        if not lr > 0:
            raise ValueError(f"LazyAdam: lr must be > 0, got {lr}")
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"LazyAdam: betas must be in [0, 1), got {betas}")
        if not eps >= 0:
            raise ValueError(f"LazyAdam: eps must be >= 0, got {eps}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                rows, g = _rows(p.grad)
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    # dense: one count (torch.optim.Adam's layout); sparse: one count per row
                    state["step"] = (torch.zeros(p.shape[0], dtype=torch.float32) if rows is not None
                                     else torch.zeros((), dtype=torch.float32))
                m, v, k = state["exp_avg"], state["exp_avg_sq"], state["step"]
                if rows is None:
                    if k.dim() != 0:
                        raise ValueError("LazyAdam: a tensor that had row-sparse gradients got a dense one")
                    k += 1
                    m.lerp_(g, 1 - beta1)
                    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                    step = float(k)
                    bc1, bc2 = 1 - beta1**step, 1 - beta2**step
                    denom = (v.sqrt() / bc2**0.5).add_(eps)
                    p.addcdiv_(m, denom, value=-lr / bc1)
                    continue
                if k.dim() != 1:  # dense steps so far (e.g. a torch.optim.Adam checkpoint): every row took them
                    k = state["step"] = torch.full((p.shape[0],), float(k), dtype=torch.float32)
                k_r = k.index_select(0, rows) + 1
                k.index_copy_(0, rows, k_r)
                m_r = m.index_select(0, rows).mul_(beta1).add_(g, alpha=1 - beta1)
                v_r = v.index_select(0, rows).mul_(beta2).addcmul_(g, g, value=1 - beta2)
                m.index_copy_(0, rows, m_r)
                v.index_copy_(0, rows, v_r)
                shape = (-1,) + (1,) * (p.dim() - 1)
                k_r = k_r.to(torch.float64)
                bc1 = (1 - beta1**k_r).to(p.dtype).view(shape)
                bc2 = (1 - beta2**k_r).to(p.dtype).view(shape)
                update = (m_r / bc1) / ((v_r / bc2).sqrt_().add_(eps))
                p.index_add_(0, rows, update, alpha=-lr)
        return loss


class LazySGD(torch.optim.Optimizer):
    r"""SGD divided by a running RMS of the gradient, one scalar per tensor; updates touched rows only.

    With the touched entries G of this step's gradient (all entries for a dense gradient),
    k ← k + 1 and

    .. math::
        s ← β s + (1 − β)\,\mathrm{mean}_{i∈G}\, g_i^2, \qquad
        φ_i ← φ_i − \mathrm{lr}\, \frac{g_i}{\sqrt{s / (1 − β^k)} + ε}\quad (i ∈ G)

    Every touched row moves in proportion to its own gradient (unlike Adam's per-entry
    normalisation, which moves a once-touched row by about lr whatever its gradient), and the
    scale of the hypergradient, tiny for one example's logit, is taken out by s.

    Args:
        params: tensors (or param groups).
        lr: step size in units of the running RMS (default: 1e-2).
        beta: decay of the running mean square (default: 0.99).
        eps: ε (default: 1e-12).
    """

    def __init__(self, params, lr: float = 1e-2, beta: float = 0.99, eps: float = 1e-12):
        if not lr > 0:
            raise ValueError(f"LazySGD: lr must be > 0, got {lr}")
        if not 0 <= beta < 1:
            raise ValueError(f"LazySGD: beta must be in [0, 1), got {beta}")
        if not eps >= 0:
            raise ValueError(f"LazySGD: eps must be >= 0, got {eps}")
        super().__init__(params, {"lr": lr, "beta": beta, "eps": eps})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, beta, eps = group["lr"], group["beta"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                rows, g = _rows(p.grad)
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["mean_sq"] = torch.zeros((), dtype=torch.float64)
                state["step"] += 1
                s = state["mean_sq"]
                s.mul_(beta).add_(g.double().pow(2).mean(), alpha=1 - beta)
                scale = float((s / (1 - beta ** float(state["step"]))).sqrt()) + eps
                if rows is None:
                    p.add_(g, alpha=-lr / scale)
                else:
                    p.index_add_(0, rows, g.to(p.dtype), alpha=-lr / scale)
        return loss


def accepts_sparse_grad(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` takes sparse COO gradients (else a row-sparse gradient must be made dense)."""
    if isinstance(optimizer, (LazyAdam, LazySGD, torch.optim.SparseAdam)):
        return True
    if type(optimizer) is torch.optim.SGD:
        return all(g.get("momentum", 0) == 0 and g.get("weight_decay", 0) == 0 for g in optimizer.param_groups)
    return False
