"""Which hypergradient a meta-step estimates, and the truncated-horizon (reverse-mode) estimator.

Every estimator answers "how does L_V move if φ moves?" for some horizon of pre-training:

- implicit (IFT) with an inverse-HVP solver: the converged answer, from the mixed term
  ∂²L_PT/∂φ∂θ on one PT batch (the paper: the PT batch just taken), on the mean L_PT of several
  (``pt_batches``), or on the batches pre-training will take next (``upcoming``), optionally in
  the PT optimiser's own
  geometry (``adam_preconditioner``: Identity(α) is then the exact one-step derivative of Adam
  with its moments frozen);
- truncated horizon (``horizon`` T > 0): reverse-mode through T unrolled PT optimiser steps on
  the upcoming batches — the exact derivative of the T-step lookahead, memory O(T);
- accumulated (``accumulate`` k > 0): the one-step mixed term of every k-th PT batch against the
  last validation direction, averaged by the meta-step (:mod:`metapt.hypergrad.accumulate`).

:class:`Estimator` is the small frozen description the trainer takes (``estimator=``);
:func:`estimate_hypergradient` is the one entry point that computes what it describes (the trainer
and the diagnostics call it for every kind).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from ._tree import Params, tree_norm
from .accumulate import accumulated_hypergradient
from .core import HypergradInfo, PretrainGraph, check_inputs, check_scalar, differentiable, pretraining_hypergradient
from .curvature import gauss_newton_product
from .optim import AdamState, InnerOptimizer, SGDState, adam, sgd
from .solvers import Identity, Neumann, Solver, SolverInfo


@dataclass(frozen=True)
class Estimator:
    """How :class:`metapt.MetaPretrainer` estimates dL_V/dφ at each meta-step.

    Attributes:
        solver: the inverse-HVP solver of the implicit estimators; None: the paper's
            ``Neumann(1, α = PT learning rate)``. Unused when ``horizon`` > 0.
        pt_batches: n, the PT batches whose mean L_PT gives H and the mixed term (the paper: 1);
            each costs a PT forward/backward with its graph.
        upcoming: take them among the batches pre-training takes next (where it goes) instead of
            the ones it just took (the paper's; only the latter can come from a kept PT graph).
        adam_preconditioner: solve in the PT optimiser's geometry P = 1/(√v̂ + ε) read from
            torch.optim.Adam's state (the formula otherwise assumes SGD).
        horizon: T > 0: reverse-mode through T differentiable PT optimiser steps on the
            upcoming batches (the exact T-step lookahead derivative, about 3T PT steps of cost
            and T graphs of memory); 0: the implicit family.
        gauss_newton: the solver sees the Gauss–Newton matrix JᵀH_ℓJ (positive semi-definite)
            instead of H; needs a problem that exposes its PT loss as outputs and a loss convex
            in them (:class:`GaussNewtonProblem`).
        accumulate: k > 0: the accumulated estimator (:mod:`metapt.hypergrad.accumulate`): every
            k-th PT step adds its one-step mixed term −α ∂/∂φ⟨∇θ L_PT, P v⟩ against the latest
            validation direction v, and each meta-step averages them (a draw of its own only
            when no PT step drew since the last meta-step); the
            solver must be None or :class:`Identity` (its α; None: the PT learning rate), and
            ``adam_preconditioner`` sets P. 0: one draw per meta-step (every other estimator).
        direction_decay: accumulated: v is the exponential moving average of the meta-steps'
            validation directions with this decay (0: the last one's); a draw against one
            validation batch's v is mostly that batch.
    """

    solver: Solver | None = None
    pt_batches: int = 1
    upcoming: bool = False
    adam_preconditioner: bool = False
    horizon: int = 0
    gauss_newton: bool = False
    accumulate: int = 0
    direction_decay: float = 0.0

    def __post_init__(self):
        if self.pt_batches < 1:
            raise ValueError(f"Estimator: pt_batches must be >= 1, got {self.pt_batches}")
        if self.horizon < 0:
            raise ValueError(f"Estimator: horizon must be >= 0, got {self.horizon}")
        if self.horizon and (self.solver is not None or self.adam_preconditioner or self.pt_batches != 1
                             or self.upcoming or self.gauss_newton):
            raise ValueError("Estimator: horizon > 0 differentiates through the PT optimiser on the upcoming "
                             "batches; leave solver, pt_batches, upcoming and adam_preconditioner at their defaults")
        if not 0.0 <= self.direction_decay < 1.0:
            raise ValueError(f"Estimator: direction_decay must be in [0, 1), got {self.direction_decay}")
        if self.direction_decay and not self.accumulate:
            raise ValueError("Estimator: direction_decay averages the accumulated estimator's validation direction; "
                             "set accumulate > 0 or leave it at 0")
        if self.accumulate < 0:
            raise ValueError(f"Estimator: accumulate must be >= 0, got {self.accumulate}")
        if self.accumulate and (self.horizon or self.pt_batches != 1 or self.upcoming or self.gauss_newton
                                or not (self.solver is None or isinstance(self.solver, Identity))):
            raise ValueError("Estimator: accumulate > 0 takes the one-step mixed term of every k-th PT batch; "
                             "it reads only solver=Identity(alpha) (or None) and adam_preconditioner")

    @property
    def uses_past_batch(self) -> bool:
        """The paper's: H and the mixed term from the one PT batch just taken (a kept PT graph applies)."""
        return (self.horizon == 0 and self.pt_batches == 1 and not self.upcoming and not self.gauss_newton
                and not self.accumulate)

    def batch_offsets(self) -> list[int]:
        """Which PT batches L_PT is taken on: t = 0, 1, … upcoming; t = −1, −2, … just taken
        (the accumulated estimator's own draw: the upcoming batch)."""
        if self.horizon:
            return list(range(self.horizon))
        if self.accumulate:
            return [0]
        return list(range(self.pt_batches)) if self.upcoming else [-1 - i for i in range(self.pt_batches)]


@runtime_checkable
class GaussNewtonProblem(Protocol):
    """A problem whose PT loss is ``pretrain_output_loss(pretrain_outputs(θ, φ, batch), φ, batch)``,
    the loss convex in the outputs (masked weighted BCE on logits is): what ``gauss_newton`` needs."""

    def pretrain_outputs(self, params: Params, metaparams: Mapping[str, Tensor], batch: Any) -> Tensor: ...

    def pretrain_output_loss(self, outputs: Tensor, metaparams: Mapping[str, Tensor], batch: Any) -> Tensor: ...


def default_estimator(pt_lr: float) -> Estimator:
    """The trainer's default, chosen by measurement (benchmarks/results/hypergrad_quality.md):
    reverse-mode through the next PT optimiser step (``Estimator(horizon=1)``), the exact derivative
    of where the next Adam step takes θ. Of the options within 1.6× plain pre-training on the
    molecules GIN it agreed best with the exact lookahead derivative over the shipped domains
    (molecules task and example weights, ECG warp), and it costs less than the paper's Neumann M = 1
    (1.33× and 1.34× vs 1.45× and 1.52× plain pre-training on the 3 × 64 and 5 × 300 GIN).
    ``pt_lr`` is unused (the step is the PT optimiser's own); it keeps the signature of the
    implicit defaults."""
    del pt_lr
    return Estimator(horizon=1)


def differentiable_pt_optimizer(opt: torch.optim.Optimizer, params: Mapping[str, Tensor]) -> tuple[InnerOptimizer, tuple]:
    """The pure, differentiable twin of a torch PT optimiser, and its current state.

    Supports ``torch.optim.Adam`` (no weight decay, no AMSGrad) and ``torch.optim.SGD`` (no
    weight decay, no Nesterov), one parameter group; the state is copied (detached) from
    ``opt.state`` so that stepping it reproduces what ``opt.step()`` would do.

    Raises:
        ValueError: another optimiser or option, which this twin would not reproduce.
    """
    if len(opt.param_groups) != 1:
        raise ValueError("differentiable_pt_optimizer: the PT optimiser must have one parameter group")
    group = opt.param_groups[0]
    tensors = list(params.values())
    if isinstance(opt, torch.optim.Adam):
        if group.get("weight_decay", 0) or group.get("amsgrad", False):
            raise ValueError("differentiable_pt_optimizer: Adam with weight_decay or amsgrad is not supported")
        inner = adam(float(group["lr"]), tuple(group["betas"]), float(group["eps"]))
        states = [opt.state.get(p, {}) for p in tensors]
        count = int(states[0]["step"]) if states and "step" in states[0] else 0
        mu = {k: opt.state[p]["exp_avg"].detach().clone() if p in opt.state else torch.zeros_like(p)
              for k, p in params.items()}
        nu = {k: opt.state[p]["exp_avg_sq"].detach().clone() if p in opt.state else torch.zeros_like(p)
              for k, p in params.items()}
        return inner, AdamState(count, mu, nu)
    if isinstance(opt, torch.optim.SGD):
        if group.get("weight_decay", 0) or group.get("nesterov", False) or group.get("dampening", 0):
            raise ValueError("differentiable_pt_optimizer: SGD with weight_decay, dampening or nesterov is not supported")
        momentum = float(group.get("momentum", 0.0))
        inner = sgd(float(group["lr"]), momentum)
        if momentum == 0:
            return inner, SGDState(None)
        buf = {k: opt.state[p]["momentum_buffer"].detach().clone()
               if p in opt.state and opt.state[p].get("momentum_buffer") is not None else torch.zeros_like(p)
               for k, p in params.items()}
        return inner, SGDState(buf)
    raise ValueError(f"differentiable_pt_optimizer: {type(opt).__name__} is not supported (use Adam or SGD)")


def adam_preconditioner(opt: torch.optim.Optimizer, params: Mapping[str, Tensor]) -> Params:
    """P = 1/(√v̂ + ε), Adam's per-coordinate scaling of the next step (v̂ = v/(1 − β₂ᵗ)).

    Before the first step (no state) P = 1/ε would be meaningless; P = 1 is returned then.
    """
    if not isinstance(opt, torch.optim.Adam):
        raise ValueError(f"adam_preconditioner: the PT optimiser is {type(opt).__name__}, not Adam")
    group = opt.param_groups[0]
    beta2, eps = group["betas"][1], float(group["eps"])
    out = {}
    for k, p in params.items():
        st = opt.state.get(p)
        if not st or "exp_avg_sq" not in st:
            out[k] = torch.ones_like(p).detach()
            continue
        c2 = 1 - beta2 ** int(st["step"])
        out[k] = 1.0 / ((st["exp_avg_sq"].detach() / c2).sqrt() + eps)
    return out


def draw_scale(estimator: Estimator, pt_opt: torch.optim.Optimizer,
               opt_params: Mapping[str, Tensor]) -> tuple[float, Params | None]:
    """α and P of the accumulated estimator's draws −α ∂/∂φ⟨∇θ L_PT, P ⊙ v⟩: α of its Identity
    solver (else the PT learning rate), P Adam's 1/(√v̂ + ε) if ``adam_preconditioner`` (else None)."""
    solver = estimator.solver
    alpha = solver.alpha if isinstance(solver, Identity) else float(pt_opt.param_groups[0]["lr"])
    return alpha, adam_preconditioner(pt_opt, opt_params) if estimator.adam_preconditioner else None


def pretrain_lookahead(
    pretrain_loss_at: Callable[[Params, Mapping[str, Tensor], int], Tensor],
    theta: Mapping[str, Tensor],
    phi: Mapping[str, Tensor],
    optimizer: InnerOptimizer,
    state: tuple,
    steps: int,
) -> Params:
    """θ_T after T PT optimiser steps from θ with φ fixed, nothing kept for differentiation.

    ``pretrain_loss_at(θ, φ, t)`` is L_PT on the t-th upcoming batch (t = 0..T−1).
    """
    th = {k: v.detach() for k, v in theta.items()}
    ph = {k: v.detach() for k, v in phi.items()}
    for t in range(steps):
        th = {k: v.requires_grad_(True) for k, v in th.items()}
        with torch.enable_grad():
            loss = pretrain_loss_at(th, ph, t)
            grads = torch.autograd.grad(loss, list(th.values()), allow_unused=True)
        grads = {k: torch.zeros_like(th[k]) if g is None else g for k, g in zip(th, grads)}
        with torch.no_grad():
            th, state = optimizer.update(th, grads, state)
        th = {k: v.detach() for k, v in th.items()}
    return th


def unrolled_pretraining_hypergradient(
    pretrain_loss_at: Callable[[Params, Mapping[str, Tensor], int], Tensor],
    meta_loss: Callable[[Params], Tensor],
    theta: Mapping[str, Tensor],
    phi: Mapping[str, Tensor],
    optimizer: InnerOptimizer,
    state: tuple,
    steps: int,
) -> tuple[Params, HypergradInfo]:
    """dL_V(θ_T)/dφ, reverse-mode through T differentiable PT optimiser steps (truncated horizon).

        θ_{t+1} = update(θ_t, ∇θ L_PT(θ_t, φ; batch t)),  t = 0..T−1,   hypergradient = d L_V(θ_T)/dφ

    the exact derivative of the T-step lookahead of pre-training (Shaban et al., AISTATS 2019,
    truncated back-propagation), to compare with the implicit family. θ_0 and the optimiser state
    are constants; memory grows as O(T) graphs of the PT step.

    Args:
        pretrain_loss_at: ``(θ, φ, t) -> scalar``, L_PT on the t-th upcoming batch.
        meta_loss: ``θ -> scalar``, L_V of the fine-tuned model (may close over φ: direct term).
        theta: the current θ (leaf tensors).
        phi: the meta-parameters φ (leaf tensors).
        optimizer: the differentiable PT optimiser (:func:`differentiable_pt_optimizer`).
        state: its state.
        steps: T ≥ 1.

    Returns:
        ``(hypergrad, info)``; ``info.solver.iterations`` is T and ``info.pretrain_loss`` L_PT of
        the first step.
    """
    if steps < 1:
        raise ValueError(f"unrolled_pretraining_hypergradient: steps must be >= 1, got {steps}")
    check_inputs(theta, phi)
    p_keys = list(phi)
    with differentiable(phi), torch.enable_grad():
        th: Params = {k: v.detach().requires_grad_(True) for k, v in theta.items()}
        first = None
        for t in range(steps):
            loss = pretrain_loss_at(th, phi, t)
            check_scalar(loss, "pretrain_loss")
            first = float(loss.detach()) if first is None else first
            grads = torch.autograd.grad(loss, list(th.values()), create_graph=True, allow_unused=True)
            grads = {k: torch.zeros_like(th[k]) if g is None else g for k, g in zip(th, grads)}
            th, state = optimizer.update(th, grads, state)
        lv = meta_loss(th)
        check_scalar(lv, "meta_loss")
        grads = torch.autograd.grad(lv, [phi[k] for k in p_keys], allow_unused=True)
    hyper = {k: torch.zeros_like(phi[k]) if g is None else g.detach() for k, g in zip(p_keys, grads)}
    norm = tree_norm(hyper)
    info = HypergradInfo(
        solver=SolverInfo(steps, None, 0.0, False),
        meta_loss=float(lv.detach()),
        pretrain_loss=first,
        norm=norm,
        direct_norm=0.0,
        finite=math.isfinite(norm),
    )
    return hyper, info


def estimate_hypergradient(
    estimator: Estimator,
    pretrain_loss_at: Callable[[Params, Mapping[str, Tensor], int], Tensor],
    meta_loss: Callable[[Params], Tensor],
    theta: Mapping[str, Tensor],
    phi: Mapping[str, Tensor],
    pt_opt: torch.optim.Optimizer,
    opt_params: Mapping[str, Tensor],
    graph: PretrainGraph | None = None,
    gauss_newton_at: Callable[[int], tuple[Callable[[Params], Tensor], Callable[[Tensor], Tensor]]] | None = None,
    *,
    fresh: bool = True,
) -> tuple[Params, HypergradInfo]:
    """dL_V/dφ as ``estimator`` describes it: the one entry point for every kind of estimator.

    Args:
        estimator: the :class:`Estimator`.
        pretrain_loss_at: ``(θ, φ, t) -> scalar``: L_PT on the (−t)-th PT batch just taken
            (t = −1, −2, …) or on the t-th upcoming one (t = 0, 1, …).
        meta_loss: ``θ -> scalar``, L_V.
        theta: the current θ.
        phi: the meta-parameters φ.
        pt_opt: the torch PT optimiser (its learning rate is the default α; its state gives
            Adam's preconditioner and the differentiable twin of the truncated estimator).
        opt_params: the tensors ``pt_opt`` holds state for, keyed like θ.
        graph: a kept :class:`PretrainGraph` of the PT step just taken; used only when the
            estimator takes the past batch.
        gauss_newton_at: ``t ↦ (θ ↦ outputs, outputs ↦ loss)`` on batch t (φ fixed), for
            ``estimator.gauss_newton``; the product is averaged over the estimator's batches.
        fresh: ``estimator.accumulate``: take the estimator's own mixed-term draw on the upcoming
            batch (:func:`metapt.hypergrad.accumulated_hypergradient`; its h may then hold None
            for entries of φ that nothing reached, and ``info.direction`` is v).
    """
    if estimator.accumulate:
        alpha, precond = draw_scale(estimator, pt_opt, opt_params)
        return accumulated_hypergradient(pretrain_loss_at, meta_loss, theta, phi, alpha=alpha,
                                         preconditioner=precond, fresh=fresh)
    if estimator.horizon:
        optimizer, state = differentiable_pt_optimizer(pt_opt, opt_params)
        return unrolled_pretraining_hypergradient(pretrain_loss_at, meta_loss, theta, phi, optimizer, state,
                                                  estimator.horizon)
    solver = estimator.solver if estimator.solver is not None else Neumann(steps=1, alpha=float(pt_opt.param_groups[0]["lr"]))
    ts = estimator.batch_offsets()
    pretrain_loss = (lambda th, ph: pretrain_loss_at(th, ph, ts[0])) if len(ts) == 1 else (
        lambda th, ph: sum(pretrain_loss_at(th, ph, t) for t in ts) / len(ts))
    precond = adam_preconditioner(pt_opt, opt_params) if estimator.adam_preconditioner else None
    curvature = None
    if estimator.gauss_newton:
        if gauss_newton_at is None:
            raise ValueError("Estimator(gauss_newton=True) needs a problem with pretrain_outputs and "
                             "pretrain_output_loss (metapt.hypergrad.estimators.GaussNewtonProblem)")
        products = [gauss_newton_product(*gauss_newton_at(t), theta) for t in ts]

        def curvature(v: Params) -> Params:
            out = [p(v) for p in products]
            return {k: sum(o[k] for o in out) / len(out) for k in v}

    return pretraining_hypergradient(pretrain_loss, meta_loss, theta, phi, solver, preconditioner=precond,
                                     graph=graph if estimator.uses_past_batch else None, curvature=curvature)
