"""One experiment runner for every domain: pre-train each method, evaluate it downstream, summarise.

A domain (molecules, ECG, synthetic, or your own) declares a small :class:`metapt.domain.Domain`:
how to load its data for a setting, how to build one method's pre-training
(problem, θ₀, ψ₀, φ₀ and the encoder used downstream), and its downstream splits.
Methods are data (:class:`metapt.domain.Method`): pre-train or not, and φ learned, frozen at its
initial value, or absent. This module does the rest, the same way for every domain:

* every pre-training phase runs through :class:`metapt.MetaPretrainer` (a frozen φ is
  a schedule with no meta-steps), inside a :class:`metapt.session.Session`, so every phase
  resumes mid-phase after a kill, writes atomically and runs data-parallel under
  torchrun;
* one evaluation protocol (:mod:`metapt.evaluation`): full fine-tuning and linear probe
  × label fractions × fine-tuning seeds, the epoch picked on the downstream 'valid'
  split, test scores as mean ± 95 % CI and per-seed paired gains; non-finite scores
  are counted, not dropped silently;
* one summary layout (``summary.json``/``summary.md``) and the shared plots
  (:mod:`metapt.summary`); a domain may add plots of its own.

Run-folder steps: phase ``SETTING/METHOD`` per pre-trained method, then one
evaluation unit ``eval/SETTING/METHOD/MODE/FRACTION/SEED`` each.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, replace
from typing import Any

import torch
from rich.console import Console
from torch import nn

from .build import build_trainer, trainer_from_config
from .devices import place, resolve_device
from .diagnostics import phase_signal
from .domain import Domain, Method, Pretraining
from .errors import deferred_stop, immediate_stop
from .evaluation import Downstream, EvalConfig, finetune_and_score, label_subset
from .metrics import progress_bar
from .problem import Params
from .runs import RunFolder
from .schema import jsonable
from .session import Session
from .summary import aggregate, agreement, gains, signal, write_plots, write_summary

__all__ = ["build_trainer", "parse_phase", "run_experiment", "trainer_from_config"]  # the builders live in .build


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
                encoders, emb_dims, learned, phis, signals = {}, {}, {}, {}, {}
                for method, seed in ((m, s) for m in methods for s in pt_seeds):
                    name = _run_name(method.name, seed, pt_seeds)
                    phase = f"{setting}/{name}"
                    built = place(domain.pretraining(config, data, method, seed, device), device)
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
                        if result.get("signal") is not None:
                            signals.setdefault(method.label, []).append(result["signal"])
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
                    "scores": aggregate(rows, methods, config.evaluation, pt_seeds),
                    "gains": gains(rows, domain, methods, config.evaluation, pt_seeds),
                    "learned": learned,
                    "agreement": agreement(phis),
                    "signal": signal(signals),
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
    """One pre-training phase through MetaPretrainer, checkpointed by the session; records its result
    and, for a meta-learned φ, :func:`metapt.diagnostics.phase_signal` at its end (not under
    torchrun, where each process holds a shard of the batches)."""
    trainer = build_trainer(built, config, method, seed, dist, device)
    session.train(phase, trainer, config.pretrain.steps, built.problem, progress=progress)
    measured = (method.phi == "learned" and trainer.metaparams and trainer.meta_step_count > 0
                and (dist is None or not dist.distributed))
    session.record(phase, {
        "signal": phase_signal(trainer) if measured else None,
        "params": {k: v.detach() for k, v in trainer.params.items()},
        "metaparams": trainer.averaged_metaparams,  # the live φ unless meta.average says otherwise
        "problem": built.problem.state_dict() if hasattr(built.problem, "state_dict") else None,
        "health": {"meta_steps": trainer.meta_step_count, "skipped_meta_steps": trainer.skipped,
                   "rejected_heads": trainer.rejected_heads, "inner_lr_capped": trainer.inner_lr_capped},
    })


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
