"""Noise models as meta-parameters: learned, reparameterised noise in the pre-training loss.

Two shapes cover the domains:

* :class:`GaussianNoiseScales` — additive Gaussian noise with a learned standard deviation per
  channel (a feature, a frequency band): noise = σ ⊙ ε with ε ~ N(0, I) drawn *outside* the
  loss (an input of the batch), σ = σ_max·sigmoid(φ) or exp(φ). The noisy input is then a
  deterministic, differentiable function of (φ, ε): the reparameterisation trick, so the
  hypergradient reaches σ through θ's gradient.
* :class:`LabelFlipRates` — per-task label noise: each binary label flips with probability
  ρ_t = ρ_max·sigmoid(φ_t). Binary cross-entropy is linear in the target, so its expectation over
  the flips is exactly the BCE against the smoothed target ỹ = y(1 − ρ) + (1 − y)ρ: no sampling,
  and differentiable in ρ.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

__all__ = ["GaussianNoiseScales", "LabelFlipRates"]


def _logit(p: float) -> float:
    return math.log(p) - math.log1p(-p)


class GaussianNoiseScales:
    """Learned standard deviations σ_c of additive Gaussian noise, one per channel.

    σ = ``max_std``·sigmoid(φ) when ``max_std`` is given (bounded: the noise can neither
    vanish for good nor swamp the signal), else σ = exp(φ).

    Args:
        size: number of channels C (features, bands, leads).
        init_std: σ₀, the same for every channel.
        key: φ's entry holding the C raw parameters.
        max_std: the upper bound of σ, or None for σ = exp(φ).
        names: optional channel names, for the per-channel part of :meth:`summary`.
    """

    row_sparse = False

    def __init__(self, size: int, init_std: float, *, key: str = "noise_std", max_std: float | None = None,
                 names: Sequence[str] | None = None):
        if size < 1:
            raise ValueError(f"GaussianNoiseScales: size must be >= 1, got {size}")
        if max_std is not None and not (0 < init_std < max_std):
            raise ValueError(f"GaussianNoiseScales: init_std must be in (0, max_std={max_std}), got {init_std}")
        if not (init_std > 0 and math.isfinite(init_std)):
            raise ValueError(f"GaussianNoiseScales: init_std must be finite and > 0, got {init_std}")
        if names is not None and len(names) != size:
            raise ValueError(f"GaussianNoiseScales: {len(names)} names for {size} channels")
        self.size, self.init_std, self.key, self.max_std = size, init_std, key, max_std
        self.names = list(names) if names is not None else None

    def init(self, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
        raw = _logit(self.init_std / self.max_std) if self.max_std is not None else math.log(self.init_std)
        return {self.key: torch.full((self.size,), raw, dtype=dtype)}

    def std(self, phi: Mapping[str, Tensor]) -> Tensor:
        """[C] standard deviations, differentiable in φ."""
        raw = phi[self.key]
        return self.max_std * torch.sigmoid(raw) if self.max_std is not None else raw.exp()

    def noise(self, phi: Mapping[str, Tensor], eps: Tensor, dim: int = -1) -> Tensor:
        """σ ⊙ ε, the channels of ``eps`` along ``dim``; ``eps`` ~ N(0, I) drawn by the caller."""
        sigma = self.std(phi).to(eps.dtype)
        shape = [1] * eps.dim()
        shape[dim] = self.size
        return eps * sigma.reshape(shape)

    def summary(self, phi: Mapping[str, Tensor]) -> dict[str, float]:
        s = self.std({self.key: phi[self.key].detach()}).double()
        out = {f"{self.key}_mean": float(s.mean()), f"{self.key}_min": float(s.min()), f"{self.key}_max": float(s.max())}
        if self.names is not None:
            out.update({f"{self.key}/{n}": float(v) for n, v in zip(self.names, s.tolist())})
        return out


class LabelFlipRates:
    """Per-task label-flip rates ρ_t = ``max_rate``·sigmoid(φ_t) of binary pre-training labels.

    The PT loss uses the expected BCE over the flips, BCE(z, ỹ) with
    ỹ = y(1 − ρ) + (1 − y)ρ (label smoothing towards the flipped label), which equals
    (1 − ρ)·BCE(z, y) + ρ·BCE(z, 1 − y) exactly.

    Args:
        num_tasks: T.
        init_rate: ρ₀ for every task, in (0, max_rate).
        max_rate: the upper bound (default 1/2: beyond it the label would mean its opposite).
        key: φ's entry holding the T raw parameters.
        names: optional task names, for the per-task part of :meth:`summary`.
    """

    row_sparse = False

    def __init__(self, num_tasks: int, init_rate: float = 0.05, *, max_rate: float = 0.5, key: str = "label_flip",
                 names: Sequence[str] | None = None):
        if num_tasks < 1:
            raise ValueError(f"LabelFlipRates: need at least one task, got {num_tasks}")
        if not 0 < max_rate <= 0.5:
            raise ValueError(f"LabelFlipRates: max_rate must be in (0, 0.5], got {max_rate}")
        if not 0 < init_rate < max_rate:
            raise ValueError(f"LabelFlipRates: init_rate must be in (0, max_rate={max_rate}), got {init_rate}")
        if names is not None and len(names) != num_tasks:
            raise ValueError(f"LabelFlipRates: {len(names)} names for {num_tasks} tasks")
        self.num_tasks, self.init_rate, self.max_rate, self.key = num_tasks, init_rate, max_rate, key
        self.names = list(names) if names is not None else None

    def init(self, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
        return {self.key: torch.full((self.num_tasks,), _logit(self.init_rate / self.max_rate), dtype=dtype)}

    def rates(self, phi: Mapping[str, Tensor]) -> Tensor:
        """[T] flip rates, differentiable in φ."""
        return self.max_rate * torch.sigmoid(phi[self.key])

    def smooth(self, phi: Mapping[str, Tensor], labels: Tensor) -> Tensor:
        """ỹ = y(1 − ρ) + (1 − y)ρ for ``labels`` [B, T] (NaN, a missing label, stays NaN)."""
        rho = self.rates(phi).to(labels.dtype)
        missing = torch.isnan(labels)
        known = labels.masked_fill(missing, 0.0)  # no NaN in the arithmetic: its gradient would be NaN too
        return (known + rho * (1 - 2 * known)).masked_fill(missing, torch.nan)

    def summary(self, phi: Mapping[str, Tensor]) -> dict[str, float]:
        r = self.rates({self.key: phi[self.key].detach()}).double()
        out = {f"{self.key}_mean": float(r.mean()), f"{self.key}_min": float(r.min()), f"{self.key}_max": float(r.max())}
        if self.names is not None:
            out.update({f"{self.key}/{n}": float(v) for n, v in zip(self.names, r.tolist())})
        return out
