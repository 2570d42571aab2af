"""Algorithm 1 of Raghu et al. (NeurIPS 2021): online meta-learning of pre-training hyperparameters.

Read top to bottom: :meth:`MetaPretrainer.run_until` pre-trains θ with the current φ
and, every ``interval`` steps (``schedule.interval``), takes one meta-step on φ:

1. unroll K fine-tuning steps of the head ψ (or of ψ and θ) on FT-train batches,
   starting from the current θ and the persisted, warm-started ψ;
2. evaluate the meta-loss L_V on a MetaFT-validation batch;
3. dL_V/dφ as the estimator describes it (:func:`metapt.hypergrad.estimate_hypergradient`, the
   one entry point for every kind), averaged over ``schedule.batches`` samples if asked;
4. update φ with its own optimiser behind :class:`metapt.meta_optimizer.ApplyIfFinite`, unless the
   hypergradient is unusable (non-finite, or the inverse-HVP solve diverged), which is skipped and counted;
5. keep ψ_K, detached, as the head for the next meta-step.

This module knows the order of things and nothing about any domain: the domain
enters through :class:`metapt.problem.MetaProblem`.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from contextlib import contextmanager
from typing import Any, Protocol

import torch
from torch import Tensor

from .errors import NonFiniteLossError
from .hypergrad import (
    Estimator,
    HypergradInfo,
    Identity,
    InnerOptimizer,
    Neumann,
    Solver,
    default_estimator,
    directional_mixed_term,
    draw_scale,
    estimate_hypergradient,
    hessian_spectrum,
    sgd,
    unrolled_finetune,
)
from .meta_optimizer import ApplyIfFinite
from .problem import MetaProblem, Params, gauss_newton_at, pretrain_loss_at
from .schedule import MetaSchedule
from .strategy import Strategy

log = logging.getLogger(__name__)  # "metapt.trainer": configure "metapt" to route or silence it


class MetricsLogger(Protocol):
    """Receives the numbers of every step; files, progress bars and TensorBoard attach here."""

    def log(self, step: int, metrics: Mapping[str, float]) -> None: ...


def _leaves(params: Mapping[str, Tensor]) -> Params:
    return {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}


class MetaPretrainer:
    """Online meta-learning of φ interleaved with pre-training of θ.

    ``run_until(n)`` pre-trains until ``step == n``; after PT step number ``s`` (counted
    from 1) it takes a warm-up head step if ``s <= warmup_steps``, else a meta-step when
    ``s % interval == 0``. Which batch index each step asks the problem for is stated
    in :class:`metapt.MetaProblem`.

    **What is copied.** θ, ψ and φ are copied at construction: the trainer owns its copies
    (``params``, ``head``, ``metaparams``) and never writes to the tensors you passed in, so
    your ``nn.Module`` is not updated; load the result back, e.g.
    ``model.load_state_dict(trainer.snapshot().params)``.

    **Reading results back.** :meth:`snapshot` returns detached copies of θ, ψ and φ with the
    counters. The attributes are live: ``params`` and ``metaparams`` are the leaf tensors
    the optimisers update (they require grad; ``.detach()`` them before use), ``head`` the
    current head; ``step`` counts PT steps, ``meta_step_count`` meta-steps attempted,
    ``skipped`` meta-steps whose update was skipped (non-finite hypergradient or diverged
    solve), ``rejected_heads`` meta-steps whose fine-tuned head was not finite (the previous
    head was kept), ``inner_lr_capped`` fine-tuning steps whose rate was capped (below). The
    per-step numbers go to ``loggers``.

    **The fine-tuning rate is capped where it would diverge** (``inner_lr_cap="auto"``, for an
    SGD inner optimiser such as the default ``sgd(0.1)``). Plain gradient descent on a loss whose
    Hessian has largest eigenvalue λ diverges once its rate exceeds 2/λ, and the head's λ grows
    with the scale of the features pre-training makes, so no fixed rate suits every problem.
    Before each warm-up head step, catch-up and meta-step unroll the trainer estimates λ of the
    fine-tuning loss in what is fine-tuned (the head, or θ and the head with
    ``unroll_encoder``), on the first FT batch that step takes, with 10 Hessian-vector
    products (:func:`metapt.hypergrad.hessian_spectrum`). If ``lr·λ > 1.9`` (within 5 % of the
    divergence bound 2) that step runs at ``1/λ`` instead: the step that lands on the minimum
    along the stiffest direction of a quadratic, so a λ estimated up to 2× low still gives a
    stable step. A rate with ``lr·λ ≤ 1.9`` converges and is used as given, bit for bit (the
    estimate draws on no RNG and leaves the problem's buffers alone), so runs that were stable
    do not change. When the cap binds it says so: ``inner_lr``, ``inner_curvature`` (λ) and
    ``inner_lr_capped`` in the step's metrics and a WARNING the first time (``last_cap`` keeps
    its text). ``inner_lr_cap="off"`` uses the rate as given. Data-parallel processes cap with
    the largest of their λ, so they stay alike.

    **Logging.** Skipped meta-steps and rejected heads are reported through the standard
    :mod:`logging` module (logger ``metapt.trainer``, a child of ``metapt``) at WARNING on
    their 1st, 2nd, 4th, 8th, ... occurrence and at DEBUG otherwise. With no logging
    configured, Python prints warnings to stderr; ``logging.getLogger("metapt")`` routes or
    silences them.

    **Checked at construction.** Unless ``schedule.learn_phi`` is False, L_PT is evaluated
    once on ``pretrain_batch(0)`` and every entry of φ must reach it (ValueError naming the
    entries that do not); the torch CPU RNG and the problem's buffers are restored after.

    Args:
        problem: the domain (losses and batches).
        params: initial θ (encoder and PT heads).
        head: initial FT head ψ.
        metaparams: initial φ.
        pt_optimizer: builds the PT optimiser from θ's tensors, e.g.
            ``lambda ps: torch.optim.Adam(ps, lr=1e-3)``.
        meta_optimizer: builds φ's optimiser (paper: Adam), e.g.
            ``lambda ps: torch.optim.Adam(ps, lr=0.05)``. The hypergradient scales with the PT
            learning rate (every estimator differentiates a PT step of that size or multiplies
            by α, the PT learning rate by default): its norm runs from about 1e-5 to 3e-3 in the
            guide's example (PT lr 1e-2; ``docs/guide.md`` quotes the measured figures), smaller
            with a smaller PT lr, so plain SGD on φ at lr 1 moves nothing; Adam (scale-free) or SGD
            with a learning rate of the order of 1/‖hypergradient‖ does. For the control
            that runs the meta-objective backwards (φ ascends L_V), pass an optimiser that
            takes ``maximize=True``, e.g. ``torch.optim.Adam(ps, lr=0.05, maximize=True)``.
            A row-sparse hypergradient (example weights read with
            :func:`metapt.metaparams.gather_rows`) reaches the optimiser as a sparse tensor when it
            takes one (:class:`metapt.optim.LazyAdam`, :class:`metapt.optim.LazySGD`: only the
            rows a meta-step touched move, at a cost independent of |φ|), else made dense.
        inner_optimizer: the differentiable FT optimiser of the warm-up, catch-up and unrolled
            head steps (default ``sgd(0.1)``).
        solver: an inverse-HVP solver, short for ``estimator=Estimator(solver=solver)`` (the
            paper's estimator with that solver; the paper's solver is ``Neumann(1, alpha=PT lr)``).
            Not the default: leave both unset for :func:`metapt.hypergrad.default_estimator`.
        estimator: which hypergradient each meta-step estimates
            (:class:`metapt.hypergrad.Estimator`): the solver, the PT batches H and the mixed
            term are taken on (the one just taken, as the paper, or the upcoming ones), Adam's
            preconditioner, or reverse-mode through T unrolled PT steps (a run's configuration
            gives it as ``meta.estimator``). Default:
            :func:`metapt.hypergrad.default_estimator` (chosen by measurement), or the paper's
            estimator with ``solver`` when that is given.
            ``benchmarks/results/hypergrad_quality.md`` measures how well each agrees with the
            lookahead truth per domain.
        schedule: :class:`MetaSchedule`.
        loggers: receive per-step metrics.
        strategy: how the steps are executed (:mod:`metapt.strategy`): one process
            (default), :class:`metapt.strategy.ReusePTGraph` (the meta-step takes H and the
            mixed term from the PT step's own graph), or data-parallel
            (:meth:`metapt.distributed.DistributedContext.strategy`). It never changes what
            is computed.
        inner_lr_cap: ``"auto"`` caps an SGD inner rate where it would diverge (above);
            ``"off"`` uses it as given.

    Normalisation statistics (batch norm): only PT steps update a problem's buffers.
    Warm-up head steps and meta-steps run with the problem's ``state_dict()`` (its buffers)
    restored afterwards, so a meta-step's extra forwards do not count a batch twice.
    """

    def __init__(
        self,
        problem: MetaProblem,
        params: Mapping[str, Tensor],
        head: Mapping[str, Tensor],
        metaparams: Mapping[str, Tensor],
        *,
        pt_optimizer: Callable[[list[Tensor]], torch.optim.Optimizer],
        meta_optimizer: Callable[[list[Tensor]], torch.optim.Optimizer],
        inner_optimizer: InnerOptimizer | None = None,
        solver: Solver | None = None,
        schedule: MetaSchedule = MetaSchedule(),
        loggers: Sequence[MetricsLogger] = (),
        strategy: Strategy | None = None,
        estimator: Estimator | None = None,
        inner_lr_cap: str = "auto",
    ):
        self.problem = problem
        self.params = _leaves(params)
        self.head = {k: v.detach().clone() for k, v in head.items()}
        self._initial_head = {k: v.clone() for k, v in self.head.items()}
        self.metaparams = _leaves(metaparams)
        self.schedule = schedule
        self.strategy = strategy if strategy is not None else Strategy()
        self.strategy.setup(self)  # data-parallel: θ becomes a DDP module's parameters, replicas agree
        if schedule.learn_phi:
            _check_metaparams_reach_loss(problem, self.params, self.metaparams)
        self.pt_opt = pt_optimizer(list(self.params.values()))
        self.meta_opt = meta_optimizer(list(self.metaparams.values()))
        # φ's optimiser behind the skip / densify / reduce policy (the strategy's cross-process mean)
        self.phi_update = ApplyIfFinite(self.meta_opt, self.metaparams, reduce=self.strategy.reduce_hypergrad)
        self.inner = inner_optimizer if inner_optimizer is not None else sgd(0.1)
        if inner_lr_cap not in ("auto", "off"):
            raise ValueError(f"MetaPretrainer: inner_lr_cap must be 'auto' or 'off', got {inner_lr_cap!r}")
        self.inner_lr_cap = inner_lr_cap
        if estimator is not None and solver is not None:
            raise ValueError("MetaPretrainer: pass the solver inside the estimator, estimator=Estimator(solver=...), "
                             "not both solver= and estimator=")
        if estimator is None:  # the measured default, or the paper's estimator with the solver given
            estimator = default_estimator(_first_lr(self.pt_opt)) if solver is None else Estimator(solver=solver)
        default_solver = Identity if estimator.accumulate else (lambda alpha: Neumann(steps=1, alpha=alpha))
        self.solver = estimator.solver if estimator.solver is not None else default_solver(alpha=_first_lr(self.pt_opt))
        self.estimator = estimator if estimator.horizon else dataclasses.replace(estimator, solver=self.solver)
        self.loggers = list(loggers)
        self.step = 0  # PT steps taken
        self.meta_step_count = 0  # meta-steps attempted
        self.skipped = 0  # meta-steps whose hypergradient was unusable
        self.rejected_heads = 0  # meta-steps whose unrolled head was non-finite (the previous one kept)
        self.inner_lr_capped = 0  # fine-tuning steps (warm-up, catch-up, unroll) run at a capped rate
        self.last_cap = ""  # what the cap did the last time it bound
        self.last_skip_reason = ""  # why the last skipped meta-step was skipped
        self._meta_loss_floor: float | None = None  # the lowest L_V of a kept head (divergence check)
        # the accumulated estimator: the last validation direction v, and Σ of the mixed-term draws since
        self._direction: Params | None = None
        self._accumulated: Params | None = None
        self._accumulated_count = 0
        # φ averaged over meta-steps (schedule.average), and how many updates it holds
        self._phi_average: Params = {k: v.detach().clone() for k, v in self.metaparams.items()}
        self._phi_average_count = 0

    # ---- Algorithm 1 --------------------------------------------------------------------------

    def run_until(self, step: int, progress: Callable[[int], None] | None = None) -> None:
        """Pre-train until ``self.step == step``, with meta-steps on schedule.

        ``step`` is a total, not a count of more steps: ``run_until(100)`` twice takes 100
        PT steps; to take ``n`` more, ``run_until(trainer.step + n)``. Nothing happens if
        ``self.step >= step``. ``progress(step)`` is called after every step.
        """
        while self.step < step:
            metrics = self.pretrain_step()
            if not self.schedule.learn_phi:
                pass
            elif self.step <= self.schedule.warmup_steps:
                if self.schedule.head_start == "carried":  # a head that no meta-step starts from is not trained
                    metrics.update(self.warmup_head_step())
            elif self.meta_step_due(self.step):
                metrics.update(self.meta_step())
            metrics = self.strategy.end_step(self, metrics)
            self._log(metrics)
            if progress is not None:
                progress(self.step)

    def meta_step_due(self, step: int) -> bool:
        """Whether a meta-step follows PT step number ``step`` (counted from 1)."""
        sched = self.schedule
        return sched.learn_phi and step > sched.warmup_steps and step % sched.interval == 0

    def pretrain_step(self) -> dict[str, float]:
        """θ ← PT optimiser step on L_PT(θ, φ) with φ held fixed."""
        batch = self.problem.pretrain_batch(self.step)
        self.pt_opt.zero_grad(set_to_none=True)
        k = self.estimator.accumulate
        draw = bool(k) and self._direction is not None and self.schedule.learn_phi and self.step % k == 0
        mixed = None
        if draw:  # the strategy's fused draw: one forward more than the PT step, where it can
            alpha, u = self._draw_scale(self._direction)
            loss, mixed = self.strategy.pretrain_backward_with_mixed(self, batch, u)
            mixed = None if mixed is None else {key: -alpha * v for key, v in mixed.items()}
        else:
            loss = self.strategy.pretrain_backward(self, batch)
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"pre-training loss became {loss.item()} at step {self.step}; lower the PT learning rate "
                "or the meta learning rate"
            )
        if draw:  # at θ before its update; other strategies take the two-forward central difference
            self._add_to_accumulator(mixed if mixed is not None else
                                     self._mixed_draw(self.problem, batch, self._direction))
        self.pt_opt.step()
        self.step += 1
        return {"pt_loss": float(loss)}

    def warmup_head_step(self) -> dict[str, float]:
        """One plain FT step of the head on the current θ (warm-up; nothing unrolled)."""
        theta = {k: v.detach() for k, v in self.params.items()}
        batch = self.problem.finetune_batch(self.step)
        inner, capped = self._inner_for(theta, lambda: [batch], joint=False)
        with _buffers_kept(self.problem):
            head, loss = self._finetune({**self.head}, theta, lambda _: batch, 1, inner)
        if self._diverged(loss):  # the head these steps made has blown up: start it again from ψ₀
            self.rejected_heads += 1
            _log_doubling(self.rejected_heads, "warm-up step %d: the fine-tuning head diverged (loss %.3g) and was "
                          "reset to its initial value; %d rejected so far. Lower the fine-tuning (inner) learning "
                          "rate (meta.inner_lr, or the inner_optimizer's)", self.step, loss, self.rejected_heads)
            self.head = {k: v.clone() for k, v in self._initial_head.items()}
            return {"warmup_ft_loss": loss, **capped}
        self._meta_loss_floor = loss if self._meta_loss_floor is None else min(self._meta_loss_floor, loss)
        self.head = self.strategy.reduce_head({k: v.detach() for k, v in head.items()})
        return {"warmup_ft_loss": loss, **capped}

    def _diverged(self, loss: float) -> bool:
        """A fine-tuning loss that is not finite or orders of magnitude above the lowest seen."""
        return not math.isfinite(loss) or (
            self._meta_loss_floor is not None and loss > _DIVERGED_FACTOR * max(self._meta_loss_floor, 1e-12))

    def meta_step(self) -> dict[str, float]:
        """One hypergradient step on φ (steps 1–5 of the module docstring)."""
        with _buffers_kept(self.problem):
            return self._meta_step()

    @property
    def start_head(self) -> Params:
        """The head the next meta-step fine-tunes from (``schedule.head_start``)."""
        return self._initial_head if self.schedule.head_start == "initial" else self.head

    def _meta_step(self) -> dict[str, float]:
        sched = self.schedule
        catch_up = {}
        if sched.head_start == "initial":  # a fresh fine-tuning from ψ₀; self.head keeps the last result
            self.head = {k: v.clone() for k, v in self._initial_head.items()}
        if sched.head_steps:
            theta = {k: v.detach() for k, v in self.params.items()}
            m = self.meta_step_count
            inner, capped = self._inner_for(theta, lambda: [self.problem.finetune_batch(sched.head_index(m, 0))],
                                            joint=False)
            head, loss = self._finetune(self.head, theta, lambda k: self.problem.finetune_batch(sched.head_index(m, k)),
                                        sched.head_steps, inner)
            self.head = self.strategy.reduce_head({k: v.detach() for k, v in head.items()})
            catch_up = {"head_ft_loss": loss, **{f"head_{k}": v for k, v in capped.items()}}
        inner, capped = self.meta_step_inner(count=True)
        total: Params | None = None
        infos, heads = [], []
        kept = self.strategy.pt_graph(self)  # H and the mixed term at the PT step just taken, if kept
        stride = len(self.estimator.batch_offsets())
        for view, j in itertools.product(self.strategy.meta_views(self), range(sched.batches)):
            index = sched.sample_index(self.meta_step_count, j)
            graph = kept if j == 0 and view is self.problem else None
            val_batch = view.metaval_batch(index)
            ft_batches = lambda k, index=index, view=view: view.finetune_batch(sched.finetune_index(index, k))
            outcome: dict[str, Params] = {}

            def meta_loss(theta: Params) -> Tensor:
                head, theta_ft = self._unroll(theta, ft_batches, inner)
                outcome["head"] = head
                return self.problem.finetune_loss(theta_ft, head, val_batch)

            hyper, info = estimate_hypergradient(
                self.estimator, pretrain_loss_at(self.problem, self.step, j, stride, batches=view),
                meta_loss, self.params, self.metaparams, self.pt_opt, self.params, graph=graph,
                gauss_newton_at=gauss_newton_at(self.problem, self.step, j, stride, self.metaparams, batches=view)
                if self.estimator.gauss_newton else None,
                fresh=not self._accumulated_count)
            kept = graph = None  # free the PT graph before the next sample
            infos.append(info)
            if j == 0:
                heads.append({k: v.detach() for k, v in outcome["head"].items()})
            if total is None:
                total = hyper
            else:  # None: an entry of φ this draw leaves out (the accumulated estimator's direct term)
                for k in total:
                    if hyper[k] is not None:
                        total[k] = hyper[k] if total[k] is None else total[k].add_(hyper[k])
        if len(infos) > 1:
            for v in total.values():
                if v is not None:
                    v.div_(len(infos))
        if self.estimator.accumulate:  # the PT steps' draws since the last meta-step, and the next v
            total = self._with_accumulated(total, [i.direction for i in infos])
        meta_loss = sum(i.meta_loss for i in infos) / len(infos)
        # a head that fine-tuning blew up (too high an inner rate): L_V orders of magnitude above its
        # lowest so far, or not finite; its hypergradient is about the explosion, not about φ
        head_diverged = self._diverged(meta_loss)
        if not head_diverged:
            self._meta_loss_floor = meta_loss if self._meta_loss_floor is None else min(self._meta_loss_floor, meta_loss)
        self.meta_step_count += 1
        applied, norm = self.phi_update.step(total, usable=all(i.usable for i in infos), keep=not head_diverged)
        if applied:
            self._update_phi_average()
        else:
            self._count_skip(meta_loss, head_diverged, infos)
        new_head = self.strategy.reduce_head(_mean(heads))
        if not head_diverged and all(bool(torch.isfinite(v).all()) for v in new_head.values()):
            self.head = new_head  # a NaN or exploded head would poison later steps
        else:
            self.rejected_heads += 1
            _log_doubling(self.rejected_heads, "meta-step %d (after PT step %d): the fine-tuned head is not finite "
                          "or diverged and was not kept; %d rejected so far. Lower the fine-tuning (inner) learning "
                          "rate (meta.inner_lr, or the inner_optimizer's)", self.meta_step_count, self.step,
                          self.rejected_heads)
        return self._meta_metrics(infos, norm, {**catch_up, **capped})

    def _count_skip(self, meta_loss: float, head_diverged: bool, infos: Sequence[HypergradInfo]) -> None:
        """Count a skipped meta-step, say why, and log it (on doubling counts)."""
        self.skipped += 1
        if head_diverged:
            self.last_skip_reason = (f"the fine-tuned head diverged (meta-loss {meta_loss:.3g}, against "
                                     f"{self._meta_loss_floor:.3g} at best so far)" if self._meta_loss_floor
                                     is not None else "the fine-tuned head diverged (meta-loss not finite)")
        elif any(i.solver.diverged for i in infos):
            self.last_skip_reason = "the inverse-HVP solve diverged"
        else:
            self.last_skip_reason = "the hypergradient is not finite"
        _log_doubling(self.skipped, "meta-step %d (after PT step %d) skipped: %s; %d skipped so far. If it "
                      "keeps happening, %s", self.meta_step_count, self.step, self.last_skip_reason,
                      self.skipped, self.skip_advice())

    def _meta_metrics(self, infos: Sequence[HypergradInfo], norm: float, extra: Mapping[str, float]) -> dict[str, float]:
        """What a meta-step logs: its samples' diagnostics, the counters and φ as the problem describes it."""
        residuals = [i.solver.residual_norm for i in infos if i.solver.residual_norm is not None]
        metrics = {
            "meta_loss": sum(i.meta_loss for i in infos) / len(infos),
            "hypergrad_norm": norm,
            "solver_iterations": float(sum(i.solver.iterations for i in infos) / len(infos)),
            "solver_residual": sum(residuals) / len(residuals) if residuals else float("nan"),
            "solver_diverged": float(any(i.solver.diverged for i in infos)),
            # CG stopped at negative curvature (its last good iterate is used); ‖b − Ax‖/‖b‖ where measured
            "solver_negative_curvature": float(any(i.solver.negative_curvature for i in infos)),
            "solver_relative_residual": _mean_of([i.solver.relative_residual for i in infos]),
            "meta_skipped": float(self.skipped),
            "rejected_heads": float(self.rejected_heads),
            **extra,  # the catch-up's loss and the inner-rate cap's figures
        }
        phi = {k: v.detach() for k, v in self.metaparams.items()}
        metrics.update({f"phi/{k}": v for k, v in self.problem.describe_metaparams(phi).items()})
        return metrics

    def skip_advice(self) -> str:
        """What to change when meta-steps keep being skipped, in the terms of this trainer's estimator."""
        if self.last_skip_reason.startswith("the fine-tuned head diverged"):
            return "lower the fine-tuning (inner) learning rate (meta.inner_lr, or the inner_optimizer's)"
        solver = self.solver if not (self.estimator.horizon or self.estimator.accumulate) else None
        if isinstance(solver, Neumann):
            return "lower the solver's alpha (meta.estimator.alpha), add damping or use conjugate gradient (meta.estimator=cg)"
        if solver is not None and not isinstance(solver, Identity):
            return "add damping (meta.estimator.damping)"
        return ("lower the fine-tuning (inner) learning rate (meta.inner_lr, or the inner_optimizer's) "
                "or the PT learning rate")

    # ---- the inner rate -----------------------------------------------------------------------

    def meta_step_inner(self, *, count: bool = False) -> tuple[InnerOptimizer, dict[str, float]]:
        """The fine-tuning optimiser the next meta-step unrolls from the current θ and ψ (its rate
        capped as ``inner_lr_cap`` says, on the first FT batch of every view's first sample) and
        the metrics that say so; diagnostics measure with the same one. ``count``: the meta-step
        itself, which counts and announces a cap."""
        if not self.schedule.unroll_steps:
            return self.inner, {}
        first = self.schedule.finetune_index(self.schedule.sample_index(self.meta_step_count, 0), 0)
        theta = {k: v.detach() for k, v in self.params.items()}
        batches = lambda: [view.finetune_batch(first) for view in self.strategy.meta_views(self)]  # noqa: E731
        return self._inner_for(theta, batches, joint=self.schedule.unroll_encoder, count=count)

    def _inner_for(self, theta: Params, batches: Callable[[], Sequence[Any]], *, joint: bool,
                   count: bool = True) -> tuple[InnerOptimizer, dict[str, float]]:
        """``self.inner``, or the same optimiser at 1/λ where lr·λ > 1.9 (class docstring). ``batches``
        is called only when the cap is on: with it off, the trainer asks for no batch of its own."""
        lr = self.inner.lr
        if self.inner_lr_cap == "off" or lr is None or self.inner.with_lr is None:
            return self.inner, {}
        found = [self._curvature(theta, batch, joint) for batch in batches()]
        lam = self.strategy.reduce_max(max((c for c in found if math.isfinite(c)), default=-math.inf))
        lam = lam if math.isfinite(lam) else math.nan  # a non-finite loss: the divergence check's case
        inner = self.inner
        if lam * lr > _INNER_RATE_BOUND:
            inner = self.inner.with_lr(_INNER_RATE_CAP / lam)
            if count:
                self.inner_lr_capped += 1
                self.last_cap = self.cap_message(lam)
                _log_first(self.inner_lr_capped, "step %d: %s", self.step, self.last_cap)
        return inner, {"inner_lr": inner.lr, "inner_curvature": lam, "inner_lr_capped": float(self.inner_lr_capped)}

    def cap_message(self, curvature: float) -> str:
        """What the inner-rate cap did, in the terms the user set it with (log and console share it)."""
        return (f"the fine-tuning (inner) rate {self.inner.lr:g} is near or above 2/λ = {2 / curvature:.3g}, where "
                f"plain SGD diverges (λ = {curvature:.3g}, the largest eigenvalue of the fine-tuning loss's Hessian; "
                f"lr·λ = {self.inner.lr * curvature:.3g} > {_INNER_RATE_BOUND:g}), so this step, and every one where "
                f"that holds, runs at 1/λ = {_INNER_RATE_CAP / curvature:.3g} (meta.inner_lr_cap: auto; 'off', or "
                "MetaPretrainer(inner_lr_cap='off'), uses the rate as given)")

    def _curvature(self, theta: Params, batch: Any, joint: bool) -> float:
        """λmax of the FT loss's Hessian in the head (and θ if ``joint``), with no side effects on the run:
        the RNG (dropout) and the problem's buffers are as before, so a run the cap leaves alone is unchanged."""
        devices = sorted({v.device.index or 0 for v in self.head.values() if v.device.type == "cuda"})
        with torch.random.fork_rng(devices=devices), _buffers_kept(self.problem):
            if joint:
                point = {**{f"theta/{k}": v for k, v in theta.items()}, **{f"head/{k}": v for k, v in self.head.items()}}
                spectrum = hessian_spectrum(
                    lambda p: self.problem.finetune_loss(_part(p, "theta/"), _part(p, "head/"), batch), point,
                    _CURVATURE_STEPS)
            else:
                spectrum = hessian_spectrum(lambda h: self.problem.finetune_loss(theta, h, batch), self.head,
                                            _CURVATURE_STEPS)
        return spectrum.lambda_max if math.isfinite(spectrum.lambda_max) else math.nan

    # ---- pieces -------------------------------------------------------------------------------

    def _draw_scale(self, direction: Params) -> tuple[float, Params]:
        """α and u = P ⊙ v of the accumulated estimator's draws (P: Adam's scaling, if asked)."""
        alpha, precond = draw_scale(self.estimator, self.pt_opt, self.params)
        return alpha, direction if precond is None else {k: v * precond[k] for k, v in direction.items()}

    def _mixed_draw(self, view: MetaProblem, batch: Any, direction: Params) -> Params:
        """One draw of the accumulated estimator on a PT batch: −α ∂/∂φ⟨∇θ L_PT(θ, φ; batch), P v⟩."""
        alpha, direction = self._draw_scale(direction)
        with _buffers_kept(self.problem):  # its forwards must not count the batch twice (batch norm)
            mixed = directional_mixed_term(lambda th, ph: view.pretrain_loss(th, ph, batch), self.params,
                                           self.metaparams, direction)
        return {k: -alpha * v for k, v in mixed.items()}

    def _add_to_accumulator(self, draw: Params) -> None:
        if self._accumulated is None:
            self._accumulated = draw
        else:
            self._accumulated = {k: self._accumulated[k] + draw[k] for k in draw}
        self._accumulated_count += 1

    def _with_accumulated(self, fresh: Params, directions: Sequence[Params]) -> Params:
        """The meta-step's hypergradient: the mean direct term of its validation batches
        (``fresh``; it holds their fresh mixed draws too when no PT step drew) plus the mean of the
        PT steps' draws since the last meta-step; v becomes the mean of this meta-step's directions."""
        if self._accumulated is not None and self._accumulated_count:
            mean = {k: v.to(self.metaparams[k].device) / self._accumulated_count for k, v in self._accumulated.items()}
            fresh = {k: mean[k] if v is None else v + mean[k] for k, v in fresh.items()}
        fresh = {k: torch.zeros_like(self.metaparams[k]) if v is None else v for k, v in fresh.items()}
        direction = _mean(directions)
        if all(bool(torch.isfinite(v).all()) for v in direction.values()):
            decay = self.estimator.direction_decay
            if decay and self._direction is not None:  # v averaged over meta-steps (estimator.direction_decay)
                direction = {k: self._direction[k].lerp(v, 1.0 - decay) for k, v in direction.items()}
            self._direction = direction  # a non-finite v would poison every draw until the next meta-step
        self._accumulated, self._accumulated_count = None, 0
        return fresh

    def _update_phi_average(self) -> None:
        """Fold the updated φ into the reported average (``schedule.average``)."""
        self._phi_average_count += 1
        n, kind = self._phi_average_count, self.schedule.average
        if kind == "none":
            return
        weight = 1.0 / n if kind == "polyak" else 1.0 - min(self.schedule.average_decay, (1 + n) / (10 + n))
        with torch.no_grad():
            for k, v in self.metaparams.items():
                self._phi_average[k].lerp_(v.detach(), weight)

    @property
    def averaged_metaparams(self) -> Params:
        """φ as the run reports it: the live φ (``average: none``) or its average over meta-steps."""
        if self.schedule.average == "none" or not self._phi_average_count:
            return {k: v.detach().clone() for k, v in self.metaparams.items()}
        return {k: v.clone() for k, v in self._phi_average.items()}

    def _unroll(self, theta: Params, ft_batches: Callable[[int], Any], inner: InnerOptimizer) -> tuple[Params, Params]:
        """K differentiable FT steps from (θ, ψ); returns (ψ_K, θ used by the FT model)."""
        steps = self.schedule.unroll_steps
        if not self.schedule.unroll_encoder:
            head = unrolled_finetune(
                lambda h, k: self.problem.finetune_loss(theta, h, ft_batches(k)), self.head, inner, steps
            )
            return head, theta
        joint = {**{f"theta/{k}": v for k, v in theta.items()}, **{f"head/{k}": v for k, v in self.head.items()}}
        out = unrolled_finetune(
            lambda p, k: self.problem.finetune_loss(_part(p, "theta/"), _part(p, "head/"), ft_batches(k)),
            joint,
            inner,
            steps,
        )
        return _part(out, "head/"), _part(out, "theta/")

    def _finetune(self, head: Params, theta: Params, batches, steps: int, inner: InnerOptimizer) -> tuple[Params, float]:
        losses = []

        def loss_fn(h, k):
            loss = self.problem.finetune_loss(theta, h, batches(k))
            losses.append(float(loss.detach()))
            return loss

        return unrolled_finetune(loss_fn, head, inner, steps), losses[-1]

    def _log(self, metrics: Mapping[str, float]) -> None:
        for logger in self.loggers:
            logger.log(self.step, metrics)

    # ---- state --------------------------------------------------------------------------------

    def snapshot(self) -> TrainerSnapshot:
        """Detached copies of θ, ψ and φ and the counters: the results, safe to keep and use."""
        return TrainerSnapshot(
            step=self.step,
            meta_step_count=self.meta_step_count,
            skipped=self.skipped,
            rejected_heads=self.rejected_heads,
            params={k: v.detach().clone() for k, v in self.params.items()},
            head={k: v.detach().clone() for k, v in self.head.items()},
            metaparams={k: v.detach().clone() for k, v in self.metaparams.items()},
            averaged_metaparams=self.averaged_metaparams,
            inner_lr_capped=self.inner_lr_capped,
        )

    def state_dict(self) -> dict[str, Any]:
        """Everything the run needs to continue exactly: tensors, optimiser states, counters."""
        return {
            "params": {k: v.detach().clone() for k, v in self.params.items()},
            "head": {k: v.detach().clone() for k, v in self.head.items()},
            "metaparams": {k: v.detach().clone() for k, v in self.metaparams.items()},
            "pt_opt": copy.deepcopy(self.pt_opt.state_dict()),
            "meta_opt": copy.deepcopy(self.meta_opt.state_dict()),
            "counters": {"step": self.step, "meta_step_count": self.meta_step_count, "skipped": self.skipped,
                         "rejected_heads": self.rejected_heads, "inner_lr_capped": self.inner_lr_capped},
            "meta_loss_floor": self._meta_loss_floor,
            "noise_control": {
                "direction": _copy(self._direction), "accumulated": _copy(self._accumulated),
                "accumulated_count": self._accumulated_count,
                "phi_average": _copy(self._phi_average), "phi_average_count": self._phi_average_count},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from a :meth:`state_dict`: θ and φ are copied into the trainer's own tensors.

        The trainer must be built like the one that made ``state`` (same keys and shapes, same
        kinds of optimiser); since batches are functions of their index, it then goes on exactly
        as the original would have.
        """
        with torch.no_grad():
            for group in ("params", "metaparams"):
                for k, v in getattr(self, group).items():
                    v.copy_(state[group][k])
        self.head = {k: v.to(self.head[k].device, copy=True) if k in self.head else v.clone()
                     for k, v in state["head"].items()}  # on the trainer's device, whatever the file's
        # torch's Optimizer.load_state_dict keeps the given moment tensors: copy, so that training
        # after a load never writes into ``state`` (or a checkpoint object still holding it)
        self.pt_opt.load_state_dict(copy.deepcopy(state["pt_opt"]))
        self.meta_opt.load_state_dict(copy.deepcopy(state["meta_opt"]))
        counters = state["counters"]
        self.step, self.meta_step_count, self.skipped = (
            int(counters["step"]), int(counters["meta_step_count"]), int(counters["skipped"])
        )
        self.rejected_heads = int(counters.get("rejected_heads", 0))
        self.inner_lr_capped = int(counters.get("inner_lr_capped", 0))
        self._meta_loss_floor = state.get("meta_loss_floor")
        noise = state.get("noise_control")  # absent in checkpoints written before it existed
        if noise is not None:
            self._direction = _copy(noise["direction"], self.params)
            self._accumulated = _copy(noise["accumulated"], self.metaparams)
            self._accumulated_count = int(noise["accumulated_count"])
            self._phi_average = _copy(noise["phi_average"], self.metaparams)
            self._phi_average_count = int(noise["phi_average_count"])
        self.strategy.reset()


@dataclass(frozen=True)
class TrainerSnapshot:
    """What :meth:`MetaPretrainer.snapshot` returns: copies, detached from every graph.

    Attributes:
        step: PT steps taken.
        meta_step_count: meta-steps attempted (skipped ones included).
        skipped: meta-steps whose φ update was skipped (non-finite hypergradient or diverged solve).
        rejected_heads: meta-steps whose fine-tuned head was not finite (the previous head was kept).
        params: θ, with the keys it was given.
        head: ψ, the fine-tuning head kept by the last meta-step (or warm-up step).
        metaparams: φ, raw (e.g. logits; apply your family's transform to read weights).
        averaged_metaparams: φ averaged over the meta-steps as ``schedule.average`` says (the
            last φ when it is ``none``): the result to read.
        inner_lr_capped: fine-tuning steps run below the inner rate given (the rate cap bound).
    """

    step: int
    meta_step_count: int
    skipped: int
    rejected_heads: int
    params: Params
    head: Params
    metaparams: Params
    averaged_metaparams: Params | None = None
    inner_lr_capped: int = 0


def _log_doubling(count: int, message: str, *args: Any) -> None:
    """WARNING on the 1st, 2nd, 4th, 8th, ... occurrence, DEBUG in between: heard, not flooding."""
    log.log(logging.WARNING if count & (count - 1) == 0 else logging.DEBUG, message, *args)


def _log_first(count: int, message: str, *args: Any) -> None:
    """WARNING the first time, DEBUG after: a cap that binds once usually binds all run long."""
    log.log(logging.WARNING if count == 1 else logging.DEBUG, message, *args)


def _check_metaparams_reach_loss(problem: MetaProblem, params: Params, metaparams: Params) -> None:
    """ValueError naming every entry of φ that L_PT on ``pretrain_batch(0)`` does not depend on."""
    with torch.random.fork_rng(devices=[]), _buffers_kept(problem), torch.enable_grad():
        loss = problem.pretrain_loss({k: v.detach() for k, v in params.items()}, metaparams, problem.pretrain_batch(0))
        if not isinstance(loss, Tensor) or loss.dim() != 0:
            raise ValueError(f"pretrain_loss must return a scalar tensor, got {getattr(loss, 'shape', type(loss))}")
        keys = list(metaparams)
        grads = (torch.autograd.grad(loss, [metaparams[k] for k in keys], allow_unused=True)
                 if loss.requires_grad else [None] * len(keys))
    unused = [k for k, g in zip(keys, grads) if g is None]
    if unused:
        raise ValueError(
            f"meta-parameter(s) {unused} do not reach the pre-training loss (checked on pretrain_batch(0)): "
            "compute pretrain_loss from the metaparams dict it is given, or drop those entries from φ"
        )


@contextmanager
def _buffers_kept(problem: MetaProblem):
    """Run a block, then put the problem's buffers (``state_dict()``) back as they were."""
    saved = problem.state_dict() if hasattr(problem, "state_dict") else None
    try:
        yield
    finally:
        if saved:
            problem.load_state_dict(saved)


def _part(params: Mapping[str, Tensor], prefix: str) -> Params:
    return {k[len(prefix):]: v for k, v in params.items() if k.startswith(prefix)}


def _mean(trees: Sequence[Params]) -> Params:
    return trees[0] if len(trees) == 1 else {k: sum(t[k] for t in trees) / len(trees) for k in trees[0]}


#: L_V this many times its lowest so far marks a diverged fine-tuning head.
_DIVERGED_FACTOR = 1e3

#: The inner-rate cap binds where lr·λ is above this: within 5 % of 2, where plain gradient descent
#: diverges along the stiffest direction. Below it a rate is stable and left exactly as given.
_INNER_RATE_BOUND = 1.9

#: Where it binds, the rate becomes this over λ: the step that lands on the minimum along the
#: stiffest direction of a quadratic, half the divergence bound (margin for a λ estimated low).
_INNER_RATE_CAP = 1.0

#: Hessian-vector products per curvature estimate (Lanczos is exact once they reach the dimension).
_CURVATURE_STEPS = 10


def _copy(tree: Mapping[str, Tensor] | None, like: Mapping[str, Tensor] | None = None) -> Params | None:
    """Detached copies (on the devices of ``like``'s entries, where given)."""
    if tree is None:
        return None
    return {k: v.detach().to(like[k].device if like is not None else v.device, copy=True) for k, v in tree.items()}


def _mean_of(values: Sequence[float | None]) -> float:
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else float("nan")


def _first_lr(opt: torch.optim.Optimizer) -> float:
    return float(opt.param_groups[0]["lr"])
