"""The pre-training hypergradient: implicit differentiation through pre-training.

    dL_V/dφ = ∂L_V/∂φ − (∂²L_PT/∂φ∂θ)ᵀ · H⁻¹ · g,   H = ∂²L_PT/∂θ²,  g = dL_V/dθ

(Raghu et al., "Meta-learning to Improve Pre-training", NeurIPS 2021, eq. 3;
Lorraine et al., AISTATS 2020). g comes from backpropagation through whatever
``meta_loss`` does with θ (typically K unrolled fine-tuning steps); H⁻¹g from a
matrix-free solver; the mixed term from one vector-Jacobian product. H and
dθ*/dφ are never formed, so memory does not grow with the size of φ. The graph of
∇θ L_PT that H and the mixed term need can come from a pre-training step's own
forward/backward (:func:`pretrain_graph`), so a meta-step need not run one.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from ._tree import Params, tree_norm
from .solvers import Solver, SolverInfo


@dataclass(frozen=True)
class HypergradInfo:
    """Diagnostics of one hypergradient.

    Attributes:
        solver: the inverse-HVP solver's diagnostics.
        meta_loss: L_V at θ (before any φ update).
        pretrain_loss: L_PT(θ, φ) on the batch used for H and the mixed term.
        norm: ‖dL_V/dφ‖ over all entries of φ.
        direct_norm: ‖∂L_V/∂φ‖, the part that does not go through θ.
        finite: every entry of the hypergradient is finite. When False the
            numbers must not be used (the trainer skips the update).
        direction: v = ∇θ L_V, for the accumulated estimator's PT-step draws until the next
            meta-step (:func:`metapt.hypergrad.accumulated_hypergradient`); None for the others.
    """

    solver: SolverInfo
    meta_loss: float
    pretrain_loss: float
    norm: float
    direct_norm: float
    finite: bool
    direction: Params | None = None

    @property
    def usable(self) -> bool:
        """The hypergradient is finite and the solver did not diverge."""
        return self.finite and not self.solver.diverged


@contextlib.contextmanager
def differentiable(phi: Mapping[str, Tensor]) -> Iterator[None]:
    """Make φ's own tensors require grad for the duration, so closures over φ see it."""
    flipped = [v for v in phi.values() if not v.requires_grad]
    for v in flipped:
        v.requires_grad_(True)
    try:
        yield
    finally:
        for v in flipped:
            v.requires_grad_(False)


def check_inputs(theta: Mapping[str, Tensor], phi: Mapping[str, Tensor]) -> None:
    if not theta:
        raise ValueError("pretraining_hypergradient: theta is empty; pass the pre-trained parameters as a dict")
    if not phi:
        raise ValueError("pretraining_hypergradient: phi is empty; pass the meta-parameters as a dict")
    for name, group in (("theta", theta), ("phi", phi)):
        for k, v in group.items():
            if not isinstance(v, Tensor) or not v.is_floating_point():
                raise TypeError(f"pretraining_hypergradient: {name}[{k!r}] must be a floating-point tensor")
        for k, v in group.items():
            if name == "phi" and v.grad_fn is not None:
                raise ValueError(
                    f"pretraining_hypergradient: phi[{k!r}] is the result of a computation; pass the leaf tensor "
                    "(for example the logits, not 2·sigmoid(logits)) and apply the transform inside the losses"
                )


@dataclass(frozen=True)
class PretrainGraph:
    """L_PT and ∇θ L_PT at one (θ, φ), with the gradient's graph kept for second derivatives.

    Made by :func:`pretrain_graph`. A pre-training step can take its update from ``grad`` and
    hand the same object to :func:`pretraining_hypergradient`, which then takes the
    Hessian-vector products and the mixed product from this graph instead of running a PT
    forward and backward of its own.

    Attributes:
        theta: the θ leaves the graph was built at: fresh copies, so an optimiser may update the
            tensors they were copied from in place without invalidating the graph.
        phi: the φ tensors the graph reaches (the caller's own).
        loss: L_PT(θ, φ), attached to the graph.
        grad: ∇θ L_PT(θ, φ), keys of θ, built with ``create_graph=True``; None where L_PT does
            not use an entry of θ (as ``.grad`` after a plain backward).
    """

    theta: Params
    phi: Mapping[str, Tensor]
    loss: Tensor
    grad: dict[str, Tensor | None]


def pretrain_graph(
    pretrain_loss: Callable[[Params, Mapping[str, Tensor]], Tensor],
    theta: Mapping[str, Tensor],
    phi: Mapping[str, Tensor],
) -> PretrainGraph:
    """One PT forward and backward at (θ, φ) that keeps the graph of ∇θ L_PT.

    Costs what a pre-training step's forward and backward cost (plus recording the backward);
    ``grad`` detached is that step's gradient, and the :class:`PretrainGraph` lets
    :func:`pretraining_hypergradient` skip its own PT forward/backward (``graph=``).
    """
    check_inputs(theta, phi)
    theta_v = {k: v.detach().clone().requires_grad_(True) for k, v in theta.items()}
    with differentiable(phi), torch.enable_grad():
        loss = pretrain_loss(theta_v, phi)
        check_scalar(loss, "pretrain_loss")
        grads = torch.autograd.grad(loss, list(theta_v.values()), create_graph=True, allow_unused=True)
    return PretrainGraph(theta_v, dict(phi), loss, dict(zip(theta_v, grads)))


def pretraining_hypergradient(
    pretrain_loss: Callable[[Params, Mapping[str, Tensor]], Tensor],
    meta_loss: Callable[[Params], Tensor],
    theta: Mapping[str, Tensor],
    phi: Mapping[str, Tensor],
    solver: Solver,
    *,
    forward_over_reverse: bool = False,
    graph: PretrainGraph | None = None,
    preconditioner: Mapping[str, Tensor] | None = None,
    curvature: Callable[[Params], Params] | None = None,
) -> tuple[Params, HypergradInfo]:
    """Gradient of the post-fine-tuning validation loss with respect to φ.

    Args:
        pretrain_loss: ``pretrain_loss(theta, phi) -> scalar``, L_PT on a batch
            captured by the closure. It must use the dicts it is given.
        meta_loss: ``meta_loss(theta) -> scalar``, L_V, differentiable in θ
            (e.g. the MetaFT-validation loss after ``unrolled_finetune``). It may
            close over the tensors of ``phi``; that adds the direct term ∂L_V/∂φ.
        theta: the pre-trained parameters θ (the current PT iterate).
        phi: the meta-parameters φ, leaf tensors of any shapes.
        solver: an inverse-HVP solver (``Neumann``, ``ConjugateGradient``,
            ``Identity``) called as ``solver(hvp, g)``.
        forward_over_reverse: compute H v as a JVP of the gradient
            (torch.func.jvp over torch.func.grad) instead of by double backward.
            It recomputes the PT forward for each HVP but keeps no graph between
            them; ``pretrain_loss`` must then be torch.func-compatible.
        graph: the gradient ∇θ L_PT with its graph, from :func:`pretrain_graph` with the same
            ``phi`` (typically the PT step's own, so the meta-step runs no PT forward/backward).
            H and the mixed term are then taken at ``graph.theta`` and ``pretrain_loss`` is not
            called (except by ``forward_over_reverse``); dL_V/dθ is still taken at ``theta``.
            With ``graph.theta`` equal to ``theta`` this is the same hypergradient; a graph from
            the PT step that produced ``theta`` evaluates the second derivatives one optimiser
            step earlier.
        preconditioner: P, a positive diagonal with θ's keys and shapes: the geometry of the
            PT optimiser θ ← θ − α P ∇θ L_PT (Adam: P = 1/(√v̂ + ε), see
            :func:`metapt.hypergrad.estimators.adam_preconditioner`). The solve then runs on
            the symmetric system S H S y = S g with S = P^½, x = S y: Identity(α) gives
            x = α P g, the exact one-step derivative of that update; Neumann gives
            α P Σ_j (I − α H P)^j g, M + 1 steps of it; an exact solve is still H⁻¹ g.
        curvature: ``v ↦ A v`` to use instead of H (e.g. a Gauss–Newton product from
            :func:`metapt.hypergrad.curvature.gauss_newton_product`); the mixed term still comes
            from ∇θ L_PT.

    Returns:
        ``(hypergrad, info)``: a dict with φ's keys and shapes holding dL_V/dφ
        (detached), and :class:`HypergradInfo`.

    Raises:
        ValueError: an entry of φ does not influence the pre-training loss, or
            ``meta_loss`` does not depend on its θ argument.
    """
    check_inputs(theta, phi)
    if graph is not None:
        _check_graph(graph, theta, phi)
    if preconditioner is not None and set(preconditioner) != set(theta):
        raise ValueError("pretraining_hypergradient: preconditioner must have theta's keys, "
                         f"missing {sorted(set(theta) - set(preconditioner))[:3]}")
    t_keys, p_keys = list(theta), list(phi)
    theta_v = {k: v.detach().requires_grad_(True) for k, v in theta.items()}
    t_list = [theta_v[k] for k in t_keys]
    p_list = [phi[k] for k in p_keys]

    with differentiable(phi), torch.enable_grad():
        # g = dL_V/dθ and the direct term ∂L_V/∂φ, in one backward.
        lv = meta_loss(theta_v)
        check_scalar(lv, "meta_loss")
        grads = torch.autograd.grad(lv, t_list + p_list, allow_unused=True)
        if all(gr is None for gr in grads[: len(t_keys)]):
            raise ValueError(
                "pretraining_hypergradient: meta_loss does not depend on the theta it is given; "
                "build the fine-tuned model from that argument, not from tensors captured elsewhere"
            )
        g = {k: torch.zeros_like(theta_v[k]) if gr is None else gr for k, gr in zip(t_keys, grads)}
        direct = dict(zip(p_keys, grads[len(t_keys):]))  # None where L_V does not close over φ

        # ∇θ L_PT(θ, φ) with its graph, for the HVPs and the mixed product: built here, or given.
        if graph is None:
            h_point = theta_v
            lpt = pretrain_loss(theta_v, phi)
            check_scalar(lpt, "pretrain_loss")
            grad_pt = torch.autograd.grad(lpt, t_list, create_graph=True, allow_unused=True)
        else:
            h_point, lpt = graph.theta, graph.loss
            grad_pt = [graph.grad[k] for k in t_keys]
        live = [i for i, gr in enumerate(grad_pt) if gr is not None and gr.requires_grad]
        live_out = [grad_pt[i] for i in live]
        live_in = [h_point[t_keys[i]] for i in live]

        if forward_over_reverse:
            hvp = _forward_over_reverse_hvp(pretrain_loss, h_point, phi)
        else:

            def hvp(v: Params) -> Params:
                out = {k: torch.zeros_like(theta_v[k]) for k in t_keys}
                if live:
                    hv = torch.autograd.grad(
                        live_out, live_in, grad_outputs=[v[t_keys[i]] for i in live],
                        retain_graph=True, allow_unused=True,
                    )
                    for i, h in zip(live, hv):
                        if h is not None:
                            out[t_keys[i]] = h
                return out

        if curvature is not None:
            hvp = curvature
        if preconditioner is None:
            x, solver_info = solver(hvp, g)
        else:
            root = {k: preconditioner[k].detach().sqrt() for k in t_keys}  # S = P^½

            def scaled_hvp(v: Params, inner=hvp) -> Params:  # v ↦ S H S v
                hv = inner({k: root[k] * v[k] for k in t_keys})
                return {k: root[k] * hv[k] for k in t_keys}

            y, solver_info = solver(scaled_hvp, {k: root[k] * g[k] for k in t_keys})
            x = {k: root[k] * y[k] for k in t_keys}

        # (∂²L_PT/∂φ∂θ)ᵀ x = ∂/∂φ ⟨∇θ L_PT, x⟩
        if live:
            mixed = torch.autograd.grad(
                live_out, p_list, grad_outputs=[x[t_keys[i]].detach() for i in live],
                retain_graph=True, allow_unused=True,
            )
        else:
            mixed = [None] * len(p_keys)
        hyper: Params = {}
        for k, m in zip(p_keys, mixed):
            if m is None:
                reaches = torch.autograd.grad(lpt, phi[k], retain_graph=True, allow_unused=True)[0]
                if reaches is None:
                    raise ValueError(
                        f"pretraining_hypergradient: meta-parameter phi[{k!r}] does not influence the pre-training "
                        "loss; pass pretrain_loss the phi dict it is given and use that entry, or drop it from phi"
                    )
                m = torch.zeros_like(phi[k])  # φ shifts L_PT but not ∇θ L_PT: no implicit term
            # dL_V/dφ = ∂L_V/∂φ − mixed; in place on the fresh gradient buffer, no |φ|-sized copy
            hyper[k] = m.neg_() if direct[k] is None else m.neg_().add_(direct[k])

    norm = tree_norm(hyper)
    info = HypergradInfo(
        solver=solver_info,
        meta_loss=float(lv.detach()),
        pretrain_loss=float(lpt.detach()),
        norm=norm,
        direct_norm=tree_norm({k: v for k, v in direct.items() if v is not None}),
        finite=math.isfinite(norm),
    )
    return hyper, info


def _check_graph(graph: PretrainGraph, theta: Mapping[str, Tensor], phi: Mapping[str, Tensor]) -> None:
    if not isinstance(graph, PretrainGraph):
        raise TypeError(
            f"pretraining_hypergradient: graph must be a PretrainGraph from pretrain_graph(), got {type(graph).__name__}"
        )
    if set(graph.theta) != set(theta):
        raise ValueError("pretraining_hypergradient: graph was built for other theta keys than the theta given")
    for k, v in theta.items():
        if graph.theta[k].shape != v.shape:
            raise ValueError(
                f"pretraining_hypergradient: graph.theta[{k!r}] has shape {tuple(graph.theta[k].shape)}, "
                f"theta[{k!r}] {tuple(v.shape)}"
            )
    if set(graph.phi) != set(phi) or any(graph.phi[k] is not v for k, v in phi.items()):
        raise ValueError(
            "pretraining_hypergradient: graph was built with other phi tensors; pass pretrain_graph the same phi dict"
        )


def check_scalar(value: Tensor, name: str) -> None:
    if not isinstance(value, Tensor) or value.dim() != 0:
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(f"pretraining_hypergradient: {name} must return a scalar tensor, got {shape}")


def _forward_over_reverse_hvp(pretrain_loss, theta_v: Params, phi: Mapping[str, Tensor]):
    primal = {k: v.detach() for k, v in theta_v.items()}
    phi_const = {k: v.detach() for k, v in phi.items()}

    def grad_theta(th: Params) -> Params:
        return torch.func.grad(lambda t: pretrain_loss(t, phi_const))(th)

    def hvp(v: Params) -> Params:
        _, tangent = torch.func.jvp(grad_theta, (primal,), ({k: v[k].detach() for k in primal},))
        return {k: t.detach() for k, t in tangent.items()}

    return hvp
