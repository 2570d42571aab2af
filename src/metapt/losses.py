"""Losses shared by domains and evaluation."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def masked_bce(
    logits: Tensor,
    labels: Tensor,
    task_weights: Tensor | None = None,
    example_weights: Tensor | None = None,
) -> Tensor:
    r"""Weighted multitask binary cross-entropy over the observed labels only.

    .. math::
        L = \frac{1}{|O|} \sum_{(i, t) \in O} v_i \, w_t \, \mathrm{BCE}(z_{it}, y_{it}),
        \qquad O = \{(i, t) : y_{it} \text{ is not NaN}\}

    The normalisation is the number of observed labels (as in Hu et al.'s
    ``pretrain_supervised.py``), not the sum of the weights: with all weights 1 this is the
    plain mean over observed labels, and scaling a weight scales its share of the loss, so
    the loss is differentiable in both weight vectors (the meta-parameters). A batch with no
    observed label gives 0 (still attached to the graph).

    Args:
        logits: ``[B, T]``.
        labels: ``[B, T]`` in {0, 1} (or soft targets), NaN where not measured.
        task_weights: ``[T]`` per-task weights :math:`w`, or None for 1.
        example_weights: ``[B]`` per-example weights :math:`v`, or None for 1.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [batch, tasks], got shape {tuple(logits.shape)}; use .view(-1, 1) for one task")
    if labels.shape != logits.shape:
        raise ValueError(
            f"labels shape {tuple(labels.shape)} != logits shape {tuple(logits.shape)}; "
            "a batch of featurize_smiles graphs carries y as [B, T]"
        )
    labels = labels.to(logits.dtype)
    observed = ~torch.isnan(labels)
    loss = F.binary_cross_entropy_with_logits(logits, torch.where(observed, labels, 0.0), reduction="none")
    if task_weights is not None:
        if task_weights.shape != (logits.size(1),):
            raise ValueError(f"task_weights must be [{logits.size(1)}] (one per task), got {tuple(task_weights.shape)}")
        loss = loss * task_weights.unsqueeze(0)
    if example_weights is not None:
        if example_weights.shape != (logits.size(0),):
            raise ValueError(
                f"example_weights must be [{logits.size(0)}] (one per example of the batch), "
                f"got {tuple(example_weights.shape)}; index the full weight vector with batch.idx"
            )
        loss = loss * example_weights.unsqueeze(1)
    loss = torch.where(observed, loss, 0.0)
    return loss.sum() / observed.sum().clamp(min=1)
