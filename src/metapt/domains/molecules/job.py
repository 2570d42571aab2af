"""The molecules job, end to end: featurise, pre-train (uniform and meta-learned weights),
fine-tune downstream over seeds, and report one comparison table with plots.

Every step is resumable (:class:`metapt.runs.Session`): a pre-training phase per
(setting, method), then one evaluation unit per (setting, method, mode, seed).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field
from rich.console import Console

from ...evaluation import FinetuneConfig, finetune_and_score, mean_ci95
from ...hypergrad import sgd
from ...metaparams import weights_from_logits
from ...metrics import progress_bar, read_jsonl
from ...plots import plot_bars, plot_curves
from ...runs import RunFolder, Session, write_text_atomic
from ...schema import CheckpointConfig, MetaConfig, PretrainConfig, jsonable, schema
from ...strategy import ReusePTGraph
from ...trainer import MetaPretrainer
from .models import GINEncoder
from .problem import MoleculeData, MoleculesProblem, WeightingConfig, load_molecule_data

MethodName = Literal["no_pretrain", "uniform", "meta_task_weights", "meta_example_weights"]

#: The methods compared, in table order: name -> (table label, weighting or None for "no pre-training").
METHODS: dict[str, tuple[str, WeightingConfig | None]] = {
    "no_pretrain": ("no pre-training", None),
    "uniform": ("uniform weights", WeightingConfig(task_weights=True)),  # φ frozen at 1: plain multitask PT
    "meta_task_weights": ("meta task weights", WeightingConfig(task_weights=True)),
    "meta_example_weights": ("meta example weights", WeightingConfig(task_weights=False, example_weights=True)),
}


@schema
class GINConfig:
    """The GIN encoder (Hu et al. 2020: 5 layers, 300 dims, batch norm, dropout 0.2).

    ``norm: layer`` is the CPU default: batch-norm statistics are module buffers, not
    part of θ, so the hypergradient does not see them.
    """

    num_layers: int = Field(default=3, ge=1)
    emb_dim: int = Field(default=64, ge=1)
    dropout: float = Field(default=0.2, ge=0, lt=1)
    norm: Literal["layer", "batch", "none"] = "layer"


@schema
class MoleculesDataConfig:
    """Which downstream settings to run, and optional seeded subsets for quick runs.

    Attributes:
        settings: ``b3db`` (all 30 ChEMBL targets → B3DB) and/or ``heldout`` (20 → the other 10).
        max_pretrain: pre-training molecules kept (None: all 35,633).
        max_downstream: downstream molecules kept (None: all).
    """

    settings: tuple[Literal["b3db", "heldout"], ...] = Field(default=("b3db",), min_length=1)
    max_pretrain: int | None = Field(default=None, ge=1)
    max_downstream: int | None = Field(default=None, ge=10)


@schema
class MoleculesEvalConfig:
    """Downstream evaluation: each mode over ``seeds`` fine-tuning seeds (None skips a mode)."""

    seeds: int = Field(default=5, ge=1)
    full_finetune: FinetuneConfig | None = FinetuneConfig(epochs=4, lr=1e-3, batch_size=64)
    linear_probe: FinetuneConfig | None = FinetuneConfig(linear_probe=True, epochs=30, lr=1e-2, batch_size=64)

    def modes(self) -> dict[str, FinetuneConfig]:
        out = {"full fine-tuning": self.full_finetune, "linear probe": self.linear_probe}
        return {k: v for k, v in out.items() if v is not None}


@schema
class MoleculesJob:
    """Everything one molecules run does (``metapt config molecules`` prints it resolved)."""

    job: Literal["molecules"] = "molecules"
    seed: int = 0
    methods: tuple[MethodName, ...] = Field(default=tuple(METHODS), min_length=1)
    data: MoleculesDataConfig = MoleculesDataConfig()
    model: GINConfig = GINConfig()
    pretrain: PretrainConfig = PretrainConfig()
    meta: MetaConfig = MetaConfig()
    evaluation: MoleculesEvalConfig = MoleculesEvalConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()

    def __post_init__(self):
        meta = [m for m in self.methods if m.startswith("meta_")]
        if meta and self.meta.warmup_steps >= self.pretrain.steps:
            raise ValueError(f"meta.warmup_steps ({self.meta.warmup_steps}) must be below pretrain.steps "
                             f"({self.pretrain.steps}), or {meta} would take no meta-step")
        if not self.evaluation.modes():
            raise ValueError("evaluation: enable full_finetune, linear_probe or both")


def _fresh_encoder(job: MoleculesJob) -> GINEncoder:
    torch.manual_seed(job.seed)  # every method starts from the same initial encoder
    return GINEncoder(**asdict(job.model))


def _problem(data: MoleculeData, job: MoleculesJob, method: str) -> MoleculesProblem:
    return MoleculesProblem(data, _fresh_encoder(job), METHODS[method][1], pt_batch_size=job.pretrain.batch_size,
                            seed=job.seed)


def _trainer(problem: MoleculesProblem, job: MoleculesJob, method: str, dist=None) -> MetaPretrainer:
    """The trainer of one method; with ``dist`` (torchrun), data-parallel over its processes."""
    torch.manual_seed(job.seed + 1 + (dist.rank if dist is not None else 0))  # dropout masks differ per process
    meta = method != "uniform"
    steps = job.pretrain.steps
    # the uniform baseline takes the same PT steps and never a meta-step
    schedule = job.meta.schedule() if meta else job.meta.schedule(meta_interval=steps + 1, warmup_steps=0)
    return MetaPretrainer(
        dist.shard(problem) if dist is not None else problem,
        problem.initial_params(), problem.initial_head(), problem.initial_metaparams(),
        pt_optimizer=lambda ps: torch.optim.Adam(ps, lr=job.pretrain.lr),
        meta_optimizer=lambda ps: torch.optim.Adam(ps, lr=job.meta.lr),
        inner_optimizer=sgd(job.meta.inner_lr),
        solver=job.meta.solver.build(job.pretrain.lr),
        schedule=schedule,
        strategy=(dist.strategy(sync_buffers_of=problem.encoder) if dist is not None and dist.distributed
                  else ReusePTGraph() if job.meta.reuse_pt_graph else None),
    )


def run_molecules(folder: RunFolder | str | Path, job: MoleculesJob = MoleculesJob(), *, resume: bool = False,
                  console: Console | None = None, reevaluate: bool = False, dist=None) -> dict:
    """Run ``job`` in ``folder`` (continuing its newest checkpoint if ``resume``); returns the summary.

    ``reevaluate`` drops recorded evaluation results, so they are computed again. ``dist`` (a
    :class:`metapt.distributed.DistributedContext`) pre-trains data-parallel; every process then
    evaluates (seeded, so identically) and rank 0 alone writes.
    """
    is_main = dist is None or dist.is_main
    console = console or Console(stderr=True)
    if not is_main:
        console = Console(stderr=True, quiet=True)
    if not isinstance(folder, RunFolder):
        folder = RunFolder(folder)
        folder.path.mkdir(parents=True, exist_ok=True)
    out = folder.path
    session = Session(folder, job.checkpoint, resume=resume, console=console, dist=dist)
    if reevaluate:
        session.forget("eval/")
    started = time.perf_counter()
    summary: dict = {"settings": {}, "config": jsonable(asdict(job))}
    learned: dict = {}
    modes = job.evaluation.modes()
    try:
        with progress_bar(console) as bars:
            for setting in job.data.settings:
                data = load_molecule_data(setting, seed=job.seed, max_pretrain=job.data.max_pretrain,
                                          max_downstream=job.data.max_downstream, progress=True)
                console.print(f"[bold]{setting}[/]: pre-train on {len(data.pretrain_positions)} molecules × "
                              f"{len(data.pretrain_task_names)} tasks; downstream " +
                              ", ".join(f"{k} {len(v)}" for k, v in data.split.items()))
                encoders = {}
                for method in job.methods:
                    if METHODS[method][1] is None:
                        encoders[method] = _fresh_encoder(job)
                        continue
                    phase = f"{setting}/{method}"
                    problem = _problem(data, job, method)
                    if not session.done(phase):
                        task = bars.add_task(f"{setting}: {METHODS[method][0]}", total=job.pretrain.steps, info="")
                        trainer = _trainer(problem, job, method, dist)
                        session.train(phase, trainer, job.pretrain.steps, problem,
                                      progress=lambda s, t=task: bars.update(t, completed=s))
                        session.record(phase, {"params": {k: v.detach() for k, v in trainer.params.items()},
                                               "metaparams": {k: v.detach() for k, v in trainer.metaparams.items()},
                                               "problem": problem.state_dict(), "skipped": trainer.skipped})
                    result = session[phase]
                    problem.load_state_dict(result["problem"])
                    encoders[method] = problem.encoder_with(result["params"])
                    learned.setdefault(setting, {})[METHODS[method][0]] = _save_weights(
                        out, setting, data, result["metaparams"], write=is_main)

                iterate = data.iterate_downstream
                scores: dict = {}
                total = len(encoders) * sum(c.epochs for c in modes.values()) * job.evaluation.seeds
                task = bars.add_task(f"{setting}: fine-tune and score", total=total, info="")
                for method, encoder in encoders.items():
                    for mode, cfg in modes.items():
                        runs = []
                        for seed in range(job.evaluation.seeds):
                            key = f"eval/{setting}/{method}/{mode}/{seed}"
                            if not session.done(key):
                                session.record(key, finetune_and_score(
                                    encoder, encoder.emb_dim, data.downstream_labels.shape[1], iterate, cfg,
                                    seed=seed, progress=lambda: bars.advance(task)))
                            else:
                                bars.advance(task, cfg.epochs)
                            runs.append(session[key])
                        tests = [r["test_auroc"] for r in runs]
                        mean, ci = mean_ci95(tests)
                        scores.setdefault(METHODS[method][0], {})[mode] = {
                            "test_auroc_mean": mean, "test_auroc_ci95": ci, "test_auroc": tests,
                            "valid_auroc": [r["valid_auroc"] for r in runs]}
                summary["settings"][setting] = {"scores": scores, "sizes": {k: len(v) for k, v in data.split.items()},
                                                "pretrain_molecules": len(data.pretrain_positions)}
    finally:
        session.close()

    summary["learned_task_weights"] = learned
    summary["skipped_meta_steps"] = {k: int(v["skipped"]) for k, v in session.results.items()
                                     if not k.startswith("eval/")}
    summary["wall_seconds"] = round(time.perf_counter() - started, 1)
    if not is_main:
        return summary
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=2))
    write_text_atomic(out / "summary.md", summary_markdown(summary))
    write_plots(out, summary)
    return summary


def _save_weights(out: Path, setting: str, data: MoleculeData, phi: dict, write: bool = True) -> dict:
    result = {}
    if "task_logits" in phi:
        w = weights_from_logits(phi["task_logits"].detach())
        result = {name: round(float(v), 4) for name, v in zip(data.pretrain_task_names, w)}
    if "example_logits" in phi:
        w = weights_from_logits(phi["example_logits"].detach()).numpy()
        if write:
            np.savez_compressed(out / f"example_weights_{setting}.npz", weights=w,
                                positions=data.pretrain_positions.numpy())
        result = {"mean": float(w.mean()), "std": float(w.std()), "min": float(w.min()), "max": float(w.max())}
    return result


def summary_markdown(summary: dict) -> str:
    lines = ["# Molecules: test AUROC, mean ± 95 % CI over seeds", ""]
    for setting, res in summary["settings"].items():
        modes = list(next(iter(res["scores"].values())))
        lines += [f"## {setting}", "", "| method | " + " | ".join(modes) + " |", "|---" * (len(modes) + 1) + "|"]
        for method, by_mode in res["scores"].items():
            cells = [f"{v['test_auroc_mean']:.4f} ± {v['test_auroc_ci95']:.4f}" for v in by_mode.values()]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
    lines.append(f"Wall time: {summary['wall_seconds']} s.")
    return "\n".join(lines) + "\n"


def write_plots(out: Path, summary: dict) -> None:
    rows = read_jsonl(out / "metrics.jsonl")
    plot_curves(rows, ["pt_loss", "meta_loss", "hypergrad_norm", "solver_residual"], out / "losses.png",
                title="Pre-training and meta-learning")
    for setting, res in summary["settings"].items():
        methods = list(res["scores"])
        modes = list(res["scores"][methods[0]])
        plot_bars(methods, {m: [(res["scores"][k][m]["test_auroc_mean"], res["scores"][k][m]["test_auroc_ci95"])
                                for k in methods] for m in modes},
                  out / f"auroc_{setting}.png", ylabel="test AUROC", title=f"{setting}: downstream test AUROC",
                  ylim=(0.5, 1.0))
        weights = summary["learned_task_weights"].get(setting, {}).get("meta task weights")
        if weights:
            names = sorted(weights, key=weights.get, reverse=True)
            plot_bars(names, {"learned weight": [(weights[n], float("nan")) for n in names]},
                      out / f"task_weights_{setting}.png", ylabel="2·sigmoid(logit)",
                      title=f"{setting}: learned task weights (1 = uniform)", rotate=True)
