"""Multitask GIN pre-training on ChEMBL with meta-learned task weights, example weights and noise.

θ = the GIN encoder and the multitask PT head; φ = any of: per-task weight logits
(the paper's task weighting, w = 2·sigmoid), per-molecule weight logits (data
reweighting, one per pre-training molecule, read with a row-sparse gradient), a shared
example-weight network (Meta-Weight-Net: a molecule's weight from its current PT loss and its
share of observed labels), and a
noise model — per-task label-flip rates (the PT loss is the expected BCE over the
flips) and per-feature Gaussian noise on the graph embedding that feeds the PT head
(reparameterised: the noise draw is part of the batch); ψ = the downstream head.
The encoder is one ``nn.Module`` driven through ``torch.func.functional_call``
with whatever θ the trainer hands over; it is put in train mode for pre-training
and in eval mode for fine-tuning, as in the paper.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor
from torch.func import functional_call
from torch_geometric.data import Batch

from ...metaparams import ExampleWeightNet, ExampleWeights, GaussianNoiseScales, LabelFlipRates, TaskWeights, summarize
from ...problem import EpochShuffler, Params
from ...schema import schema
from .data import held_out_split, load_b3db, load_chembl_pretraining, scaffold_split
from .featurize import MoleculeGraphs, featurize_smiles
from .motifs import MOTIF_PREFIX
from .motifs import motif_tasks as compute_motif_tasks
from .models import GINEncoder, masked_bce


@dataclass(frozen=True)
class MoleculeData:
    """Graphs and labels for pre-training and for one downstream setting.

    Rows of the label matrices are positions in the graph collections.
    ``split`` maps "ft_train", "metaval", "valid", "test" to positions in
    ``downstream``: the downstream train split divided by scaffold into FT-train
    and MetaFT-validation (80/20, as in the paper); "valid" and "test" are never
    seen by meta-learning.
    """

    pretrain: MoleculeGraphs
    pretrain_positions: Tensor  # [N_pt] positions in ``pretrain`` used for pre-training
    pretrain_labels: Tensor  # [N_pt, T_pt], NaN = missing
    downstream: MoleculeGraphs
    downstream_labels: Tensor  # [len(downstream), T_ft], NaN = missing
    split: dict[str, Tensor]
    pretrain_task_names: list[str]
    downstream_task_names: list[str]
    #: what :func:`add_motif_tasks` kept and dropped (:meth:`MotifTasks.summary`); None without motif tasks
    motifs: dict | None = None

    def pretrain_batch(self, rows: Tensor) -> Batch:
        """Rows of the pre-training set (0..N_pt-1) as a batch with ``y`` [B, T_pt]."""
        batch = self.pretrain.batch(self.pretrain_positions[rows])
        batch.y = self.pretrain_labels[rows]
        return batch

    def downstream_batch(self, positions: Tensor) -> Batch:
        batch = self.downstream.batch(positions)
        batch.y = self.downstream_labels[positions]
        return batch

    def iterate_downstream(self, split: str, batch_size: int, shuffle: bool, seed: int):
        """``(batch, labels)`` over "train" (FT-train ∪ MetaFT-validation: evaluation fine-tunes on
        all the downstream training data), "valid" or "test"; the ``iterate`` of
        :func:`metapt.evaluation.finetune_and_score`."""
        if split == "train":
            pos = torch.cat([self.split["ft_train"], self.split["metaval"]]).sort().values
        else:
            pos = self.split[split]
        if shuffle:
            pos = pos[torch.randperm(len(pos), generator=torch.Generator().manual_seed(seed))]
        for i in range(0, len(pos), batch_size):
            batch = self.downstream_batch(pos[i : i + batch_size])
            yield batch, batch.y


class _RowGraphs:
    """Featurise only the needed rows of a SMILES table; map table rows to graph positions."""

    def __init__(self, smiles: list[str], labels: Tensor, rows: Tensor, cache_dir, progress: bool):
        self.rows = rows.unique()  # sorted
        self.graphs = featurize_smiles([smiles[i] for i in self.rows.tolist()], labels[self.rows],
                                       cache_dir=cache_dir, progress=progress)
        lookup = torch.full((len(smiles),), -1, dtype=torch.long)
        lookup[self.rows[self.graphs.index]] = torch.arange(len(self.graphs))
        self._lookup = lookup

    def positions(self, rows: Tensor) -> Tensor:
        """Graph positions of table rows; rows whose SMILES failed to parse are dropped."""
        pos = self._lookup[rows]
        return pos[pos >= 0]

    def table_rows(self) -> Tensor:
        """The table row of every graph position."""
        return self.rows[self.graphs.index]


def _subsample(rows: Tensor, limit: int | None, seed: int) -> Tensor:
    if limit is None or len(rows) <= limit:
        return rows
    keep = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))[:limit]
    return rows[keep.sort().values]


def _subsample_split(split: Mapping[str, Tensor], limit: int | None, seed: int) -> dict[str, Tensor]:
    """``limit`` train rows and a fifth as many valid/test rows (all of them when None)."""
    small = None if limit is None else max(limit // 5, 8)
    return {name: _subsample(rows, limit if name == "train" else small, seed) for name, rows in split.items()}


def add_junk_tasks(data: MoleculeData, count: int, seed: int) -> MoleculeData:
    """``count`` junk pre-training tasks appended to ``data``: a known answer for task weighting.

    Junk task i copies the labels of real task ``order[i mod T]`` (a seeded order of the T real
    tasks) and permutes them among the molecules where that task is observed: the same
    molecules, sparsity and label balance, and no relation between molecule and label. Named
    ``junk<i>:<copied task>``.
    """
    if count < 0:
        raise ValueError(f"junk_tasks must be >= 0, got {count}")
    if count == 0:
        return data
    labels, names = data.pretrain_labels, data.pretrain_task_names
    g = torch.Generator().manual_seed(7_919 * seed + 17)
    order = torch.randperm(labels.shape[1], generator=g)
    columns = []
    for i in range(count):
        source = int(order[i % len(order)])
        column = torch.full_like(labels[:, source], float("nan"))
        observed = (~torch.isnan(labels[:, source])).nonzero().squeeze(1)
        column[observed] = labels[observed[torch.randperm(len(observed), generator=g)], source]
        columns.append((f"junk{i}:{names[source]}", column))
    return dataclasses.replace(
        data, pretrain_labels=torch.cat([labels, torch.stack([c for _, c in columns], 1)], 1),
        pretrain_task_names=[*names, *(n for n, _ in columns)])


def is_junk_task(name: str) -> bool:
    """Whether a pre-training task name is one of :func:`add_junk_tasks`'."""
    return name.startswith("junk") and ":" in name


#: The pre-training task groups: ChEMBL targets, RDKit motif tasks, label-permuted junk tasks.
TASK_GROUPS = ("chembl", "motif", "junk")


def task_group(name: str) -> str:
    """``"junk"`` (:func:`add_junk_tasks`, whatever it copies), ``"motif"`` (:func:`add_motif_tasks`)
    or ``"chembl"`` (a ChEMBL target column)."""
    if is_junk_task(name):
        return "junk"
    return "motif" if name.startswith(MOTIF_PREFIX) else "chembl"


def add_motif_tasks(data: MoleculeData, smiles: list[str], min_fraction: float = 0.01, *,
                    cache_dir: str | None = None) -> MoleculeData:
    """``data`` with RDKit functional-group tasks (:func:`metapt.domains.molecules.motifs.motif_tasks`)
    appended to its pre-training tasks, named ``motif:fr_*``.

    ``smiles[i]`` must be pre-training row i's molecule: the labels, and which fragments are kept
    (constant, rare and duplicate ones are dropped), come from these structures alone; no
    downstream molecule or label is read.
    """
    if len(smiles) != len(data.pretrain_positions):
        raise ValueError(f"add_motif_tasks: {len(smiles)} SMILES for {len(data.pretrain_positions)} pre-training rows")
    motifs = compute_motif_tasks(smiles, min_fraction, cache_dir=cache_dir)
    return dataclasses.replace(
        data, pretrain_labels=torch.cat([data.pretrain_labels, motifs.labels], 1),
        pretrain_task_names=[*data.pretrain_task_names, *motifs.names], motifs=motifs.summary())


def keep_task_groups(data: MoleculeData, groups: tuple[str, ...]) -> MoleculeData:
    """``data`` with the labels of every pre-training task outside ``groups`` masked (NaN): the same
    molecules and task columns, pre-trained on the kept groups only."""
    keep = torch.tensor([task_group(n) in groups for n in data.pretrain_task_names])
    if not keep.any():
        raise ValueError(f"no pre-training task is in the groups {list(groups)}; the tasks' groups are "
                         f"{sorted({task_group(n) for n in data.pretrain_task_names})} (motif tasks need "
                         "data.motif_tasks=true, junk tasks data.junk_tasks > 0)")
    return dataclasses.replace(data, pretrain_labels=data.pretrain_labels.masked_fill(~keep, float("nan")))


def load_molecule_data(
    setting: str = "b3db",
    *,
    seed: int = 0,
    max_pretrain: int | None = None,
    max_downstream: int | None = None,
    cache_dir: str | None = None,
    progress: bool = False,
    junk_tasks: int = 0,
    motif_tasks: bool = False,
    motif_min_fraction: float = 0.01,
) -> MoleculeData:
    """Featurise (cached) the shipped data for a downstream setting.

    Args:
        setting: ``"b3db"`` — pre-train on all 30 ChEMBL targets, fine-tune on B3DB
            blood-brain-barrier permeability (its scaffold split); ``"heldout"`` —
            pre-train on 20 ChEMBL targets, fine-tune on the 10 held out (``seed``
            picks them; held-out valid/test molecules are excluded from pre-training).
        seed: picks subsets and the held-out targets.
        max_pretrain, max_downstream: seeded subsets for tests and quick runs (the
            downstream valid/test splits get a fifth of ``max_downstream`` each).
        junk_tasks: label-permuted copies of real tasks appended as pre-training tasks
            (:func:`add_junk_tasks`, seeded by ``seed``): a planted answer for task weights.
        motif_tasks: add RDKit functional-group presence tasks of the pre-training molecules
            (:func:`add_motif_tasks`; ``motif_min_fraction`` drops the rare ones), before the junk
            tasks (which may then copy a motif task too).
    """
    chembl = load_chembl_pretraining()
    if setting == "b3db":
        pt_rows = _subsample(torch.arange(len(chembl)), max_pretrain, seed)
        pt_tasks = torch.arange(chembl.num_tasks)
        b3db = load_b3db()
        ds_split = _subsample_split(b3db.split, max_downstream, seed)
        ds_table = _RowGraphs(b3db.smiles, b3db.labels.view(-1, 1), torch.cat(list(ds_split.values())), cache_dir, progress)
        pt_table = _RowGraphs(chembl.smiles, chembl.labels, pt_rows, cache_dir, progress)
        ds_labels = ds_table.graphs.y
        ds_scaffolds = [b3db.scaffolds[i] for i in ds_table.table_rows().tolist()]
        ds_names = ["BBB+"]
    elif setting == "heldout":
        hs = held_out_split(chembl, 20, seed)
        pt_rows = _subsample(hs.pretrain_rows, max_pretrain, seed)
        pt_tasks = hs.pretrain_tasks
        ds_split = _subsample_split(hs.finetune_split, max_downstream, seed)
        # one featurisation serves both: the downstream molecules are ChEMBL molecules too
        pt_table = ds_table = _RowGraphs(
            chembl.smiles, chembl.labels, torch.cat([pt_rows, *ds_split.values()]), cache_dir, progress
        )
        ds_labels = ds_table.graphs.y[:, hs.finetune_tasks]
        ds_scaffolds = [chembl.scaffolds[i] for i in ds_table.table_rows().tolist()]
        ds_names = hs.finetune_targets
    else:
        raise ValueError(f"unknown molecules setting {setting!r}; choose 'b3db' or 'heldout'")

    pt_positions = pt_table.positions(pt_rows)
    local = {name: ds_table.positions(rows) for name, rows in ds_split.items()}
    local_train = local["train"]
    meta = scaffold_split([ds_scaffolds[i] for i in local_train.tolist()], (0.8, 0.2, 0.0))
    data = MoleculeData(
        pretrain=pt_table.graphs,
        pretrain_positions=pt_positions,
        pretrain_labels=pt_table.graphs.y[pt_positions][:, pt_tasks],
        downstream=ds_table.graphs,
        downstream_labels=ds_labels,
        split={"ft_train": local_train[meta["train"]], "metaval": local_train[meta["valid"]],
               "valid": local["valid"], "test": local["test"]},
        pretrain_task_names=[chembl.target_names[int(t)] for t in pt_tasks],
        downstream_task_names=ds_names,
    )
    if motif_tasks:  # the pre-training molecules' own structures, row by row
        pt_smiles = [chembl.smiles[i] for i in pt_table.table_rows()[pt_positions].tolist()]
        data = add_motif_tasks(data, pt_smiles, motif_min_fraction, cache_dir=cache_dir)
    return add_junk_tasks(data, junk_tasks, seed)


@schema
class NoiseModelConfig:
    """Starting values of the molecules noise models (used when :class:`WeightingConfig` enables them).

    Attributes:
        label_flip_init: ρ₀, the initial label-flip rate of every task, in (0, 0.5).
        embedding_noise_init: σ₀, the initial std of the noise on every embedding feature
            (the embeddings are layer-normed: about unit scale).
    """

    label_flip_init: float = 0.05
    embedding_noise_init: float = 0.1

    def __post_init__(self):
        if not 0 < self.label_flip_init < 0.5:
            raise ValueError(f"noise.label_flip_init must be in (0, 0.5), got {self.label_flip_init}")
        if not (self.embedding_noise_init > 0 and math.isfinite(self.embedding_noise_init)):
            raise ValueError(f"noise.embedding_noise_init must be finite and > 0, got {self.embedding_noise_init}")


@schema
class WeightingConfig:
    """Which meta-parameters φ to learn.

    Attributes:
        task_weights: one weight per pre-training task (the paper's setting).
        example_weights: one weight per pre-training molecule (data reweighting).
        example_weight_net: a molecule's weight from a small network of its current PT loss and
            its share of observed labels (:class:`metapt.metaparams.ExampleWeightNet`, the
            features standardised within the batch); with ``example_weights`` too, a molecule's
            weight is the product of the two.
        label_noise: per-task label-flip rates ρ_t = 0.5·sigmoid(φ_t) (a noise model; the PT
            loss is the expected BCE over the flips, i.e. label smoothing by ρ_t).
        feature_noise: per-feature Gaussian noise σ_j = exp(φ_j) on the graph embedding fed
            to the PT head (a noise model; the standard normal draw is part of the batch).
        noise: the noise models' starting values.
        normalize: task weights T·softmax and example weights scaled to mean 1 per batch
            (``meta.normalize_weights``).
        task_groups: pre-train on the tasks of these groups only (:data:`TASK_GROUPS`: ``chembl``,
            ``motif``, ``junk``); the others' labels are masked (NaN), which is pre-training without
            them: the loss averages over observed labels. None: every task.
    """

    task_weights: bool = True
    example_weights: bool = False
    example_weight_net: bool = False
    label_noise: bool = False
    feature_noise: bool = False
    noise: NoiseModelConfig = NoiseModelConfig()
    normalize: bool = False
    task_groups: tuple[Literal["chembl", "motif", "junk"], ...] | None = None


class MoleculesProblem:
    """Implements :class:`metapt.problem.MetaProblem` for ChEMBL → downstream molecules."""

    def __init__(
        self,
        data: MoleculeData,
        encoder: GINEncoder,
        weighting: WeightingConfig = WeightingConfig(),
        *,
        pt_batch_size: int = 64,
        ft_batch_size: int = 64,
        seed: int = 0,
    ):
        if weighting.task_groups is not None:
            data = keep_task_groups(data, weighting.task_groups)
        self.data, self.encoder, self.weighting = data, encoder, weighting
        self.num_pt_tasks = data.pretrain_labels.shape[1]
        self.num_ft_tasks = data.downstream_labels.shape[1]
        self._pt_order = EpochShuffler(len(data.pretrain_positions), pt_batch_size, seed)
        split = data.split
        self._ft_order = EpochShuffler(len(split["ft_train"]), ft_batch_size, seed + 1)
        self._val_order = EpochShuffler(len(split["metaval"]), ft_batch_size, seed + 2)
        self.seed = seed
        names = data.pretrain_task_names
        w = weighting
        #: the families of φ this problem learns, in φ's key order
        self.families = [f for f, on in (
            (TaskWeights(self.num_pt_tasks, names=names, normalize=w.normalize), w.task_weights),
            (ExampleWeights(len(data.pretrain_positions), normalize=w.normalize), w.example_weights),
            (ExampleWeightNet(normalize=w.normalize), w.example_weight_net),
            (LabelFlipRates(self.num_pt_tasks, w.noise.label_flip_init, names=names), w.label_noise),
            (GaussianNoiseScales(encoder.emb_dim, w.noise.embedding_noise_init, key="feature_noise"), w.feature_noise),
        ) if on]
        if not self.families:
            raise ValueError("WeightingConfig: enable task_weights, example_weights, example_weight_net, label_noise "
                             "or feature_noise")

    # ---- initial values -------------------------------------------------------------------

    def initial_params(self) -> Params:
        """θ: the encoder's parameters (``enc.*``) and a fresh multitask PT head (``pt.*``)."""
        params = {f"enc.{k}": v.detach().clone() for k, v in self.encoder.named_parameters()}
        head = torch.nn.Linear(self.encoder.emb_dim, self.num_pt_tasks)
        params.update({f"pt.{k}": v.detach().clone() for k, v in head.named_parameters()})
        return params

    def initial_head(self) -> Params:
        """ψ: the downstream linear head, zero so the first FT steps see every feature alike."""
        return {
            "weight": torch.zeros(self.num_ft_tasks, self.encoder.emb_dim),
            "bias": torch.zeros(self.num_ft_tasks),
        }

    def initial_metaparams(self) -> Params:
        """φ₀: weights 1, flip rates and embedding noise at their configured starting values."""
        phi: Params = {}
        for family in self.families:
            phi.update(family.init())
        return phi

    def _family(self, kind: type):
        return next((f for f in self.families if isinstance(f, kind)), None)

    # ---- MetaProblem ----------------------------------------------------------------------

    def embed(self, params: Params, graphs: Batch, *, train: bool) -> Tensor:
        """[B, emb_dim] graph embeddings from the ``enc.*`` entries of θ."""
        self.encoder.train(train)
        enc = {k[4:]: v for k, v in params.items() if k.startswith("enc.")}
        return functional_call(self.encoder, enc, (graphs,))

    def pretrain_loss(self, params: Params, metaparams: Params, batch: tuple[Batch, Tensor]) -> Tensor:
        """Masked multitask BCE, weighted by task and example weights, with the noise models applied:
        z + σ ⊙ ε for the embedding, ỹ = y(1 − ρ) + (1 − y)ρ for the labels."""
        return self.pretrain_output_loss(self.pretrain_outputs(params, metaparams, batch), metaparams, batch)

    def pretrain_outputs(self, params: Params, metaparams: Params, batch: tuple[Batch, Tensor]) -> Tensor:
        """The PT logits [B, tasks] (the outputs of :meth:`pretrain_loss`, in which it is convex: Gauss–Newton)."""
        graphs, _ = batch
        z = self.embed(params, graphs, train=True)
        noise = self._family(GaussianNoiseScales)
        if noise is not None:
            z = z + noise.noise(metaparams, graphs.embedding_noise.to(z.dtype))
        return z @ params["pt.weight"].T + params["pt.bias"]

    def pretrain_output_loss(self, logits: Tensor, metaparams: Params, batch: tuple[Batch, Tensor]) -> Tensor:
        """The masked, task- and example-weighted BCE of the PT logits (convex in them, the weights
        held fixed: the weight network's features are detached). The weight network reads each
        molecule's loss from these logits and labels (the smoothed ones with label noise): no second
        forward."""
        graphs, rows = batch
        tasks, examples, flips = self._family(TaskWeights), self._family(ExampleWeights), self._family(LabelFlipRates)
        net = self._family(ExampleWeightNet)
        labels = graphs.y if flips is None else flips.smooth(metaparams, graphs.y.to(logits.dtype))
        task_w = tasks.weights(metaparams) if tasks is not None else None
        example_w = examples.weights(metaparams, rows) if examples is not None else None
        if net is not None:
            net_w = net.weights(metaparams, net.features(logits, labels))
            example_w = net_w if example_w is None else example_w * net_w
        return masked_bce(logits, labels, task_w, example_w)

    def finetune_loss(self, params: Params, head: Params, batch: Batch) -> Tensor:
        logits = self.embed(params, batch, train=False) @ head["weight"].T + head["bias"]
        return masked_bce(logits, batch.y)

    def pretrain_batch(self, index: int) -> tuple[Batch, Tensor]:
        """(graphs, rows); with feature noise, ``graphs.embedding_noise`` [B, emb_dim] ~ N(0, I) seeded by ``index``."""
        rows = self._pt_order.indices(index)
        graphs = self.data.pretrain_batch(rows)
        if self.weighting.feature_noise:
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + index) * 2 + 1)
            graphs.embedding_noise = torch.randn(len(rows), self.encoder.emb_dim, generator=g)
        return graphs, rows

    def finetune_batch(self, index: int) -> Batch:
        return self.data.downstream_batch(self.data.split["ft_train"][self._ft_order.indices(index)])

    def metaval_batch(self, index: int) -> Batch:
        return self.data.downstream_batch(self.data.split["metaval"][self._val_order.indices(index)])

    def describe_metaparams(self, metaparams: Params) -> Mapping[str, float]:
        """Every family's summary (min/max/std of the weights, mean/min/max flip rate and noise σ)."""
        return {k: v for k, v in summarize(self.families, metaparams).items() if "/" not in k}

    # ---- state outside θ --------------------------------------------------------------------

    def state_dict(self) -> dict[str, Tensor]:
        """The encoder's buffers (batch-norm running statistics): checkpointed with θ for exact resume."""
        return {k: v.detach().clone() for k, v in self.encoder.named_buffers()}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        buffers = dict(self.encoder.named_buffers())
        if set(state) != set(buffers):
            raise ValueError(f"buffers do not match the encoder: got {sorted(state)}, expected {sorted(buffers)}")
        with torch.no_grad():
            for k, v in state.items():
                buffers[k].copy_(v)

    # ---- after pre-training ---------------------------------------------------------------

    def encoder_with(self, params: Mapping[str, Tensor]) -> GINEncoder:
        """A copy of the encoder module holding θ's ``enc.*`` weights, for downstream evaluation."""
        enc = copy.deepcopy(self.encoder)
        missing, unexpected = enc.load_state_dict(
            {k[4:]: v.detach() for k, v in params.items() if k.startswith("enc.")}, strict=False
        )
        buffers = {name for name, _ in enc.named_buffers()}
        if unexpected or set(missing) - buffers:  # buffers (batch-norm statistics) stay the module's own
            raise ValueError(f"params do not match the encoder: missing {sorted(set(missing) - buffers)}, unexpected {unexpected}")
        return enc
