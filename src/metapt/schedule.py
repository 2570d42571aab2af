"""When Algorithm 1 does what: the meta-step schedule and which PT batch each estimate takes.

Configuration (:meth:`metapt.schema.MetaConfig.schedule`), the trainer and the diagnostics all
read the schedule from here, so the configuration layer needs no runtime module. The batch-index
rules are stated once in :class:`metapt.MetaProblem`'s docstring and implemented once here
(:func:`pt_batch_index`, :meth:`MetaSchedule.sample_index`, :meth:`MetaSchedule.finetune_index`,
:meth:`MetaSchedule.head_index`).

The fields are named as the configuration's ``meta`` section names them (``meta.interval`` is
``MetaSchedule.interval``, ``meta.batches`` is ``MetaSchedule.batches``); the older keywords
``meta_interval`` and ``meta_batches`` are accepted with a DeprecationWarning.
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass
from typing import Any

__all__ = ["MetaSchedule", "pt_batch_index"]

#: keyword renamed -> its name now (the config's): accepted by MetaSchedule with a DeprecationWarning
_RENAMED = {"meta_interval": "interval", "meta_batches": "batches"}


@dataclass(frozen=True)
class MetaSchedule:
    """When and how meta-steps happen (the paper's defaults).

    Attributes:
        interval: PT steps between meta-steps (paper: 10); ``meta.interval``.
        unroll_steps: K, unrolled FT steps per meta-step (paper: 1).
        unroll_encoder: unroll θ together with the head instead of the head only.
        batches: hypergradient samples averaged per meta-step, each on its own
            FT/validation batches (and PT batches, as the estimator takes them); ``meta.batches``
            (paper: 1; single-batch estimates are noisy). Not the estimator's ``pt_batches``,
            the PT batches within one sample.
        warmup_steps: PT steps, with the head trained alongside, before the
            first meta-step.
        head_steps: plain (not differentiated) FT steps of the head before each
            meta-step's unroll, so the persisted head keeps up with the moving
            encoder (paper: 0; a stale head makes L_V, and its gradient, about
            the head rather than the representation).
        head_start: where each meta-step's fine-tuning starts: ``carried`` from the head the
            last meta-step fine-tuned (the paper's; warm-up steps train it), ``initial`` from ψ₀
            every time, as a fresh fine-tuning would (no warm-up head steps). A carried head
            that has fitted the validation task absorbs what φ did to the parts it can correct,
            so L_V's gradient stops seeing it: with the PT model's own head plus a correction
            as the FT model, planted label noise harms the PT head, the carried correction
            undoes it, and the validation direction ranks the corrupted molecules the wrong
            way (benchmarks/results/planted_noise_sign_check_4000_rate0.4.md).
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

    interval: int = 10
    unroll_steps: int = 1
    unroll_encoder: bool = False
    batches: int = 1
    warmup_steps: int = 0
    head_steps: int = 0
    head_start: str = "carried"
    learn_phi: bool = True
    average: str = "none"
    average_decay: float = 0.95

    def __post_init__(self):
        if self.average not in ("none", "polyak", "ema"):
            raise ValueError(f"MetaSchedule: average must be none, polyak or ema, got {self.average!r}")
        if self.head_start not in ("carried", "initial"):
            raise ValueError(f"MetaSchedule: head_start must be carried or initial, got {self.head_start!r}")
        if not 0.0 < self.average_decay < 1.0:
            raise ValueError(f"MetaSchedule: average_decay must be in (0, 1), got {self.average_decay}")
        for name in ("interval", "batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"MetaSchedule: {name} must be >= 1, got {getattr(self, name)}")
        for name in ("unroll_steps", "warmup_steps", "head_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"MetaSchedule: {name} must be >= 0, got {getattr(self, name)}")

    def sample_index(self, meta_step: int, sample: int) -> int:
        """The index of sample ``j`` of meta-step ``m``, ``m * batches + j``: it reads
        ``metaval_batch`` of this index, and its FT batches follow from it (:meth:`finetune_index`)."""
        return meta_step * self.batches + sample

    def finetune_index(self, sample_index: int, k: int) -> int:
        """The FT batch of unrolled step ``k`` of the sample with index ``i`` (:meth:`sample_index`):
        ``i * max(unroll_steps, 1) + k``."""
        return sample_index * max(self.unroll_steps, 1) + k

    def head_index(self, meta_step: int, c: int) -> int:
        """The FT batch of catch-up head step ``c`` before meta-step ``m``: ``m * head_steps + c``."""
        return meta_step * self.head_steps + c

    @property
    def meta_interval(self) -> int:
        """Deprecated: :attr:`interval`."""
        warnings.warn("MetaSchedule.meta_interval is deprecated; use .interval", DeprecationWarning, stacklevel=2)
        return self.interval

    @property
    def meta_batches(self) -> int:
        """Deprecated: :attr:`batches`."""
        warnings.warn("MetaSchedule.meta_batches is deprecated; use .batches", DeprecationWarning, stacklevel=2)
        return self.batches


_dataclass_init = MetaSchedule.__init__


def _init(self: MetaSchedule, *args: Any, **kwargs: Any) -> None:
    for old, new in _RENAMED.items():
        if old in kwargs:
            if new in kwargs:
                raise TypeError(f"MetaSchedule: give {new}= only ({old}= is its deprecated name)")
            warnings.warn(f"MetaSchedule({old}=...) is deprecated; use {new}= (the name of meta.{new} in a config)",
                          DeprecationWarning, stacklevel=2)
            kwargs[new] = kwargs.pop(old)
    _dataclass_init(self, *args, **kwargs)


_init.__signature__ = inspect.signature(_dataclass_init)  # what help() and the docs show
_init.__doc__ = _dataclass_init.__doc__
MetaSchedule.__init__ = _init


def pt_batch_index(step: int, t: int, sample: int = 0, stride: int = 1) -> int:
    """The PT batch an estimate taken after ``step`` PT steps reads at offset ``t`` for its sample
    ``sample``: t ≥ 0 the t-th upcoming batch, ``step + t + sample·stride``; t < 0 the (−t)-th just
    taken, ``max(step + t − sample·stride, 0)`` (the paper's extra samples, t = −1, are the past
    batches, newest first)."""
    if t < 0:
        return max(step + t - sample * stride, 0)
    return step + t + sample * stride
