"""The synthetic task-weighting demo as a runner domain: a problem with a known answer.

Half the pre-training tasks are pure label noise; meta-learned task weights should
push them down, and a linear probe on the pre-trained bottleneck should then fit the
downstream regression better (test MSE, lower is better).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field
from rich.console import Console
from torch import nn

from ...evaluation import Downstream, EvalConfig, FinetuneConfig
from ...plots import plot_bars
from ...domain import Method, Pretraining
from ...schema import CheckpointConfig, EstimatorConfig, MetaConfig, PretrainConfig, check_device, check_job, schema
from .problem import SyntheticConfig, SyntheticTaskWeighting

METHODS = {m.name: m for m in (
    Method("no_pretrain", "no pre-training", pretrain=False, phi="none"),
    Method("uniform", "uniform weights", phi="frozen"),
    Method("meta_task_weights", "meta task weights"),
    Method("random_task_weights", "random task weights", phi="random"),  # opt-in: --set methods=[...]
)}
DEFAULT_METHODS = ("no_pretrain", "uniform", "meta_task_weights")


@schema
class SyntheticJob:
    """The demo (``metapt config synthetic`` prints it resolved).

    ``problem`` is the data (its ``seed`` draws the data); ``pretrain.seed`` draws θ₀ and
    the batch order; ``pretrain.batch_size`` is every stream's batch size.
    """

    job: Literal["synthetic"] = "synthetic"
    device: str = "auto"
    methods: tuple[Literal[tuple(METHODS)], ...] = Field(default=DEFAULT_METHODS, min_length=1)
    problem: SyntheticConfig = SyntheticConfig()
    pretrain: PretrainConfig = PretrainConfig(steps=1000, lr=0.01, batch_size=32)
    meta: MetaConfig = MetaConfig(interval=5, unroll_steps=1, inner_lr=0.1, lr=0.1, warmup_steps=100,
                                  estimator=EstimatorConfig(kind="neumann", terms=5, alpha=0.01))
    evaluation: EvalConfig = EvalConfig(seeds=3, linear_probe=FinetuneConfig(linear_probe=True, epochs=60, lr=0.05,
                                                                              batch_size=16))
    checkpoint: CheckpointConfig = CheckpointConfig(every=100)

    def __post_init__(self) -> None:
        check_device(self.device)
        check_job(self, any(METHODS[m].phi == "learned" for m in self.methods))
        if self.problem.batch_size != SyntheticConfig().batch_size:
            raise ValueError("problem.batch_size is set by pretrain.batch_size; leave it out")


class _Linear(nn.Module):
    """The pre-trained bottleneck x ↦ W x as a module."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone())
        self.emb_dim = weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.T


class Synthetic:
    name = "synthetic"
    methods = METHODS
    gains = (("meta_task_weights", "uniform"), ("meta_task_weights", "random_task_weights"), ("uniform", "no_pretrain"))

    def settings(self, config: SyntheticJob) -> tuple[str, ...]:
        return ("synthetic",)

    def load(self, config: SyntheticJob, setting: str, console: Console) -> SyntheticTaskWeighting:
        return SyntheticTaskWeighting(replace(config.problem, batch_size=config.pretrain.batch_size),
                                      normalize_weights=config.meta.normalize_weights)

    def pretraining(self, config: SyntheticJob, data: SyntheticTaskWeighting, method: Method, seed: int,
                    device: torch.device) -> Pretraining:
        for name in ("x_pt", "y_pt", "ft_train", "metaval"):  # the tensors the losses index
            value = getattr(data, name)
            setattr(data, name, tuple(v.to(device) for v in value) if isinstance(value, tuple) else value.to(device))
        params = data.initial_params(seed)
        return Pretraining(data, params, data.initial_head(), data.initial_metaparams(),
                           encoder=lambda p: _Linear(p["encoder"]), emb_dim=data.config.subspace)

    def downstream(self, config: SyntheticJob, data: SyntheticTaskWeighting) -> Downstream:
        # evaluation fine-tunes on all downstream training data: FT-train ∪ MetaFT-validation
        splits = {"train": tuple(torch.cat(p).cpu() for p in zip(data.ft_train, data.metaval)),
                  "valid": data.valid, "test": data.test}
        return Downstream(batch=lambda split, idx: (splits[split][0][idx], splits[split][1][idx]),
                          labels={k: v[1] for k, v in splits.items()}, num_tasks=1, metric="mse")

    def data_summary(self, config: SyntheticJob, data: SyntheticTaskWeighting) -> dict[str, Any]:
        c = data.config
        return {"pretrain_examples": c.pretrain_examples, "helpful_tasks": c.helpful_tasks,
                "noise_tasks": c.noise_tasks, "dim": c.dim, "subspace": c.subspace}

    def describe(self, config: SyntheticJob, data: SyntheticTaskWeighting, method: Method, phi: dict) -> dict[str, Any]:
        weights = data.task_weights.weights(phi)
        return {"task_weights": [round(float(w), 4) for w in weights],
                "helpful_task": [bool(h) for h in data.helpful], **data.describe_metaparams(phi)}

    def plots(self, out: Path, summary: dict[str, Any]) -> None:
        learned = summary["settings"]["synthetic"]["learned"].get("meta_task_weights")
        if learned:
            names = [f"{'helpful' if h else 'noise'} {i}" for i, h in enumerate(learned["helpful_task"])]
            plot_bars(names, {"learned weight": [(w, float("nan")) for w in learned["task_weights"]]},
                      out / "task_weights.png", ylabel="learned task weight\n2·sigmoid(logit)",
                      title="Learned task weights per task (dashed: 1, uniform)", rotate=True,
                      reference=(1.0, "uniform weight"))


DOMAIN = Synthetic()
CONFIG = SyntheticJob
