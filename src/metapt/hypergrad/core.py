"""The pre-training hypergradient: implicit differentiation through pre-training.

    dL_V/dφ = ∂L_V/∂φ − (∂²L_PT/∂φ∂θ)ᵀ · H⁻¹ · g,   H = ∂²L_PT/∂θ²,  g = dL_V/dθ

(Raghu et al., "Meta-learning to Improve Pre-training", NeurIPS 2021, eq. 3;
Lorraine et al., AISTATS 2020). g comes from backpropagation through whatever
``meta_loss`` does with θ (typically K unrolled fine-tuning steps); H⁻¹g from a
matrix-free solver; the mixed term from one vector-Jacobian product. H and
dθ*/dφ are never formed, so memory does not grow with the size of φ.
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
    """

    solver: SolverInfo
    meta_loss: float
    pretrain_loss: float
    norm: float
    direct_norm: float
    finite: bool

    @property
    def usable(self) -> bool:
        """The hypergradient is finite and the solver did not diverge."""
        return self.finite and not self.solver.diverged


@contextlib.contextmanager
def _differentiable(phi: Mapping[str, Tensor]) -> Iterator[None]:
    """Make φ's own tensors require grad for the duration, so closures over φ see it."""
    flipped = [v for v in phi.values() if not v.requires_grad]
    for v in flipped:
        v.requires_grad_(True)
    try:
        yield
    finally:
        for v in flipped:
            v.requires_grad_(False)


def _check_inputs(theta: Mapping[str, Tensor], phi: Mapping[str, Tensor]) -> None:
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


def pretraining_hypergradient(
    pretrain_loss: Callable[[Params, Mapping[str, Tensor]], Tensor],
    meta_loss: Callable[[Params], Tensor],
    theta: Mapping[str, Tensor],
    phi: Mapping[str, Tensor],
    solver: Solver,
    *,
    forward_over_reverse: bool = False,
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

    Returns:
        ``(hypergrad, info)``: a dict with φ's keys and shapes holding dL_V/dφ
        (detached), and :class:`HypergradInfo`.

    Raises:
        ValueError: an entry of φ does not influence the pre-training loss, or
            ``meta_loss`` does not depend on its θ argument.
    """
    _check_inputs(theta, phi)
    t_keys, p_keys = list(theta), list(phi)
    theta_v = {k: v.detach().requires_grad_(True) for k, v in theta.items()}
    t_list = [theta_v[k] for k in t_keys]
    p_list = [phi[k] for k in p_keys]

    with _differentiable(phi), torch.enable_grad():
        # g = dL_V/dθ and the direct term ∂L_V/∂φ, in one backward.
        lv = meta_loss(theta_v)
        _check_scalar(lv, "meta_loss")
        grads = torch.autograd.grad(lv, t_list + p_list, allow_unused=True)
        if all(gr is None for gr in grads[: len(t_keys)]):
            raise ValueError(
                "pretraining_hypergradient: meta_loss does not depend on the theta it is given; "
                "build the fine-tuned model from that argument, not from tensors captured elsewhere"
            )
        g = {k: torch.zeros_like(theta_v[k]) if gr is None else gr for k, gr in zip(t_keys, grads)}
        direct = dict(zip(p_keys, grads[len(t_keys):]))  # None where L_V does not close over φ

        # ∇θ L_PT(θ, φ) with its graph, for the HVPs and the mixed product.
        lpt = pretrain_loss(theta_v, phi)
        _check_scalar(lpt, "pretrain_loss")
        grad_pt = torch.autograd.grad(lpt, t_list, create_graph=True, allow_unused=True)
        live = [i for i, gr in enumerate(grad_pt) if gr is not None and gr.requires_grad]
        live_out = [grad_pt[i] for i in live]
        live_in = [t_list[i] for i in live]

        if forward_over_reverse:
            hvp = _forward_over_reverse_hvp(pretrain_loss, theta_v, phi)
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

        x, solver_info = solver(hvp, g)

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


def _check_scalar(value: Tensor, name: str) -> None:
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
