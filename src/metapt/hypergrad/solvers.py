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
from .curvature import lanczos

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
        negative_curvature: CG met a direction p with pᵀ(H + λI)p ≤ 0 and stopped there,
            returning its last iterate before that direction (truncated Newton-CG); x is usable.
        lambda_max: the largest Ritz value of H (+ damping) when the solver measured the
            spectrum to pick α or the damping (``spectrum_steps`` > 0); None otherwise.
        lambda_min: the smallest such Ritz value, or None.
        damping: the λ actually added to H (given plus chosen from the spectrum).
    """

    iterations: int
    residual_norm: float | None
    rhs_norm: float
    diverged: bool
    negative_curvature: bool = False
    lambda_max: float | None = None
    lambda_min: float | None = None
    damping: float = 0.0

    @property
    def relative_residual(self) -> float | None:
        """‖b − A x‖ / ‖b‖ (A = H + λI), the solve's accuracy; None where not measured."""
        if self.residual_norm is None:
            return None
        return self.residual_norm / self.rhs_norm if self.rhs_norm > 0 else 0.0


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

    With ``damping`` λ > 0 the series inverts H + λI (λ ≥ −λmin(H) makes an indefinite H
    safe). With ``spectrum_steps`` k > 0, α is not given but chosen as 1/λmax(H + λI) from k
    Lanczos steps started at b (k more HVPs), so the series converges on the positive part of the
    spectrum whatever the learning rate.

    Attributes:
        steps: M, the number of terms after the first (the paper uses 1).
        alpha: α, the step size of the underlying fixed point (paper: the PT lr); ignored
            (the spectrum picks it) when ``spectrum_steps`` > 0.
        divergence_factor: ‖(I − αH)^j b‖ / ‖b‖ above which the series diverged.
        damping: λ ≥ 0 added to H.
        spectrum_steps: Lanczos steps that estimate λmax to set α = 1/λmax (0: use ``alpha``).
    """

    steps: int = 1
    alpha: float = 1.0
    divergence_factor: float = 10.0
    damping: float = 0.0
    spectrum_steps: int = 0

    def __post_init__(self):
        if self.steps < 0:
            raise ValueError(f"Neumann: steps must be >= 0, got {self.steps}")
        if not self.alpha > 0:
            raise ValueError(f"Neumann: alpha must be > 0, got {self.alpha}")
        if not self.divergence_factor > 1:
            raise ValueError(f"Neumann: divergence_factor must be > 1, got {self.divergence_factor}")
        if self.damping < 0:
            raise ValueError(f"Neumann: damping must be >= 0, got {self.damping}")
        if self.spectrum_steps < 0:
            raise ValueError(f"Neumann: spectrum_steps must be >= 0, got {self.spectrum_steps}")

    def __call__(self, hvp: HVP, b: Params) -> tuple[Params, SolverInfo]:
        b_norm = tree_norm(b)
        matvec = _damped(hvp, self.damping)
        alpha, lmax, lmin, spent = self.alpha, None, None, 0
        if self.spectrum_steps and math.isfinite(b_norm) and b_norm > 0:
            spec = lanczos(matvec, b, self.spectrum_steps, start=b)
            lmax, lmin, spent = spec.lambda_max, spec.lambda_min, spec.iterations
            if not (math.isfinite(lmax) and lmax > 0):
                return tree_scale(b, 0.0), SolverInfo(spent, None, b_norm, True, False, lmax, lmin, self.damping)
            alpha = 1.0 / lmax
        extra = {"lambda_max": lmax, "lambda_min": lmin, "damping": self.damping}
        term, total, term_norm = b, b, b_norm
        for j in range(1, self.steps + 1):
            term = tree_add(term, matvec(term), -alpha)  # v_j = (I − α(H + λI)) v_{j−1}
            total = tree_add(total, term)  # p_j = Σ_{i≤j} v_i
            term_norm = tree_norm(term)
            if not math.isfinite(term_norm) or term_norm > self.divergence_factor * b_norm:
                return tree_scale(total, alpha), SolverInfo(j + spent, term_norm, b_norm, True, **extra)
        # g − H·(α p_{M−1}) = (I − αH)^M g = v_M: the residual of the previous partial sum.
        residual = term_norm if self.steps > 0 else None
        info = SolverInfo(self.steps + spent, residual, b_norm, not math.isfinite(b_norm), **extra)
        return tree_scale(total, alpha), info


@dataclass(frozen=True)
class ConjugateGradient:
    """Conjugate gradient on (H + λI) x = b (Hestenes & Stiefel, 1952).

    Exact in at most dim(θ) steps for positive-definite H; stops when
    ‖r‖ ≤ tol·‖b‖. Meeting non-positive curvature pᵀ(H + λI)p ≤ 0 means H + λI
    is not positive definite along p: as truncated Newton-CG does (Nocedal & Wright,
    Numerical Optimization, Alg. 7.1) the solve stops and returns its last iterate before
    that direction, flagged ``negative_curvature`` (usable, not diverged). When that happens
    on the very first direction (x is still 0) it returns the Cauchy-like step
    (‖b‖² / |bᵀ(H + λI)b|)·b. With ``spectrum_steps`` k > 0, k Lanczos steps measure λmin
    and the damping becomes ``damping`` + 2·max(0, −λmin), so H + λI is positive definite
    along the Ritz directions.

    Attributes:
        max_iter: the most HVPs to spend.
        tol: relative residual tolerance.
        damping: λ ≥ 0, Tikhonov damping added to H.
        spectrum_steps: Lanczos steps that choose extra damping from λmin (0: none).
    """

    max_iter: int = 20
    tol: float = 1e-10
    damping: float = 0.0
    spectrum_steps: int = 0

    def __post_init__(self):
        if self.max_iter < 1:
            raise ValueError(f"ConjugateGradient: max_iter must be >= 1, got {self.max_iter}")
        if self.tol < 0:
            raise ValueError(f"ConjugateGradient: tol must be >= 0, got {self.tol}")
        if self.damping < 0:
            raise ValueError(f"ConjugateGradient: damping must be >= 0, got {self.damping}")
        if self.spectrum_steps < 0:
            raise ValueError(f"ConjugateGradient: spectrum_steps must be >= 0, got {self.spectrum_steps}")

    def __call__(self, hvp: HVP, b: Params) -> tuple[Params, SolverInfo]:
        b_norm = tree_norm(b)
        x = tree_scale(b, 0.0)
        r, p = b, b  # r = b − A x with x = 0
        rr = tree_dot(r, r)
        if not math.isfinite(b_norm) or b_norm == 0.0:
            return x, SolverInfo(0, b_norm, b_norm, not math.isfinite(b_norm), damping=self.damping)
        damping, lmax, lmin, spent = self.damping, None, None, 0
        if self.spectrum_steps:
            spec = lanczos(hvp, b, self.spectrum_steps, start=b)
            lmax, lmin, spent = spec.lambda_max, spec.lambda_min, spec.iterations
            if not (math.isfinite(lmax) and math.isfinite(lmin)):
                return x, SolverInfo(spent, None, b_norm, True, False, lmax, lmin, damping)
            damping += 2.0 * max(0.0, -lmin)
        matvec = _damped(hvp, damping)
        extra = {"lambda_max": lmax, "lambda_min": lmin, "damping": damping}
        r_norm = b_norm
        for it in range(1, self.max_iter + 1):
            ap = matvec(p)
            curvature = tree_dot(p, ap)
            if not math.isfinite(float(curvature)):
                return x, SolverInfo(it + spent, float(rr.sqrt()), b_norm, True, **extra)
            if not float(curvature) > 0:  # negative curvature: stop at the last good iterate
                if it == 1:  # x = 0: take the step along b with the curvature's magnitude
                    x = tree_scale(b, float(rr) / max(abs(float(curvature)), 1e-30 * float(rr)))
                    r_norm = tree_norm(tree_add(b, matvec(x), -1.0))  # one more product, for the residual
                    return x, SolverInfo(it + 1 + spent, r_norm, b_norm, False, True, **extra)
                return x, SolverInfo(it + spent, r_norm, b_norm, False, True, **extra)
            step = rr / curvature
            x = tree_add(x, p, step)
            r = tree_add(r, ap, -step)
            rr_new = tree_dot(r, r)
            r_norm = float(rr_new.sqrt())
            if not math.isfinite(r_norm):
                return x, SolverInfo(it + spent, r_norm, b_norm, True, **extra)
            if r_norm <= self.tol * b_norm:
                return x, SolverInfo(it + spent, r_norm, b_norm, False, **extra)
            p = tree_add(r, p, rr_new / rr)  # p = r + β p
            rr = rr_new
        return x, SolverInfo(self.max_iter + spent, r_norm, b_norm, False, **extra)


def _damped(hvp: HVP, damping: float) -> HVP:
    """v ↦ (H + λI) v."""
    if not damping:
        return hvp
    return lambda v: tree_add(hvp(v), v, damping)


Solver = Callable[[HVP, Mapping[str, Tensor]], tuple[Params, SolverInfo]]
