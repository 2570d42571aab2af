"""Task and example weights, parameterised as in the paper: w = 2·sigmoid(logit), w₀ = 1.

The factor 2 keeps a weight's range (0, 2) centred on the uniform weighting and
makes the logit's gradient at initialisation 1/2 of the weight's, so a zero
logit is the plain, unweighted loss.
"""

from __future__ import annotations

import torch
from torch import Tensor


def weights_from_logits(logits: Tensor) -> Tensor:
    """w = 2·sigmoid(logits), elementwise, in (0, 2)."""
    return 2.0 * torch.sigmoid(logits)


def weight_logits(num: int, *, dtype: torch.dtype | None = None) -> Tensor:
    """Logits of ``num`` weights all equal to 1 (the uniform starting point)."""
    if num < 1:
        raise ValueError(f"weight_logits: need at least one weight, got {num}")
    return torch.zeros(num, dtype=dtype)
