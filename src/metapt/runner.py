"""One experiment runner for every domain: pre-train each method, evaluate it downstream, summarise.

A domain (molecules, ECG, synthetic, or your own) declares a small :class:`Domain`:
how to load its data for a setting, how to build one method's pre-training
(problem, θ₀, ψ₀, φ₀ and the encoder used downstream), and its downstream splits.
Methods are data (:class:`Method`): pre-train or not, and φ learned, frozen at its
initial value, or absent. This module does the rest, the same way for every domain:

* every pre-training phase runs through :class:`metapt.MetaPretrainer` (a frozen φ is
  a schedule with no meta-steps), inside a :class:`metapt.session.Session`, so every phase
  resumes mid-phase after a kill, writes atomically and runs data-parallel under
  torchrun;
* one evaluation protocol (:mod:`metapt.evaluation`): full fine-tuning and linear probe
  × label fractions × fine-tuning seeds, the epoch picked on the downstream 'valid'
  split, test scores as mean ± 95 % CI and per-seed paired gains; non-finite scores
  are counted, not dropped silently;
* one summary layout (``summary.json``/``summary.md``) and the shared plots; a domain
  may add plots of its own.

Run-folder steps: phase ``SETTING/METHOD`` per pre-trained method, then one
evaluation unit ``eval/SETTING/METHOD/MODE/FRACTION/SEED`` each.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from rich.console import Console
from torch import nn

from .errors import ConfigError, deferred_stop, immediate_stop
from .evaluation import Downstream, EvalConfig, finetune_and_score, label_subset, mean_ci95, nonfinite, seed_agreement, to_device
from .hypergrad import sgd
from .metrics import progress_bar, read_jsonl
from .optim import LazyAdam
from .plots import plot_bars, plot_curves
from .problem import MetaProblem, Params
from .atomic import write_text_atomic
from .runs import RunFolder
from .session import Session
from .schema import jsonable
from .strategy import ReusePTGraph, Strategy
from .trainer import MetaPretrainer


@dataclass(frozen=True)
class Method:
    """One way of producing the encoder that is fine-tuned downstream.

    Attributes:
        name: the key in configs and run folders (``meta_task_weights``).
        label: what tables and plots call it (``meta task weights``).
        pretrain: False: a randomly initialised encoder (no pre-training).
        phi: ``learned`` (meta-learned online), ``frozen`` (held at φ₀: plain
            pre-training with the same φ₀, the control for meta-learning), ``random`` (φ₀ plus
            standard normal noise drawn from the pre-training seed, held there: a random
            weighting, one draw per pre-training seed) or ``none``.
        variant: the domain's own selector of what φ is (``task_weights``, ``warp``).
    """

    name: str
    label: str
    pretrain: bool = True
    phi: Literal["learned", "frozen", "random", "none"] = "learned"
    variant: str = ""


@dataclass
class Pretraining:
    """What a domain builds for one method's pre-training.

    Attributes:
        problem: the :class:`metapt.MetaProblem` (losses and batches).
        params, head, metaparams: θ₀, ψ₀, φ₀ (φ₀ may be empty for φ ``none``).
        encoder: pre-trained θ → the ``nn.Module`` fine-tuned downstream.
        emb_dim: the encoder's output width.
        buffers: a module whose buffers (batch norm) data-parallel runs keep in sync.
    """

    problem: MetaProblem
    params: Params
    head: Params
    metaparams: Params
    encoder: Callable[[Params], nn.Module]
    emb_dim: int
    buffers: nn.Module | None = None


class Domain(Protocol):
    """What a domain declares to be run by :func:`run_experiment`.

    ``config`` is the job's configuration, an instance of the domain's pydantic class
    with the shared sections ``pretrain``, ``meta``, ``evaluation``, ``checkpoint``,
    ``methods`` and ``device``.
    """

    name: str
    methods: Mapping[str, Method]
    #: paired differences reported, (better, baseline) method names
    gains: Sequence[tuple[str, str]]

    def settings(self, config: Any) -> Sequence[str]:
        """Downstream settings run one after the other (``("b3db", "heldout")``; one name if just one)."""
        ...

    def load(self, config: Any, setting: str, console: Console) -> Any:
        """The data of one setting (printed briefly on ``console``)."""
        ...

    def pretraining(self, config: Any, data: Any, method: Method, seed: int, device: torch.device) -> Pretraining:
        """One method's problem and initial values; ``seed`` is the pre-training seed. The problem's
        own tensors and modules go on ``device`` (the runner moves θ₀, ψ₀, φ₀ and every batch)."""
        ...

    def downstream(self, config: Any, data: Any) -> Downstream:
        """The labelled downstream splits 'train', 'valid', 'test'."""
        ...

    def data_summary(self, config: Any, data: Any) -> dict[str, Any]:
        """What the data of a setting is (sizes, groups, records), JSON-able, for the summary."""
        ...

    def describe(self, config: Any, data: Any, method: Method, metaparams: Params) -> dict[str, Any]:
        """A readable, JSON-able summary of a learned φ (task names → weights, warp size)."""
        ...

    def plots(self, folder: Path, summary: dict[str, Any]) -> None:
        """Extra plots from the run folder (may do nothing)."""
        ...

    # Optional: ``check(config)``, called before a run folder is made, raises
    # :class:`metapt.errors.UserError` for what the configuration cannot express but the run
    # cannot do without (the ECG job: a data folder that exists). A domain without it accepts
    # every configuration its schema accepts.


# ---- the run ----------------------------------------------------------------------------------


def run_experiment(domain: Domain, folder: RunFolder, config: Any, *, resume: bool = False,
                   console: Console | None = None, reevaluate: bool = False, dist: Any = None) -> dict[str, Any]:
    """Run (or, with ``resume``, continue) ``config`` of ``domain`` in ``folder``; returns the summary.

    ``reevaluate`` (with ``resume``) keeps the pre-trained encoders and redoes the evaluation.
    ``dist``: the :class:`metapt.distributed.DistributedContext` of a torchrun launch: every
    process pre-trains its shard, evaluates (seeded, so identically), and rank 0 alone writes.
    """
    is_main = dist is None or dist.is_main
    console = console if console is not None and is_main else Console(stderr=True, quiet=not is_main)
    session = Session(folder, config.checkpoint, resume=resume, console=console, dist=dist)
    if reevaluate:
        session.forget("eval/")
    device = resolve_device(config.device, dist)
    methods = [domain.methods[m] for m in config.methods]
    pt_seeds = list(range(config.pretrain.seed, config.pretrain.seed + config.pretrain.seeds))
    summary: dict[str, Any] = {"job": domain.name, "config": jsonable(asdict(config)), "settings": {},
                               "pretraining": {}, "device": str(device)}
    try:
        # a stop signal stops the run between two steps, never inside a write (errors.deferred_stop)
        with deferred_stop(), progress_bar(console) as bars:
            for setting in domain.settings(config):
                with immediate_stop():  # loading holds nothing a cleanup needs: Ctrl-C stops it at once
                    data = domain.load(config, setting, console)
                _check_lr_groups(domain, config, data, methods, pt_seeds[0], device)
                encoders, emb_dims, learned, phis = {}, {}, {}, {}
                for method, seed in ((m, s) for m in methods for s in pt_seeds):
                    name = _run_name(method.name, seed, pt_seeds)
                    phase = f"{setting}/{name}"
                    built = _placed(domain.pretraining(config, data, method, seed, device), device)
                    if method.phi == "random":
                        built = replace(built, metaparams=_random_phi(built.metaparams, seed))
                    emb_dims[name] = built.emb_dim
                    if not method.pretrain:
                        encoders[name] = built.encoder(built.params)
                        continue
                    if not session.done(phase):
                        task = bars.add_task(f"{setting}: {method.label}" + (f" (seed {seed})" if len(pt_seeds) > 1 else ""),
                                             total=config.pretrain.steps, info="")
                        _pretrain(session, phase, built, config, method, seed, dist, device,
                                  lambda s, t=task: bars.update(t, completed=s))
                    result = session[phase]
                    if hasattr(built.problem, "load_state_dict") and result["problem"] is not None:
                        built.problem.load_state_dict(result["problem"])
                    encoders[name] = built.encoder(result["params"])
                    summary["pretraining"][phase] = result["health"]
                    if method.phi == "learned":
                        phis.setdefault(method.label, []).append(result["metaparams"])
                        described = domain.describe(config, data, method, result["metaparams"])
                        if len(pt_seeds) == 1:
                            learned[method.name] = described
                        else:  # the first seed's at the top (plots), every seed's below
                            learned.setdefault(method.name, {**described, "by_pretrain_seed": {}})
                            learned[method.name]["by_pretrain_seed"][str(seed)] = described
                downstream = domain.downstream(config, data)
                rows = _evaluate(session, setting, encoders, emb_dims, downstream, config.evaluation, bars, device)
                summary["settings"][setting] = {
                    "metric": downstream.metric,
                    "sizes": {k: len(v) for k, v in downstream.labels.items()},
                    "ci_over": "pretraining seeds" if len(pt_seeds) > 1 else "fine-tuning seeds",
                    "scores": _aggregate(rows, methods, config.evaluation, pt_seeds),
                    "gains": _gains(rows, domain, methods, config.evaluation, pt_seeds),
                    "learned": learned,
                    "agreement": _agreement(phis),
                    "data": domain.data_summary(config, data),
                }
    finally:
        session.close()
    summary["wall_seconds"] = round(session.wall_seconds, 1)  # over every session of this run (resumes too)
    if is_main:
        write_summary(folder, summary)
        write_plots(domain, folder, summary)
    return summary


def _check_lr_groups(domain: Domain, config: Any, data: Any, methods: Sequence[Method], seed: int,
                     device: torch.device) -> None:
    """Every ``meta.lr_groups`` key the user set must be the prefix of a φ entry of a meta-learned
    method of this run (checked before any phase runs; φ is only built when there is such a key)."""
    exempt = getattr(getattr(type(config)(), "meta", None), "lr_groups", {})  # the job's defaults
    if all(key in exempt for key in config.meta.lr_groups):
        return
    from .rng import capture_rng, restore_rng

    rng = capture_rng()  # building may seed the global generators: leave them as they were
    try:
        keys = [k for m in methods if m.phi == "learned"
                for k in domain.pretraining(config, data, m, seed, device).metaparams]
    finally:
        restore_rng(rng)
    config.meta.check_lr_groups(keys, exempt)


def _agreement(phis: Mapping[str, list[Params]]) -> dict[str, Any]:
    """Per learned method and φ entry, the Spearman agreement of the pre-training seeds' φ
    (:func:`metapt.evaluation.seed_agreement`); empty with one pre-training seed."""
    out: dict[str, Any] = {}
    for label, runs in phis.items():
        if len(runs) < 2:
            continue
        for key in runs[0]:
            if runs[0][key].numel() >= 2:
                vectors = [r[key].detach().double().cpu().reshape(-1).numpy() for r in runs]
                out.setdefault(label, {})[key] = seed_agreement(vectors)
    return out


def _run_name(method: str, seed: int, pt_seeds: Sequence[int]) -> str:
    """A method's name in phase and result keys: ``method``, or ``method/seed3`` with several seeds."""
    return method if len(pt_seeds) == 1 else f"{method}/seed{seed}"


def parse_phase(phase: str, default_seed: int) -> tuple[str, str, int]:
    """(setting, method, pre-training seed) of a phase key, ``SETTING/METHOD`` (the seed is then
    ``default_seed``) or ``SETTING/METHOD/seedN``: the inverse of the names the runner gives phases."""
    setting, _, name = phase.partition("/") if "/" in phase else ("", "", phase)
    method, _, seed = name.partition("/seed")
    return setting, method, int(seed) if seed.isdigit() else default_seed


def _random_phi(phi: Params, seed: int) -> Params:
    """φ₀ plus standard normal noise, drawn from the pre-training seed (a random weighting)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + 7)
    return {k: v + torch.randn(v.shape, generator=g, dtype=v.dtype).to(v.device) for k, v in phi.items()}


def _pretrain(session: Session, phase: str, built: Pretraining, config: Any, method: Method, seed: int, dist: Any,
              device: torch.device, progress: Callable[[int], None]) -> None:
    """One pre-training phase through MetaPretrainer, checkpointed by the session; records its result."""
    trainer = build_trainer(built, config, method, seed, dist, device)
    session.train(phase, trainer, config.pretrain.steps, built.problem, progress=progress)
    session.record(phase, {
        "params": {k: v.detach() for k, v in trainer.params.items()},
        "metaparams": trainer.averaged_metaparams,  # the live φ unless meta.average says otherwise
        "problem": built.problem.state_dict() if hasattr(built.problem, "state_dict") else None,
        "health": {"meta_steps": trainer.meta_step_count, "skipped_meta_steps": trainer.skipped,
                   "rejected_heads": trainer.rejected_heads},
    })


def build_trainer(built: Pretraining, config: Any, method: Method, seed: int, dist: Any = None,
                  device: torch.device = torch.device("cpu")) -> MetaPretrainer:
    """The :class:`MetaPretrainer` of one phase, as the runner configures it from ``config``
    (seeds this process's dropout and other draws from ``seed``; checks the device placement).
    Benchmarks that drive phases themselves (e.g. a black-box search over φ) start here."""
    meta = config.meta
    rank = dist.rank if dist is not None else 0
    torch.manual_seed(seed * 1_000_003 + 1 + rank)  # dropout and other draws; per process
    learn = method.phi == "learned" and bool(built.metaparams)
    phi = built.metaparams if built.metaparams else {}
    problem = OnDevice(built.problem, device) if device.type != "cpu" else built.problem
    problem = dist.shard(problem) if dist is not None else problem
    strategy: Strategy | None
    if dist is not None and dist.distributed:
        strategy = dist.strategy(sync_buffers_of=built.buffers)
    else:
        strategy = ReusePTGraph() if meta.reuse_pt_graph and learn else None
    trainer = trainer_from_config(problem, built.params, built.head, phi, pt_lr=config.pretrain.lr, meta=meta,
                                  learn=learn, strategy=strategy)
    check_device(trainer, device)
    return trainer


def trainer_from_config(problem: MetaProblem, params: Params, head: Params, metaparams: Params, *, pt_lr: float,
                        meta: Any, learn: bool = True, strategy: Strategy | None = None) -> MetaPretrainer:
    """The one construction of a :class:`MetaPretrainer` from a run's configuration: Adam on θ at
    ``pt_lr``; φ's optimiser from ``meta`` (:class:`metapt.schema.MetaConfig`: LazyAdam with
    ``meta.lr_groups``); SGD at ``meta.inner_lr`` for the unrolled FT steps; ``meta.solver``'s
    estimator; ``meta``'s schedule (no meta-steps unless ``learn``). Every phase of a run
    (:func:`build_trainer`) and the diagnostics of a run's state are built here, so a checkpoint's
    optimiser states load in either."""
    keys = list(metaparams)
    return MetaPretrainer(
        problem, params, head, metaparams,
        pt_optimizer=lambda ps: torch.optim.Adam(ps, lr=pt_lr),
        meta_optimizer=lambda ps: _meta_optimizer(meta, dict(zip(keys, ps))),
        inner_optimizer=sgd(meta.inner_lr),
        estimator=meta.solver.estimator(pt_lr),
        schedule=meta.schedule(learn_phi=learn),
        strategy=strategy,
    )


def _meta_optimizer(meta: Any, phi: Params) -> torch.optim.Optimizer:
    """Adam on φ with the configured per-key rates (an optimiser of nothing when φ is empty).

    :class:`metapt.optim.LazyAdam`: on dense hypergradients exactly Adam; on row-sparse ones
    (example weights) it updates only the rows a meta-step touched, at a cost independent of |φ|.
    """
    if not phi:
        return torch.optim.SGD([torch.zeros(0, requires_grad=True)], lr=0.0)
    return LazyAdam(meta.param_groups(phi), lr=meta.lr, betas=(meta.momentum, 0.999))


# ---- devices ----------------------------------------------------------------------------------


def resolve_device(setting: str, dist: Any = None) -> torch.device:
    """``auto``: CUDA when available, else CPU. Under torchrun with CUDA, process r takes
    ``cuda:LOCAL_RANK`` (the distributed context's device), whatever index was named."""
    if setting == "auto":
        setting = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(setting)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {setting!r}: CUDA is not available on this machine; use device=cpu or auto")
        if dist is not None and dist.distributed:
            if dist.device.type != "cuda":
                raise ConfigError(f"device {setting!r} under torchrun needs the NCCL backend; launch with "
                                  "`metapt run` (which picks it from the config) or use device=cpu")
            return dist.device
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device {setting!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


class OnDevice:
    """A problem whose batches (of every stream) are moved to ``device``; everything else is the problem's."""

    def __init__(self, problem: MetaProblem, device: torch.device):
        self.base, self.device = problem, device

    def pretrain_batch(self, index: int) -> Any:
        return to_device(self.base.pretrain_batch(index), self.device)

    def finetune_batch(self, index: int) -> Any:
        return to_device(self.base.finetune_batch(index), self.device)

    def metaval_batch(self, index: int) -> Any:
        return to_device(self.base.metaval_batch(index), self.device)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.base, name)


def _placed(built: Pretraining, device: torch.device) -> Pretraining:
    move = lambda tree: {k: v.to(device) for k, v in tree.items()}  # noqa: E731
    return replace(built, params=move(built.params), head=move(built.head), metaparams=move(built.metaparams))


def check_device(trainer: MetaPretrainer, device: torch.device) -> None:
    """Raise unless θ, ψ, φ, their optimisers' states and a batch of every stream are on ``device``."""
    off = []

    def visit(name: str, value: Any) -> None:
        if isinstance(value, torch.Tensor):
            if value.device.type != device.type or (device.index is not None and value.device.index != device.index):
                off.append(f"{name} ({value.device})")
        elif isinstance(value, Mapping):
            for k, v in value.items():
                visit(f"{name}.{k}", v)
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                visit(f"{name}[{i}]", v)
        elif hasattr(value, "to_dict"):  # a PyG batch
            visit(name, value.to_dict())

    for group in ("params", "head", "metaparams"):
        visit(group, getattr(trainer, group))
    for name, opt in (("pt optimiser", trainer.pt_opt), ("meta optimiser", trainer.meta_opt)):
        visit(name, {str(i): st for i, st in enumerate(opt.state.values())})
    problem = trainer.problem
    visit("pretrain batch", problem.pretrain_batch(0))
    visit("finetune batch", problem.finetune_batch(0))
    visit("metaval batch", problem.metaval_batch(0))
    if off:
        raise RuntimeError(f"not on {device}: " + ", ".join(off[:8]) + (f" and {len(off) - 8} more" if len(off) > 8 else ""))


# ---- evaluation -------------------------------------------------------------------------------


def _evaluate(session: Session, setting: str, encoders: Mapping[str, nn.Module], emb_dims: Mapping[str, int],
              downstream: Downstream, ev: EvalConfig, bars, device: torch.device) -> list[dict[str, Any]]:
    """Every (method, mode, label fraction, seed) unit, each recorded once by the session."""
    modes = ev.modes()
    total = len(encoders) * len(ev.label_fractions) * ev.seeds * sum(c.epochs for c in modes.values())
    task = bars.add_task(f"{setting}: fine-tune and score", total=total, info="")
    rows = []
    train_labels = downstream.labels["train"]
    for name, encoder in encoders.items():
        method, _, seed_part = name.partition("/seed")
        for mode, cfg in modes.items():
            for fraction in ev.label_fractions:
                for seed in range(ev.seeds):
                    key = f"eval/{setting}/{name}/{mode}/{fraction:g}/{seed}"
                    if not session.done(key):
                        subset = label_subset(train_labels, fraction, seed)
                        score = finetune_and_score(
                            encoder, emb_dims[name], downstream.num_tasks,
                            downstream.iterate(subset, ev.min_batches_per_epoch), cfg, seed,
                            progress=lambda: bars.advance(task), metric=downstream.metric, device=device)
                        session.record(key, {"train_examples": int(len(subset)), **score})
                    else:
                        bars.advance(task, cfg.epochs)
                    rows.append({"method": method, "pt_seed": int(seed_part) if seed_part else None, "mode": mode,
                                 "fraction": fraction, "seed": seed, **session[key]})
    return rows


def _aggregate(rows: list[dict[str, Any]], methods: Sequence[Method], ev: EvalConfig,
               pt_seeds: Sequence[int]) -> dict[str, Any]:
    """Mean ± 95 % CI per method, mode and label fraction: over fine-tuning seeds with one
    pre-training seed; over pre-training seeds (of each one's mean over fine-tuning seeds) with several."""
    out: dict[str, Any] = {}
    for method in methods:
        for mode in ev.modes():
            for fraction in ev.label_fractions:
                mine = [r for r in rows if (r["method"], r["mode"], r["fraction"]) == (method.name, mode, fraction)]
                tests = [r["test"] for r in mine]
                cell = {"test": tests, "valid": [r["valid"] for r in mine],
                        "best_epoch": [r["best_epoch"] for r in mine], "nonfinite": nonfinite(tests)}
                if len(pt_seeds) > 1:
                    per_seed = [mean_ci95([r["test"] for r in mine if r["pt_seed"] == s])[0] for s in pt_seeds]
                    cell["per_pretrain_seed"] = per_seed
                    cell["mean"], cell["ci95"] = mean_ci95(per_seed)
                else:
                    cell["mean"], cell["ci95"] = mean_ci95(tests)
                out.setdefault(method.label, {}).setdefault(mode, {})[f"{fraction:g}"] = cell
    return out


def _gains(rows: list[dict[str, Any]], domain: Domain, methods: Sequence[Method], ev: EvalConfig,
           pt_seeds: Sequence[int]) -> dict[str, Any]:
    """Paired differences: per fine-tuning seed (same label subset, head init and batch order) with
    one pre-training seed; per pre-training seed (of the per-seed means) with several."""
    names = {m.name for m in methods}
    table = {(r["method"], r["pt_seed"], r["mode"], r["fraction"], r["seed"]): r["test"] for r in rows}
    seeds = pt_seeds if len(pt_seeds) > 1 else [None]
    out: dict[str, Any] = {}
    for better, base in domain.gains:
        if better not in names or base not in names:
            continue
        label = f"{domain.methods[better].label} − {domain.methods[base].label}"
        for mode in ev.modes():
            for fraction in ev.label_fractions:
                per_ft = {p: [table[(better, p, mode, fraction, s)] - table[(base, p, mode, fraction, s)]
                              for s in range(ev.seeds)] for p in seeds}
                diffs = per_ft[None] if len(seeds) == 1 else [mean_ci95(per_ft[p])[0] for p in seeds]
                mean, ci = mean_ci95(diffs)
                out.setdefault(label, {}).setdefault(mode, {})[f"{fraction:g}"] = {
                    "mean": mean, "ci95": ci, "diff": diffs, "nonfinite": nonfinite(diffs)}
    return out


# ---- summary and plots ------------------------------------------------------------------------


def write_summary(folder: RunFolder, summary: dict[str, Any]) -> None:
    """``summary.json`` (strict JSON: non-finite numbers become null) and ``summary.md``."""
    write_text_atomic(folder.path / "summary.json", json.dumps(jsonable(summary), indent=2, allow_nan=False))
    write_text_atomic(folder.path / "summary.md", summary_markdown(summary))


def _cell(v: Mapping[str, Any]) -> str:
    mean, ci, bad = v.get("mean"), v.get("ci95"), v.get("nonfinite", 0)
    if mean is None or not math.isfinite(mean):
        text = "n/a"
    else:
        text = f"{mean:.3f}" + (f" ± {ci:.3f}" if ci is not None and math.isfinite(ci) else "")
    return text + (f" ({bad} non-finite)" if bad else "")


def _rho(a: Mapping[str, Any]) -> str:
    mean, loo, ci = a.get("pairwise_mean"), a.get("leave_one_out_mean"), a.get("leave_one_out_ci95")
    if mean is None or not math.isfinite(mean):
        return "undefined (a seed's φ did not move)"
    text = f"{mean:.2f} over pairs; each seed against the others' mean {loo:.2f}"
    return text + (f" ± {ci:.2f} (95 % CI)" if ci is not None and math.isfinite(ci) else "")


def summary_markdown(summary: Mapping[str, Any]) -> str:
    over = "pre-training seeds" if summary["config"]["pretrain"].get("seeds", 1) > 1 else "fine-tuning seeds"
    lines = [f"# {summary.get('job', 'run')}: downstream test scores, mean ± 95 % CI over {over}", ""]
    for setting, res in summary["settings"].items():
        metric = "AUROC" if res["metric"] == "auroc" else "MSE (lower is better)"
        columns = [(mode, fr) for by_mode in list(res["scores"].values())[:1] for mode, by_fr in by_mode.items()
                   for fr in by_fr]
        head = ["method"] + [f"{mode}, {float(fr):.0%} labels" if len({f for _, f in columns}) > 1 else mode
                             for mode, fr in columns]
        lines += [f"## {setting}: test {metric}", "", "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
        for method, by_mode in res["scores"].items():
            lines.append(f"| {method} | " + " | ".join(_cell(by_mode[m][f]) for m, f in columns) + " |")
        for label, by_mode in res.get("gains", {}).items():
            lines.append(f"| *{label}* (paired) | " + " | ".join(_cell(by_mode[m][f]) for m, f in columns) + " |")
        cells = [c for by_mode in res["scores"].values() for by_fr in by_mode.values() for c in by_fr.values()]
        if cells and all(c.get("nonfinite", 0) == len(c["test"]) for c in cells):
            lines += ["", f"**Every score of {setting} is NaN**: no fine-tuning run could be scored (e.g. a "
                      "split with only one class); see summary.json for the counts."]
        for label, by_key in res.get("agreement", {}).items():
            for key, a in by_key.items():
                lines += ["", f"Seed agreement, {label} ({key}): Spearman ρ of the learned φ across "
                          f"{a['seeds']} pre-training seeds {_rho(a)}."]
        sizes = ", ".join(f"{k} {v}" for k, v in res["sizes"].items())
        lines += ["", f"Downstream examples: {sizes}. The epoch is chosen on 'valid'; test is read at that epoch.", ""]
    health = summary.get("pretraining", {})
    skipped = sum(int(h.get("skipped_meta_steps", 0)) for h in health.values())
    rejected = sum(int(h.get("rejected_heads", 0)) for h in health.values())
    meta_steps = sum(int(h.get("meta_steps", 0)) for h in health.values())
    pt = summary["config"]["pretrain"]
    n_pt = pt.get("seeds", 1)
    if n_pt > 1:
        seeds = f"Each method is pre-trained with {n_pt} seeds ({pt['seed']}–{pt['seed'] + n_pt - 1}): the CIs " \
                "and paired gains are over pre-training seeds, of each seed's mean over fine-tuning seeds."
    else:
        seeds = f"Each method is pre-trained once (seed {pt['seed']}): the CIs cover fine-tuning seeds only."
    lines.append(f"Meta-steps: {meta_steps}, skipped (unusable hypergradient): {skipped}, "
                 f"non-finite heads rejected: {rejected}. {seeds}")
    lines.append(f"Wall time: {summary.get('wall_seconds', float('nan'))} s.")
    return "\n".join(lines) + "\n"


def write_plots(domain: Domain, folder: RunFolder, summary: Mapping[str, Any]) -> None:
    """(Re)draw the run's plots from ``metrics.jsonl`` and the summary."""
    out = folder.path
    rows = read_jsonl(out / "metrics.jsonl") if (out / "metrics.jsonl").is_file() else []
    keys = ["pt_loss", "meta_loss", "hypergrad_norm", "solver_residual"]
    keys += sorted({k for r in rows for k in r if k.startswith("phi/")})
    plot_curves(rows, keys, out / "losses.png", title="Pre-training and meta-learning")
    for setting, res in summary["settings"].items():
        methods = list(res["scores"])
        columns = [(mode, fr) for mode, by_fr in res["scores"][methods[0]].items() for fr in by_fr]
        metric = "test AUROC" if res["metric"] == "auroc" else "test MSE"
        series = {f"{mode} {float(fr):.0%}" if len(columns) > len({m for m, _ in columns}) else mode:
                  [(res["scores"][k][mode][fr]["mean"] if res["scores"][k][mode][fr]["mean"] is not None else math.nan,
                    res["scores"][k][mode][fr]["ci95"] if res["scores"][k][mode][fr]["ci95"] is not None else math.nan)
                   for k in methods] for mode, fr in columns}
        auroc = res["metric"] == "auroc"
        plot_bars(methods, series, out / f"scores_{_slug(setting)}.png",
                  ylabel=f"{metric}, {'higher' if auroc else 'lower'} is better\n(mean ± 95 % CI over seeds)",
                  title=f"{setting}: downstream {metric} per method", reference=(0.5, "chance (AUROC 0.5)") if auroc else None,
                  bounds=(0.0, 1.0) if auroc else None)
    domain.plots(out, summary)


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in text)
