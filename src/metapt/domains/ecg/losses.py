"""SimCLR's NT-Xent loss (Chen et al. 2020), the ECG pre-training objective of Raghu et al. 2021."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["nt_xent"]


def nt_xent(z1: Tensor, z2: Tensor, temperature: float = 0.5) -> Tensor:
    """Normalised-temperature cross-entropy over the 2N views of a batch.

    ``z1[i]`` and ``z2[i]`` are the projections of two augmented views of example ``i``. Each of
    the 2N views must pick its partner out of the other 2N - 1 views by cosine similarity / T;
    the loss is the mean over all 2N views (the SimCLR paper's
    ``1/2N sum_k [l(2k-1, 2k) + l(2k, 2k-1)]``). Written with ``cross_entropy`` over a masked
    similarity matrix, so it is batched, numerically stable and twice differentiable.

    Args:
        z1, z2: ``[N, D]`` projections, N >= 2 (a batch of one has no negatives).
        temperature: softmax temperature T > 0; 0.5 is the paper's value for ECG.
    """
    if not isinstance(z1, Tensor) or not isinstance(z2, Tensor):
        raise TypeError("nt_xent expects two tensors of projections, z1 and z2")
    if z1.dim() != 2 or z1.shape != z2.shape:
        raise ValueError(
            f"nt_xent expects z1 and z2 of the same shape [N, D]; got {tuple(z1.shape)} and "
            f"{tuple(z2.shape)} (flatten the projections to 2-D first)"
        )
    if z1.shape[0] < 2:
        raise ValueError(
            f"nt_xent needs a batch of at least 2 examples to have negatives; got {z1.shape[0]}"
        )
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a positive number, got {temperature!r}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be finite and > 0, got {temperature!r}")
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2], dim=0), dim=1)
    sim = (z @ z.T) / temperature
    # A view is never its own negative: remove the diagonal from the softmax denominator.
    self_mask = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    sim = sim.masked_fill(self_mask, float("-inf"))
    partner = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, partner)
