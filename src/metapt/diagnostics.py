"""Is the hypergradient right? Ground truth at a checkpointed state of a run.

At one state of Algorithm 1 (θ, φ, the FT head ψ, the PT optimiser's state, the step counter)
this module measures, for any estimator of dL_V/dφ (:class:`metapt.hypergrad.estimators.Estimator`):

- **lookahead agreement**: move φ by ±ε·d, continue pre-training for T steps from the same state
  with the same batches and the same random draws (common random numbers), fine-tune and score on
  MetaFT-validation as the meta-step does, and compare the central difference with ⟨ĥ, d⟩ — for
  the estimator's own direction and N random directions: sign agreement, correlation, and the
  cosine with the exact T-step derivative (reverse-mode through the same T steps, which is what the
  finite differences estimate, without their noise);
- **signal-to-noise**: hypergradients from independent PT and FT/validation batches: mean pairwise
  cosine and ‖mean‖/‖std‖;
- **curvature**: extreme eigenvalues of H = ∂²L_PT/∂θ² on the next PT batch (Lanczos);
- **cost**: seconds per estimate in units of one plain PT step, timed here.

:func:`diagnose` takes a trainer at the state; :func:`diagnose_state` builds one from a problem,
a trainer state dict (a checkpoint's) and the run's configuration sections, independent of the job
layer. Everything here is on demand: nothing runs during training.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .hypergrad import Neumann, tree_dot, tree_norm, unrolled_finetune
from .hypergrad.curvature import lanczos
from .hypergrad.estimators import (
    Estimator,
    GaussNewtonProblem,
    differentiable_pt_optimizer,
    estimate_hypergradient,
    pretrain_lookahead,
    unrolled_pretraining_hypergradient,
)
from .problem import MetaProblem, Params
from .schedule import pt_batch_index

__all__ = [
    "DiagnoseOptions",
    "StateProbe",
    "default_estimators",
    "diagnose",
    "diagnose_run",
    "diagnose_state",
    "format_table",
    "lookahead_agreement",
    "signal_to_noise",
]


@dataclass(frozen=True)
class DiagnoseOptions:
    """What :func:`diagnose` measures.

    Attributes:
        horizon: T, PT steps of the lookahead (the meta-interval is the natural choice).
        directions: N random unit directions in φ, besides each estimator's own.
        epsilon: the step ε of the central difference, along unit directions in φ (large enough
            that the change of L_V stands above float32 rounding, ~1e-6).
        val_pairs: FT/MetaFT-validation batch pairs the meta-objective averages (the meta-step
            uses one; more make the truth less noisy). The estimators see the same average.
        snr_samples: independent hypergradients per estimator for the signal-to-noise figures.
        lanczos_steps: Hessian-vector products spent on the extreme eigenvalues.
        seed: seeds the random directions and the common random numbers.
    """

    horizon: int = 10
    directions: int = 8
    epsilon: float = 0.5
    val_pairs: int = 4
    snr_samples: int = 4
    lanczos_steps: int = 20
    seed: int = 0

    def __post_init__(self):
        for name in ("horizon", "val_pairs", "snr_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"DiagnoseOptions: {name} must be >= 1, got {getattr(self, name)}")
        if self.directions < 0 or self.lanczos_steps < 0:
            raise ValueError("DiagnoseOptions: directions and lanczos_steps must be >= 0")
        if not self.epsilon > 0:
            raise ValueError(f"DiagnoseOptions: epsilon must be > 0, got {self.epsilon}")


class StateProbe:
    """Pure measurements at one trainer state; the trainer itself is never stepped.

    Reads from ``trainer``: ``problem``, ``params`` (θ), ``metaparams`` (φ), ``head`` (ψ),
    ``pt_opt`` (Adam or SGD), ``inner`` (the FT optimiser), ``schedule``, ``step`` and
    ``meta_step_count``. The meta-objective is the one the next meta-step optimises: the head
    fine-tuned by K unrolled steps on that meta-step's FT batches, scored on its MetaFT-validation
    batch, averaged over ``val_pairs`` consecutive pairs.
    """

    def __init__(self, trainer: Any, *, val_pairs: int = 1, seed: int = 0):
        self.problem: MetaProblem = trainer.problem
        self.theta = {k: v.detach().clone() for k, v in trainer.params.items()}
        self.phi = {k: v.detach().clone() for k, v in trainer.metaparams.items()}
        self.head = {k: v.detach().clone() for k, v in trainer.head.items()}
        self.pt_opt = trainer.pt_opt
        self.trainer_params = trainer.params  # the keys of pt_opt's state
        self.inner = trainer.inner
        self.schedule = trainer.schedule
        self.step = int(trainer.step)
        self.meta_index = int(trainer.meta_step_count) * self.schedule.meta_batches
        self.val_pairs = val_pairs
        self.seed = seed
        self.pt_lr = float(self.pt_opt.param_groups[0]["lr"])

    # ---- the pieces ----------------------------------------------------------------------------

    def pt_batch_index(self, t: int, sample: int = 0, stride: int = 1) -> int:
        """t ≥ 0: the t-th upcoming PT batch; t < 0: the (−t)-th just taken; sample s shifts by s·stride
        (:func:`metapt.schedule.pt_batch_index`, as the trainer's meta-step)."""
        return pt_batch_index(self.step, t, sample, stride)

    def pretrain_loss_at(self, sample: int = 0, stride: int = 1) -> Callable[[Params, Mapping[str, Tensor], int], Tensor]:
        cache: dict[int, Any] = {}

        def loss(theta, phi, t):
            i = self.pt_batch_index(t, sample, stride)
            if i not in cache:
                cache[i] = self.problem.pretrain_batch(i)
            return self.problem.pretrain_loss(theta, phi, cache[i])

        return loss

    def gauss_newton_at(self, sample: int = 0, stride: int = 1):
        """t ↦ (θ ↦ PT outputs, outputs ↦ PT loss) on the batches of :meth:`pretrain_loss_at`, φ fixed."""
        if not isinstance(self.problem, GaussNewtonProblem):
            raise ValueError(f"{type(self.problem).__name__} does not expose pretrain_outputs/pretrain_output_loss")
        phi = {k: v.detach() for k, v in self.phi.items()}

        def at(t: int):
            batch = self.problem.pretrain_batch(self.pt_batch_index(t, sample, stride))
            return (lambda th: self.problem.pretrain_outputs(th, phi, batch),
                    lambda out: self.problem.pretrain_output_loss(out, phi, batch))

        return at

    def meta_loss(self, sample: int = 0) -> Callable[[Params], Tensor]:
        """θ ↦ mean over the pairs of L_V(θ, ψ_K(θ)), as the meta-step computes it."""
        sched, first = self.schedule, self.meta_index + sample * self.val_pairs
        pairs = []
        for i in range(first, first + self.val_pairs):
            fts = [self.problem.finetune_batch(i * max(sched.unroll_steps, 1) + k) for k in range(sched.unroll_steps)]
            pairs.append((fts, self.problem.metaval_batch(i)))

        def meta_loss(theta: Params) -> Tensor:
            total = 0.0
            for fts, val in pairs:
                if sched.unroll_encoder:
                    joint = {**{f"theta/{k}": v for k, v in theta.items()}, **{f"head/{k}": v for k, v in self.head.items()}}
                    out = unrolled_finetune(
                        lambda p, k, fts=fts: self.problem.finetune_loss(_part(p, "theta/"), _part(p, "head/"), fts[k]),
                        joint, self.inner, sched.unroll_steps)
                    total = total + self.problem.finetune_loss(_part(out, "theta/"), _part(out, "head/"), val)
                else:
                    head = unrolled_finetune(lambda h, k, fts=fts: self.problem.finetune_loss(theta, h, fts[k]),
                                             self.head, self.inner, sched.unroll_steps)
                    total = total + self.problem.finetune_loss(theta, head, val)
            return total / len(pairs)

        return meta_loss

    def _crn(self) -> None:
        torch.manual_seed(self.seed)  # common random numbers: the same dropout masks for every φ

    # ---- truth ---------------------------------------------------------------------------------

    def objective_after(self, phi: Mapping[str, Tensor], horizon: int) -> float:
        """L_V after T PT steps from this state with φ (same batches and random draws for any φ)."""
        self._crn()
        optimizer, state = differentiable_pt_optimizer(self.pt_opt, self.trainer_params)
        theta = pretrain_lookahead(self.pretrain_loss_at(), self.theta, phi, optimizer, state, horizon)
        with torch.enable_grad():  # the unrolled FT steps need gradients
            return float(self.meta_loss()(theta).detach())

    def exact_derivative(self, horizon: int) -> Params:
        """d/dφ of :meth:`objective_after`, by reverse-mode through the T PT steps."""
        self._crn()
        optimizer, state = differentiable_pt_optimizer(self.pt_opt, self.trainer_params)
        phi = {k: v.clone().requires_grad_(False) for k, v in self.phi.items()}
        hyper, _ = unrolled_pretraining_hypergradient(self.pretrain_loss_at(), self.meta_loss(), self.theta, phi,
                                                      optimizer, state, horizon)
        return _dense(hyper)

    # ---- estimators ----------------------------------------------------------------------------

    def estimate(self, estimator: Estimator, sample: int = 0) -> tuple[Params, Any, float]:
        """(hypergradient, info, seconds) of ``estimator`` at this state on sample ``sample``."""
        phi = {k: v.clone() for k, v in self.phi.items()}
        stride = len(estimator.batch_offsets())
        loss_at = self.pretrain_loss_at(sample, stride)
        meta_loss = self.meta_loss(sample)
        self._crn()
        start = time.perf_counter()
        gn_at = self.gauss_newton_at(sample, stride) if estimator.gauss_newton else None
        hyper, info = estimate_hypergradient(estimator, loss_at, meta_loss, self.theta, phi, self.pt_opt,
                                             self.trainer_params, gauss_newton_at=gn_at)
        seconds = time.perf_counter() - start
        return _dense(hyper), info, seconds

    def pt_step_seconds(self, repeats: int = 3) -> float:
        """Seconds of one plain PT step (forward, backward, Adam update) at this state, best of ``repeats``."""
        theta = {k: v.clone().requires_grad_(True) for k, v in self.theta.items()}
        opt = torch.optim.Adam(list(theta.values()), lr=self.pt_lr)
        phi = {k: v.detach() for k, v in self.phi.items()}
        batch = self.problem.pretrain_batch(self.step)
        best = math.inf
        for _ in range(repeats):
            start = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            self.problem.pretrain_loss(theta, phi, batch).backward()
            opt.step()
            best = min(best, time.perf_counter() - start)
        return best

    def hessian_spectrum(self, steps: int):
        """Lanczos on H = ∂²L_PT/∂θ² at θ on the next PT batch."""
        theta = {k: v.clone().requires_grad_(True) for k, v in self.theta.items()}
        phi = {k: v.detach() for k, v in self.phi.items()}
        self._crn()
        with torch.enable_grad():
            loss = self.pretrain_loss_at()(theta, phi, 0)
            grads = torch.autograd.grad(loss, list(theta.values()), create_graph=True, allow_unused=True)
        live = [(k, g) for k, g in zip(theta, grads) if g is not None and g.requires_grad]

        def hvp(v: Params) -> Params:
            out = {k: torch.zeros_like(t) for k, t in theta.items()}
            hv = torch.autograd.grad([g for _, g in live], [theta[k] for k, _ in live],
                                     grad_outputs=[v[k] for k, _ in live], retain_graph=True, allow_unused=True)
            for (k, _), h in zip(live, hv):
                if h is not None:
                    out[k] = h
            return out

        return lanczos(hvp, self.theta, steps, seed=self.seed)


# ---- measurements -----------------------------------------------------------------------------

def _random_directions(phi: Mapping[str, Tensor], n: int, seed: int) -> list[Params]:
    g = torch.Generator().manual_seed(seed + 7919)
    out = []
    for _ in range(n):
        d = {k: torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in phi.items()}
        out.append(_unit(d))
    return out


def _dense(tree: Mapping[str, Tensor]) -> Params:
    """Row-sparse hypergradients (example weights read by gather_rows) as dense tensors."""
    return {k: v.to_dense() if v.is_sparse else v for k, v in tree.items()}


def _unit(d: Mapping[str, Tensor]) -> Params:
    n = tree_norm(d)
    return {k: v / n for k, v in d.items()} if n > 0 else dict(d)


def central_difference(probe: StateProbe, direction: Mapping[str, Tensor], horizon: int, epsilon: float) -> float:
    """(f(φ + εd) − f(φ − εd)) / 2ε, f the meta-objective after ``horizon`` PT steps."""
    plus = {k: v + epsilon * direction[k] for k, v in probe.phi.items()}
    minus = {k: v - epsilon * direction[k] for k, v in probe.phi.items()}
    return (probe.objective_after(plus, horizon) - probe.objective_after(minus, horizon)) / (2 * epsilon)


def lookahead_agreement(
    probe: StateProbe,
    hypergrads: Mapping[str, Mapping[str, Tensor]],
    *,
    horizon: int,
    directions: int,
    epsilon: float,
    seed: int = 0,
    exact: Mapping[str, Tensor] | None = None,
) -> dict[str, Any]:
    """Each hypergradient against the T-step lookahead truth at one state.

    For each name: the finite differences along its own unit direction and N shared random unit
    directions are compared with ⟨ĥ, d⟩: ``sign_agreement_fd`` (fraction of directions with the
    same sign), ``correlation_fd`` (Pearson, over the directions), ``own_fd`` (the change along its
    own direction: positive when stepping against ĥ lowers L_V). With ``exact`` (the exact T-step
    derivative, noise-free where finite differences in float32 are not) the same against
    ⟨exact, d⟩: ``sign_agreement_exact``, ``correlation_exact``, and ``cos_exact``.
    ``sign_agreement`` and ``correlation`` are the exact-based figures when ``exact`` is given,
    else the finite-difference ones. ``truth`` checks the two truths against each other.
    """
    dirs = _random_directions(probe.phi, directions, seed)
    fd_random = [central_difference(probe, d, horizon, epsilon) for d in dirs]
    out: dict[str, Any] = {"random_fd": fd_random}
    if exact is not None:
        exact_random = [float(tree_dot(exact, d)) for d in dirs]
        out["random_exact"] = exact_random
        out["truth"] = {"fd_vs_exact_correlation": _pearson(fd_random, exact_random),
                        "fd_vs_exact_sign_agreement": _agreement(exact_random, fd_random)}
    for name, h in hypergrads.items():
        own = _unit(h)
        fd_own = central_difference(probe, own, horizon, epsilon)
        preds = [float(tree_dot(h, d)) for d in dirs] + [tree_norm(h)]
        truth = fd_random + [fd_own]
        row = {
            "sign_agreement_fd": _agreement(preds, truth),
            "correlation_fd": _pearson(preds, truth),
            "own_fd": fd_own,
            "norm": tree_norm(h),
        }
        row["sign_agreement"], row["correlation"] = row["sign_agreement_fd"], row["correlation_fd"]
        if exact is not None:
            exact_truth = exact_random + [float(tree_dot(exact, own))]
            row["sign_agreement_exact"] = _agreement(preds, exact_truth)
            row["correlation_exact"] = _pearson(preds, exact_truth)
            row["cos_exact"] = _cos(h, exact)
            row["sign_agreement"], row["correlation"] = row["sign_agreement_exact"], row["correlation_exact"]
        out[name] = row
    return out


def _agreement(preds: Sequence[float], truth: Sequence[float]) -> float:
    agree = [(p > 0) == (t > 0) for p, t in zip(preds, truth) if p != 0 and t != 0]
    return sum(agree) / len(agree) if agree else float("nan")


def signal_to_noise(probe: StateProbe, estimator: Estimator, samples: int) -> dict[str, float]:
    """Independent hypergradients (other PT and FT/validation batches): their mean pairwise cosine c,
    ``split_half_cos``: the cosine of the means of two disjoint halves of the draws (does the
    averaged hypergradient agree with itself on other batches?),
    ‖mean‖ / √(mean ‖h_i − mean‖²), and ``draws_for_half``: how many draws must be averaged for two
    such averages to reach cosine 0.5 (draws = signal s + noise n: c ≈ r/(1 + r) with r = ‖s‖²/E‖n‖²,
    and a mean of N draws has pairwise cosine N·r/(1 + N·r); inf when c ≤ 0: no expected direction)."""
    hs = [probe.estimate(estimator, sample=s)[0] for s in range(samples)]
    if samples < 2:
        return {"mean_pairwise_cos": float("nan"), "snr": float("nan"), "draws_for_half": float("nan"),
                "split_half_cos": float("nan")}
    cosines = [_cos(hs[i], hs[j]) for i in range(samples) for j in range(i + 1, samples)]
    mean = {k: sum(h[k] for h in hs) / samples for k in hs[0]}
    spread = math.sqrt(sum(tree_norm({k: h[k] - mean[k] for k in h}) ** 2 for h in hs) / (samples - 1))
    c = sum(cosines) / len(cosines)
    half = samples // 2  # the steady-signal check: two disjoint halves of the draws, averaged, agree?
    split = (_cos({k: sum(h[k] for h in hs[:half]) for k in hs[0]},
                  {k: sum(h[k] for h in hs[half:2 * half]) for k in hs[0]}) if half >= 1 else float("nan"))
    return {"mean_pairwise_cos": c, "snr": tree_norm(mean) / spread if spread > 0 else math.inf,
            "draws_for_half": draws_for_cosine(c, 0.5), "split_half_cos": split}


def draws_for_cosine(pair_cos: float, target: float = 0.5) -> float:
    """Draws to average so that two independent averages have cosine ``target``, given the pairwise
    cosine of single draws (signal + independent noise): N = (target/(1 − target)) · (1 − c)/c."""
    if not math.isfinite(pair_cos) or pair_cos <= 0:
        return math.inf
    if pair_cos >= 1:
        return 1.0
    return max(1.0, target / (1 - target) * (1 - pair_cos) / pair_cos)


def default_estimators(pt_lr: float, horizon: int) -> dict[str, Estimator]:
    """The options benchmarks/hypergrad_quality.py compares, by name (the paper's first)."""
    from .hypergrad import ConjugateGradient, Identity

    return {
        "neumann1_past (paper)": Estimator(solver=Neumann(1, pt_lr)),
        "identity_past (T1-T2)": Estimator(solver=Identity(pt_lr)),
        "identity_past_adam": Estimator(solver=Identity(pt_lr), adam_preconditioner=True),
        "identity_next": Estimator(solver=Identity(pt_lr), upcoming=True),
        "identity_next_adam": Estimator(solver=Identity(pt_lr), upcoming=True, adam_preconditioner=True),
        "neumann1_next_adam": Estimator(solver=Neumann(1, pt_lr), upcoming=True, adam_preconditioner=True),
        "identity_next4_adam": Estimator(solver=Identity(pt_lr), pt_batches=4, upcoming=True, adam_preconditioner=True),
        "cg5_spectral_damped_next": Estimator(solver=ConjugateGradient(max_iter=5, tol=1e-6, spectrum_steps=5),
                                              upcoming=True),
        "cg5_gauss_newton_next": Estimator(solver=ConjugateGradient(max_iter=5, tol=1e-6, damping=1e-3), upcoming=True,
                                           gauss_newton=True),
        "unrolled_T1": Estimator(horizon=1),
        f"unrolled_T{horizon}": Estimator(horizon=horizon),
    }


def diagnose(trainer: Any, estimators: Mapping[str, Estimator] | None = None,
             options: DiagnoseOptions = DiagnoseOptions(),
             progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Every measurement of this module at the trainer's current state, as a JSON-able dict.

    The trainer is not modified. ``estimators`` default to :func:`default_estimators`.
    ``progress(message)`` is called as each stage starts (``metapt diagnose`` prints them).
    """
    say = progress or (lambda message: None)
    probe = StateProbe(trainer, val_pairs=options.val_pairs, seed=options.seed)
    if estimators is None:
        estimators = default_estimators(probe.pt_lr, options.horizon)
    if not isinstance(probe.problem, GaussNewtonProblem):  # Gauss-Newton needs the PT loss as outputs + loss
        estimators = {k: v for k, v in estimators.items() if not v.gauss_newton}
    say("timing a plain PT step")
    pt_seconds = probe.pt_step_seconds()
    say(f"the exact {options.horizon}-step lookahead derivative")
    exact = probe.exact_derivative(options.horizon)
    timing = StateProbe(trainer, val_pairs=1, seed=options.seed)  # the cost of a meta-step's single estimate
    hypergrads, rows = {}, {}
    for i, (name, est) in enumerate(estimators.items()):
        say(f"estimator {i + 1}/{len(estimators)}: {name}")
        h, info, _ = probe.estimate(est)
        hypergrads[name] = h
        seconds = min(timing.estimate(est)[2] for _ in range(2))
        rows[name] = {"cost_pt_steps": seconds / pt_seconds, "meta_loss": info.meta_loss,
                      "solver_iterations": info.solver.iterations,
                      "negative_curvature": bool(info.solver.negative_curvature),
                      "usable": bool(info.usable)}
    say(f"lookahead finite differences: {len(estimators) + options.directions} directions × 2 runs of "
        f"{options.horizon} PT steps")
    agreement = lookahead_agreement(probe, hypergrads, horizon=options.horizon, directions=options.directions,
                                    epsilon=options.epsilon, seed=options.seed, exact=exact)
    say(f"signal-to-noise: {options.snr_samples} independent draws per estimator")
    for name, est in estimators.items():
        rows[name].update(agreement[name])
        rows[name].update(signal_to_noise(probe, est, options.snr_samples))
    if options.lanczos_steps:
        say(f"Hessian extreme eigenvalues ({options.lanczos_steps} Lanczos steps)")
    spectrum = probe.hessian_spectrum(options.lanczos_steps) if options.lanczos_steps else None
    return {
        "step": probe.step,
        "options": asdict(options),
        "pt_step_seconds": pt_seconds,
        "exact_norm": tree_norm(exact),
        "random_fd": agreement["random_fd"],
        "truth": agreement.get("truth"),
        "curvature": None if spectrum is None else {"lambda_max": spectrum.lambda_max,
                                                     "lambda_min": spectrum.lambda_min,
                                                     "hvps": spectrum.iterations},
        "estimators": rows,
    }


def diagnose_state(problem: MetaProblem, state: Mapping[str, Any], *, pt_lr: float, meta: Any,
                   estimators: Mapping[str, Estimator] | None = None,
                   options: DiagnoseOptions = DiagnoseOptions()) -> dict[str, Any]:
    """:func:`diagnose` at a trainer state dict (a checkpoint's ``MetaPretrainer.state_dict()``).

    Args:
        problem: the domain problem of the phase the state belongs to.
        state: ``params``, ``head``, ``metaparams``, ``pt_opt``, ``meta_opt``, ``counters``.
        pt_lr: the Adam learning rate of pre-training.
        meta: the run's :class:`metapt.schema.MetaConfig` (schedule and FT inner learning rate).
    """
    from .runner import trainer_from_config

    trainer = trainer_from_config(problem, state["params"], state["head"], state["metaparams"], pt_lr=pt_lr, meta=meta)
    trainer.load_state_dict(state)
    return diagnose(trainer, estimators, options)


#: The ``meta.solver`` config of each of :func:`default_estimators` (``horizon`` filled in for the
#: long unrolled one); ``tests/test_diagnostics.py`` checks each builds the same estimator.
def estimator_configs(horizon: int) -> dict[str, dict[str, Any]]:
    return {
        "neumann1_past (paper)": {"kind": "neumann", "upcoming": False, "adam_preconditioner": False},
        "identity_past (T1-T2)": {"kind": "identity", "upcoming": False, "adam_preconditioner": False},
        "identity_past_adam": {"kind": "identity", "upcoming": False},
        "identity_next": {"kind": "identity", "adam_preconditioner": False},
        "identity_next_adam": {"kind": "identity"},
        "neumann1_next_adam": {"kind": "neumann"},
        "identity_next4_adam": {"kind": "identity", "pt_batches": 4},
        "cg5_spectral_damped_next": {"kind": "cg", "max_iter": 5, "spectrum_steps": 5, "adam_preconditioner": False},
        "cg5_gauss_newton_next": {"kind": "cg", "max_iter": 5, "damping": 1e-3, "gauss_newton": True,
                                  "adam_preconditioner": False},
        "unrolled_T1": {"kind": "unrolled"},
        f"unrolled_T{horizon}": {"kind": "unrolled", "horizon": horizon},
    }


def config_text(config: Mapping[str, Any]) -> str:
    """``{kind: cg, max_iter: 5}``: a ``meta.solver`` value as it is written in YAML."""
    def value(v):
        return str(v).lower() if isinstance(v, bool) else str(v)

    return "{" + ", ".join(f"{k}: {value(v)}" for k, v in config.items()) + "}"


def format_table(result: Mapping[str, Any]) -> str:
    """A Markdown table of one :func:`diagnose` result (``metapt diagnose --format md``)."""
    opts = result["options"]
    configs = result.get("configs", {})
    own = result.get("own")
    lines = [f"state: {result.get('state') or 'PT step ' + str(result['step'])}; lookahead T = {opts['horizon']}, {opts['directions']} random "
             f"directions + own, ε = {opts['epsilon']}, {opts['val_pairs']} FT/val pairs; "
             f"Hessian λmax ≈ {_fmt(result['curvature'] and result['curvature']['lambda_max'])}, "
             f"λmin ≈ {_fmt(result['curvature'] and result['curvature']['lambda_min'])}",
             "",
             "| estimator | meta.solver | sign agreement (exact) | sign agreement (FD) | cos(exact T-step) | own-direction FD | SNR | mean pair cos | cost (PT steps) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in result["estimators"].items():
        shown = f"**{name}** (this run's)" if name == own else name
        lines.append(f"| {shown} | `{config_text(configs[name]) if name in configs else '?'}` | "
                     f"{_fmt(r.get('sign_agreement_exact'))} | {_fmt(r['sign_agreement_fd'])} | "
                     f"{_fmt(r.get('cos_exact'))} | {_fmt(r['own_fd'])} | {_fmt(r['snr'])} | "
                     f"{_fmt(r['mean_pairwise_cos'])} | {_fmt(r['cost_pt_steps'])} |")
    if result.get("truth"):
        t = result["truth"]
        lines += ["", f"truth check (random directions): FD vs exact T-step derivative correlation "
                      f"{_fmt(t['fd_vs_exact_correlation'])}, sign agreement {_fmt(t['fd_vs_exact_sign_agreement'])}"]
    lines += ["", f"verdict: {verdict(result)}"]
    return "\n".join(lines)


def verdict(result: Mapping[str, Any]) -> str:
    """One sentence: does the run's estimator follow the exact lookahead derivative, and is there signal?"""
    rows = result["estimators"]
    name = result.get("own") if result.get("own") in rows else "unrolled_T1" if "unrolled_T1" in rows else next(iter(rows))
    r = rows[name]
    cos, sign, pair = r.get("cos_exact"), r.get("sign_agreement_exact"), r.get("mean_pairwise_cos")
    who = "this run's estimator" if name == result.get("own") else "the default estimator"
    configs = result.get("configs", {})
    if name not in default_estimators(1.0, result["options"]["horizon"]) and name in configs:
        name = config_text(configs[name])
    if cos is None or not math.isfinite(cos):
        return f"{who} ({name}) could not be compared with the exact lookahead derivative"
    follows = ("follows" if cos >= 0.7 else "partly follows" if cos >= 0.3 else "does not follow")
    text = (f"{who} ({name}) {follows} the exact {result['options']['horizon']}-step derivative "
            f"(cos {cos:.2f}, signs {sign:.0%} of directions)")
    if pair is not None and math.isfinite(pair):
        text += ("; its draws agree with each other (pair cos " if pair >= 0.5 else
                 "; its draws are mostly batch noise (pair cos ") + f"{pair:.2f})"
        need = draws_for_cosine(pair)
        text += (f"; there is a signal to learn from here: about {need:.0f} draws average to cosine 0.5"
                 if math.isfinite(need) else "; no expected direction here: the objective is flat at this state")
    cost = r.get("cost_pt_steps") or math.inf
    better = [(o.get("cos_exact"), n) for n, o in rows.items()
              if n != name and o.get("cost_pt_steps", math.inf) <= 2 * cost
              and o.get("cos_exact") is not None and math.isfinite(o["cos_exact"]) and o["cos_exact"] > cos + 0.2]
    if better:
        best_cos, best = max(better)
        text += f"; {best} does better (cos {best_cos:.2f}) for at most twice the cost"
    return text + "."


def format_text(result: Mapping[str, Any], width: int = 80) -> str:
    """The 80-column plain-text layout of ``metapt diagnose``: the key figures per estimator, the
    config of each below, and a one-line verdict (``--format md`` gives every column)."""
    import textwrap

    opts = result["options"]
    own = result.get("own")
    curvature = result.get("curvature") or {}
    head = (f"state: {result.get('state') or 'PT step ' + str(result['step'])}. Lookahead T = {opts['horizon']} "
            f"PT steps, {opts['directions']} random directions + each estimator's own, "
            f"{opts['val_pairs']} FT/val pairs; Hessian λ ∈ [{_fmt(curvature.get('lambda_min'))}, "
            f"{_fmt(curvature.get('lambda_max'))}].")
    lines = textwrap.wrap(head, width) + [""]
    def num(x: Any, digits: int = 2) -> str:
        return "–" if x is None or not math.isfinite(x) else f"{x:.{digits}f}" if abs(x) < 1e4 else f"{x:.1e}"

    lines.append(f"  {'estimator':<26}{'signs':>7}{'cos':>7}{'SNR':>9}{'pair cos':>10}{'cost':>7}")
    for name, r in result["estimators"].items():
        mark = "*" if name == own else " "
        lines.append(f"{mark} {name[:26]:<26}{num(r.get('sign_agreement_exact')):>7}{num(r.get('cos_exact')):>7}"
                     f"{num(r.get('snr')):>9}{num(r.get('mean_pairwise_cos')):>10}{num(r.get('cost_pt_steps'), 1):>7}")
    lines += ["", "signs: share of directions in which the estimate has the sign of the exact",
              "T-step derivative; cos: cosine with it; SNR and pair cos: how well independent",
              "draws agree; cost: one estimate's time in plain PT steps."]
    if own:
        lines.append("* this run's estimator (its meta.solver)")
    configs = result.get("configs", {})
    if configs:
        lines += ["", "meta.solver of each:"]
        for name in result["estimators"]:
            if name in configs:
                lines += textwrap.wrap(f"{name}: {config_text(configs[name])}", width, initial_indent="  ",
                                       subsequent_indent="      ")
    lines += [""] + textwrap.wrap(f"verdict: {verdict(result)}", width)
    return "\n".join(lines)


def _fmt(x: Any) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return f"{x:.3g}" if isinstance(x, float) else str(x)


def _cos(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> float:
    na, nb = tree_norm(a), tree_norm(b)
    return float(tree_dot(a, b)) / (na * nb) if na > 0 and nb > 0 else float("nan")


def _pearson(x: Sequence[float], y: Sequence[float]) -> float:
    n = len(x)
    if n < 2:
        return float("nan")
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else float("nan")


def _part(params: Mapping[str, Tensor], prefix: str) -> Params:
    return {k[len(prefix):]: v for k, v in params.items() if k.startswith(prefix)}


# ---- a run folder ------------------------------------------------------------------------------

def diagnose_run(run_dir: str | Path, *, phase: str | None = None, options: DiagnoseOptions | None = None,
                 warm_steps: int = 50, console: Any = None) -> dict[str, Any]:
    """:func:`diagnose` at a checkpointed state of a run folder; writes ``RUN/diagnostics.json``.

    The state is the newest checkpoint that holds a pre-training phase's trainer (of ``phase``,
    ``SETTING/METHOD``, if given). A finished run keeps only each phase's θ and φ: the trainer is
    then rebuilt from the recorded θ and φ of the newest learned phase (or ``phase``), and
    ``warm_steps`` PT steps with φ fixed, the head trained alongside, re-estimate Adam's moments
    and the head before measuring. The problem is rebuilt through the job's domain
    (:func:`metapt.domains.domain`), the lookahead horizon is the run's ``meta.interval``.

    Raises:
        metapt.errors.UserError: no usable state in the folder.
    """
    from .config import load_config
    from .domains import domain as domain_of
    from .errors import UserError
    from .atomic import write_text_atomic
    from .runs import RunFolder
    from .runner import build_trainer, parse_phase

    folder = RunFolder.open(run_dir)
    config = load_config(folder.config_file)
    dom = domain_of(config.job)
    state, recorded = None, None
    for path in reversed(folder.checkpoints()):
        try:
            ckpt = folder.load_checkpoint(path)
        except Exception:  # noqa: BLE001 (a damaged checkpoint: try the previous one)
            continue
        if ckpt.get("trainer") is not None and (phase is None or ckpt.get("phase") == phase):
            state, phase = ckpt, ckpt["phase"]
            break
        if recorded is None:
            recorded = ckpt
    if state is None:
        if recorded is None:
            raise UserError(f"{folder.path} has no readable checkpoint to diagnose")
        results = folder.load_results(recorded.get("results", {}))
        learned = [k for k, v in results.items() if isinstance(v, dict) and v.get("metaparams")
                   and (phase is None or k == phase)]
        if not learned:
            raise UserError(f"{folder.path} holds no pre-training phase with meta-parameters"
                            + (f" named {phase!r}" if phase else ""))
        phase = learned[-1]
    from .config import config_changes

    made_with = (state if state is not None else recorded).get("config", "")
    changes = [k for k in config_changes(made_with, folder.config_file.read_text(encoding="utf-8"))
               if not k.startswith("evaluation.")]  # `metapt eval` changes those; pre-training never reads them
    if made_with and changes:
        raise UserError(f"{folder.config_file} was edited since the checkpoint was written ({', '.join(changes[:8])}"
                        f"{' …' if len(changes) > 8 else ''}): the state it holds belongs to the configuration it was "
                        "made with; undo the edit to diagnose it")
    setting, method_name, seed = parse_phase(phase, config.pretrain.seed)
    if method_name not in dom.methods:
        raise UserError(f"phase {phase!r} of {folder.path} is not a method of the {config.job} job")
    if console is None:
        from rich.console import Console

        console = Console(stderr=True)
    start = time.perf_counter()

    def progress(message: str) -> None:
        console.print(f"[{time.perf_counter() - start:5.1f} s] {message}", highlight=False, markup=False)

    progress(f"loading the data and rebuilding phase {phase!r}")
    data = dom.load(config, setting or dom.settings(config)[0], console)
    method = dom.methods[method_name]
    built = dom.pretraining(config, data, method, seed, torch.device("cpu"))
    meta = config.meta
    trainer = build_trainer(built, config, method, seed)  # as the run built it: its checkpoint's state loads
    if state is not None:
        trainer.load_state_dict(state["trainer"])
        if state.get("problem") is not None and hasattr(built.problem, "load_state_dict"):
            built.problem.load_state_dict(state["problem"])
        source = f"checkpoint of phase {phase!r} at PT step {trainer.step}"
        state_text = f"PT step {trainer.step} of {config.pretrain.steps} of phase {phase!r} (a checkpoint)"
    else:
        value = results[phase]
        with torch.no_grad():
            for k, v in trainer.params.items():
                v.copy_(value["params"][k])
            for k, v in trainer.metaparams.items():
                v.copy_(value["metaparams"][k])
        if value.get("problem") is not None and hasattr(built.problem, "load_state_dict"):
            built.problem.load_state_dict(value["problem"])
        progress(f"{warm_steps} PT steps with φ fixed, re-estimating Adam's moments and the head")
        for _ in range(warm_steps):
            trainer.pretrain_step()
            trainer.warmup_head_step()
        source = f"recorded end of phase {phase!r} + {warm_steps} PT steps re-estimating Adam's moments and the head"
        state_text = (f"the end of phase {phase!r} (θ and φ as recorded after its {config.pretrain.steps} PT steps, "
                      f"then {warm_steps} PT steps with φ fixed to re-estimate Adam's moments and the head; the "
                      f"step counter restarts, so it reads {trainer.step})")
    if options is None:
        options = DiagnoseOptions(horizon=meta.interval)
    estimators = default_estimators(config.pretrain.lr, options.horizon)
    configs = estimator_configs(options.horizon)
    own_estimator = meta.solver.estimator(config.pretrain.lr)
    own = next((name for name, est in estimators.items() if est == own_estimator), None)
    if own is None and not getattr(own_estimator, "accumulate", 0):  # the accumulated kind has no one-shot estimate
        own = "this run's meta.solver"
        estimators = {**estimators, own: own_estimator}
        configs[own] = {k: v for k, v in asdict(meta.solver).items() if v is not None}
    result = diagnose(trainer, estimators, options, progress=progress)
    result.update({"phase": phase, "source": source, "run": str(folder.path), "state": state_text, "own": own,
                   "configs": configs})
    from .schema import jsonable

    write_text_atomic(folder.path / "diagnostics.json", json.dumps(jsonable(result), indent=1) + "\n")
    return result
