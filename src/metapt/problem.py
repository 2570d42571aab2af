"""The small protocol through which a domain plugs into the trainer.

Batches are addressed by an integer index, not drawn from an iterator: a domain
maps ``(index)`` to the same batch every time (a seeded permutation per epoch),
so a run's data order is a pure function of its step counter. That makes exact
resume and data-parallel sharding a matter of integers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

Params = dict[str, Tensor]


@runtime_checkable
class MetaProblem(Protocol):
    """What a domain provides to :class:`metapt.MetaPretrainer`.

    ``params`` are the pre-training parameters θ (encoder and PT heads),
    ``metaparams`` the meta-parameters φ, ``head`` the fine-tuning head ψ; all are
    dicts of tensors used through ``torch.func.functional_call``.
    """

    def pretrain_loss(self, params: Params, metaparams: Params, batch: Any) -> Tensor:
        """L_PT(θ, φ) on a pre-training batch; a scalar."""
        ...

    def finetune_loss(self, params: Params, head: Params, batch: Any) -> Tensor:
        """L_FT(θ, ψ) on a labelled batch (FT-train or MetaFT-validation); a scalar."""
        ...

    def pretrain_batch(self, index: int) -> Any: ...

    def finetune_batch(self, index: int) -> Any: ...

    def metaval_batch(self, index: int) -> Any: ...

    def describe_metaparams(self, metaparams: Params) -> Mapping[str, float]:
        """A few numbers that summarise φ for the step log (e.g. mean task weight)."""
        ...


class EpochShuffler:
    """Index → batch of example indices, reshuffled each epoch by a seeded permutation.

    ``indices(i)`` is a pure function of ``(seed, i)``; the last partial batch of an
    epoch is dropped so every batch has ``batch_size`` examples.
    """

    def __init__(self, num_examples: int, batch_size: int, seed: int = 0):
        if num_examples < 1:
            raise ValueError(f"EpochShuffler: no examples to draw from (num_examples={num_examples})")
        if not 1 <= batch_size:
            raise ValueError(f"EpochShuffler: batch_size must be >= 1, got {batch_size}")
        self.num_examples = num_examples
        self.batch_size = min(batch_size, num_examples)
        self.seed = seed
        self.batches_per_epoch = num_examples // self.batch_size
        self._cache: tuple[int, Tensor] | None = None

    def indices(self, index: int) -> Tensor:
        epoch, within = divmod(index, self.batches_per_epoch)
        if self._cache is None or self._cache[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._cache = (epoch, torch.randperm(self.num_examples, generator=g))
        start = within * self.batch_size
        return self._cache[1][start : start + self.batch_size]
