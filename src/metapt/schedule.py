"""When Algorithm 1 does what: the meta-step schedule and which PT batch each estimate takes.

Configuration (:meth:`metapt.schema.MetaConfig.schedule`), the trainer and the diagnostics all
read the schedule from here, so the configuration layer needs no runtime module. The batch-index
rules are stated once in :class:`metapt.MetaProblem`'s docstring and implemented once here.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["MetaSchedule", "pt_batch_index"]


@dataclass(frozen=True)
class MetaSchedule:
    """When and how meta-steps happen (the paper's defaults).

    Attributes:
        meta_interval: PT steps between meta-steps (paper: 10).
        unroll_steps: K, unrolled FT steps per meta-step (paper: 1).
        unroll_encoder: unroll θ together with the head instead of the head only.
        meta_batches: PT/validation batch pairs whose hypergradients are averaged
            per meta-step (paper: 1; single-batch estimates are noisy).
        warmup_steps: PT steps, with the head trained alongside, before the
            first meta-step.
        head_steps: plain (not differentiated) FT steps of the head before each
            meta-step's unroll, so the persisted head keeps up with the moving
            encoder (paper: 0; a stale head makes L_V, and its gradient, about
            the head rather than the representation).
        learn_phi: False runs plain pre-training with φ held at its initial value: no
            warm-up head steps, no meta-steps (the frozen-φ baselines).
        average: which φ the trainer reports as its result (``averaged_metaparams``):
            ``none`` the last φ, ``polyak`` the mean of φ over every meta-step, ``ema`` an
            exponential moving average with ``average_decay``. A single φ at the last step
            is the endpoint of a noisy walk; its average over the run is what the
            hypergradients agreed on. Pre-training always uses the live φ.
        average_decay: the EMA's decay per meta-step (the first meta-steps average
            uniformly: decay min(d, (1 + n)/(10 + n)) after n updates).
    """

    meta_interval: int = 10
    unroll_steps: int = 1
    unroll_encoder: bool = False
    meta_batches: int = 1
    warmup_steps: int = 0
    head_steps: int = 0
    learn_phi: bool = True
    average: str = "none"
    average_decay: float = 0.95

    def __post_init__(self):
        if self.average not in ("none", "polyak", "ema"):
            raise ValueError(f"MetaSchedule: average must be none, polyak or ema, got {self.average!r}")
        if not 0.0 < self.average_decay < 1.0:
            raise ValueError(f"MetaSchedule: average_decay must be in (0, 1), got {self.average_decay}")
        for name in ("meta_interval", "meta_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"MetaSchedule: {name} must be >= 1, got {getattr(self, name)}")
        for name in ("unroll_steps", "warmup_steps", "head_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"MetaSchedule: {name} must be >= 0, got {getattr(self, name)}")


def pt_batch_index(step: int, t: int, sample: int = 0, stride: int = 1) -> int:
    """The PT batch an estimate taken after ``step`` PT steps reads at offset ``t`` for its sample
    ``sample``: t ≥ 0 the t-th upcoming batch, ``step + t + sample·stride``; t < 0 the (−t)-th just
    taken, ``max(step + t − sample·stride, 0)`` (the paper's extra samples, t = −1, are the past
    batches, newest first)."""
    if t < 0:
        return max(step + t - sample * stride, 0)
    return step + t + sample * stride
