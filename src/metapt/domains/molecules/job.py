"""The molecules domain for the runner: GIN pre-training on ChEMBL, fine-tuning on B3DB or held-out targets.

Settings: ``b3db`` (all 30 ChEMBL targets → B3DB blood-brain-barrier permeability) and
``heldout`` (20 targets → the other 10; ``data.split_seed`` picks them). Either can add many
pre-training tasks of uneven value (the paper's setting for task weighting): RDKit
functional-group tasks (``data.motif_tasks=true``) and label-permuted junk tasks
(``data.junk_tasks``), with the controls ``chembl_only`` and ``motifs_only``. Methods differ
only in φ: uniform task weights (φ frozen at 1), meta-learned task weights, meta-learned
per-molecule weights, a meta-learned example-weight network (opt-in: ``meta_example_weight_net``,
a molecule's weight from its current PT loss and share of observed labels), and a randomly
initialised encoder. Opt-in noise models
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
from ...metaparams import ExampleWeightNet, GaussianNoiseScales, LabelFlipRates, TaskWeights, weights_from_logits
from ...plots import plot_hbars
from ...domain import Method, Pretraining
from ...schema import MAX_SEED, CheckpointConfig, MetaConfig, PretrainConfig, check_device, check_job, schema
from .data import target_name
from .models import GINEncoder
from .problem import (TASK_GROUPS, MoleculeData, MoleculesProblem, NoiseModelConfig, WeightingConfig,
                      load_molecule_data, task_group)

#: What φ is, by method variant.
VARIANTS: dict[str, WeightingConfig] = {
    "task_weights": WeightingConfig(task_weights=True),
    "example_weights": WeightingConfig(task_weights=False, example_weights=True),
    "example_weight_net": WeightingConfig(task_weights=False, example_weight_net=True),
    "label_noise": WeightingConfig(task_weights=False, label_noise=True),
    "feature_noise": WeightingConfig(task_weights=False, feature_noise=True),
    # uniform weights on one task group, the other groups' labels masked (pre-training without them)
    "chembl_only": WeightingConfig(task_weights=True, task_groups=("chembl",)),
    "motifs_only": WeightingConfig(task_weights=True, task_groups=("motif",)),
}

METHODS = {m.name: m for m in (
    Method("no_pretrain", "no pre-training", pretrain=False, phi="none", variant="task_weights"),
    Method("uniform", "uniform weights", phi="frozen", variant="task_weights"),
    Method("meta_task_weights", "meta task weights", variant="task_weights"),
    Method("random_task_weights", "random task weights", phi="random", variant="task_weights"),  # opt-in
    Method("meta_example_weights", "meta example weights", variant="example_weights"),
    Method("random_example_weights", "random example weights", phi="random", variant="example_weights"),  # opt-in
    Method("meta_example_weight_net", "meta example weight net", variant="example_weight_net"),  # opt-in
    Method("meta_label_noise", "meta label noise", variant="label_noise"),  # opt-in: --set methods=[...]
    Method("meta_feature_noise", "meta embedding noise", variant="feature_noise"),
    # the noise models' frozen-φ₀ controls: the same noise, held at its initial level
    Method("frozen_label_noise", "label noise frozen at φ₀", phi="frozen", variant="label_noise"),
    Method("frozen_feature_noise", "embedding noise frozen at φ₀", phi="frozen", variant="feature_noise"),
    # the many-tasks setting's controls (data.motif_tasks / data.junk_tasks): one task group alone
    Method("chembl_only", "ChEMBL tasks only", phi="frozen", variant="chembl_only"),
    Method("motifs_only", "motif tasks only", phi="frozen", variant="motifs_only"),
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
        junk_tasks: label-permuted copies of real pre-training tasks added as pre-training tasks
            (a planted answer: learned task weights should sink them); 0: none. With motif
            tasks, a junk task may copy a motif task.
        motif_tasks: add one self-supervised pre-training task per RDKit ``fr_*`` functional-group
            descriptor (presence in the molecule, as GROVER's motif prediction), computed from
            the pre-training molecules only and cached; named ``motif:fr_*``.
        motif_min_fraction: a motif becomes a task only if at least this fraction of the
            pre-training molecules have it and at least this fraction lack it (constant and
            duplicate motifs are always dropped).
    """

    settings: tuple[Literal["b3db", "heldout"], ...] = Field(default=("b3db",), min_length=1)
    max_pretrain: int | None = Field(default=None, ge=1)
    max_downstream: int | None = Field(default=None, ge=10)
    split_seed: int = Field(default=0, ge=0, le=MAX_SEED)
    junk_tasks: int = Field(default=0, ge=0, le=1000)
    motif_tasks: bool = False
    motif_min_fraction: float = Field(default=0.01, gt=0, lt=0.5)


@schema
class MoleculesJob:
    """Everything one molecules run does (``metapt config molecules`` prints it resolved)."""

    job: Literal["molecules"] = "molecules"
    device: str = "auto"
    methods: tuple[Literal[tuple(METHODS)], ...] = Field(default=DEFAULT_METHODS, min_length=1)
    data: MoleculesDataConfig = MoleculesDataConfig()
    model: GINConfig = GINConfig()
    pretrain: PretrainConfig = PretrainConfig()
    # inner_lr_cap off: on this job the cap never bound (λ·inner_lr at most 1.58 against its 1.9;
    # benchmarks/results/inner_rate_cap.md) and its λ estimates cost 0.13–0.18× of plain
    # pre-training (noise_control_cost_inner_cap.md); a diverging head is still detected and named
    meta: MetaConfig = MetaConfig(inner_lr_cap="off")
    #: starting values of the noise models of meta_label_noise / meta_feature_noise
    noise: NoiseModelConfig = NoiseModelConfig()
    evaluation: EvalConfig = EvalConfig(
        seeds=5, full_finetune=FinetuneConfig(epochs=4, lr=1e-3, batch_size=64),
        linear_probe=FinetuneConfig(linear_probe=True, epochs=30, lr=1e-2, batch_size=64))
    checkpoint: CheckpointConfig = CheckpointConfig()

    def __post_init__(self) -> None:
        check_device(self.device)
        check_job(self, any(METHODS[m].phi == "learned" for m in self.methods))
        if "motifs_only" in self.methods and not self.data.motif_tasks:
            raise ValueError("method motifs_only pre-trains on the motif tasks alone: set data.motif_tasks=true")


class Molecules:
    name = "molecules"
    methods = METHODS
    gains = (("meta_task_weights", "uniform"), ("meta_task_weights", "random_task_weights"),
             ("meta_example_weights", "uniform"), ("meta_example_weights", "random_example_weights"),
             ("meta_example_weight_net", "uniform"), ("meta_example_weight_net", "meta_example_weights"),
             ("meta_label_noise", "uniform"),
             ("meta_label_noise", "frozen_label_noise"), ("meta_feature_noise", "uniform"),
             ("meta_feature_noise", "frozen_feature_noise"), ("uniform", "no_pretrain"),
             ("meta_task_weights", "chembl_only"), ("meta_task_weights", "motifs_only"),
             ("uniform", "chembl_only"))

    def settings(self, config: MoleculesJob) -> tuple[str, ...]:
        return config.data.settings

    def load(self, config: MoleculesJob, setting: str, console: Console) -> MoleculeData:
        d = config.data
        data = load_molecule_data(setting, seed=d.split_seed, max_pretrain=d.max_pretrain,
                                  max_downstream=d.max_downstream, progress=True, junk_tasks=d.junk_tasks,
                                  motif_tasks=d.motif_tasks, motif_min_fraction=d.motif_min_fraction)
        groups = _group_counts(data.pretrain_task_names)
        console.print(f"[bold]{setting}[/]: pre-train on {len(data.pretrain_positions)} molecules × "
                      f"{len(data.pretrain_task_names)} tasks"
                      + (f" ({', '.join(f'{n} {g}' for g, n in groups.items())})" if len(groups) > 1 else "")
                      + "; downstream " + ", ".join(f"{k} {len(v)}" for k, v in data.split.items()))
        if data.motifs is not None:
            m = data.motifs
            console.print(f"motif tasks: {m['kept']} of {m['kept'] + len(m['dropped'])} RDKit fr_* fragments kept "
                          f"(dropped: constant, present in or absent from fewer than {m['min_count']} molecules, or "
                          f"duplicates), {'from the cache' if m['from_cache'] else 'computed'} in {m['seconds']:.1f} s")
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
                "downstream": {k: len(v) for k, v in data.split.items()},
                "task_groups": _group_counts(data.pretrain_task_names),
                **({"motifs": data.motifs} if data.motifs is not None else {})}

    def describe(self, config: MoleculesJob, data: MoleculeData, method: Method, phi: dict) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if "task_logits" in phi:
            w = TaskWeights(len(phi["task_logits"]), normalize=config.meta.normalize_weights).weights(phi)
            out["task_weights"] = {name: round(float(v), 4) for name, v in zip(data.pretrain_task_names, w)}
            if len(_group_counts(data.pretrain_task_names)) > 1:
                out["task_group_weights"] = group_means(out["task_weights"])
        if "example_logits" in phi:
            w = weights_from_logits(phi["example_logits"])
            out["example_weights"] = {"mean": float(w.mean()), "std": float(w.std()), "min": float(w.min()),
                                      "max": float(w.max())}
        net = ExampleWeightNet(normalize=config.meta.normalize_weights)  # the summary reads ratios when normalised
        if all(k in phi for k in net.keys):  # the weight at standardised loss −2 … +2, the slopes
            out["example_weight_net"] = net.summary(phi)
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
            by_group = [group_means(w) for w in by_seed]
            if len(by_group[0]) > 1:  # the many-tasks setting: which groups do the weights favour?
                groups = list(by_group[0])
                plot_hbars([f"{g} ({sum(task_group(t) == g for t in by_seed[0])} tasks)" for g in groups],
                           [mean_ci95([w[g] for w in by_group]) for g in groups],
                           out / f"task_weights_by_group_{setting}.png",
                           points=[[w[g] for w in by_group] for g in groups] if len(by_group) > 1 else None,
                           reference=1.0, xlabel="mean learned task weight of the group (1 = uniform)",
                           title=f"{setting}: learned task weights by task group" + (f"\n{over}" if over else ""))


def _group_counts(names: list[str]) -> dict[str, int]:
    """Tasks per group (:data:`TASK_GROUPS` order), groups without tasks left out."""
    counts = {g: sum(task_group(n) == g for n in names) for g in TASK_GROUPS}
    return {g: n for g, n in counts.items() if n}


def group_means(task_weights: dict[str, float]) -> dict[str, float]:
    """The mean weight of each task group (chembl, motif, junk) of a task name → weight mapping."""
    out = {}
    for g in TASK_GROUPS:
        values = [w for t, w in task_weights.items() if task_group(t) == g]
        if values:
            out[g] = round(sum(values) / len(values), 4)
    return out


DOMAIN = Molecules()
CONFIG = MoleculesJob
