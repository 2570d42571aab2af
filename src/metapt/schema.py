"""Building blocks of the run configuration: validated, frozen, JSON-able sections.

Every configuration class in metapt is a pydantic dataclass made with
:func:`schema`: it validates types and ranges when constructed (from Python or
from YAML), rejects unknown keys, and stays a plain frozen dataclass otherwise
(``dataclasses.replace`` and ``asdict`` work). Sections shared by the domains
live here; each domain adds its own next to its job.
"""

from __future__ import annotations

import enum
import functools
import math
from collections.abc import Mapping
from pathlib import PurePath
from typing import Any, Literal

import numpy as np
from pydantic import ConfigDict, Field, field_validator
from pydantic.dataclasses import dataclass as _pydantic_dataclass

from .hypergrad import ConjugateGradient, Identity, Neumann, Solver
from .trainer import MetaSchedule

#: Decorator for configuration classes: frozen, validated, unknown keys are errors.
schema = functools.partial(_pydantic_dataclass, frozen=True, config=ConfigDict(extra="forbid"))


def jsonable(value: Any) -> Any:
    """Configs and results made of JSON/YAML types: tuples → lists, enums → values, numpy
    scalars → Python numbers, paths → strings, non-finite floats → None (valid JSON)."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (np.integer, np.floating)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, PurePath):
        return str(value)
    return value


@schema
class CheckpointConfig:
    """How often the whole meta-state is written, and how many files are kept.

    Attributes:
        every: PT steps between checkpoints (and one at the end of every phase).
        keep: the newest checkpoints kept; older ones are deleted after a new one is safely on disk.
    """

    every: int = Field(default=200, ge=1)
    keep: int = Field(default=3, ge=1)


@schema
class SolverConfig:
    """The inverse-Hessian-vector-product solver of the implicit hypergradient.

    Attributes:
        kind: ``neumann`` (the paper), ``cg`` (conjugate gradient) or ``identity`` (H ≈ I/α).
        steps: Neumann terms M, or CG iterations.
        alpha: Neumann/identity step α; None uses the PT learning rate (the paper's choice).
        damping: CG: solve (H + damping·I) x = b, which keeps it stable on an indefinite H.
        tol: CG: stop when the residual norm falls below tol·‖b‖.
    """

    kind: Literal["neumann", "cg", "identity"] = "neumann"
    steps: int = Field(default=1, ge=0)
    alpha: float | None = Field(default=None, gt=0)
    damping: float = Field(default=0.0, ge=0)
    tol: float = Field(default=1e-6, gt=0)

    def build(self, pt_lr: float) -> Solver:
        alpha = self.alpha if self.alpha is not None else pt_lr
        if self.kind == "neumann":
            return Neumann(steps=self.steps, alpha=alpha)
        if self.kind == "cg":
            return ConjugateGradient(max_iter=max(self.steps, 1), tol=self.tol, damping=self.damping)
        return Identity(alpha=alpha)


@schema
class PretrainConfig:
    """Plain pre-training: Adam on θ.

    Attributes:
        steps: PT steps per method.
        lr: Adam learning rate (also the Neumann α unless ``meta.solver.alpha`` is set).
        batch_size: pre-training examples per step.
    """

    steps: int = Field(default=2000, ge=1)
    lr: float = Field(default=1e-3, gt=0)
    batch_size: int = Field(default=64, ge=1)


@schema
class MetaConfig:
    """Algorithm 1's meta-learning knobs (the paper's defaults unless noted).

    Attributes:
        interval: PT steps between meta-steps (paper: 10).
        unroll_steps: K, differentiable fine-tuning steps per meta-step (paper: 1).
        unroll_encoder: unroll θ together with the head instead of the head only.
        inner_lr: SGD learning rate of the unrolled head steps.
        lr: Adam learning rate of φ.
        batches: hypergradients averaged per meta-step (paper: 1).
        warmup_steps: PT steps, the head trained alongside, before the first meta-step.
        head_steps: plain head steps before each meta-step's unroll (paper: 0).
        reuse_pt_graph: take H and the mixed term from the gradient graph of the PT step just
            before each meta-step instead of a second PT forward/backward: 1.34× instead of
            1.49× plain pre-training on Hu et al.'s GIN, but H is one PT step older than g
            (off by default: every derivative at the same θ, as in the paper).
        solver: the inverse-HVP solver.
    """

    interval: int = Field(default=10, ge=1)
    unroll_steps: int = Field(default=1, ge=0)
    unroll_encoder: bool = False
    inner_lr: float = Field(default=0.1, gt=0)
    lr: float = Field(default=0.05, ge=0)
    batches: int = Field(default=1, ge=1)
    warmup_steps: int = Field(default=100, ge=0)
    head_steps: int = Field(default=0, ge=0)
    reuse_pt_graph: bool = False
    solver: SolverConfig = SolverConfig()

    @field_validator("solver", mode="before")
    @classmethod
    def _solver_by_name(cls, value: Any) -> Any:
        return {"kind": value} if isinstance(value, str) else value  # `--set meta.solver=cg`

    def schedule(self, **overrides) -> MetaSchedule:
        values = {"meta_interval": self.interval, "unroll_steps": self.unroll_steps,
                  "unroll_encoder": self.unroll_encoder, "meta_batches": self.batches,
                  "warmup_steps": self.warmup_steps, "head_steps": self.head_steps}
        return MetaSchedule(**(values | overrides))
