"""Matrix-free solvers for H x = b, H the pre-training Hessian ∂²L_PT/∂θ².

One contract for every solver: ``solver(hvp, b) -> (x, SolverInfo)`` where
``hvp(v)`` returns H v for a dict v shaped like b, and x has b's keys. Options
live in small frozen dataclasses with the paper's defaults.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from torch import Tensor

from ._tree import Params, tree_add, tree_dot, tree_norm, tree_scale

HVP = Callable[[Params], Params]


@dataclass(frozen=True)
class SolverInfo:
    """Diagnostics of one inverse-HVP solve.

    Attributes:
        iterations: Hessian-vector products spent on the solve.
        residual_norm: ‖b − H x‖ of the returned x (CG), of the series truncated
            one term earlier (Neumann, free), or None where not measured (Identity).
        rhs_norm: ‖b‖, to read the residual relative to the right-hand side.
        diverged: the iteration blew up or met non-finite numbers; x is unusable.
    """

    iterations: int
    residual_norm: float | None
    rhs_norm: float
    diverged: bool


@dataclass(frozen=True)
class Identity:
    """H⁻¹ ≈ α I: the one-step ("T1–T2") approximation, x = α b. No HVP."""

    alpha: float = 1.0

    def __post_init__(self):
        if not self.alpha > 0:
            raise ValueError(f"Identity: alpha must be > 0, got {self.alpha}")

    def __call__(self, hvp: HVP, b: Params) -> tuple[Params, SolverInfo]:
        norm = tree_norm(b)
        return tree_scale(b, self.alpha), SolverInfo(0, None, norm, not math.isfinite(norm))


@dataclass(frozen=True)
class Neumann:
    """Truncated Neumann series H⁻¹ b ≈ α Σ_{j=0..M} (I − αH)^j b (Lorraine et al., 2020).

    Converges for 0 < α < 2/λ_max(H) when H is positive definite; M = 0 is
    :class:`Identity`. Uses M HVPs. The series is declared diverged when a term
    grows past ``divergence_factor``·‖b‖ or turns non-finite: lower α, or use CG.

    Attributes:
        steps: M, the number of terms after the first (the paper uses 1).
        alpha: α, the step size of the underlying fixed point (paper: the PT lr).
        divergence_factor: ‖(I − αH)^j b‖ / ‖b‖ above which the series diverged.
    """

    steps: int = 1
    alpha: float = 1.0
    divergence_factor: float = 10.0

    def __post_init__(self):
        if self.steps < 0:
            raise ValueError(f"Neumann: steps must be >= 0, got {self.steps}")
        if not self.alpha > 0:
            raise ValueError(f"Neumann: alpha must be > 0, got {self.alpha}")
        if not self.divergence_factor > 1:
            raise ValueError(f"Neumann: divergence_factor must be > 1, got {self.divergence_factor}")

    def __call__(self, hvp: HVP, b: Params) -> tuple[Params, SolverInfo]:
        b_norm = tree_norm(b)
        term, total, term_norm = b, b, b_norm
        for j in range(1, self.steps + 1):
            term = tree_add(term, hvp(term), -self.alpha)  # v_j = (I − αH) v_{j−1}
            total = tree_add(total, term)  # p_j = Σ_{i≤j} v_i
            term_norm = tree_norm(term)
            if not math.isfinite(term_norm) or term_norm > self.divergence_factor * b_norm:
                return tree_scale(total, self.alpha), SolverInfo(j, term_norm, b_norm, True)
        # g − H·(α p_{M−1}) = (I − αH)^M g = v_M: the residual of the previous partial sum.
        residual = term_norm if self.steps > 0 else None
        return tree_scale(total, self.alpha), SolverInfo(self.steps, residual, b_norm, not math.isfinite(b_norm))


@dataclass(frozen=True)
class ConjugateGradient:
    """Conjugate gradient on (H + λI) x = b (Hestenes & Stiefel, 1952).

    Exact in at most dim(θ) steps for positive-definite H; stops when
    ‖r‖ ≤ tol·‖b‖. Meeting non-positive curvature pᵀ(H + λI)p ≤ 0 means H + λI
    is not positive definite there: the solve is reported as diverged (raise
    ``damping``).

    Attributes:
        max_iter: the most HVPs to spend.
        tol: relative residual tolerance.
        damping: λ ≥ 0, Tikhonov damping added to H.
    """

    max_iter: int = 20
    tol: float = 1e-10
    damping: float = 0.0

    def __post_init__(self):
        if self.max_iter < 1:
            raise ValueError(f"ConjugateGradient: max_iter must be >= 1, got {self.max_iter}")
        if self.tol < 0:
            raise ValueError(f"ConjugateGradient: tol must be >= 0, got {self.tol}")
        if self.damping < 0:
            raise ValueError(f"ConjugateGradient: damping must be >= 0, got {self.damping}")

    def _matvec(self, hvp: HVP, v: Params) -> Params:
        hv = hvp(v)
        return tree_add(hv, v, self.damping) if self.damping else hv

    def __call__(self, hvp: HVP, b: Params) -> tuple[Params, SolverInfo]:
        b_norm = tree_norm(b)
        x = tree_scale(b, 0.0)
        r, p = b, b  # r = b − A x with x = 0
        rr = tree_dot(r, r)
        if not math.isfinite(b_norm) or b_norm == 0.0:
            return x, SolverInfo(0, b_norm, b_norm, not math.isfinite(b_norm))
        for it in range(1, self.max_iter + 1):
            ap = self._matvec(hvp, p)
            curvature = tree_dot(p, ap)
            if not float(curvature) > 0:  # also catches NaN
                return x, SolverInfo(it, float(rr.sqrt()), b_norm, True)
            step = rr / curvature
            x = tree_add(x, p, step)
            r = tree_add(r, ap, -step)
            rr_new = tree_dot(r, r)
            r_norm = float(rr_new.sqrt())
            if not math.isfinite(r_norm):
                return x, SolverInfo(it, r_norm, b_norm, True)
            if r_norm <= self.tol * b_norm:
                return x, SolverInfo(it, r_norm, b_norm, False)
            p = tree_add(r, p, rr_new / rr)  # p = r + β p
            rr = rr_new
        return x, SolverInfo(self.max_iter, r_norm, b_norm, False)


Solver = Callable[[HVP, Mapping[str, Tensor]], tuple[Params, SolverInfo]]
