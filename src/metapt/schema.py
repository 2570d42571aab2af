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
import re
import warnings
from collections.abc import Mapping
from pathlib import PurePath
from typing import Any, Literal

import numpy as np
from pydantic import ConfigDict, Field, field_validator, model_validator
from pydantic.dataclasses import dataclass as _pydantic_dataclass
from pydantic_core import ArgsKwargs

from .hypergrad import ConjugateGradient, Estimator, Identity, Neumann, Solver
from .schedule import MetaSchedule

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


#: Bounds of the count-like keys, so that an absurd value is a config error, not an overflow deep in a run:
#: seeds fit every generator (numpy's legacy seeds, and ``seed * 1_000_003 + k`` in torch's 64 bits);
#: step counts, batch sizes and per-step counts are far beyond any run that could finish.
MAX_SEED = 2**32 - 1
MAX_STEPS = 10**9
MAX_BATCH = 10**7
MAX_PER_STEP = 10**6

#: Config keys renamed, dotted from the top of a job config: deprecated name -> name now. The old
#: name is still read (a YAML file, ``--set``, a run folder's ``config.yaml`` written before the
#: rename) with a FutureWarning, by :mod:`metapt.config`; giving both is an error.
RENAMED_KEYS: dict[str, str] = {"meta.solver": "meta.estimator"}

_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def check_device(device: str) -> str:
    """``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:INDEX``; raises ValueError otherwise."""
    if not _DEVICE.match(device):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:INDEX, got {device!r}")
    return device


def check_job(config: Any, learned: bool) -> None:
    """Checks every job config shares: a learned φ must get at least one meta-step."""
    if learned and config.meta.warmup_steps >= config.pretrain.steps:
        raise ValueError(f"meta.warmup_steps ({config.meta.warmup_steps}) must be below pretrain.steps "
                         f"({config.pretrain.steps}), or the meta-learned methods would take no meta-step")
    if len(set(config.methods)) != len(config.methods):
        raise ValueError(f"methods must be distinct, got {list(config.methods)}")


@schema
class CheckpointConfig:
    """How often the whole meta-state is written, and how many files are kept.

    Attributes:
        every: PT steps between checkpoints (and one at the end of every phase).
        keep: the newest checkpoints kept; older ones are deleted after a new one is safely on disk.
    """

    every: int = Field(default=200, ge=1, le=MAX_STEPS)
    keep: int = Field(default=3, ge=1, le=MAX_PER_STEP)


#: Which keys each estimator kind reads (every other kind-specific key must stay unset).
ESTIMATOR_KEYS: dict[str, tuple[str, ...]] = {
    "neumann": ("alpha", "terms", "damping", "spectrum_steps", "pt_batches", "upcoming", "adam_preconditioner",
                "gauss_newton"),
    "identity": ("alpha", "pt_batches", "upcoming", "adam_preconditioner"),
    "cg": ("max_iter", "tol", "damping", "spectrum_steps", "pt_batches", "upcoming", "adam_preconditioner",
           "gauss_newton"),
    "unrolled": ("horizon",),
    "accumulated": ("alpha", "every", "adam_preconditioner", "direction_decay"),
}
#: Defaults of the kind-specific keys; kind ``unrolled`` with ``horizon`` 1, and ``upcoming`` and
#: ``adam_preconditioner`` for the implicit kinds, were chosen by measurement
#: (benchmarks/results/hypergrad_quality.md). The paper's estimator is
#: ``{kind: neumann, upcoming: false, adam_preconditioner: false}``.
_ESTIMATOR_DEFAULTS: dict[str, Any] = {"terms": 1, "max_iter": 20, "tol": 1e-6, "damping": 0.0,
                                       "spectrum_steps": 0, "horizon": 1, "pt_batches": 1, "upcoming": True,
                                       "adam_preconditioner": True, "gauss_newton": False, "every": 1,
                                       "direction_decay": 0.0}


@schema
class EstimatorConfig:
    """The hypergradient estimator of a meta-step (``meta.estimator``): an inverse-HVP solver, or reverse-mode
    through T PT steps.

    Each kind has its own keys; a key that the chosen kind does not read is an error (leave it
    unset, ``null``). Unset keys take the kind's default (in brackets). The default (``unrolled``
    through the next PT step) agreed best with the exact lookahead derivative over the shipped
    domains among the options within 1.6× plain pre-training, and costs less than the paper's
    ``{kind: neumann, upcoming: false, adam_preconditioner: false}``; among the implicit kinds,
    the upcoming batch and Adam's preconditioner agreed better than the paper's past batch
    (benchmarks/results/hypergrad_quality.md).

    Attributes:
        kind: ``neumann`` (the paper: α Σ_{j≤M} (I − αH)^j g), ``identity`` (α g, the one-step
            "T1–T2" hypergradient, no HVP), ``cg`` (conjugate gradient on (H + λI) x = g; stops at
            negative curvature with its last good iterate, as truncated Newton-CG) or
            ``unrolled`` (reverse-mode through ``horizon`` PT optimiser steps on the upcoming
            batches: the exact T-step lookahead derivative) or ``accumulated`` (every
            ``every``-th PT batch adds its one-step mixed term against the validation direction
            of the last meta-step, and each meta-step averages them: ``interval / every`` times
            the PT draws per update; :mod:`metapt.hypergrad.accumulate`).
        alpha: neumann, identity, accumulated: the step α; unset: the PT learning rate (the paper's choice).
        terms: neumann: M, Hessian-vector products after the first term [1].
        max_iter: cg: the most Hessian-vector products [20].
        tol: cg: stop when ‖r‖ ≤ tol·‖g‖ [1e-6].
        damping: neumann, cg: λ ≥ 0 added to H [0].
        spectrum_steps: neumann: Lanczos steps that set α = 1/λmax (then ``alpha`` must stay
            unset); cg: Lanczos steps that add 2·max(0, −λmin) to the damping [0: off].
        horizon: unrolled: T, PT steps differentiated through (memory and time grow with T) [1].
        pt_batches: neumann, identity, cg: PT batches whose mean loss gives H and the mixed
            term, within one hypergradient sample (``meta.batches`` counts the samples) [1].
        upcoming: neumann, identity, cg: take those batches among the ones pre-training takes
            next instead of the one(s) just taken (the paper's) [true].
        every: accumulated: PT steps between two draws (1: every PT batch) [1].
        direction_decay: accumulated: the draws' validation direction v is an exponential moving
            average over meta-steps with this decay (0: the last meta-step's). One validation
            batch's v decides most of a draw (two batches' draws at one state: Spearman ρ ≈ 0;
            benchmarks/results/planted_noise_sign_check_4000_rate0.4.md); the average trades
            that noise for staleness [0].
        adam_preconditioner: neumann, identity, cg, accumulated: solve in Adam's geometry P = 1/(√v̂ + ε) of
            the PT optimiser (the paper's formula assumes SGD) [true].
        gauss_newton: neumann, cg: solve with the Gauss–Newton matrix JᵀH_ℓJ instead of H (the
            problem must expose ``pretrain_outputs``/``pretrain_output_loss``) [false].
    """

    kind: Literal["neumann", "cg", "identity", "unrolled", "accumulated"] = "unrolled"
    alpha: float | None = Field(default=None, gt=0)
    terms: int | None = Field(default=None, ge=0)
    max_iter: int | None = Field(default=None, ge=1)
    tol: float | None = Field(default=None, gt=0)
    damping: float | None = Field(default=None, ge=0)
    spectrum_steps: int | None = Field(default=None, ge=0)
    horizon: int | None = Field(default=None, ge=1)
    pt_batches: int | None = Field(default=None, ge=1)
    upcoming: bool | None = None
    adam_preconditioner: bool | None = None
    gauss_newton: bool | None = None
    every: int | None = Field(default=None, ge=1, le=1_000_000)
    direction_decay: float | None = Field(default=None, ge=0, lt=1)

    def __post_init__(self):
        allowed = ESTIMATOR_KEYS[self.kind]
        stray = [k for k in _ESTIMATOR_DEFAULTS | {"alpha": None} if getattr(self, k) is not None and k not in allowed]
        if stray:
            owners = {k: [kind for kind, keys in ESTIMATOR_KEYS.items() if k in keys] for k in stray}
            detail = "; ".join(f"{k} is read by kind {' / '.join(v)}" for k, v in owners.items())
            raise ValueError(f"estimator kind {self.kind!r} does not read {', '.join(stray)} ({detail}); "
                             f"unset {'it' if len(stray) == 1 else 'them'} (e.g. --set meta.estimator.{stray[0]}=null) "
                             f"or choose that kind; {self.kind} reads {', '.join(allowed)}")
        if self.kind == "neumann" and self.spectrum_steps and self.alpha is not None:
            raise ValueError("estimator kind 'neumann': spectrum_steps > 0 sets alpha = 1/λmax; unset alpha or spectrum_steps")

    def get(self, key: str) -> Any:
        """The value of a kind-specific key, its default when unset."""
        value = getattr(self, key)
        return _ESTIMATOR_DEFAULTS.get(key) if value is None else value

    def build(self, pt_lr: float) -> Solver | None:
        """The inverse-HVP solver (None for ``unrolled``, which solves nothing)."""
        alpha = self.alpha if self.alpha is not None else pt_lr
        if self.kind == "neumann":
            return Neumann(steps=self.get("terms"), alpha=alpha, damping=self.get("damping"),
                           spectrum_steps=self.get("spectrum_steps"))
        if self.kind == "cg":
            return ConjugateGradient(max_iter=self.get("max_iter"), tol=self.get("tol"), damping=self.get("damping"),
                                     spectrum_steps=self.get("spectrum_steps"))
        if self.kind in ("identity", "accumulated"):
            return Identity(alpha=alpha)
        return None

    def estimator(self, pt_lr: float) -> Estimator:
        """The :class:`metapt.hypergrad.Estimator` for ``MetaPretrainer(estimator=...)``."""
        if self.kind == "unrolled":
            return Estimator(horizon=self.get("horizon"))
        if self.kind == "accumulated":
            return Estimator(solver=self.build(pt_lr), accumulate=self.get("every"),
                             adam_preconditioner=self.get("adam_preconditioner"),
                             direction_decay=self.get("direction_decay"))
        return Estimator(solver=self.build(pt_lr), pt_batches=self.get("pt_batches"), upcoming=self.get("upcoming"),
                         adam_preconditioner=self.get("adam_preconditioner"),
                         gauss_newton=bool(self.get("gauss_newton")) if self.kind in ("neumann", "cg") else False)


@schema
class PretrainConfig:
    """Plain pre-training: Adam on θ.

    Attributes:
        steps: PT steps per method.
        lr: Adam learning rate (also α of the implicit meta.estimator kinds unless ``meta.estimator.alpha`` is set).
        batch_size: pre-training examples per step.
        seed: the pre-training seed: θ₀, φ₀, the order of the PT, FT and MetaFT-validation
            batches and their random draws (augmentations, dropout). The data split has its
            own seed (``data.split_seed``), so a new pre-training seed keeps the same data.
        seeds: how many pre-training seeds (``seed``, ``seed`` + 1, …) each method is run
            with; with more than one, CIs and paired gains are over pre-training seeds.
    """

    steps: int = Field(default=2000, ge=1, le=MAX_STEPS)
    lr: float = Field(default=1e-3, gt=0, allow_inf_nan=False)
    batch_size: int = Field(default=64, ge=1, le=MAX_BATCH)
    seed: int = Field(default=0, ge=0, le=MAX_SEED)
    seeds: int = Field(default=1, ge=1, le=100)

    def __post_init__(self) -> None:
        if self.seed + self.seeds - 1 > MAX_SEED:
            raise ValueError(f"pretrain.seed + pretrain.seeds - 1 must be at most {MAX_SEED} (the seeds used are "
                             f"seed, seed + 1, ...), got {self.seed} + {self.seeds} - 1")


@schema
class MetaConfig:
    """Algorithm 1's meta-learning knobs (the paper's values where it gives one, as noted).

    Attributes:
        interval: PT steps between meta-steps (paper: 10); ``MetaSchedule.interval``.
        unroll_steps: K, differentiable fine-tuning steps per meta-step (paper: 1).
        unroll_encoder: unroll θ together with the head instead of the head only.
        inner_lr: SGD learning rate of the fine-tuning head steps (warm-up, catch-up and unrolled).
        inner_lr_cap: ``auto``: before each fine-tuning step the largest eigenvalue λ of the
            fine-tuning loss's Hessian is estimated, and a step with ``inner_lr``·λ > 1.9 (near or
            past 2, where plain SGD diverges) runs at 1/λ; the run says so (``inner_lr_capped`` in
            the metrics and the summary, a warning the first time). A stable rate is used as
            given, so such runs do not change. ``off``: ``inner_lr`` as given, always.
        lr: Adam learning rate of φ.
        batches: hypergradient samples averaged per meta-step, each on its own FT/validation
            batches (paper: 1); ``MetaSchedule.batches``. Not ``estimator.pt_batches``, the PT
            batches within one sample.
        warmup_steps: PT steps, the head trained alongside, before the first meta-step.
        head_steps: plain head steps before each meta-step's unroll (paper: 0).
        head_start: ``carried``: each meta-step fine-tunes from the head the last one left (the
            paper's); ``initial``: from ψ₀ every time (``MetaSchedule.head_start``: a carried head
            can absorb what φ did, so that L_V stops seeing it).
        lr_groups: Adam learning rates for the φ entries whose key starts with a given prefix
            (e.g. ``{log_magnitude: 0.03}``); the others use ``lr``.
        momentum: β₁ of Adam on φ, the decay of its running mean of hypergradients (0.9:
            about 10 meta-steps averaged; higher averages more of the batch noise away).
        average: the φ a run reports (summary, seed agreement): ``none`` the last φ, ``polyak``
            its mean over every meta-step, ``ema`` a moving average (``average_decay``).
            Pre-training always uses the live φ.
        average_decay: the EMA's decay per meta-step.
        normalize_weights: task weights K·softmax(φ) (they sum to the number of tasks) and
            example weights scaled within each batch to sum to its size: a drift shared by
            every weight cannot move the loss's scale, only the weights' ratios.
        reuse_pt_graph: take H and the mixed term from the gradient graph of the PT step just
            before each meta-step instead of a second PT forward/backward (cheaper, but H is
            one PT step older than g; off by default: every derivative at the same θ, as in the
            paper; benchmarks/meta_overhead.py measures the saving).
        estimator: the hypergradient estimator (:class:`EstimatorConfig`; default: reverse-mode through
            the next PT step; ``accumulated``: every PT batch's mixed term, the noise-controlled
            option). ``meta.solver`` is its deprecated name, still read (with a warning).
    """

    interval: int = Field(default=10, ge=1, le=MAX_STEPS)
    unroll_steps: int = Field(default=1, ge=0, le=MAX_PER_STEP)
    unroll_encoder: bool = False
    inner_lr: float = Field(default=0.1, gt=0)
    inner_lr_cap: Literal["auto", "off"] = "auto"
    lr: float = Field(default=0.05, ge=0)
    batches: int = Field(default=1, ge=1, le=MAX_PER_STEP)
    warmup_steps: int = Field(default=100, ge=0, le=MAX_STEPS)
    head_steps: int = Field(default=0, ge=0, le=MAX_PER_STEP)
    head_start: Literal["carried", "initial"] = "carried"
    lr_groups: dict[str, float] = Field(default_factory=dict)
    momentum: float = Field(default=0.9, ge=0, lt=1)
    average: Literal["none", "polyak", "ema"] = "none"
    average_decay: float = Field(default=0.95, gt=0, lt=1)
    normalize_weights: bool = False
    reuse_pt_graph: bool = False
    estimator: EstimatorConfig = EstimatorConfig()

    @field_validator("inner_lr_cap", mode="before")
    @classmethod
    def _cap_off(cls, value: Any) -> Any:
        return "off" if value is False else value  # YAML reads a bare `off` as false

    @model_validator(mode="before")
    @classmethod
    def _renamed_solver(cls, values: Any) -> Any:
        """``MetaConfig(solver=...)``, the deprecated name of ``estimator=``."""
        given = values.kwargs if isinstance(values, ArgsKwargs) else values
        if not (isinstance(given, dict) and "solver" in given):
            return values
        if "estimator" in given:
            raise ValueError("give estimator only (solver is its deprecated name)")
        warnings.warn("MetaConfig(solver=...) is deprecated; use estimator= (meta.estimator in a config)",
                      DeprecationWarning, stacklevel=3)
        given = {("estimator" if k == "solver" else k): v for k, v in given.items()}
        return ArgsKwargs(values.args, given) if isinstance(values, ArgsKwargs) else given

    @property
    def solver(self) -> EstimatorConfig:
        """Deprecated: :attr:`estimator`."""
        warnings.warn("MetaConfig.solver is deprecated; use .estimator", DeprecationWarning, stacklevel=2)
        return self.estimator

    @field_validator("estimator", mode="before")
    @classmethod
    def _estimator_by_name(cls, value: Any) -> Any:
        return {"kind": value} if isinstance(value, str) else value  # `--set meta.estimator=cg`

    def __post_init__(self) -> None:
        if self.reuse_pt_graph and not self.estimator.estimator(1.0).uses_past_batch:
            raise ValueError("reuse_pt_graph needs an estimator that takes H and the mixed term on the PT batch "
                             "just taken (meta.estimator: {kind: neumann, identity or cg, upcoming: false, "
                             "pt_batches: 1}); this one takes PT batches of its own, so a kept graph would go unused")

    @field_validator("lr_groups")
    @classmethod
    def _finite_rates(cls, value: dict[str, float]) -> dict[str, float]:
        bad = {k: v for k, v in value.items() if not (math.isfinite(v) and v >= 0)}
        if bad:
            raise ValueError(f"learning rates must be finite and >= 0, got {bad}")
        return value

    def check_lr_groups(self, phi_keys: Any, exempt: Any = ()) -> None:
        """Raise a :class:`metapt.errors.ConfigError` naming the φ entries if an ``lr_groups`` key
        (other than those in ``exempt``: a job's own defaults, which may name opt-in methods' φ)
        is the prefix of none of ``phi_keys`` (the φ entries of every learned method of the run);
        such a key would silently leave every entry at ``lr``."""
        from .errors import ConfigError

        keys = sorted(set(phi_keys))
        bad = [p for p in self.lr_groups if p not in exempt and not any(k.startswith(p) for k in keys)]
        if bad:
            shown = ", ".join(keys[:20]) + (f" and {len(keys) - 20} more" if len(keys) > 20 else "")
            raise ConfigError(f"meta.lr_groups: {', '.join(map(repr, bad))} matches no meta-parameter (φ) entry of "
                              f"this run's meta-learned methods, so its rate would never be used; a key is a prefix "
                              f"of these entries: {shown or '(none: no method of this run meta-learns φ)'}")

    def param_groups(self, metaparams: Mapping[str, Any]) -> list[dict[str, Any]]:
        """torch.optim parameter groups for φ: ``lr_groups`` prefixes first, ``lr`` for the rest."""
        groups: dict[float, list] = {}
        for key, tensor in metaparams.items():
            lr = next((v for prefix, v in self.lr_groups.items() if key.startswith(prefix)), self.lr)
            groups.setdefault(lr, []).append(tensor)
        return [{"params": tensors, "lr": lr} for lr, tensors in groups.items()]

    def schedule(self, **overrides) -> MetaSchedule:
        values = {"interval": self.interval, "unroll_steps": self.unroll_steps,
                  "unroll_encoder": self.unroll_encoder, "batches": self.batches,
                  "warmup_steps": self.warmup_steps, "head_steps": self.head_steps,
                  "head_start": self.head_start,
                  "average": self.average, "average_decay": self.average_decay}
        return MetaSchedule(**(values | overrides))


def __getattr__(name: str) -> Any:
    if name == "SolverConfig":  # the name of EstimatorConfig before meta.solver became meta.estimator
        warnings.warn("metapt.schema.SolverConfig is deprecated; use EstimatorConfig", DeprecationWarning, stacklevel=2)
        return EstimatorConfig
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
