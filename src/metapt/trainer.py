"""Algorithm 1 of Raghu et al. (NeurIPS 2021): online meta-learning of pre-training hyperparameters.

Read top to bottom: :meth:`MetaPretrainer.run` pre-trains θ with the current φ
and, every ``meta_interval`` steps, takes one meta-step on φ:

1. unroll K fine-tuning steps of the head ψ (or of ψ and θ) on FT-train batches,
   starting from the current θ and the persisted, warm-started ψ;
2. evaluate the meta-loss L_V on a MetaFT-validation batch;
3. dL_V/dφ by implicit differentiation through pre-training (``hypergrad``),
   averaged over ``meta_batches`` PT/validation batch pairs if asked;
4. update φ with its own optimiser, unless the hypergradient is unusable
   (non-finite, or the inverse-HVP solve diverged), which is skipped and counted;
5. keep ψ_K, detached, as the head for the next meta-step.

This module knows the order of things and nothing about any domain: the domain
enters through :class:`metapt.problem.MetaProblem`.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from .hypergrad import (
    InnerOptimizer,
    Neumann,
    Solver,
    pretrain_graph,
    pretraining_hypergradient,
    sgd,
    unrolled_finetune,
)
from .problem import MetaProblem, Params


class MetricsLogger(Protocol):
    """Receives the numbers of every step; files, progress bars and TensorBoard attach here."""

    def log(self, step: int, metrics: Mapping[str, float]) -> None: ...


class NonFiniteLossError(FloatingPointError):
    """The pre-training loss stopped being finite; the run cannot continue."""


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
    """

    meta_interval: int = 10
    unroll_steps: int = 1
    unroll_encoder: bool = False
    meta_batches: int = 1
    warmup_steps: int = 0
    head_steps: int = 0

    def __post_init__(self):
        for name in ("meta_interval", "meta_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"MetaSchedule: {name} must be >= 1, got {getattr(self, name)}")
        for name in ("unroll_steps", "warmup_steps", "head_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"MetaSchedule: {name} must be >= 0, got {getattr(self, name)}")


def _leaves(params: Mapping[str, Tensor]) -> Params:
    return {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}


class MetaPretrainer:
    """Online meta-learning of φ interleaved with pre-training of θ.

    Args:
        problem: the domain (losses and batches).
        params: initial θ (encoder and PT heads).
        head: initial FT head ψ.
        metaparams: initial φ.
        pt_optimizer: builds the PT optimiser from θ's tensors, e.g.
            ``lambda ps: torch.optim.Adam(ps, lr=1e-3)``.
        meta_optimizer: builds φ's optimiser (paper: Adam).
        inner_optimizer: the differentiable FT optimiser that is unrolled.
        solver: the inverse-HVP solver (paper: ``Neumann(1, alpha=PT lr)``).
        schedule: :class:`MetaSchedule`.
        loggers: receive per-step metrics.
        reduce_hypergrad: averages a hypergradient across processes in
            data-parallel runs; identity by default.
        reduce_head: averages the FT head across processes after each update
            of it (warm-up, catch-up, unroll); identity by default.
        data_parallel: the data-parallel hooks of :mod:`metapt.distributed`
            (``DistributedContext.trainer_kwargs()`` supplies them and the two
            reductions): θ becomes a DistributedDataParallel module's parameters,
            replicas start from rank 0's values, metrics are averaged over processes.
        meta_views: problems whose batches each meta-step averages over, one
            sample (``meta_batches`` samples) each; the persisted head is the mean
            of their first samples' heads. Default: the problem itself. A
            one-process reference for W data-parallel processes passes the W
            shard views (:class:`metapt.distributed.ShardedProblem`).
        reuse_pt_graph: take H and ∂²L_PT/∂φ∂θ from the gradient graph of the PT
            step right before each meta-step (at that step's θ, batch and dropout
            mask) instead of a second PT forward/backward: the meta-step at its
            floor cost (benchmarks/meta_overhead.py), but H is then one PT step
            older than g. Off by default, so that every derivative is taken at the
            same θ as in the paper (the molecules job could not tell them apart
            beyond pre-training seed variation; README).
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
        reduce_hypergrad: Callable[[Params], Params] = lambda h: h,
        reduce_head: Callable[[Params], Params] = lambda h: h,
        data_parallel: Any = None,
        meta_views: Sequence[MetaProblem] | None = None,
        reuse_pt_graph: bool = False,
    ):
        self.problem = problem
        self.params = _leaves(params)
        self.head = {k: v.detach().clone() for k, v in head.items()}
        self.metaparams = _leaves(metaparams)
        self.data_parallel = data_parallel
        if data_parallel is not None:  # θ becomes a DDP module's parameters; every process starts from rank 0's values
            data_parallel.setup(self)
        self.pt_opt = pt_optimizer(list(self.params.values()))
        self.meta_opt = meta_optimizer(list(self.metaparams.values()))
        self.inner = inner_optimizer if inner_optimizer is not None else sgd(0.1)
        self.solver = solver if solver is not None else Neumann(steps=1, alpha=_first_lr(self.pt_opt))
        self.schedule = schedule
        self.loggers = list(loggers)
        self.reduce_hypergrad = reduce_hypergrad
        self.reduce_head = reduce_head
        self.meta_views = list(meta_views) if meta_views is not None else [problem]
        self.reuse_pt_graph = reuse_pt_graph
        self._pt_graph = None  # (step, tensor versions, graph) kept by pretrain_step for the next meta-step
        self.step = 0  # PT steps taken
        self.meta_step_count = 0  # meta-steps attempted
        self.skipped = 0  # meta-steps whose hypergradient was unusable

    # ---- Algorithm 1 --------------------------------------------------------------------------

    def run(self, steps: int, progress: Callable[[int], None] | None = None) -> None:
        """Take PT steps until ``self.step == steps``, with meta-steps on schedule."""
        while self.step < steps:
            metrics = self.pretrain_step()
            if self.step <= self.schedule.warmup_steps:
                metrics.update(self.warmup_head_step())
            elif self.step % self.schedule.meta_interval == 0:
                metrics.update(self.meta_step())
            if self.data_parallel is not None:  # every process: metrics averaged; replicas checked in debug mode
                metrics = self.data_parallel.end_step(self, metrics)
            self._log(metrics)
            if progress is not None:
                progress(self.step)

    def pretrain_step(self) -> dict[str, float]:
        """θ ← PT optimiser step on L_PT(θ, φ) with φ held fixed.

        Right before a meta-step the step keeps the graph of its gradient (``pretrain_graph``),
        and the meta-step takes H and ∂²L_PT/∂φ∂θ from it, at this step's θ and batch, instead
        of running a second PT forward/backward, when ``reuse_pt_graph`` is on.
        """
        batch = self.problem.pretrain_batch(self.step)
        self.pt_opt.zero_grad(set_to_none=True)
        self._pt_graph = None  # a kept graph that no meta-step took is stale now
        sched, nxt = self.schedule, self.step + 1
        keep_graph = (
            self.reuse_pt_graph and self.data_parallel is None
            and len(self.meta_views) == 1 and self.meta_views[0] is self.problem
            and nxt > sched.warmup_steps and nxt % sched.meta_interval == 0
        )
        if keep_graph:
            graph = pretrain_graph(lambda th, ph: self.problem.pretrain_loss(th, ph, batch), self.params, self.metaparams)
            loss = graph.loss
        else:
            phi = {k: v.detach() for k, v in self.metaparams.items()}
            pretrain_loss = self.problem.pretrain_loss if self.data_parallel is None else self.data_parallel.pretrain_loss
            loss = pretrain_loss(self.params, phi, batch)
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"pre-training loss became {loss.item()} at step {self.step}; lower the PT learning rate "
                "or the meta learning rate, then resume from the last checkpoint"
            )
        if keep_graph:
            for k, v in self.params.items():
                v.grad = None if graph.grad[k] is None else graph.grad[k].detach()
        else:
            loss.backward()
        self.pt_opt.step()
        self.step += 1
        if keep_graph:  # valid for the meta-step of this step only, while θ and φ stay as they are now
            versions = [v._version for v in (*self.params.values(), *self.metaparams.values())]
            self._pt_graph = (self.step, versions, graph)
        return {"pt_loss": float(loss.detach())}

    def warmup_head_step(self) -> dict[str, float]:
        """One plain FT step of the head on the current θ (warm-up; nothing unrolled)."""
        theta = {k: v.detach() for k, v in self.params.items()}
        batch = self.problem.finetune_batch(self.step)
        head, loss = self._finetune({**self.head}, theta, lambda _: batch, steps=1)
        self.head = self.reduce_head({k: v.detach() for k, v in head.items()})
        return {"warmup_ft_loss": loss}

    def meta_step(self) -> dict[str, float]:
        """One hypergradient step on φ (steps 1–5 of the module docstring)."""
        sched = self.schedule
        catch_up = {}
        if sched.head_steps:
            theta = {k: v.detach() for k, v in self.params.items()}
            first = self.meta_step_count * sched.head_steps
            head, loss = self._finetune(self.head, theta, lambda k: self.problem.finetune_batch(first + k), sched.head_steps)
            self.head = self.reduce_head({k: v.detach() for k, v in head.items()})
            catch_up = {"head_ft_loss": loss}
        total: Params | None = None
        infos, heads = [], []
        # the gradient graph of the PT step just taken (pretrain_step keeps it when a meta-step follows)
        kept, self._pt_graph = self._pt_graph, None
        versions = [v._version for v in (*self.params.values(), *self.metaparams.values())]
        # None where θ or φ changed since (a load_state_dict, an update by hand): recompute then
        pt_graph = kept[2] if kept is not None and kept[:2] == (self.step, versions) else None
        for view, j in itertools.product(self.meta_views, range(sched.meta_batches)):  # view: batches only
            index = self.meta_step_count * sched.meta_batches + j
            graph = pt_graph if j == 0 and view is self.problem else None  # H, mixed term: at that step's θ
            pt_batch = None if graph is not None else view.pretrain_batch(self.step - 1 if j == 0 else _extra_index(self.step, j))
            val_batch = view.metaval_batch(index)
            ft_batches = lambda k, index=index, view=view: view.finetune_batch(index * max(sched.unroll_steps, 1) + k)
            outcome: dict[str, Params] = {}

            def meta_loss(theta: Params) -> Tensor:
                head, theta_ft = self._unroll(theta, ft_batches)
                outcome["head"] = head
                return self.problem.finetune_loss(theta_ft, head, val_batch)

            hyper, info = pretraining_hypergradient(
                lambda th, ph: self.problem.pretrain_loss(th, ph, pt_batch),
                meta_loss,
                self.params,
                self.metaparams,
                self.solver,
                graph=graph,
            )
            pt_graph = graph = None  # free the PT graph before the next sample
            infos.append(info)
            if j == 0:
                heads.append({k: v.detach() for k, v in outcome["head"].items()})
            if total is None:
                total = hyper
            else:
                for k in total:
                    total[k].add_(hyper[k])
        if len(infos) > 1:
            for v in total.values():
                v.div_(len(infos))
        if not all(i.usable for i in infos):  # NaN survives the cross-process mean: every process skips alike
            total = {k: torch.full_like(v, math.nan) for k, v in total.items()}
        hyper = self.reduce_hypergrad(total)
        # one pass over φ: the norm is non-finite exactly when some entry is (or it overflows)
        norm = math.sqrt(sum(float(torch.dot(v.reshape(-1), v.reshape(-1))) for v in hyper.values()))
        usable = all(i.usable for i in infos) and math.isfinite(norm)
        self.meta_step_count += 1
        if usable:
            self.meta_opt.zero_grad(set_to_none=True)
            for k, v in self.metaparams.items():
                v.grad = hyper[k].to(v.dtype)
            self.meta_opt.step()
        else:
            self.skipped += 1
        new_head = self.reduce_head(_mean(heads))
        if all(bool(torch.isfinite(v).all()) for v in new_head.values()):  # a NaN head would poison later steps
            self.head = new_head

        residuals = [i.solver.residual_norm for i in infos if i.solver.residual_norm is not None]
        metrics = {
            "meta_loss": sum(i.meta_loss for i in infos) / len(infos),
            "hypergrad_norm": norm,
            "solver_iterations": float(sum(i.solver.iterations for i in infos) / len(infos)),
            "solver_residual": sum(residuals) / len(residuals) if residuals else float("nan"),
            "solver_diverged": float(any(i.solver.diverged for i in infos)),
            "meta_skipped": float(self.skipped),
            **catch_up,
        }
        metrics.update({f"phi/{k}": v for k, v in self.problem.describe_metaparams(self.metaparams).items()})
        return metrics

    # ---- pieces -------------------------------------------------------------------------------

    def _unroll(self, theta: Params, ft_batches: Callable[[int], Any]) -> tuple[Params, Params]:
        """K differentiable FT steps from (θ, ψ); returns (ψ_K, θ used by the FT model)."""
        steps = self.schedule.unroll_steps
        if not self.schedule.unroll_encoder:
            head = unrolled_finetune(
                lambda h, k: self.problem.finetune_loss(theta, h, ft_batches(k)), self.head, self.inner, steps
            )
            return head, theta
        joint = {**{f"theta/{k}": v for k, v in theta.items()}, **{f"head/{k}": v for k, v in self.head.items()}}
        out = unrolled_finetune(
            lambda p, k: self.problem.finetune_loss(_part(p, "theta/"), _part(p, "head/"), ft_batches(k)),
            joint,
            self.inner,
            steps,
        )
        return _part(out, "head/"), _part(out, "theta/")

    def _finetune(self, head: Params, theta: Params, batches, steps: int) -> tuple[Params, float]:
        losses = []

        def loss_fn(h, k):
            loss = self.problem.finetune_loss(theta, h, batches(k))
            losses.append(float(loss.detach()))
            return loss

        return unrolled_finetune(loss_fn, head, self.inner, steps), losses[-1]

    def _log(self, metrics: Mapping[str, float]) -> None:
        for logger in self.loggers:
            logger.log(self.step, metrics)

    # ---- state --------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything the run needs to continue exactly: tensors, optimiser states, counters."""
        return {
            "params": {k: v.detach().clone() for k, v in self.params.items()},
            "head": {k: v.detach().clone() for k, v in self.head.items()},
            "metaparams": {k: v.detach().clone() for k, v in self.metaparams.items()},
            "pt_opt": copy.deepcopy(self.pt_opt.state_dict()),
            "meta_opt": copy.deepcopy(self.meta_opt.state_dict()),
            "counters": {"step": self.step, "meta_step_count": self.meta_step_count, "skipped": self.skipped},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        with torch.no_grad():
            for group in ("params", "metaparams"):
                for k, v in getattr(self, group).items():
                    v.copy_(state[group][k])
        self.head = {k: v.clone() for k, v in state["head"].items()}
        self.pt_opt.load_state_dict(state["pt_opt"])
        self.meta_opt.load_state_dict(state["meta_opt"])
        counters = state["counters"]
        self.step, self.meta_step_count, self.skipped = (
            int(counters["step"]), int(counters["meta_step_count"]), int(counters["skipped"])
        )


def _part(params: Mapping[str, Tensor], prefix: str) -> Params:
    return {k[len(prefix):]: v for k, v in params.items() if k.startswith(prefix)}


def _mean(trees: Sequence[Params]) -> Params:
    return trees[0] if len(trees) == 1 else {k: sum(t[k] for t in trees) / len(trees) for k in trees[0]}


def _extra_index(step: int, j: int) -> int:
    """PT batch index for the j-th extra hypergradient sample: past batches, newest first."""
    return max(step - 1 - j, 0)


def _first_lr(opt: torch.optim.Optimizer) -> float:
    return float(opt.param_groups[0]["lr"])
