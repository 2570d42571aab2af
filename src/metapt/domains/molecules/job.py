"""The molecules job, end to end: featurise, pre-train (uniform and meta-learned weights),
fine-tune downstream over seeds, and report one comparison table with plots.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from ...evaluation import FinetuneConfig, finetune_and_score, mean_ci95
from ...hypergrad import Neumann, sgd
from ...metaparams import weights_from_logits
from ...metrics import JsonlLogger, progress_bar, read_jsonl
from ...plots import plot_bars, plot_curves
from ...trainer import MetaPretrainer, MetaSchedule
from .models import GINEncoder
from .problem import MoleculeData, MoleculesProblem, WeightingConfig, load_molecule_data

#: The methods compared, in table order: (name, weighting or None for "no pre-training").
METHODS: dict[str, WeightingConfig | None] = {
    "no pre-training": None,
    "uniform weights": WeightingConfig(task_weights=True),  # φ frozen at 1: plain multitask PT
    "meta task weights": WeightingConfig(task_weights=True),
    "meta example weights": WeightingConfig(task_weights=False, example_weights=True),
}


@dataclass(frozen=True)
class MoleculesJob:
    """Everything one molecules run does; the presets below are starting points.

    Attributes follow Algorithm 1's names: PT = pre-training, FT = fine-tuning.
    """

    settings: tuple[str, ...] = ("b3db",)
    methods: tuple[str, ...] = tuple(METHODS)
    encoder: dict = field(default_factory=lambda: {"num_layers": 3, "emb_dim": 64, "dropout": 0.2, "norm": "layer"})
    pt_steps: int = 2000
    pt_lr: float = 1e-3
    pt_batch_size: int = 64
    meta_interval: int = 10
    unroll_steps: int = 1
    inner_lr: float = 0.1
    neumann_steps: int = 1
    neumann_alpha: float | None = None  # None: the PT learning rate, as in the paper
    meta_lr: float = 0.05
    meta_batches: int = 1
    warmup_steps: int = 100
    eval_seeds: int = 5
    eval_epochs: int = 4
    eval_lr: float = 1e-3
    probe_epochs: int = 30
    probe_lr: float = 1e-2
    eval_batch_size: int = 64
    max_pretrain: int | None = None
    max_downstream: int | None = None
    seed: int = 0

    def __post_init__(self):
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; choose from {list(METHODS)}")


PRESETS: dict[str, MoleculesJob] = {
    # fits the 10-minute budget on 2 CPU cores
    "default": MoleculesJob(),
    # Hu et al.'s encoder and longer training, for a machine with more to give
    "paper": MoleculesJob(
        settings=("b3db", "heldout"),
        encoder={"num_layers": 5, "emb_dim": 300, "dropout": 0.2, "norm": "batch"},
        pt_steps=20000, eval_seeds=10, eval_epochs=50, warmup_steps=500,
    ),
    # seconds, for tests
    "test": MoleculesJob(
        encoder={"num_layers": 2, "emb_dim": 16, "dropout": 0.0, "norm": "layer"},
        pt_steps=30, meta_interval=5, warmup_steps=5, eval_seeds=2, eval_epochs=2, probe_epochs=3,
        max_pretrain=300, max_downstream=120,
    ),
}


def _fresh_encoder(job: MoleculesJob) -> GINEncoder:
    torch.manual_seed(job.seed)  # every method starts from the same initial encoder
    return GINEncoder(**job.encoder)


def _pretrain(data: MoleculeData, job: MoleculesJob, method: str, log: JsonlLogger, tick: Callable[[int], None]):
    weighting = METHODS[method]
    problem = MoleculesProblem(data, _fresh_encoder(job), weighting, pt_batch_size=job.pt_batch_size, seed=job.seed)
    torch.manual_seed(job.seed + 1)
    meta = method != "uniform weights"
    schedule = MetaSchedule(
        # the uniform baseline takes the same PT steps and never a meta-step
        meta_interval=job.meta_interval if meta else job.pt_steps + 1,
        unroll_steps=job.unroll_steps,
        meta_batches=job.meta_batches,
        warmup_steps=job.warmup_steps if meta else 0,
    )
    trainer = MetaPretrainer(
        problem, problem.initial_params(), problem.initial_head(), problem.initial_metaparams(),
        pt_optimizer=lambda ps: torch.optim.Adam(ps, lr=job.pt_lr),
        meta_optimizer=lambda ps: torch.optim.Adam(ps, lr=job.meta_lr),
        inner_optimizer=sgd(job.inner_lr),
        solver=Neumann(steps=job.neumann_steps, alpha=job.neumann_alpha or job.pt_lr),
        schedule=schedule,
        loggers=[log],
    )
    trainer.run(job.pt_steps, progress=tick)
    return problem, trainer


def _iterate(data: MoleculeData) -> Callable:
    splits = {
        "train": torch.cat([data.split["ft_train"], data.split["metaval"]]).sort().values,
        "valid": data.split["valid"],
        "test": data.split["test"],
    }

    def iterate(split, batch_size, shuffle, seed):
        pos = splits[split]
        if shuffle:
            pos = pos[torch.randperm(len(pos), generator=torch.Generator().manual_seed(seed))]
        for i in range(0, len(pos), batch_size):
            batch = data.downstream_batch(pos[i : i + batch_size])
            yield batch, batch.y

    return iterate


def run_molecules(out: Path, job: MoleculesJob, console: Console | None = None) -> dict:
    """Run ``job`` and write the run folder ``out``; returns the summary."""
    console = console or Console(stderr=True)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(asdict(job), indent=2))
    started = time.perf_counter()
    summary: dict = {"settings": {}, "config": asdict(job)}
    learned: dict = {}
    modes = {"full fine-tuning": FinetuneConfig(epochs=job.eval_epochs, lr=job.eval_lr, batch_size=job.eval_batch_size),
             "linear probe": FinetuneConfig(linear_probe=True, epochs=job.probe_epochs, lr=job.probe_lr,
                                            batch_size=job.eval_batch_size)}

    with progress_bar(console) as bars, JsonlLogger(out / "metrics.jsonl") as log:
        for setting in job.settings:
            data = load_molecule_data(setting, seed=job.seed, max_pretrain=job.max_pretrain,
                                      max_downstream=job.max_downstream, progress=True)
            console.print(f"[bold]{setting}[/]: pre-train on {len(data.pretrain_positions)} molecules × "
                          f"{len(data.pretrain_task_names)} tasks; downstream " +
                          ", ".join(f"{k} {len(v)}" for k, v in data.split.items()))
            encoders = {}
            for method in job.methods:
                if METHODS[method] is None:
                    encoders[method] = _fresh_encoder(job)
                    continue
                task = bars.add_task(f"{setting}: {method}", total=job.pt_steps, info="")
                log.phase = f"{setting}/{method}"
                problem, trainer = _pretrain(data, job, method, log, lambda s, t=task: bars.update(t, completed=s))
                encoders[method] = problem.encoder_with(trainer.params)
                learned.setdefault(setting, {})[method] = _save_weights(out, setting, method, data, trainer)
                if trainer.skipped:
                    console.print(f"[yellow]{setting}/{method}: {trainer.skipped} meta-steps skipped "
                                  "(non-finite hypergradient or diverged solve)[/]")

            iterate = _iterate(data)
            scores: dict = {}
            total = len(encoders) * sum(c.epochs for c in modes.values()) * job.eval_seeds
            task = bars.add_task(f"{setting}: fine-tune and score", total=total, info="")
            for method, encoder in encoders.items():
                for mode, cfg in modes.items():
                    runs = [finetune_and_score(encoder, encoder.emb_dim, data.downstream_labels.shape[1], iterate, cfg,
                                               seed=s, progress=lambda: bars.advance(task)) for s in range(job.eval_seeds)]
                    tests = [r["test_auroc"] for r in runs]
                    mean, ci = mean_ci95(tests)
                    scores.setdefault(method, {})[mode] = {"test_auroc_mean": mean, "test_auroc_ci95": ci,
                                                            "test_auroc": tests,
                                                            "valid_auroc": [r["valid_auroc"] for r in runs]}
            summary["settings"][setting] = {"scores": scores, "sizes": {k: len(v) for k, v in data.split.items()},
                                            "pretrain_molecules": len(data.pretrain_positions)}

    summary["learned_task_weights"] = learned
    summary["wall_seconds"] = round(time.perf_counter() - started, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "summary.md").write_text(summary_markdown(summary))
    write_plots(out, summary)
    return summary


def _save_weights(out: Path, setting: str, method: str, data: MoleculeData, trainer: MetaPretrainer) -> dict:
    phi = trainer.metaparams
    result = {}
    if "task_logits" in phi:
        w = weights_from_logits(phi["task_logits"].detach())
        result = {name: round(float(v), 4) for name, v in zip(data.pretrain_task_names, w)}
    if "example_logits" in phi:
        w = weights_from_logits(phi["example_logits"].detach()).numpy()
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


def job_from_preset(name: str, **overrides) -> MoleculesJob:
    if name not in PRESETS:
        raise ValueError(f"unknown molecules preset {name!r}; choose from {sorted(PRESETS)}")
    return replace(PRESETS[name], **overrides)
