"""The molecules domain for the runner: GIN pre-training on ChEMBL, fine-tuning on B3DB or held-out targets.

Settings: ``b3db`` (all 30 ChEMBL targets → B3DB blood-brain-barrier permeability) and
``heldout`` (20 targets → the other 10; ``data.split_seed`` picks them). Methods differ
only in φ: uniform task weights (φ frozen at 1), meta-learned task weights, meta-learned
per-molecule weights, and a randomly initialised encoder. Opt-in noise models
(``--set 'methods=[uniform,meta_label_noise,meta_feature_noise]'``): per-task label-flip rates
(``noise.label_flip_init``) and per-feature Gaussian noise on the graph embedding fed to the PT
head (``noise.embedding_noise_init``).
"""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field
from rich.console import Console

from ...evaluation import Downstream, EvalConfig, FinetuneConfig, mean_ci95
from ...metaparams import GaussianNoiseScales, LabelFlipRates, TaskWeights, weights_from_logits
from ...plots import plot_hbars
from ...runner import Method, Pretraining
from ...schema import MAX_SEED, CheckpointConfig, MetaConfig, PretrainConfig, check_device, check_job, schema
from .data import target_name
from .models import GINEncoder
from .problem import MoleculeData, MoleculesProblem, NoiseModelConfig, WeightingConfig, load_molecule_data

#: What φ is, by method variant.
VARIANTS: dict[str, WeightingConfig] = {
    "task_weights": WeightingConfig(task_weights=True),
    "example_weights": WeightingConfig(task_weights=False, example_weights=True),
    "label_noise": WeightingConfig(task_weights=False, label_noise=True),
    "feature_noise": WeightingConfig(task_weights=False, feature_noise=True),
}

METHODS = {m.name: m for m in (
    Method("no_pretrain", "no pre-training", pretrain=False, phi="none", variant="task_weights"),
    Method("uniform", "uniform weights", phi="frozen", variant="task_weights"),
    Method("meta_task_weights", "meta task weights", variant="task_weights"),
    Method("random_task_weights", "random task weights", phi="random", variant="task_weights"),  # opt-in
    Method("meta_example_weights", "meta example weights", variant="example_weights"),
    Method("random_example_weights", "random example weights", phi="random", variant="example_weights"),  # opt-in
    Method("meta_label_noise", "meta label noise", variant="label_noise"),  # opt-in: --set methods=[...]
    Method("meta_feature_noise", "meta embedding noise", variant="feature_noise"),
    # the noise models' frozen-φ₀ controls: the same noise, held at its initial level
    Method("frozen_label_noise", "label noise frozen at φ₀", phi="frozen", variant="label_noise"),
    Method("frozen_feature_noise", "embedding noise frozen at φ₀", phi="frozen", variant="feature_noise"),
)}
#: The methods run unless ``methods`` says otherwise (the noise models are opt-in).
DEFAULT_METHODS = ("no_pretrain", "uniform", "meta_task_weights", "meta_example_weights")


@schema
class GINConfig:
    """The GIN encoder (Hu et al. 2020: 5 layers, 300 dims, batch norm, dropout 0.2).

    ``norm: layer`` is the CPU default; with ``batch``, only PT steps update the running
    statistics (meta-steps restore them; see :class:`metapt.MetaPretrainer`).

    Attributes:
        num_layers: GIN message-passing layers.
        emb_dim: width of every node embedding.
        dropout: dropout rate after each layer.
        norm: ``layer``, ``batch`` or ``none`` normalisation after each layer.
    """

    num_layers: int = Field(default=3, ge=1)
    emb_dim: int = Field(default=64, ge=1)
    dropout: float = Field(default=0.2, ge=0, lt=1)
    norm: Literal["layer", "batch", "none"] = "layer"


@schema
class MoleculesDataConfig:
    """Which downstream settings to run, and the data's own seed.

    Attributes:
        settings: ``b3db`` and/or ``heldout``.
        max_pretrain: pre-training molecules kept (None: all 35,633).
        max_downstream: downstream molecules kept (None: all).
        split_seed: picks the held-out targets and the subsets (not θ₀ or the batch order).
        junk_tasks: label-permuted copies of real ChEMBL targets added as pre-training tasks
            (a planted answer: learned task weights should sink them); 0: none.
    """

    settings: tuple[Literal["b3db", "heldout"], ...] = Field(default=("b3db",), min_length=1)
    max_pretrain: int | None = Field(default=None, ge=1)
    max_downstream: int | None = Field(default=None, ge=10)
    split_seed: int = Field(default=0, ge=0, le=MAX_SEED)
    junk_tasks: int = Field(default=0, ge=0, le=1000)


@schema
class MoleculesJob:
    """Everything one molecules run does (``metapt config molecules`` prints it resolved)."""

    job: Literal["molecules"] = "molecules"
    device: str = "auto"
    methods: tuple[Literal[tuple(METHODS)], ...] = Field(default=DEFAULT_METHODS, min_length=1)
    data: MoleculesDataConfig = MoleculesDataConfig()
    model: GINConfig = GINConfig()
    pretrain: PretrainConfig = PretrainConfig()
    meta: MetaConfig = MetaConfig()
    #: starting values of the noise models of meta_label_noise / meta_feature_noise
    noise: NoiseModelConfig = NoiseModelConfig()
    evaluation: EvalConfig = EvalConfig(
        seeds=5, full_finetune=FinetuneConfig(epochs=4, lr=1e-3, batch_size=64),
        linear_probe=FinetuneConfig(linear_probe=True, epochs=30, lr=1e-2, batch_size=64))
    checkpoint: CheckpointConfig = CheckpointConfig()

    def __post_init__(self) -> None:
        check_device(self.device)
        check_job(self, any(METHODS[m].phi == "learned" for m in self.methods))


class Molecules:
    name = "molecules"
    methods = METHODS
    gains = (("meta_task_weights", "uniform"), ("meta_task_weights", "random_task_weights"),
             ("meta_example_weights", "uniform"), ("meta_example_weights", "random_example_weights"),
             ("meta_label_noise", "uniform"),
             ("meta_label_noise", "frozen_label_noise"), ("meta_feature_noise", "uniform"),
             ("meta_feature_noise", "frozen_feature_noise"), ("uniform", "no_pretrain"))

    def settings(self, config: MoleculesJob) -> tuple[str, ...]:
        return config.data.settings

    def load(self, config: MoleculesJob, setting: str, console: Console) -> MoleculeData:
        d = config.data
        data = load_molecule_data(setting, seed=d.split_seed, max_pretrain=d.max_pretrain,
                                  max_downstream=d.max_downstream, progress=True, junk_tasks=d.junk_tasks)
        console.print(f"[bold]{setting}[/]: pre-train on {len(data.pretrain_positions)} molecules × "
                      f"{len(data.pretrain_task_names)} tasks; downstream "
                      + ", ".join(f"{k} {len(v)}" for k, v in data.split.items()))
        return data

    def pretraining(self, config: MoleculesJob, data: MoleculeData, method: Method, seed: int,
                    device: torch.device) -> Pretraining:
        torch.manual_seed(seed)  # θ₀: every method starts from the same encoder
        encoder = GINEncoder(**asdict(config.model)).to(device)
        weighting = replace(VARIANTS[method.variant], noise=config.noise, normalize=config.meta.normalize_weights)
        problem = MoleculesProblem(data, encoder, weighting, pt_batch_size=config.pretrain.batch_size, seed=seed)
        return Pretraining(problem, problem.initial_params(), problem.initial_head(), problem.initial_metaparams(),
                           encoder=problem.encoder_with, emb_dim=encoder.emb_dim, buffers=encoder)

    def downstream(self, config: MoleculesJob, data: MoleculeData) -> Downstream:
        # evaluation fine-tunes on all downstream training data: FT-train ∪ MetaFT-validation
        positions = {"train": torch.cat([data.split["ft_train"], data.split["metaval"]]).sort().values,
                     "valid": data.split["valid"], "test": data.split["test"]}

        def batch(split: str, idx: torch.Tensor):
            graphs = data.downstream_batch(positions[split][idx])
            return graphs, graphs.y

        return Downstream(batch=batch, labels={k: data.downstream_labels[v] for k, v in positions.items()},
                          num_tasks=data.downstream_labels.shape[1])

    def data_summary(self, config: MoleculesJob, data: MoleculeData) -> dict[str, Any]:
        return {"pretrain_molecules": len(data.pretrain_positions), "pretrain_tasks": list(data.pretrain_task_names),
                "downstream_tasks": list(data.downstream_task_names),
                "target_names": {t: target_name(t) for t in [*data.pretrain_task_names, *data.downstream_task_names]
                                 if target_name(t) != t},
                "downstream": {k: len(v) for k, v in data.split.items()}}

    def describe(self, config: MoleculesJob, data: MoleculeData, method: Method, phi: dict) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if "task_logits" in phi:
            w = TaskWeights(len(phi["task_logits"]), normalize=config.meta.normalize_weights).weights(phi)
            out["task_weights"] = {name: round(float(v), 4) for name, v in zip(data.pretrain_task_names, w)}
        if "example_logits" in phi:
            w = weights_from_logits(phi["example_logits"])
            out["example_weights"] = {"mean": float(w.mean()), "std": float(w.std()), "min": float(w.min()),
                                      "max": float(w.max())}
        if "label_flip" in phi:  # ρ_t per task
            rates = LabelFlipRates(len(data.pretrain_task_names)).rates(phi)
            out["label_flip_rates"] = {name: round(float(v), 4) for name, v in zip(data.pretrain_task_names, rates)}
        if "feature_noise" in phi:
            out["embedding_noise_std"] = GaussianNoiseScales(len(phi["feature_noise"]), 1.0, key="feature_noise").summary(phi)
        return out

    def plots(self, out: Path, summary: dict[str, Any]) -> None:
        for setting, res in summary["settings"].items():
            learned = res["learned"].get("meta_task_weights", {})
            by_seed = [v["task_weights"] for v in learned.get("by_pretrain_seed", {}).values()]
            if not by_seed and learned.get("task_weights"):
                by_seed = [learned["task_weights"]]
            if not by_seed:
                continue
            stats = {t: mean_ci95([w[t] for w in by_seed]) for t in by_seed[0]}
            order = sorted(stats, key=lambda t: stats[t][0], reverse=True)
            over = f"mean ± 95 % CI over {len(by_seed)} pre-training seeds (dots: each seed)" if len(by_seed) > 1 else ""
            plot_hbars([target_name(t) for t in order], [stats[t] for t in order], out / f"task_weights_{setting}.png",
                       points=[[w[t] for w in by_seed] for t in order] if len(by_seed) > 1 else None, reference=1.0,
                       xlabel="learned task weight 2·sigmoid(logit) (1 = uniform)",
                       title=f"{setting}: learned task weights" + (f"\n{over}" if over else ""))


DOMAIN = Molecules()
CONFIG = MoleculesJob
