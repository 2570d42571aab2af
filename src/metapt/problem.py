"""The small protocol through which your pre-training problem plugs into the trainer.

Batches are addressed by an integer index, not drawn from an iterator: a problem
maps ``index`` to the same batch every time it is asked (a seeded permutation per
epoch, :class:`EpochShuffler`), so a run's data order is a pure function of its
step counter. That makes exact resume and data-parallel sharding a matter of
integers, and lets a meta-step look at exactly the batch the PT step before it used.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from .hypergrad.estimators import GaussNewtonProblem
from .schedule import pt_batch_index

Params = dict[str, Tensor]
"""A flat dict of named tensors: θ, φ or ψ (e.g. ``dict(model.named_parameters())``)."""


@runtime_checkable
class MetaProblem(Protocol):
    """What your pre-training problem provides to [`MetaPretrainer`][metapt.MetaPretrainer].

    Three dicts of tensors travel through it, each used through
    ``torch.func.functional_call`` (or plain tensor code):

    * ``params``, θ: what pre-training trains (encoder and pre-training heads);
    * ``metaparams``, φ: the pre-training hyperparameters that are meta-learned
      (task-weight logits, an augmentation network, a noise model);
    * ``head``, ψ: the fine-tuning head, trained on top of θ downstream.

    Subclass it (``class MyProblem(metapt.MetaProblem)``) or write a class with the
    same methods; ``isinstance(obj, MetaProblem)`` checks that the methods exist.

    **Batches are pure functions of their index.** The trainer asks for batches by
    integer index, never iterates, and may ask for the same index more than once
    (from different streams, or again after a resume): return the same batch every
    time, including any random draws (augmentations, noise: seed them from the
    index). Indices grow without bound; wrap them around your data
    (:class:`EpochShuffler` does). Which index is asked for when, with
    ``s`` = the PT steps taken so far and ``m`` = the meta-steps taken so far
    (both counted from 0; schedule fields of [`MetaSchedule`][metapt.MetaSchedule]):

    * ``pretrain_batch(s)`` for the PT step that follows, so PT batches are 0, 1, 2, ...
      A meta-step after PT step ``n = s + 1``, with the default estimator (one step of
      reverse-mode through the PT optimiser, ``meta.estimator.kind: unrolled``), asks for the
      batch the next PT step will use, ``pretrain_batch(n + j)`` for its sample ``j``
      (``n + t + j * T`` for ``t < T`` with ``horizon`` T; ``n + t + j * P`` for ``t < P`` with
      ``upcoming`` and ``pt_batches`` P). The paper's estimator (``upcoming: false``) uses
      ``pretrain_batch(n - 1)`` again (the batch that step just used) for H and the mixed
      term, and, for its extra samples ``j = 1 .. batches - 1``,
      ``pretrain_batch(max(n - 1 - j, 0))`` (``n - 1 - t - j * P`` with ``pt_batches`` P).
    * ``finetune_batch`` serves three streams, which may ask for the same indices:
      the warm-up head step after PT step ``n`` asks for ``n`` (so 1 .. ``warmup_steps``);
      the ``head_steps`` catch-up steps of meta-step ``m`` ask for
      ``m * head_steps + c``; the unrolled step ``k`` of sample ``j`` of meta-step ``m``
      asks for ``(m * batches + j) * max(unroll_steps, 1) + k``.
    * ``metaval_batch(m * batches + j)`` for sample ``j`` of meta-step ``m``.

    Optional: ``state_dict()`` / ``load_state_dict(state)`` for state the problem keeps
    outside θ (batch-norm running statistics). The trainer restores it after warm-up and
    meta-steps, so only PT steps update it; the CLI's run folders checkpoint it.
    """

    def pretrain_loss(self, params: Params, metaparams: Params, batch: Any) -> Tensor:
        """L_PT(θ, φ) on a pre-training batch.

        Args:
            params: θ. Compute the loss from these tensors (not from your module's own
                parameters), e.g. ``torch.func.functional_call(model, params, x)``.
            metaparams: φ. Use the entries from this dict: during a meta-step they are
                the tensors the hypergradient is taken with respect to. Every entry
                must reach the loss.
            batch: what ``pretrain_batch`` returned.

        Returns:
            A scalar tensor, differentiable twice in θ and once in φ.
        """
        ...

    def finetune_loss(self, params: Params, head: Params, batch: Any) -> Tensor:
        """L_FT(θ, ψ) on a labelled batch: FT-train (unrolled steps) or MetaFT-validation (L_V).

        Args:
            params: θ, the pre-trained parameters (the encoder part is what matters).
            head: ψ, the fine-tuning head.
            batch: what ``finetune_batch`` or ``metaval_batch`` returned.

        Returns:
            A scalar tensor, differentiable twice in ψ (and in θ).
        """
        ...

    def pretrain_batch(self, index: int) -> Any:
        """Pre-training batch number ``index`` (>= 0); the same batch for the same index."""
        ...

    def finetune_batch(self, index: int) -> Any:
        """FT-train batch number ``index`` (>= 0), for the head's steps and the unrolled ones."""
        ...

    def metaval_batch(self, index: int) -> Any:
        """MetaFT-validation batch number ``index`` (>= 0), on which L_V is measured.

        Keep this data apart from what you test on: φ is fitted to it.
        """
        ...

    def describe_metaparams(self, metaparams: Params) -> Mapping[str, float]:
        """A few numbers that summarise φ for the step log (e.g. mean task weight).

        Logged after each meta-step as ``phi/NAME``. The default logs nothing.
        """
        return {}


class EpochShuffler:
    """Index → batch of example indices, reshuffled each epoch by a seeded permutation.

    ``indices(i)`` is a pure function of ``(seed, i)``; the last partial batch of an
    epoch is dropped so every batch has ``batch_size`` examples (``batch_size`` is
    capped at ``num_examples``). Batch ``i`` lies in epoch ``i // batches_per_epoch``.

    Index-addressed batches from a ``torch.utils.data.Dataset``:

        order = EpochShuffler(len(dataset), batch_size=32, seed=0)

        def pretrain_batch(index):
            return default_collate([dataset[int(j)] for j in order.indices(index)])

    Args:
        num_examples: the number of examples to draw from (>= 1).
        batch_size: examples per batch (>= 1).
        seed: seeds the permutation of every epoch.
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
        """The example indices of batch ``index``: a ``[batch_size]`` int64 tensor."""
        epoch, within = divmod(index, self.batches_per_epoch)
        if self._cache is None or self._cache[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._cache = (epoch, torch.randperm(self.num_examples, generator=g))
        start = within * self.batch_size
        return self._cache[1][start : start + self.batch_size]


class LabelledBatches:
    """``finetune_batch`` and ``metaval_batch`` for a problem that holds its labelled data as tensors.

    The problem sets ``ft_train`` and ``metaval`` (``(inputs, labels)`` pairs) and ``_ft_order``,
    ``_val_order`` (:class:`EpochShuffler`); batch ``i`` is the rows ``_ft_order.indices(i)``.
    """

    ft_train: tuple[Tensor, Tensor]
    metaval: tuple[Tensor, Tensor]
    _ft_order: EpochShuffler
    _val_order: EpochShuffler

    def finetune_batch(self, index: int) -> tuple[Tensor, Tensor]:
        i = self._ft_order.indices(index)
        return self.ft_train[0][i], self.ft_train[1][i]

    def metaval_batch(self, index: int) -> tuple[Tensor, Tensor]:
        i = self._val_order.indices(index)
        return self.metaval[0][i], self.metaval[1][i]


# ---- a problem's PT loss as the estimators read it ------------------------------------------


def pretrain_loss_at(problem: MetaProblem, step: int, sample: int = 0, stride: int = 1, *,
                     batches: Any = None) -> Callable[[Params, Mapping[str, Tensor], int], Tensor]:
    """``(θ, φ, t) ↦ L_PT`` on the PT batch that an estimate taken after ``step`` PT steps reads at
    offset ``t`` for its sample ``sample`` (:func:`metapt.schedule.pt_batch_index`: t ≥ 0 upcoming,
    t < 0 just taken); each batch is fetched once. The trainer's meta-step and the diagnostics
    hand this to :func:`metapt.hypergrad.estimate_hypergradient`.

    Args:
        problem: whose ``pretrain_loss`` is taken.
        step: PT steps taken.
        sample: the meta-step's sample j.
        stride: how far apart the samples' batches are (the estimator's batches per sample).
        batches: whose ``pretrain_batch`` is read (a process's shard); default ``problem``.
    """
    source = problem if batches is None else batches
    cache: dict[int, Any] = {}

    def loss(theta: Params, phi: Mapping[str, Tensor], t: int) -> Tensor:
        i = pt_batch_index(step, t, sample, stride)
        if i not in cache:
            cache[i] = source.pretrain_batch(i)
        return problem.pretrain_loss(theta, phi, cache[i])

    return loss


def gauss_newton_at(problem: Any, step: int, sample: int, stride: int, phi: Mapping[str, Tensor], *,
                    batches: Any = None) -> Callable[[int], tuple[Callable[[Params], Tensor], Callable[[Tensor], Tensor]]]:
    """``t ↦ (θ ↦ PT outputs, outputs ↦ PT loss)`` on the batches of :func:`pretrain_loss_at`, φ fixed:
    what an estimator with ``gauss_newton`` needs.

    Raises:
        ValueError: ``problem`` is not a :class:`metapt.hypergrad.GaussNewtonProblem`.
    """
    if not isinstance(problem, GaussNewtonProblem):
        raise ValueError(f"{type(problem).__name__} has no pretrain_outputs/pretrain_output_loss: Gauss-Newton "
                         "products need the PT loss as outputs + a loss convex in them; use gauss_newton=False")
    source = problem if batches is None else batches
    fixed = {k: v.detach() for k, v in phi.items()}

    def at(t: int):
        batch = source.pretrain_batch(pt_batch_index(step, t, sample, stride))
        return (lambda theta: problem.pretrain_outputs(theta, fixed, batch),
                lambda outputs: problem.pretrain_output_loss(outputs, fixed, batch))

    return at
