"""Arithmetic on parameter dicts (dict[str, Tensor]), the pytree of the math layer."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

Params = dict[str, Tensor]


def tree_add(a: Mapping[str, Tensor], b: Mapping[str, Tensor], alpha: float = 1.0) -> Params:
    """a + alpha * b."""
    return {k: a[k] + alpha * b[k] for k in a}


def tree_scale(a: Mapping[str, Tensor], s: float | Tensor) -> Params:
    return {k: s * v for k, v in a.items()}


def tree_dot(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> Tensor:
    """<a, b> summed over every leaf, as a 0-dim tensor."""
    return sum((torch.sum(a[k] * b[k]) for k in a), torch.zeros((), dtype=_dtype(a)))


def tree_norm(a: Mapping[str, Tensor]) -> float:
    """‖a‖ over every leaf, as a float."""
    return float(torch.sqrt(tree_dot(a, a)))


def _dtype(a: Mapping[str, Tensor]) -> torch.dtype:
    for v in a.values():
        return v.dtype
    return torch.get_default_dtype()
