"""Task and example weights, parameterised as in the paper: w = 2·sigmoid(logit), w₀ = 1.

The factor 2 keeps a weight's range (0, 2) centred on the uniform weighting and
makes the logit's gradient at initialisation 1/2 of the weight's, so a zero
logit is the plain, unweighted loss.

Example weights are row-sparse: a batch reads B of the N logits, so its
hypergradient has at most B non-zero entries. :func:`gather_rows` reads them
with a gradient that is a sparse COO tensor (B rows), not a dense [N] tensor of
zeros, so a meta-step's cost does not grow with N; :class:`metapt.optim.LazyAdam`
and :class:`metapt.optim.LazySGD` then update only those rows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

__all__ = ["ExampleWeights", "TaskWeights", "gather_rows", "weight_logits", "weights_from_logits"]


def weights_from_logits(logits: Tensor) -> Tensor:
    """w = 2·sigmoid(logits), elementwise, in (0, 2)."""
    return 2.0 * torch.sigmoid(logits)


def weight_logits(num: int, *, dtype: torch.dtype | None = None) -> Tensor:
    """Logits of ``num`` weights all equal to 1 (the uniform starting point)."""
    if num < 1:
        raise ValueError(f"weight_logits: need at least one weight, got {num}")
    return torch.zeros(num, dtype=dtype)


class _GatherRows(torch.autograd.Function):
    """``table[rows]`` whose gradient with respect to ``table`` is a sparse COO tensor."""

    @staticmethod
    def forward(table: Tensor, rows: Tensor) -> Tensor:
        return table.index_select(0, rows)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        table, rows = inputs
        ctx.save_for_backward(rows)
        ctx.table_shape = table.shape

    @staticmethod
    def backward(ctx, grad: Tensor):
        (rows,) = ctx.saved_tensors
        # ∂/∂table of Σ_b ⟨grad_b, table[rows_b]⟩: grad_b added at row rows_b (repeats sum on coalesce)
        return torch.sparse_coo_tensor(rows.unsqueeze(0), grad, ctx.table_shape, check_invariants=False), None


def gather_rows(table: Tensor, rows: Tensor) -> Tensor:
    """``table[rows]`` (rows of the first dimension) with a row-sparse gradient.

    The value is ``table.index_select(0, rows)``; the gradient with respect to ``table``
    is a sparse COO tensor holding only the rows read (repeated rows sum), which equals the
    dense gradient of ``table[rows]`` once made dense. Differentiable once in ``table``
    (enough for the hypergradient: its mixed term differentiates the forward once).
    """
    if rows.dtype != torch.long or rows.dim() != 1:
        raise ValueError(f"gather_rows: rows must be a 1-D long tensor of row indices, got {rows.dtype} {tuple(rows.shape)}")
    if not table.requires_grad:
        return table.index_select(0, rows)
    return _GatherRows.apply(table, rows)


def _spread(w: Tensor) -> dict[str, float]:
    w = w.detach().double()
    return {"mean": float(w.mean()), "min": float(w.min()), "max": float(w.max()),
            "std": float(w.std()) if w.numel() > 1 else 0.0}


class TaskWeights:
    """One weight per pre-training task, w_t = 2·sigmoid(φ_t) (the paper's task weighting).

    With ``normalize``, w = T·softmax(φ) instead: the weights sum to T whatever φ is, so a
    drift that every logit shares (batch noise common to all tasks) changes nothing and only
    the tasks' ratios are learned. φ₀ = 0 is the uniform weighting either way.

    Args:
        num_tasks: T.
        key: φ's entry holding the T logits.
        names: optional task names, for the per-task part of :meth:`summary`.
        normalize: T·softmax(φ) instead of 2·sigmoid(φ).
    """

    row_sparse = False

    def __init__(self, num_tasks: int, *, key: str = "task_logits", names: Sequence[str] | None = None,
                 normalize: bool = False):
        if num_tasks < 1:
            raise ValueError(f"TaskWeights: need at least one task, got {num_tasks}")
        if names is not None and len(names) != num_tasks:
            raise ValueError(f"TaskWeights: {len(names)} names for {num_tasks} tasks; give one name per task")
        self.num_tasks, self.key, self.names = num_tasks, key, list(names) if names is not None else None
        self.normalize = normalize

    def init(self, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
        """φ₀: every weight 1."""
        return {self.key: weight_logits(self.num_tasks, dtype=dtype)}

    def weights(self, phi: Mapping[str, Tensor]) -> Tensor:
        """[T] weights, differentiable in φ."""
        logits = phi[self.key]
        if self.normalize:
            return self.num_tasks * torch.softmax(logits, dim=0)
        return weights_from_logits(logits)

    def summary(self, phi: Mapping[str, Tensor]) -> dict[str, float]:
        """Mean, min, max and std of the weights (as ``task_weight_*``), and each named task's weight."""
        w = self.weights({self.key: phi[self.key].detach()})
        out = {f"task_weight_{k}": v for k, v in _spread(w).items()}
        if self.names is not None:
            out.update({f"task_weight/{n}": float(x) for n, x in zip(self.names, w.tolist())})
        return out


class ExampleWeights:
    """One weight per pre-training example, w_i = 2·sigmoid(φ_i) (data reweighting).

    Row-sparse: :meth:`weights` of a batch's rows has a sparse COO gradient (see
    :func:`gather_rows`), so with :class:`metapt.optim.LazyAdam` or :class:`metapt.optim.LazySGD`
    a meta-step costs the same for 10 or 10⁶ examples.

    With ``normalize``, a batch's weights are scaled to sum to its size (Ren et al. 2018
    normalise within the batch): the loss's scale stays that of uniform weights, and what a
    meta-step learns is which examples of a batch count more than the others.

    Args:
        num_examples: N.
        key: φ's entry holding the N logits.
        normalize: scale each batch's weights to mean 1.
    """

    row_sparse = True

    def __init__(self, num_examples: int, *, key: str = "example_logits", normalize: bool = False):
        if num_examples < 1:
            raise ValueError(f"ExampleWeights: need at least one example, got {num_examples}")
        self.num_examples, self.key, self.normalize = num_examples, key, normalize

    def init(self, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
        """φ₀: every weight 1."""
        return {self.key: weight_logits(self.num_examples, dtype=dtype)}

    def weights(self, phi: Mapping[str, Tensor], rows: Tensor) -> Tensor:
        """[B] weights of examples ``rows``, with a row-sparse gradient in φ."""
        w = weights_from_logits(gather_rows(phi[self.key], rows))
        return w * (len(w) / w.sum()) if self.normalize else w

    def summary(self, phi: Mapping[str, Tensor]) -> dict[str, float]:
        """Mean, min, max, std of the weights, and the share of examples weighted below 1/2 and above 3/2."""
        w = weights_from_logits(phi[self.key].detach())
        out = {f"example_weight_{k}": v for k, v in _spread(w).items()}
        out["example_weight_below_0.5"] = float((w < 0.5).double().mean())
        out["example_weight_above_1.5"] = float((w > 1.5).double().mean())
        return out
