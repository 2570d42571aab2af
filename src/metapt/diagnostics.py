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
layer; :func:`metapt.run_diagnosis.diagnose_run` (``metapt diagnose``) at a run folder's state.
Everything here is on demand, except :func:`phase_signal`: the runner's one cheap figure at the
end of every meta-learned phase (is there an expected direction for φ to follow here?).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
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
from .problem import MetaProblem, Params, gauss_newton_at, pretrain_loss_at
from .schedule import pt_batch_index

__all__ = [
    "DiagnoseOptions",
    "StateProbe",
    "default_estimators",
    "diagnose",
    "diagnose_state",
    "draws_for_cosine",
    "estimator_configs",
    "lookahead_agreement",
    "phase_signal",
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
    ``pt_opt`` (Adam or SGD), ``meta_step_inner()`` (the FT optimiser, its rate capped as the
    trainer's would be), ``schedule``, ``step`` and ``meta_step_count``. The meta-objective is
    the one the next meta-step optimises: the head fine-tuned by K unrolled steps on that
    meta-step's FT batches, scored on its MetaFT-validation
    batch, averaged over ``val_pairs`` consecutive pairs.
    """

    def __init__(self, trainer: Any, *, val_pairs: int = 1, seed: int = 0):
        self.problem: MetaProblem = trainer.problem
        self.theta = {k: v.detach().clone() for k, v in trainer.params.items()}
        self.phi = {k: v.detach().clone() for k, v in trainer.metaparams.items()}
        self.head = {k: v.detach().clone() for k, v in getattr(trainer, "start_head", trainer.head).items()}
        self.pt_opt = trainer.pt_opt
        self.trainer_params = trainer.params  # the keys of pt_opt's state
        self.inner = trainer.meta_step_inner()[0]  # the rate the next meta-step unrolls with (capped or not)
        self.schedule = trainer.schedule
        self.step = int(trainer.step)
        self.meta_step = int(trainer.meta_step_count)
        self.val_pairs = val_pairs
        self.seed = seed
        self.pt_lr = float(self.pt_opt.param_groups[0]["lr"])

    # ---- the pieces ----------------------------------------------------------------------------

    def pt_batch_index(self, t: int, sample: int = 0, stride: int = 1) -> int:
        """t ≥ 0: the t-th upcoming PT batch; t < 0: the (−t)-th just taken; sample s shifts by s·stride
        (:func:`metapt.schedule.pt_batch_index`, as the trainer's meta-step)."""
        return pt_batch_index(self.step, t, sample, stride)

    def pretrain_loss_at(self, sample: int = 0, stride: int = 1) -> Callable[[Params, Mapping[str, Tensor], int], Tensor]:
        """(θ, φ, t) ↦ L_PT on the batches the trainer's meta-step would read (:func:`metapt.problem.pretrain_loss_at`)."""
        return pretrain_loss_at(self.problem, self.step, sample, stride)

    def gauss_newton_at(self, sample: int = 0, stride: int = 1):
        """t ↦ (θ ↦ PT outputs, outputs ↦ PT loss) on the batches of :meth:`pretrain_loss_at`, φ fixed."""
        return gauss_newton_at(self.problem, self.step, sample, stride, self.phi)

    def meta_loss(self, sample: int = 0) -> Callable[[Params], Tensor]:
        """θ ↦ mean over the pairs of L_V(θ, ψ_K(θ)), as the meta-step computes it."""
        sched, pairs = self.schedule, []
        for j in range(sample * self.val_pairs, (sample + 1) * self.val_pairs):  # as the meta-step's sample j
            i = sched.sample_index(self.meta_step, j)
            fts = [self.problem.finetune_batch(sched.finetune_index(i, k)) for k in range(sched.unroll_steps)]
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


#: independent draws of the meta-step's own hypergradient that :func:`phase_signal` compares
SIGNAL_DRAWS = 8


def phase_signal(trainer: Any, draws: int = SIGNAL_DRAWS) -> dict[str, float]:
    """:func:`signal_to_noise` of the trainer's own estimator at its state, over ``draws``
    independent draws (other PT and FT/validation batches, as its next meta-steps would take):
    the cheap "is there a signal to learn from" figure a run reports per meta-learned phase.
    Costs about ``draws`` meta-steps; leaves the trainer and every random generator as they were."""
    from .rng import capture_rng, restore_rng

    rng = capture_rng()
    try:
        out = signal_to_noise(StateProbe(trainer, val_pairs=1), trainer.estimator, draws)
    finally:
        restore_rng(rng)
    return {**out, "draws": draws}


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
    from .build import trainer_from_config

    trainer = trainer_from_config(problem, state["params"], state["head"], state["metaparams"], pt_lr=pt_lr, meta=meta)
    trainer.load_state_dict(state)
    return diagnose(trainer, estimators, options)


#: The ``meta.estimator`` config of each of :func:`default_estimators` (``horizon`` filled in for the
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
