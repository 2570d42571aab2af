"""How Algorithm 1's steps are carried out, kept out of the algorithm itself.

:class:`metapt.MetaPretrainer` says *what* happens (a PT step, a meta-step on
schedule); a :class:`Strategy` says *how* a few of those things are executed, as
Lightning's strategies do: in one process or data-parallel across many, with or
without reusing the PT step's gradient graph in the meta-step. A strategy never
changes what is computed, only where and how (the tests check that each one
reproduces the plain single-process numbers).

The hooks, all called by the trainer:

* ``setup(trainer)`` once, before the optimisers are built;
* ``pretrain_backward(trainer, batch)`` the PT forward with φ held fixed, leaving
  ∇θ L_PT in θ's ``.grad``; returns the loss;
* ``pretrain_backward_with_mixed(trainer, batch, u)`` the same, plus the accumulated
  estimator's draw ∂/∂φ ⟨∇θ L_PT, u⟩ from that one forward, or None (then the trainer draws it
  with two forwards of its own);
* ``pt_graph(trainer)`` the kept gradient graph of the PT step just taken, or None
  (the meta-step then runs a PT forward/backward of its own);
* ``meta_views(trainer)`` the problems whose batches one meta-step averages over;
* ``reduce_hypergrad`` / ``reduce_head`` what every process must agree on (the hypergradient
  may hold row-sparse entries: a reduction that runs collectives densifies them first);
* ``end_step(trainer, metrics)`` after every step (metrics as logged);
* ``reset()`` when the trainer's state is replaced (``load_state_dict``).

The data-parallel strategy lives in :mod:`metapt.distributed`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from torch import Tensor

from .hypergrad import PretrainGraph, pretrain_backward_with_mixed_term, pretrain_graph
from .problem import MetaProblem, Params

if TYPE_CHECKING:
    from .trainer import MetaPretrainer


class Strategy:
    """One process, plain autograd: the default."""

    def setup(self, trainer: MetaPretrainer) -> None:
        """Called once, before the optimisers are built from ``trainer.params``/``metaparams``."""

    def pretrain_backward(self, trainer: MetaPretrainer, batch: Any) -> Tensor:
        """L_PT(θ, φ) on ``batch`` with φ held fixed; leaves ∇θ L_PT in θ's ``.grad``.

        A non-finite loss is returned without a backward (the trainer stops on it).
        """
        phi = {k: v.detach() for k, v in trainer.metaparams.items()}
        loss = trainer.problem.pretrain_loss(trainer.params, phi, batch)
        if loss.isfinite():
            loss.backward()
        return loss.detach()

    def pretrain_backward_with_mixed(self, trainer: MetaPretrainer, batch: Any,
                                     u: Mapping[str, Tensor]) -> tuple[Tensor, Params | None]:
        """:meth:`pretrain_backward` and, from the same forward, the mixed term ∂/∂φ ⟨∇θ L_PT, u⟩.

        A strategy whose :meth:`pretrain_backward` is its own (another graph, an all-reduce) keeps
        it and returns None for the mixed term, unless it overrides this too: the fused draw
        would bypass its backward.
        """
        if type(self).pretrain_backward is not Strategy.pretrain_backward:
            return self.pretrain_backward(trainer, batch), None
        return pretrain_backward_with_mixed_term(
            lambda th, ph: trainer.problem.pretrain_loss(th, ph, batch), trainer.params, trainer.metaparams, u)

    def pt_graph(self, trainer: MetaPretrainer) -> PretrainGraph | None:
        """The gradient graph of the PT step just taken, for the meta-step's H and mixed term."""
        return None

    def meta_views(self, trainer: MetaPretrainer) -> Sequence[MetaProblem]:
        """Problems whose batches a meta-step averages its hypergradient over (one sample each)."""
        return [trainer.problem]

    def reduce_hypergrad(self, hypergrad: Params) -> Params:
        """The hypergradient every process applies (row-sparse entries may come in and go out)."""
        return hypergrad

    def reduce_head(self, head: Params) -> Params:
        return head

    def reduce_max(self, value: float) -> float:
        """The largest ``value`` over processes: every replica then caps the inner rate alike."""
        return value

    def end_step(self, trainer: MetaPretrainer, metrics: Mapping[str, float]) -> dict[str, float]:
        return dict(metrics)

    def reset(self) -> None:
        """Forget anything kept from earlier steps (the trainer's state was replaced)."""


class ReusePTGraph(Strategy):
    """Take H and ∂²L_PT/∂φ∂θ from the gradient graph of the PT step right before a meta-step.

    That PT step builds ∇θ L_PT with ``create_graph=True`` (:func:`metapt.hypergrad.pretrain_graph`),
    updates θ from it, and hands the graph to the meta-step, which then runs no PT
    forward/backward of its own: the meta-step at its floor cost
    (benchmarks/meta_overhead.py). The price: H and the mixed term are taken at the θ of
    one PT step earlier than g = dL_V/dθ. The graph is valid for the meta-step of that
    same step only; it is dropped after use, on the next PT step and on ``reset()``.
    """

    def __init__(self) -> None:
        self._kept: tuple[int, PretrainGraph] | None = None

    def pretrain_backward(self, trainer: MetaPretrainer, batch: Any) -> Tensor:
        self._kept = None  # a graph that no meta-step took is stale now
        if not trainer.meta_step_due(trainer.step + 1):
            return super().pretrain_backward(trainer, batch)
        graph = pretrain_graph(lambda th, ph: trainer.problem.pretrain_loss(th, ph, batch),
                               trainer.params, trainer.metaparams)
        if graph.loss.isfinite():
            for k, v in trainer.params.items():
                v.grad = None if graph.grad[k] is None else graph.grad[k].detach()
            self._kept = (trainer.step + 1, graph)  # the step counter once the optimiser has stepped
        return graph.loss.detach()

    def pt_graph(self, trainer: MetaPretrainer) -> PretrainGraph | None:
        kept, self._kept = self._kept, None
        return kept[1] if kept is not None and kept[0] == trainer.step else None

    def reset(self) -> None:
        self._kept = None


class MeanOverViews(Strategy):
    """Average each meta-step's hypergradient over several views of the problem.

    One process reproduces a W-process data-parallel meta-step with the W shard views
    (:class:`metapt.distributed.ShardedProblem`); the persisted head is the mean of the
    views' heads.
    """

    def __init__(self, views: Sequence[MetaProblem]):
        if not views:
            raise ValueError("MeanOverViews: give at least one view of the problem")
        self.views = list(views)

    def meta_views(self, trainer: MetaPretrainer) -> Sequence[MetaProblem]:
        return self.views
