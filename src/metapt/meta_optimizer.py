"""φ's optimiser behind the meta-step's policies: optax's ``apply_if_finite``, for torch.optim.

The meta-step hands its hypergradient h (a dict keyed like φ, dense or row-sparse entries) to
:class:`ApplyIfFinite`, which

1. replaces h by NaN when the estimate was unusable (a diverged solve), so that the mean across
   processes carries the verdict and every process skips alike;
2. reduces it (``reduce``: the strategy's mean over processes; the identity on one process);
3. coalesces row-sparse entries and takes ‖h‖ over all of φ in one pass (non-finite exactly
   when some entry is, or the sum of squares overflows);
4. applies it with the wrapped optimiser only if ‖h‖ is finite and the caller keeps it: row-sparse
   entries reach the optimiser as they are when it takes them (:func:`metapt.optim.accepts_sparse_grad`:
   only the touched rows move), else made dense.

Counting skipped meta-steps, their reasons and the advice stay with the trainer, which knows its
estimator; averaging φ (``schedule.average``) follows an applied step there too.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import NamedTuple

import torch
from torch import Tensor

from .optim import accepts_sparse_grad
from .problem import Params

__all__ = ["ApplyIfFinite", "PhiUpdate"]


class PhiUpdate(NamedTuple):
    """What :meth:`ApplyIfFinite.step` did.

    Attributes:
        applied: the optimiser stepped.
        norm: ‖h‖ of the reduced hypergradient (NaN or inf when it is not finite).
    """

    applied: bool
    norm: float


class ApplyIfFinite:
    """Step ``optimizer`` with a hypergradient only when it is usable and finite after reduction.

    Args:
        optimizer: φ's optimiser (``torch.optim.Optimizer``), built on ``params``' tensors.
        params: φ, keyed as the hypergradients are; their ``.grad`` is set before each step.
        reduce: the hypergradient averaged across processes (default: as it is). It receives
            row-sparse entries as they are; one that runs collectives densifies them first.

    Example::

        update = ApplyIfFinite(torch.optim.Adam(list(phi.values()), lr=0.05), phi)
        applied, norm = update.step(hypergrad, usable=info.usable)
    """

    def __init__(self, optimizer: torch.optim.Optimizer, params: Mapping[str, Tensor],
                 reduce: Callable[[Params], Params] | None = None):
        self.optimizer = optimizer
        self.params = params
        self.reduce = reduce if reduce is not None else (lambda hypergrad: hypergrad)

    def step(self, hypergrad: Mapping[str, Tensor], *, usable: bool = True, keep: bool = True) -> PhiUpdate:
        """Reduce ``hypergrad`` and step the optimiser if it is usable, finite and kept.

        Args:
            hypergrad: dL_V/dφ of this process, keyed like ``params``.
            usable: False: the estimate is known bad (every process must skip): it is sent
                through the reduction as NaN.
            keep: False: this process's own veto (a diverged fine-tuning head), applied after
                the reduction.
        """
        if not usable:  # NaN survives the cross-process mean: every process skips alike
            hypergrad = {k: torch.full(v.shape, math.nan, dtype=v.dtype, device=v.device) for k, v in hypergrad.items()}
        hyper = self.reduce(dict(hypergrad))
        # a row-sparse hypergradient (example weights read by gather_rows) stays sparse: O(batch), not O(|φ|)
        hyper = {k: v.coalesce() if v.is_sparse else v for k, v in hyper.items()}
        # one pass over φ: the norm is non-finite exactly when some entry is (or it overflows)
        norm = math.sqrt(sum(float(torch.dot(e, e)) for e in (
            (v.values() if v.is_sparse else v).reshape(-1) for v in hyper.values())))
        if not (usable and keep and math.isfinite(norm)):
            return PhiUpdate(False, norm)
        self.optimizer.zero_grad(set_to_none=True)
        sparse_ok = accepts_sparse_grad(self.optimizer)  # LazyAdam, LazySGD: only the touched rows move
        for k, v in self.params.items():
            g = hyper[k].to(v.dtype)
            v.grad = g.to_dense() if g.is_sparse and not sparse_ok else g
        self.optimizer.step()
        return PhiUpdate(True, norm)
