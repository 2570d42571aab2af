"""The ECG experiment end to end: pre-train several ways, fine-tune with few labels, compare.

Methods (same PT steps, same batches and default-augmented views, same θ₀ for every SimCLR run):

* ``no_pretrain`` -- a randomly initialised encoder (one init per seed);
* ``simclr`` -- SimCLR with the default augmentations only, no warp network at all;
* ``simclr_fixed_warp`` -- SimCLR plus the warp network frozen at its initial φ₀ (a control:
  what a warp does without meta-learning; the paper's baseline had this by accident);
* ``simclr_meta_warp`` -- SimCLR whose views also go through the learned warp φ, meta-learned
  online with :class:`metapt.MetaPretrainer` (implicit hypergradient through PT).

Evaluation: the downstream task (PVC vs other beats for the beat layout, the 5 PTB-XL
superclasses multi-label) on test records no PT, FT or meta-step has seen; for every label
fraction and seed, a seeded subset of the FT-train beats trains a fresh linear head, either
with the whole encoder (full fine-tuning) or on frozen features (linear probe); the epoch is
picked on MetaFT-validation; test AUROC is reported as mean ± 95 % CI over seeds, and each
gain (:data:`GAINS`) as the mean ± CI of the per-seed paired difference (same seed, same label
subset, same head init). Pre-training runs once per method (``PretrainConfig.seed``), so the
CIs cover fine-tuning variation, not pre-training variation.

Run-folder layout (``out``)::

    config.json          the resolved configuration and data summary
    metrics.jsonl        per-step metrics, one phase per pre-trained method (phase = method name)
    evaluation.jsonl     one row per (method, mode, label fraction, seed)
    warp_phi.npz         the learned warp φ (np.load(..., allow_pickle=False))
    encoder_<method>.npz the pre-trained encoder weights
    summary.json         AUROC mean ± CI per method/mode/fraction, paired gains, timing
    summary.md           the same as a Markdown table
    warp_examples.png  warp_magnitude.png  auroc.png
"""

from __future__ import annotations

import enum
import json
import math
import platform
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from ...evaluation import FinetuneConfig, finetune_and_score, mean_ci95
from ...hypergrad import Neumann, sgd
from ...metrics import JsonlLogger, progress_bar, read_jsonl
from ...problem import Params
from ...runs import RunFolder, Session, write_text_atomic
from ...schema import CheckpointConfig, jsonable, schema
from ...trainer import MetaPretrainer, MetaSchedule, NonFiniteLossError
from .data import ECGDataset, detect_layout, load_beat_folder, load_ptbxl
from .problem import (
    ECGProblemConfig,
    ECGSimCLRProblem,
    ECGSplit,
    PTBXLFolds,
    RecordFractions,
    label_subset,
    split_ecg,
)

__all__ = [
    "DataConfig", "ECGJobConfig", "EvalConfig", "MetaConfig", "Method", "ECG_PRESETS", "PretrainConfig", "preset_config", "markdown_table",
    "resolve_config", "run_ecg",
]


class Method(str, enum.Enum):
    """What produces the encoder that is fine-tuned."""

    NO_PRETRAIN = "no_pretrain"
    SIMCLR = "simclr"
    SIMCLR_FIXED_WARP = "simclr_fixed_warp"
    SIMCLR_META_WARP = "simclr_meta_warp"

    @property
    def uses_warp(self) -> bool:
        return self in (Method.SIMCLR_FIXED_WARP, Method.SIMCLR_META_WARP)


#: Paired comparisons reported (better, baseline): what meta-learning adds over a fixed warp and
#: over plain SimCLR, and what SimCLR adds over no pre-training.
GAINS: tuple[tuple[Method, Method], ...] = (
    (Method.SIMCLR_META_WARP, Method.SIMCLR),
    (Method.SIMCLR_META_WARP, Method.SIMCLR_FIXED_WARP),
    (Method.SIMCLR_FIXED_WARP, Method.SIMCLR),
    (Method.SIMCLR, Method.NO_PRETRAIN),
)


@schema
class DataConfig:
    """How the folder becomes the four groups.

    Attributes:
        window, resample_fs: beat layout: samples per beat window and optional resampling.
        record_fractions: beat layout: shares of the records per group (split by record).
        min_positives: beat layout: positives each of FT-train, MetaFT-val and test must hold.
        split_seed: beat layout: seed of the record split.
        max_labelled_per_record: cap on the FT-train, MetaFT-validation and test beats per
            record (a seeded uniform subsample, so each record keeps its PVC share; None keeps
            all). It bounds the cost of fine-tuning and of the per-epoch validation on a CPU, and
            weights the test records more evenly. Pre-training keeps every beat.
        cap_keeps_positives: under the cap, keep a record's positive beats first (up to half
            the cap) and fill with the rest, so a small cap still leaves both classes to score
            (the ``quick`` preset; the uniform subsample keeps each record's PVC share).
        ptbxl_folds: PTB-XL: strat_fold groups.
        ptbxl_sampling_rate, ptbxl_max_records: PTB-XL: records100/ or records500/, and a cap
            on records for quick runs.
        cache_dir: where the loader keeps its npz cache (None: no cache).
    """

    window: int = 256
    resample_fs: float | None = None
    record_fractions: RecordFractions = RecordFractions()
    min_positives: int = 20
    split_seed: int = 0
    max_labelled_per_record: int | None = None
    cap_keeps_positives: bool = False
    ptbxl_folds: PTBXLFolds = PTBXLFolds()
    ptbxl_sampling_rate: int = 100
    ptbxl_max_records: int | None = None
    cache_dir: str | None = None


@schema
class PretrainConfig:
    """Pre-training shared by both SimCLR methods: steps, Adam lr, seed of θ₀ and φ₀."""

    steps: int = 2000
    lr: float = 1e-3
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or not self.lr > 0:
            raise ValueError(f"PretrainConfig: steps must be >= 1 and lr > 0, got {self}")


@schema
class MetaConfig:
    """The meta-learning of the warp.

    The defaults average 4 hypergradients (of 4 past PT batches) per meta-step, every 20 PT
    steps: on MIT-BIH the hypergradients of single PT batches are nearly orthogonal (the PT
    batch's augmentation and warp-noise draws dominate), so fewer, averaged steps beat more,
    noisier ones at the same cost (see benchmarks/results/ecg_auroc.md).

    Attributes:
        meta_lr: Adam learning rate of the warp's scale CNN.
        magnitude_lr: Adam learning rate of the global log-magnitude; a step of 0.03 changes
            the warp size by 3 %, whatever its scale.
        inner_lr: SGD learning rate of the unrolled head steps (and of the warm-up head steps).
        neumann_steps: M, Hessian-vector products per inverse-HVP (paper: 1).
        neumann_alpha: α of the Neumann series; None uses the PT learning rate (the paper).
        schedule: meta-step interval, K, meta-batches averaged, warm-up.
    """

    meta_lr: float = 1e-3
    magnitude_lr: float = 0.03
    inner_lr: float = 0.1
    neumann_steps: int = 1
    neumann_alpha: float | None = None
    schedule: MetaSchedule = MetaSchedule(meta_interval=20, unroll_steps=1, meta_batches=4, warmup_steps=150)

    def __post_init__(self) -> None:
        if not (self.meta_lr >= 0 and self.magnitude_lr >= 0 and self.inner_lr > 0):
            raise ValueError(f"MetaConfig: learning rates must be >= 0 (inner_lr > 0), got {self}")


@schema
class EvalConfig:
    """Downstream evaluation.

    Attributes:
        seeds: one label subset, head init and batch order per seed (>= 5 for a CI worth having).
        label_fractions: shares of the FT-train examples that keep their labels.
        full_finetune: fine-tune encoder and head (None: skip).
        linear_probe: train only the head on frozen features (None: skip).
        min_batches_per_epoch: an epoch over a tiny label subset repeats it up to this many
            batches, so 1 % of the labels still gets enough optimiser steps per validation.
    """

    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    label_fractions: tuple[float, ...] = (0.01, 0.1, 1.0)
    full_finetune: FinetuneConfig | None = FinetuneConfig(epochs=10, lr=1e-3, batch_size=64)
    linear_probe: FinetuneConfig | None = FinetuneConfig(linear_probe=True, epochs=30, lr=1e-2, batch_size=64)
    min_batches_per_epoch: int = 8

    def __post_init__(self) -> None:
        if not self.seeds:
            raise ValueError("EvalConfig: give at least one seed (5 or more for a confidence interval)")
        if not self.label_fractions or any(not 0 < f <= 1 for f in self.label_fractions):
            raise ValueError(f"EvalConfig: label fractions must be in (0, 1], got {self.label_fractions}")
        if self.full_finetune is None and self.linear_probe is None:
            raise ValueError("EvalConfig: enable full_finetune, linear_probe or both")
        if self.linear_probe is not None and not self.linear_probe.linear_probe:
            raise ValueError("EvalConfig: linear_probe needs FinetuneConfig(linear_probe=True, ...)")

    def modes(self) -> dict[str, FinetuneConfig]:
        out = {"full_finetune": self.full_finetune, "linear_probe": self.linear_probe}
        return {k: v for k, v in out.items() if v is not None}


@schema
class ECGJobConfig:
    """Everything :func:`run_ecg` does, in one resolvable, JSON-able object.

    ``data_dir`` is the folder of WFDB records (``--data`` on the command line).
    """

    job: Literal["ecg"] = "ecg"
    data_dir: str | None = None
    checkpoint: CheckpointConfig = CheckpointConfig()
    data: DataConfig = DataConfig()
    problem: ECGProblemConfig = ECGProblemConfig()
    pretrain: PretrainConfig = PretrainConfig()
    meta: MetaConfig = MetaConfig()
    evaluation: EvalConfig = EvalConfig()
    methods: tuple[Method, ...] = tuple(Method)


ECG_PRESETS = ("default", "benchmark", "quick")


def preset_config(name: str) -> ECGJobConfig:
    """A named configuration, from the YAML presets that ship with metapt (``metapt config ecg``).

    ``default`` (preset ``ecg``): 3000 PT steps on a CPU-sized problem (beats resampled to
    180 Hz, a 64K-parameter 1-D ResNet with GroupNorm, a warp starting at 3 % of the window),
    about 15 minutes on 2 cores for MIT-BIH; ``benchmark`` (``ecg-benchmark``): 11 minutes on
    one thread (benchmarks/ecg_auroc.py); ``quick`` (``ecg-quick``): seconds, for tests.
    """
    if name not in ECG_PRESETS:
        raise ValueError(f"unknown ECG preset {name!r}; choose one of {list(ECG_PRESETS)} or pass an ECGJobConfig")
    from ...config import load_config  # the presets are YAML; the loader validates them

    return load_config("ecg" if name == "default" else f"ecg-{name}")


# --------------------------------------------------------------------------- entry point


def run_ecg(
    out: Path,
    data: Path,
    *,
    preset: str | ECGJobConfig = "default",
    seeds: Sequence[int] | None = None,
    label_fractions: Sequence[float] | None = None,
    pretrain_steps: int | None = None,
    resume: bool = False,
    reevaluate: bool = False,
) -> dict[str, Any]:
    """Run the ECG protocol on the folder ``data`` and write the run folder ``out``.

    Args:
        out: run folder (created if needed; a previous run's files in it are replaced).
        data: a beat-layout folder (REC.hea/.dat + REC_beats.csv) or a PTB-XL folder
            (ptbxl_database.csv, scp_statements.csv, records100/); the layout is detected.
        preset: a name in :data:`ECG_PRESETS` ("default", "benchmark", "quick") or an
            :class:`ECGJobConfig`.
        seeds: fine-tuning seeds (default: the preset's, five).
        label_fractions: shares of FT-train labels to fine-tune with (default 1 %, 10 %, 100 %).
        pretrain_steps: PT steps of each SimCLR method (default: the preset's).
        resume: continue from the run folder's newest checkpoint (:class:`metapt.runs.Session`):
            finished methods and evaluation units are kept, the meta-warp phase continues
            mid-way, a plain SimCLR phase restarts from its own seed.
        reevaluate: with ``resume``, redo the evaluation from the pre-trained encoders.

    Returns:
        The summary (also in ``out/summary.json``): ``methods[method][mode][fraction]`` holds
        the test AUROC per seed with its mean and 95 % CI half-width; ``gains["a - b"]`` the
        same for the per-seed paired differences (see :data:`GAINS`); ``learned_warp`` the
        final warp's magnitude and mean shift; ``timing`` the PT and meta-step costs;
        ``data`` the groups' sizes, positives and records.

    Raises:
        ValueError: an unknown preset or a bad option (the message says what to change).
        ECGDataError: a problem with the data files (it names the file).
    """
    config = resolve_config(preset, seeds, label_fractions, pretrain_steps)
    folder = out if isinstance(out, RunFolder) else RunFolder(out)
    out = folder.path
    out.mkdir(parents=True, exist_ok=True)
    session = Session(folder, config.checkpoint, resume=resume)
    if reevaluate:
        session.forget("eval/")
    started = time.perf_counter()
    ds, split = load_and_split(Path(data), config.data)
    problem_for = {
        warp: ECGSimCLRProblem.from_dataset(ds, split, replace(config.problem, use_warp=warp)) for warp in (False, True)
    }
    data_summary = _data_summary(ds, split, data)
    _write_json(out / "config.json", {"config": jsonable(asdict(config)), "data": data_summary})

    summary: dict[str, Any] = {"methods": {}, "timing": {}, "data": data_summary}
    encoders: dict[Method, nn.Module] = {}
    with progress_bar() as bars:
        for index, method in enumerate(config.methods):
            if method is Method.NO_PRETRAIN:
                continue
            problem = problem_for[method.uses_warp]
            phase = f"pretrain/{method.value}"
            if not session.done(phase):
                torch.manual_seed(config.pretrain.seed * 1_000 + index)  # each phase's own augmentation draws
                params, timing, phi = _pretrain(problem, method, config, session, bars)
                session.record(phase, {"params": {k: v.detach() for k, v in params.items()},
                                       "phi": phi or {}, "timing": timing})
            params, timing, phi = session[phase]["params"], session[phase]["timing"], session[phase]["phi"]
            summary["timing"][method.value] = timing
            encoders[method] = problem.encoder_module(params)
            np.savez(out / f"encoder_{method.value}.npz",
                     **{k: v.detach().numpy() for k, v in encoders[method].state_dict().items()})
            if method is Method.SIMCLR_META_WARP:
                np.savez(out / "warp_phi.npz", **{k: v.detach().numpy() for k, v in phi.items()})
                summary["learned_warp"] = dict(problem.describe_metaparams(phi))
                _plot_warp_examples(problem, phi, out / "warp_examples.png")
                _plot_magnitude(out / "metrics.jsonl", out / "warp_magnitude.png")
        rows = _evaluate(ds, split, problem_for[False], encoders, config, session, bars)
    session.close()

    summary["methods"] = _aggregate(rows, config)
    summary["gains"] = {
        f"{a.value} - {b.value}": _paired_gain(rows, config, a, b) for a, b in GAINS
        if a in config.methods and b in config.methods
    }
    summary["wall_seconds"] = time.perf_counter() - started
    summary["machine"] = {"python": platform.python_version(), "torch": torch.__version__,
                          "threads": torch.get_num_threads(), "processor": platform.processor() or platform.machine()}
    _write_json(out / "summary.json", summary)
    (out / "summary.md").write_text(markdown_table(summary, config))
    _plot_auroc(summary, config, out / "auroc.png")
    return summary


def resolve_config(
    preset: str | ECGJobConfig,
    seeds: Sequence[int] | None = None,
    label_fractions: Sequence[float] | None = None,
    pretrain_steps: int | None = None,
) -> ECGJobConfig:
    """The configuration :func:`run_ecg` runs: the preset with the given overrides, checked."""
    if isinstance(preset, ECGJobConfig):
        config = preset
    else:
        config = preset_config(preset)
    ev = config.evaluation
    if seeds is not None:
        ev = replace(ev, seeds=tuple(int(s) for s in seeds))
    if label_fractions is not None:
        ev = replace(ev, label_fractions=tuple(sorted(float(f) for f in label_fractions)))
    config = replace(config, evaluation=ev)
    if pretrain_steps is not None:
        config = replace(config, pretrain=replace(config.pretrain, steps=int(pretrain_steps)))
    warmup = config.meta.schedule.warmup_steps
    if Method.SIMCLR_META_WARP in config.methods and warmup >= config.pretrain.steps:
        raise ValueError(
            f"the meta-warp run would take no meta-step: warmup_steps={warmup} >= pretrain steps "
            f"{config.pretrain.steps}; raise pretrain_steps or lower MetaSchedule.warmup_steps"
        )
    return config


# --------------------------------------------------------------------------- data


def load_and_split(folder: Path, config: DataConfig) -> tuple[ECGDataset, ECGSplit]:
    """Load either layout and cut it into pre-train / FT-train / MetaFT-validation / test."""
    if detect_layout(folder) == "ptbxl":
        ds = load_ptbxl(folder, sampling_rate=config.ptbxl_sampling_rate,  # type: ignore[arg-type]
                        max_records=config.ptbxl_max_records, cache_dir=config.cache_dir)
    else:
        ds = load_beat_folder(folder, window=config.window, resample_fs=config.resample_fs, cache_dir=config.cache_dir)
    split = split_ecg(ds, config.record_fractions, config.ptbxl_folds, seed=config.split_seed,
                      min_positives=config.min_positives)
    if config.max_labelled_per_record is not None:
        split = _cap_labelled(ds, split, config.max_labelled_per_record, config.split_seed,
                              keep_positives=config.cap_keeps_positives)
    return ds, split


def _cap_labelled(ds: ECGDataset, split: ECGSplit, cap: int, seed: int, keep_positives: bool = False) -> ECGSplit:
    """At most ``cap`` examples per record in each labelled group (seeded, order kept)."""
    if cap < 1:
        raise ValueError(f"max_labelled_per_record must be >= 1 or None, got {cap}")
    rng = np.random.default_rng(seed + 7919)
    capped = {}
    for name in ("ft_train", "metaval", "test"):
        idx, keep = getattr(split, name), []
        for rec in np.unique(ds.patient_ids[idx]):
            mine = idx[ds.patient_ids[idx] == rec]
            if len(mine) <= cap:
                keep.append(mine)
            elif keep_positives:
                positive = ds.labels[torch.from_numpy(mine)].amax(1).numpy() > 0
                pos, neg = mine[positive], mine[~positive]
                pos = pos if len(pos) <= cap // 2 else rng.choice(pos, size=cap // 2, replace=False)
                neg = rng.choice(neg, size=min(cap - len(pos), len(neg)), replace=False)
                keep.append(np.sort(np.concatenate([pos, neg])))
            else:
                keep.append(np.sort(rng.choice(mine, size=cap, replace=False)))
        capped[name] = np.sort(np.concatenate(keep))
    return replace(split, **capped)


def _data_summary(ds: ECGDataset, split: ECGSplit, folder: Path) -> dict[str, Any]:
    groups = {}
    for name, idx in split.groups().items():
        y = ds.labels[torch.from_numpy(idx)]
        groups[name] = {"examples": int(len(idx)), "positives": [int(v) for v in y.sum(0)],
                        "records": len(split.records.get(name, ())),
                        "record_ids": list(split.records.get(name, ()))[:50]}
    return {"folder": str(folder), "layout": ds.layout, "classes": list(ds.class_names), "fs": ds.fs,
            "leads": list(ds.lead_names), "length": ds.length, "groups": groups}


# --------------------------------------------------------------------------- pre-training


def _pretrain(problem: ECGSimCLRProblem, method: Method, config: ECGJobConfig, session: Session,
              bars) -> tuple[Params, dict[str, float], Params | None]:
    """Pre-train θ (and meta-learn φ for the warp method); per-step metrics under phase = method."""
    pc, mc = config.pretrain, config.meta
    theta0 = problem.initial_params(pc.seed)
    task = bars.add_task(f"pre-train {method.value}", total=pc.steps, info="")
    stamps: list[float] = [time.perf_counter()]

    def tick(step: int) -> None:
        stamps.append(time.perf_counter())
        bars.update(task, completed=step)

    phi0 = problem.initial_metaparams(pc.seed)  # {} for the baseline
    if method is not Method.SIMCLR_META_WARP:
        session.log.phase = method.value
        params = _pretrain_plain(problem, theta0, phi0, pc, session.log, tick)
        phi = phi0 or None
    else:
        keys = list(phi0)

        def meta_optimizer(tensors: list[Tensor]) -> torch.optim.Optimizer:
            by_key = dict(zip(keys, tensors))
            return torch.optim.Adam([
                {"params": [t for k, t in by_key.items() if k != "log_magnitude"], "lr": mc.meta_lr},
                {"params": [by_key["log_magnitude"]], "lr": mc.magnitude_lr},
            ])

        trainer = MetaPretrainer(
            problem, theta0, problem.initial_head(), phi0,
            pt_optimizer=lambda ps: torch.optim.Adam(ps, lr=pc.lr),
            meta_optimizer=meta_optimizer,
            inner_optimizer=sgd(mc.inner_lr),
            solver=Neumann(steps=mc.neumann_steps, alpha=mc.neumann_alpha or pc.lr),
            schedule=mc.schedule,
        )
        session.train(method.value, trainer, pc.steps, problem, progress=tick)
        params, phi = trainer.params, {k: v.detach() for k, v in trainer.metaparams.items()}
    durations = np.diff(stamps)
    steps = np.arange(pc.steps - len(durations) + 1, pc.steps + 1)  # a resumed phase times its last steps
    sched = mc.schedule
    is_meta = (steps > sched.warmup_steps) & (steps % sched.meta_interval == 0)
    plain = durations[~is_meta] if method is Method.SIMCLR_META_WARP else durations
    timing = {"seconds": float(durations.sum()), "pt_step_seconds": float(np.median(plain))}
    if method is Method.SIMCLR_META_WARP and is_meta.any():
        meta_cost = float(np.median(durations[is_meta]) - np.median(plain))
        timing.update(meta_step_seconds=meta_cost, meta_step_cost_ratio=meta_cost / float(np.median(plain)),
                      meta_steps=int(is_meta.sum()))
    return params, timing, phi


def _pretrain_plain(problem: ECGSimCLRProblem, theta0: Params, phi: Params, pc: PretrainConfig, log: JsonlLogger,
                    tick: Callable[[int], None]) -> Params:
    """SimCLR with φ held fixed ({} for the baseline): exactly MetaPretrainer's PT step."""
    params = {k: v.detach().clone().requires_grad_(True) for k, v in theta0.items()}
    opt = torch.optim.Adam(list(params.values()), lr=pc.lr)
    for step in range(pc.steps):
        opt.zero_grad(set_to_none=True)
        loss = problem.pretrain_loss(params, phi, problem.pretrain_batch(step))
        if not torch.isfinite(loss):
            raise NonFiniteLossError(f"SimCLR loss became {loss.item()} at step {step}; lower the PT learning rate")
        loss.backward()
        opt.step()
        log.log(step + 1, {"pt_loss": float(loss.detach())})
        tick(step + 1)
    return params


# --------------------------------------------------------------------------- evaluation


Split = tuple[Tensor, Tensor]


def _iterate_fn(splits: Mapping[str, Split], min_batches: int) -> Callable[..., Iterator[Split]]:
    """``iterate(split, batch_size, shuffle, seed)`` for finetune_and_score; a shuffled epoch
    over a small subset repeats it (fresh permutations) until it has ``min_batches`` batches."""

    def iterate(name: str, batch_size: int, shuffle: bool, seed: int) -> Iterator[Split]:
        x, y = splits[name]
        n = len(x)
        if not shuffle:
            for s in range(0, n, batch_size):
                yield x[s:s + batch_size], y[s:s + batch_size]
            return
        g = torch.Generator().manual_seed(seed)
        per_pass = math.ceil(n / batch_size)
        for _ in range(max(1, math.ceil(min_batches / per_pass))):
            order = torch.randperm(n, generator=g)
            for s in range(0, n, batch_size):
                i = order[s:s + batch_size]
                yield x[i], y[i]

    return iterate


@torch.no_grad()
def _features(encoder: nn.Module, x: Tensor, batch_size: int = 512) -> Tensor:
    encoder.eval()
    return torch.cat([encoder(x[s:s + batch_size]) for s in range(0, len(x), batch_size)])


def _evaluate(ds: ECGDataset, split: ECGSplit, problem: ECGSimCLRProblem, encoders: Mapping[Method, nn.Module],
              config: ECGJobConfig, session: Session, bars) -> list[dict[str, Any]]:
    """Every (method, seed, label fraction, mode): fine-tune, pick the epoch on MetaFT-val, score test."""
    ev = config.evaluation
    modes = ev.modes()

    def take(idx: np.ndarray) -> Split:
        t = torch.from_numpy(idx)
        return ds.signals[t], ds.labels[t]

    ft, val, test = take(split.ft_train), take(split.metaval), take(split.test)
    n_runs = len(config.methods) * len(ev.seeds) * len(ev.label_fractions) * len(modes)
    task = bars.add_task("fine-tune and score", total=n_runs, info="")
    rows: list[dict[str, Any]] = []
    pretrained_features: dict[Method, dict[str, Split]] = {}
    for method in config.methods:
        for seed in ev.seeds:
            if method is Method.NO_PRETRAIN:
                encoder = problem.encoder_module(problem.initial_params(seed=10_000 + seed))
            else:
                encoder = encoders[method]
            feats: dict[str, Split] = {}
            if "linear_probe" in modes:
                if method in pretrained_features:
                    feats = pretrained_features[method]
                else:
                    feats = {name: (_features(encoder, s[0]), s[1]) for name, s in
                             (("ft", ft), ("valid", val), ("test", test))}
                    if method is not Method.NO_PRETRAIN:  # one encoder for every seed
                        pretrained_features[method] = feats
            for fraction in ev.label_fractions:
                subset = torch.from_numpy(label_subset(ft[1], fraction, seed))
                for mode, ft_config in modes.items():
                    if mode == "linear_probe":
                        # frozen encoder + linear head = a linear head on the frozen features
                        splits = {"train": (feats["ft"][0][subset], feats["ft"][1][subset]),
                                  "valid": feats["valid"], "test": feats["test"]}
                        model: nn.Module = nn.Identity()
                    else:
                        splits = {"train": (ft[0][subset], ft[1][subset]), "valid": val, "test": test}
                        model = encoder
                    key = f"eval/{method.value}/{mode}/{fraction}/{seed}"
                    if not session.done(key):
                        score = finetune_and_score(model, problem.embedding_dim, ds.labels.shape[1],
                                                   _iterate_fn(splits, ev.min_batches_per_epoch), ft_config, seed)
                        session.record(key, {"method": method.value, "mode": mode, "label_fraction": fraction,
                                             "seed": seed, "train_examples": int(len(subset)),
                                             "train_positives": int(ft[1][subset].sum()), **score})
                    rows.append(session[key])
                    bars.update(task, advance=1, info=f"{method.value} {mode} {fraction:g} seed {seed}")
    write_text_atomic(session.folder.path / "evaluation.jsonl",
                      "".join(json.dumps(jsonable(row)) + "\n" for row in rows))
    return rows


def _aggregate(rows: list[dict[str, Any]], config: ECGJobConfig) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for method in config.methods:
        out[method.value] = {}
        for mode in config.evaluation.modes():
            out[method.value][mode] = {}
            for fraction in config.evaluation.label_fractions:
                scores = [r["test_auroc"] for r in rows
                          if r["method"] == method.value and r["mode"] == mode and r["label_fraction"] == fraction]
                mean, ci = mean_ci95(scores)
                out[method.value][mode][str(fraction)] = {"test_auroc": scores, "mean": mean, "ci95": ci}
    return out


def _paired_gain(rows: list[dict[str, Any]], config: ECGJobConfig, better: Method, base: Method) -> dict[str, Any]:
    """Per-seed differences of test AUROC (same seed = same label subset and head init)."""
    table = {(r["method"], r["mode"], r["label_fraction"], r["seed"]): r["test_auroc"] for r in rows}
    out: dict[str, Any] = {}
    for mode in config.evaluation.modes():
        out[mode] = {}
        for fraction in config.evaluation.label_fractions:
            diffs = [table[(better.value, mode, fraction, s)] - table[(base.value, mode, fraction, s)]
                     for s in config.evaluation.seeds]
            mean, ci = mean_ci95(diffs)
            out[mode][str(fraction)] = {"diff": diffs, "mean": mean, "ci95": ci}
    return out


# --------------------------------------------------------------------------- report


def _cell(mean: float, ci: float, scale: float = 100.0) -> str:
    if not math.isfinite(mean):
        return "n/a"
    return f"{scale * mean:.1f} ± {scale * ci:.1f}" if math.isfinite(ci) else f"{scale * mean:.1f}"


def markdown_table(summary: Mapping[str, Any], config: ECGJobConfig) -> str:
    """Test AUROC (×100) mean ± 95 % CI per method, mode and label fraction, and the paired gains."""
    fractions = config.evaluation.label_fractions
    modes = list(config.evaluation.modes())
    head = ["method"] + [f"{m.replace('_', ' ')} {f:.0%}" for m in modes for f in fractions]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, per_mode in summary["methods"].items():
        cells = [_cell(per_mode[m][str(f)]["mean"], per_mode[m][str(f)]["ci95"]) for m in modes for f in fractions]
        lines.append("| " + " | ".join([method, *cells]) + " |")
    for label, gain in summary.get("gains", {}).items():
        cells = [_cell(gain[m][str(f)]["mean"], gain[m][str(f)]["ci95"]) for m in modes for f in fractions]
        lines.append("| " + " | ".join([f"*{label}* (paired)", *cells]) + " |")
    data = summary["data"]
    n_seeds = len(config.evaluation.seeds)
    notes = [
        "",
        f"Test AUROC × 100, mean ± 95 % CI over {n_seeds} fine-tuning seeds ({', '.join(data['classes'])}; "
        f"{data['layout']} layout, test = {data['groups']['test']['examples']} examples from records never used in "
        "pre-training or meta-learning). Gains are per-seed paired differences (same label subset and head "
        "init). Each method is pre-trained once, so the CIs do not include pre-training variation.",
    ]
    return "\n".join(lines + notes) + "\n"


def write_plots(out: Path, summary: Mapping[str, Any]) -> None:
    """Redraw the plots that need only the run folder (``metapt report``)."""
    from ...config import load_config

    out = Path(out)
    _plot_auroc(summary, load_config(out / "config.yaml"), out / "auroc.png")
    if (out / "metrics.jsonl").is_file():
        _plot_magnitude(out / "metrics.jsonl", out / "warp_magnitude.png")


def _plot_warp_examples(problem: ECGSimCLRProblem, phi: Params, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ex = problem.warp_examples(phi, count=4)
    fig, axes = plt.subplots(2, 4, figsize=(14, 5), sharex=True)
    t = np.arange(ex["beats"].shape[-1])
    for j in range(4):
        axes[0, j].plot(t, ex["beats"][j, 0].numpy(), label="beat", lw=1)
        axes[0, j].plot(t, ex["warped"][j, 0].numpy(), label="learned warp", lw=1)
        axes[1, j].plot(t, (ex["positions"][j] - torch.arange(len(t))).numpy(), color="C2")
        axes[1, j].axhline(0, color="k", lw=0.5)
    axes[0, 0].legend(fontsize=8)
    axes[0, 0].set_ylabel("z-scored signal")
    axes[1, 0].set_ylabel("displacement (samples)")
    for ax in axes[1]:
        ax.set_xlabel("sample")
    fig.suptitle(f"Beats and one draw of the learned warp (magnitude {float(phi['log_magnitude'].exp()):.4f})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_magnitude(metrics: Path, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in read_jsonl(metrics) if r.get("phase") == Method.SIMCLR_META_WARP.value
            and r.get("phi/magnitude") is not None]
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    steps = [r["step"] for r in rows]
    ax[0].plot(steps, [r["phi/magnitude"] for r in rows])
    ax[0].set_title("learned global magnitude")
    ax[1].plot(steps, [r["phi/mean_abs_shift"] for r in rows], color="C1")
    ax[1].set_title("mean |displacement| on 32 fixed beats (samples)")
    for a in ax:
        a.set_xlabel("pre-training step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_auroc(summary: Mapping[str, Any], config: ECGJobConfig, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(config.evaluation.modes())
    fractions = list(config.evaluation.label_fractions)
    fig, axes = plt.subplots(1, len(modes), figsize=(5.5 * len(modes), 4), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        for k, (method, per_mode) in enumerate(summary["methods"].items()):
            means = [per_mode[mode][str(f)]["mean"] for f in fractions]
            cis = [per_mode[mode][str(f)]["ci95"] for f in fractions]
            x = np.arange(len(fractions)) + (k - (len(summary["methods"]) - 1) / 2) * 0.06
            ax.errorbar(x, means, yerr=[c if math.isfinite(c) else 0 for c in cis], marker="o", capsize=3,
                        label=method)
        ax.set_xticks(range(len(fractions)), [f"{f:.0%}" for f in fractions])
        ax.set_xlabel("labelled fraction of FT-train")
        ax.set_ylabel("test AUROC (mean ± 95 % CI)")
        ax.set_title(mode.replace("_", " "))
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------- helpers


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(jsonable(obj), indent=2))
