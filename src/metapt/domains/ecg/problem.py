"""SimCLR on ECG with a meta-learned augmentation (Raghu et al. 2021, section 4.2), as a MetaProblem.

θ = the 1-D ResNet encoder and SimCLR's projection head; φ = the parameters of
:class:`LearnedWarp` (its scale CNN and the global log-magnitude) and/or a learned noise model,
band-limited Gaussian noise with one log-amplitude per frequency band (``band_noise``);
ψ = a linear classifier on the encoder's embedding. The PT loss is NT-Xent between two views of
each beat, each view the default SimCLR augmentations followed, in the meta-learned methods, by
the learned warp and then the learned noise. φ reaches θ only through the views, so the
hypergradient flows through ``grid_sample`` into the warp network and through the
(reparameterised) noise into its amplitudes.

Everything random about a batch (which beats, the masks and noise of the default
augmentations, the warp's Gaussian flow, the learned noise's white-noise draw) is drawn from generators seeded by the batch index,
so batch ``i`` is the same tensor every time it is asked for: the meta-step's PT batch is
exactly the one the PT step used, and a run is a pure function of its step counter.

Why GroupNorm (``norm="group"``) and not the paper's BatchNorm: under
``torch.func.functional_call`` a BatchNorm layer in train mode updates its running-stat
buffers in place on every forward, including the extra forwards of Hessian-vector products
and unrolled fine-tuning steps, so the hypergradient would change the model it differentiates
and the stats would not be part of θ (not checkpointed, not resumable). In eval mode it
would normalise with never-trained running stats. GroupNorm normalises each example on its
own, has no buffers, and behaves identically in train and eval mode, so "the encoder in eval
mode during fine-tuning" (the paper) holds by construction. ``norm="batch"`` is refused.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from ...errors import DataError  # a ValueError too
from ...problem import EpochShuffler, LabelledBatches, Params
from ...schema import schema
from ...metaparams import AugmentationNetwork, GaussianNoiseScales
from .augment import BandNoiseConfig, LearnedWarp, WarpConfig, band_split, default_augment
from .data import ECGDataset, group_sizes, ptbxl_fold_indices
from .losses import nt_xent
from .models import EncoderConfig, ProjectionHead, ResNet1dEncoder

__all__ = [
    "ECGProblemConfig",
    "ECGSimCLRProblem",
    "ECGSplit",
    "PTBXLFolds",
    "PretrainBatch",
    "RecordFractions",
    "SimCLRNet",
    "label_subset",
    "cross_validation_folds",
    "split_beats_by_record",
    "split_beats_cross_validation",
    "split_ptbxl_by_fold",
    "split_ecg",
]


# --------------------------------------------------------------------------- splits


@schema
class RecordFractions:
    """Shares of the records (patients) in each group of the beat layout.

    Attributes:
        pretrain: share of the records whose beats pre-train (SimCLR, no labels).
        ft_train: share whose labelled beats fine-tune (and give the downstream 'valid' split).
        metaval: share that makes the MetaFT-validation set of the meta-objective.
        test: share held out for the test scores.
    """

    pretrain: float = 0.4
    ft_train: float = 0.2
    metaval: float = 0.15
    test: float = 0.25

    def __post_init__(self) -> None:
        values = (self.pretrain, self.ft_train, self.metaval, self.test)
        if any(not math.isfinite(v) or v <= 0 for v in values):
            raise ValueError(f"RecordFractions: every share must be > 0 (each group needs a record), got {values}")

    def as_tuple(self) -> tuple[float, float, float, float]:
        return (self.pretrain, self.ft_train, self.metaval, self.test)


@schema
class PTBXLFolds:
    """PTB-XL's strat_fold groups (already stratified by patient).

    The default follows the paper and the PTB-XL benchmark: pre-train on the unlabelled
    ECGs of folds 1-8, fine-tune on (a label fraction of) the same folds, MetaFT-validation on
    fold 9, test on fold 10, which no pre-training, fine-tuning or meta-step ever sees.

    Attributes:
        pretrain: strat_folds whose ECGs pre-train.
        ft_train: strat_folds whose labelled ECGs fine-tune.
        metaval: strat_folds of the MetaFT-validation set.
        test: strat_folds held out for the test scores.
    """

    pretrain: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 8)
    ft_train: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 8)
    metaval: tuple[int, ...] = (9,)
    test: tuple[int, ...] = (10,)

    def __post_init__(self) -> None:
        held_out = set(self.test)
        if held_out & (set(self.pretrain) | set(self.ft_train) | set(self.metaval)) or set(self.metaval) & (
            set(self.pretrain) | set(self.ft_train)
        ):
            raise ValueError(
                f"PTBXLFolds: the test folds {self.test} and MetaFT-validation folds {self.metaval} must not be "
                "used by any other group; choose disjoint folds"
            )


@dataclass(frozen=True)
class ECGSplit:
    """Example indices of the four groups, and the records (patients) behind them."""

    pretrain: np.ndarray
    ft_train: np.ndarray
    metaval: np.ndarray
    test: np.ndarray
    records: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def groups(self) -> dict[str, np.ndarray]:
        return {"pretrain": self.pretrain, "ft_train": self.ft_train, "metaval": self.metaval, "test": self.test}


def split_beats_by_record(
    ds: ECGDataset,
    fractions: RecordFractions = RecordFractions(),
    *,
    seed: int = 0,
    min_positives: int = 20,
    class_index: int = 0,
    max_tries: int = 10_000,
) -> ECGSplit:
    """Four disjoint groups of records: pre-train, FT-train, MetaFT-validation, test.

    The first seeded permutation of the records whose FT-train, MetaFT-validation and test
    groups each hold at least ``min_positives`` positives of ``class_index`` (PVCs cluster
    in a few MIT-BIH records, so an unconstrained split can leave a group without any).
    """
    unique = sorted({str(p) for p in ds.patient_ids})
    if len(unique) < 4:
        raise DataError(f"{len(unique)} records cannot fill 4 disjoint groups; the beat layout needs at least 4")
    sizes = group_sizes(len(unique), fractions.as_tuple())
    positives = ds.positives_per_patient(class_index)
    rng = np.random.default_rng(seed)
    for _ in range(max_tries):
        order = [str(r) for r in rng.permutation(unique)]
        bounds = np.cumsum([0, *sizes])
        groups = [tuple(sorted(order[a:b])) for a, b in zip(bounds[:-1], bounds[1:])]
        if all(sum(positives.get(r, 0) for r in g) >= min_positives for g in groups[1:]):
            names = ("pretrain", "ft_train", "metaval", "test")
            index = {n: np.flatnonzero(np.isin(ds.patient_ids, np.array(g, dtype=str))) for n, g in zip(names, groups)}
            return ECGSplit(**index, records=dict(zip(names, groups)))
    raise DataError(
        f"no split of the {len(unique)} records in {max_tries} seeded draws gives FT-train, MetaFT-validation and "
        f"test {min_positives} positives each (positives per record: {positives}); lower min_positives or "
        "change the record fractions"
    )


def cross_validation_folds(ds: ECGDataset, folds: int, *, seed: int = 0, class_index: int = 0) -> list[tuple[str, ...]]:
    """Every record in exactly one of ``folds`` test folds, the positives spread evenly.

    Records are dealt in snake order (0…K−1, K−1…0, …) from most to fewest positives (a
    seeded draw breaks ties), so each fold gets one of the records that hold most positives
    and every fold can be scored. A fold without positives is an error: AUROC needs both classes.
    """
    unique = sorted({str(p) for p in ds.patient_ids})
    if not 2 <= folds <= len(unique) - 2:
        raise DataError(f"data.cv_folds must be between 2 and {len(unique) - 2} with {len(unique)} records "
                         f"(the other folds must fill FT-train and MetaFT-validation), got {folds}")
    positives = ds.positives_per_patient(class_index)
    tiebreak = np.random.default_rng(seed).permutation(len(unique))
    order = sorted(range(len(unique)), key=lambda i: (-positives.get(unique[i], 0), tiebreak[i]))
    groups: list[list[str]] = [[] for _ in range(folds)]
    for rank, i in enumerate(order):
        lap, pos = divmod(rank, folds)
        groups[pos if lap % 2 == 0 else folds - 1 - pos].append(unique[i])
    empty = [k for k, g in enumerate(groups) if sum(positives.get(r, 0) for r in g) == 0]
    if empty:
        raise DataError(f"data.cv_folds={folds}: test fold(s) {empty} would hold no positives (positives per "
                         f"record: {positives}); choose fewer folds")
    return [tuple(sorted(g)) for g in groups]


def split_beats_cross_validation(
    ds: ECGDataset,
    folds: int,
    fold: int,
    fractions: RecordFractions = RecordFractions(),
    *,
    seed: int = 0,
    min_positives: int = 20,
    class_index: int = 0,
    max_tries: int = 10_000,
) -> ECGSplit:
    """Test on fold ``fold`` of :func:`cross_validation_folds`; pre-train on every other record.

    Self-supervised pre-training reads no labels, so it takes every record not tested
    (FT-train's and MetaFT-validation's too). The other records are split by record between
    FT-train and MetaFT-validation in the ratio of ``fractions``, the first seeded
    permutation that gives each ``min_positives`` positives.
    """
    groups = cross_validation_folds(ds, folds, seed=seed, class_index=class_index)
    if not 0 <= fold < folds:
        raise ValueError(f"data.cv_fold must be in [0, {folds}), got {fold}")
    test = groups[fold]
    rest = sorted(r for g in groups for r in g if r not in test)
    n_meta = min(len(rest) - 1, max(1, round(len(rest) * fractions.metaval / (fractions.ft_train + fractions.metaval))))
    positives = ds.positives_per_patient(class_index)
    rng = np.random.default_rng(seed * 1009 + fold)
    for _ in range(max_tries):
        order = [str(r) for r in rng.permutation(rest)]
        metaval, ft_train = tuple(sorted(order[:n_meta])), tuple(sorted(order[n_meta:]))
        if all(sum(positives.get(r, 0) for r in g) >= min_positives for g in (ft_train, metaval)):
            records = {"pretrain": tuple(rest), "ft_train": ft_train, "metaval": metaval, "test": test}
            index = {n: np.flatnonzero(np.isin(ds.patient_ids, np.array(g, dtype=str))) for n, g in records.items()}
            return ECGSplit(**index, records=records)
    raise DataError(
        f"cross-validation fold {fold}: no split of the other {len(rest)} records in {max_tries} seeded draws gives "
        f"FT-train and MetaFT-validation {min_positives} positives each (positives per record: {positives}); lower "
        "data.min_positives"
    )


def split_ptbxl_by_fold(ds: ECGDataset, folds: PTBXLFolds = PTBXLFolds()) -> ECGSplit:
    """The four groups from PTB-XL's ``strat_fold`` (see :class:`PTBXLFolds`)."""
    idx = ptbxl_fold_indices(ds, folds.ft_train, folds.metaval, folds.test)
    pretrain = np.flatnonzero(np.isin(ds.folds, folds.pretrain))
    groups = {"pretrain": pretrain, "ft_train": idx["train"], "metaval": idx["valid"], "test": idx["test"]}
    records = {name: tuple(sorted({str(p) for p in ds.patient_ids[i]})) for name, i in groups.items()}
    split = ECGSplit(**groups, records=records)
    for name, i in split.groups().items():
        if len(i) == 0:
            raise DataError(f"PTB-XL group {name!r} is empty with folds {folds}; choose folds present in the data")
    return split


def split_ecg(
    ds: ECGDataset,
    fractions: RecordFractions = RecordFractions(),
    folds: PTBXLFolds = PTBXLFolds(),
    *,
    seed: int = 0,
    min_positives: int = 20,
) -> ECGSplit:
    """By record for the beat layout, by strat_fold for PTB-XL (the dataset's own ``layout``)."""
    if ds.folds is not None:
        return split_ptbxl_by_fold(ds, folds)
    return split_beats_by_record(ds, fractions, seed=seed, min_positives=min_positives)


def label_subset(labels: Tensor, fraction: float, seed: int, min_examples: int = 8) -> np.ndarray:
    """A seeded ``fraction`` of the examples (at least ``min_examples``), sorted indices.

    Uniform, then topped up with one positive and one negative of every class that has both
    in the pool but not in the sample: BCE fine-tuning and AUROC model selection need both.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"label fraction must be in (0, 1], got {fraction}")
    n = labels.shape[0]
    k = min(n, max(min_examples, int(round(fraction * n))))
    rng = np.random.default_rng(seed)
    chosen = set(rng.choice(n, size=k, replace=False).tolist())
    y = labels.reshape(n, -1).numpy() > 0.5
    for c in range(y.shape[1]):
        for value in (True, False):
            pool = np.flatnonzero(y[:, c] == value)
            if len(pool) and not any(y[i, c] == value for i in chosen):
                chosen.add(int(rng.choice(pool)))
    return np.array(sorted(chosen), dtype=np.int64)


# --------------------------------------------------------------------------- the problem


@schema
class ECGProblemConfig:
    """Shape of the ECG SimCLR problem.

    Attributes:
        encoder: the 1-D ResNet (``in_channels`` is set from the data); GroupNorm by default,
            see the module docstring for why BatchNorm is refused.
        projection_dim: SimCLR projection output size (the hidden layer is the embedding size).
        use_warp: apply the meta-learned warp φ after the default augmentations. False is the
            clean baseline: default augmentations only, no warp network at all.
        warp: the warp network (``in_channels`` is set from the data).
        use_noise: add the learned band-limited Gaussian noise (a noise model, φ entry
            ``band_noise``: one log-amplitude per band) to each view, after the warp if any.
        noise: the noise model's bands and initial amplitude.
        temperature: NT-Xent temperature (paper: 0.5).
        pretrain_batch_size: beats per PT batch (2x as many views).
        finetune_batch_size: beats per FT-train / MetaFT-validation batch.
        max_mask_fraction, max_noise_std: the default augmentations (paper: 0.5, 0.1).
        seed: seeds batch order and augmentation draws.
    """

    encoder: EncoderConfig = EncoderConfig(norm="group")
    projection_dim: int = 64
    use_warp: bool = True
    warp: WarpConfig = WarpConfig()
    use_noise: bool = False
    noise: BandNoiseConfig = BandNoiseConfig()
    temperature: float = 0.5
    pretrain_batch_size: int = 64
    finetune_batch_size: int = 64
    max_mask_fraction: float = 0.5
    max_noise_std: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.encoder.norm == "batch":
            raise ValueError(
                "ECGProblemConfig: encoder norm='batch' would update BatchNorm running stats in place inside "
                "hypergradients and unrolled steps; use EncoderConfig(norm='group') or norm='none'"
            )
        if self.pretrain_batch_size < 2:
            raise ValueError(
                f"pretrain_batch_size must be >= 2 (NT-Xent needs negatives), got {self.pretrain_batch_size}"
            )
        if self.finetune_batch_size < 1 or self.projection_dim < 1:
            raise ValueError("finetune_batch_size and projection_dim must be >= 1")


class PretrainBatch(NamedTuple):
    """Two default-augmented views of the same beats and the learned augmentations' random inputs.

    ``noise1``/``noise2``: the warp's Gaussian input, None without a warp network.
    ``bands1``/``bands2``: white noise split into frequency bands ``[N, bands, leads, L]``
    (:func:`band_split`), None without the learned noise model.
    """

    view1: Tensor
    view2: Tensor
    noise1: Tensor | None
    noise2: Tensor | None
    bands1: Tensor | None = None
    bands2: Tensor | None = None


class SimCLRNet(nn.Module):
    """Encoder + projection head; θ is this module's ``named_parameters()``."""

    def __init__(self, encoder: ResNet1dEncoder, projector: ProjectionHead):
        super().__init__()
        self.encoder, self.projector = encoder, projector

    def forward(self, x: Tensor) -> Tensor:
        return self.projector(self.encoder(x))


def _index_generator(seed: int, index: int, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + index) * 4 + stream)


class ECGSimCLRProblem(LabelledBatches):
    """SimCLR pre-training with a learned warp, PVC (or superclass) fine-tuning; a MetaProblem.

    Args:
        pretrain_signals: unlabelled ``[N, leads, L]`` beats/ECGs for pre-training.
        ft_train: ``(signals, labels [N, C])`` for the unrolled fine-tuning steps.
        metaval: ``(signals, labels)``, the MetaFT-validation data of the meta-loss.
        config: :class:`ECGProblemConfig`.
        dtype: float32 for runs, float64 for exactness tests.
    """

    def __init__(
        self,
        pretrain_signals: Tensor,
        ft_train: tuple[Tensor, Tensor],
        metaval: tuple[Tensor, Tensor],
        config: ECGProblemConfig = ECGProblemConfig(),
        dtype: torch.dtype = torch.float32,
    ):
        for name, x in (("pretrain", pretrain_signals), ("ft_train", ft_train[0]), ("metaval", metaval[0])):
            if x.dim() != 3 or x.shape[0] == 0:
                raise ValueError(f"{name} signals must be a non-empty [N, leads, L] tensor, got {tuple(x.shape)}")
        if ft_train[1].dim() != 2 or metaval[1].shape[1:] != ft_train[1].shape[1:]:
            raise ValueError("labels must be [N, classes], the same classes for FT-train and MetaFT-validation")
        leads = pretrain_signals.shape[1]
        self.config = config = replace(
            config, encoder=replace(config.encoder, in_channels=leads), warp=replace(config.warp, in_channels=leads)
        )
        self.dtype = dtype
        self.pretrain_x = pretrain_signals.to(dtype)
        self.ft_train = (ft_train[0].to(dtype), ft_train[1].to(dtype))
        self.metaval = (metaval[0].to(dtype), metaval[1].to(dtype))
        self.num_classes = ft_train[1].shape[1]
        encoder = ResNet1dEncoder(config.encoder)
        self.net = SimCLRNet(encoder, ProjectionHead(encoder.embedding_dim, out_dim=config.projection_dim)).to(dtype)
        self.net.eval()  # no dropout, no batch statistics: train and eval mode are the same function
        self.warp: LearnedWarp | None = LearnedWarp(config.warp).to(dtype) if config.use_warp else None
        self.noise_model = (GaussianNoiseScales(config.noise.bands, config.noise.init_amplitude, key="band_noise",
                                                names=[f"b{b}" for b in range(config.noise.bands)])
                            if config.use_noise else None)
        if config.use_noise and config.noise.bands > pretrain_signals.shape[-1] // 2 + 1:
            raise ValueError(f"noise.bands ({config.noise.bands}) exceeds the {pretrain_signals.shape[-1] // 2 + 1} "
                             "frequency bins of a beat; use fewer bands")
        self._pt_order = EpochShuffler(len(self.pretrain_x), config.pretrain_batch_size, seed=config.seed)
        self._ft_order = EpochShuffler(len(self.ft_train[0]), config.finetune_batch_size, seed=config.seed + 1)
        self._val_order = EpochShuffler(len(self.metaval[0]), config.finetune_batch_size, seed=config.seed + 2)
        probe = torch.randperm(len(self.pretrain_x), generator=torch.Generator().manual_seed(config.seed))[:32]
        self._probe = self.pretrain_x[probe]  # fixed beats on which describe_metaparams measures the warp
        self._probe_noise = torch.randn(len(probe), config.warp.n_knots, generator=torch.Generator().manual_seed(1),
                                        dtype=dtype)

    def to(self, device: torch.device) -> ECGSimCLRProblem:
        """Move the problem's own tensors and modules to ``device`` (its batches are built from them)."""
        self.pretrain_x = self.pretrain_x.to(device)
        self.ft_train = tuple(t.to(device) for t in self.ft_train)
        self.metaval = tuple(t.to(device) for t in self.metaval)
        self._probe, self._probe_noise = self._probe.to(device), self._probe_noise.to(device)
        self.net.to(device)
        if self.warp is not None:
            self.warp.to(device)
        return self

    @classmethod
    def from_dataset(
        cls, ds: ECGDataset, split: ECGSplit, config: ECGProblemConfig = ECGProblemConfig(),
        dtype: torch.dtype = torch.float32,
    ) -> "ECGSimCLRProblem":
        """Pre-train on the split's pre-training group (labels unused), FT/MetaFT on its labelled groups."""
        def pick(i: np.ndarray) -> tuple[Tensor, Tensor]:
            t = torch.from_numpy(np.asarray(i, dtype=np.int64))
            return ds.signals[t], ds.labels[t]

        return cls(pick(split.pretrain)[0], pick(split.ft_train), pick(split.metaval), config, dtype)

    @property
    def embedding_dim(self) -> int:
        return self.net.encoder.embedding_dim

    # ---- initial values -----------------------------------------------------------------

    def initial_params(self, seed: int = 0) -> Params:
        """θ₀: a freshly initialised encoder and projection head (PyTorch's default init, seeded)."""
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            encoder = ResNet1dEncoder(self.config.encoder)
            net = SimCLRNet(encoder, ProjectionHead(encoder.embedding_dim, out_dim=self.config.projection_dim))
        return {k: v.detach().to(self.dtype) for k, v in net.named_parameters()}

    def initial_head(self) -> Params:
        """ψ₀: a zero linear classifier (its first unrolled step is then plain logistic regression)."""
        return {"weight": torch.zeros(self.num_classes, self.embedding_dim, dtype=self.dtype),
                "bias": torch.zeros(self.num_classes, dtype=self.dtype)}

    def initial_metaparams(self, seed: int = 0) -> Params:
        """φ₀: the warp network's parameters and the noise model's log-amplitudes (empty for the baseline)."""
        phi: Params = {}
        if self.warp is not None:
            with torch.random.fork_rng():
                torch.manual_seed(seed)
                warp = LearnedWarp(self.config.warp).to(self.dtype)
            phi.update(AugmentationNetwork(warp).init())
        if self.noise_model is not None:
            phi.update(self.noise_model.init(self.dtype))
        return phi

    def _warp_phi(self, metaparams: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {k: v for k, v in metaparams.items() if k != "band_noise"}

    def encoder_module(self, params: Mapping[str, Tensor]) -> ResNet1dEncoder:
        """A standalone encoder holding θ's encoder weights (for evaluation and export)."""
        encoder = ResNet1dEncoder(self.config.encoder).to(self.dtype)
        prefix = "encoder."
        encoder.load_state_dict({k[len(prefix):]: v.detach() for k, v in params.items() if k.startswith(prefix)})
        return encoder.eval()

    # ---- MetaProblem ----------------------------------------------------------------------

    def augment(self, metaparams: Mapping[str, Tensor], x: Tensor, noise: Tensor | None,
                bands: Tensor | None = None) -> Tensor:
        """The learned warp, then the learned noise, with parameters φ on top of a default-augmented view.

        The noise adds Σ_b a_b · std(x) · bands[:, b] with a_b = exp(φ_b) and std(x) the std over time
        of each lead of the view *before* the warp (a constant in φ, so the noise is linear in a:
        reparameterised). Identity in the baseline.
        """
        view = x
        if self.warp is None and self.noise_model is None:
            if metaparams:
                raise ValueError(
                    "this ECGSimCLRProblem is the baseline (use_warp=False, use_noise=False) and has no "
                    "meta-parameters; pass {} or build the problem with use_warp=True or use_noise=True"
                )
            return x
        if self.warp is not None:
            if noise is None:
                raise ValueError("the warp needs its Gaussian input: build batches with this problem's pretrain_batch")
            x = functional_call(self.warp, self._warp_phi(metaparams), (x, noise))
        if self.noise_model is not None:
            if bands is None:
                raise ValueError("the noise model needs its band noise: build batches with this problem's pretrain_batch")
            lead_std = view.std(dim=-1, keepdim=True, unbiased=False)  # [N, C, 1], the view before the warp
            x = x + lead_std * self.noise_model.noise(metaparams, bands.to(x.dtype), dim=1).sum(dim=1)
        return x

    def pretrain_loss(self, params: Params, metaparams: Params, batch: PretrainBatch) -> Tensor:
        """NT-Xent (temperature 0.5) between the two (warped) views; both go through θ in one forward."""
        v1 = self.augment(metaparams, batch.view1, batch.noise1, batch.bands1)
        v2 = self.augment(metaparams, batch.view2, batch.noise2, batch.bands2)
        z = functional_call(self.net, params, (torch.cat([v1, v2]),))
        return nt_xent(z[: len(v1)], z[len(v1):], self.config.temperature)

    def embed(self, params: Mapping[str, Tensor], x: Tensor) -> Tensor:
        return functional_call(self.net.encoder, {k[len("encoder."):]: v for k, v in params.items()
                                                  if k.startswith("encoder.")}, (x,))

    def finetune_loss(self, params: Params, head: Params, batch: tuple[Tensor, Tensor]) -> Tensor:
        """BCE of a linear classifier on the encoder's embedding (encoder in eval mode)."""
        x, y = batch
        logits = self.embed(params, x) @ head["weight"].T + head["bias"]
        return F.binary_cross_entropy_with_logits(logits, y)

    def pretrain_batch(self, index: int) -> PretrainBatch:
        """Batch ``index``: its beats, two default-augmented views and the warp noise, all seeded by ``index``."""
        c = self.config
        x = self.pretrain_x[self._pt_order.indices(index)]
        g = _index_generator(c.seed, index, 0)
        views = [default_augment(x, g, max_mask_fraction=c.max_mask_fraction, max_noise_std=c.max_noise_std)
                 for _ in range(2)]
        n1 = n2 = b1 = b2 = None
        if self.warp is not None:
            gn = _index_generator(c.seed, index, 1)  # its own stream: the views match the baseline's exactly
            n1, n2 = (self.warp.sample_noise(len(x), gn, dtype=self.dtype) for _ in range(2))
        if self.noise_model is not None:
            gb = _index_generator(c.seed, index, 2)
            b1, b2 = (band_split(torch.randn(x.shape, generator=gb, dtype=torch.float64), c.noise.bands).to(self.dtype)
                      for _ in range(2))
        return PretrainBatch(views[0], views[1], n1, n2, b1, b2)

    def warp_module(self, metaparams: Mapping[str, Tensor]) -> LearnedWarp:
        """A standalone warp holding φ (detached), for inspection and plots."""
        if self.warp is None:
            raise ValueError("the baseline problem (use_warp=False) has no warp; build it with use_warp=True")
        warp = LearnedWarp(self.config.warp).to(self.dtype)
        warp.load_state_dict({k: v.detach() for k, v in self._warp_phi(metaparams).items()})
        return warp.eval()

    @torch.no_grad()
    def describe_metaparams(self, metaparams: Params) -> Mapping[str, float]:
        """The warp's global magnitude, and on 32 fixed PT beats its mean per-example scale and |displacement|
        in samples; the noise model's amplitude per band (``band_noise/b0`` is the lowest band)."""
        out: dict[str, float] = {}
        if self.warp is not None:
            warp = self.warp_module(metaparams)
            pos = warp.sampling_positions(self._probe, self._probe_noise)
            shift = float((pos - torch.arange(pos.shape[-1], dtype=pos.dtype)).abs().mean())
            out.update({"magnitude": float(warp.magnitude), "mean_scale": float(warp.scale(self._probe).mean()),
                        "mean_abs_shift": shift})
        if self.noise_model is not None:
            out.update(self.noise_model.summary(metaparams))
        return out

    @torch.no_grad()
    def warp_examples(self, metaparams: Params, count: int = 4, seed: int = 0) -> dict[str, Tensor]:
        """A few PT beats, one warp noise draw each, their sampling positions and warped beats (for plots)."""
        warp = self.warp_module(metaparams)
        x = self._probe[:count]
        noise = warp.sample_noise(len(x), torch.Generator().manual_seed(seed), dtype=self.dtype)
        return {"beats": x, "positions": warp.sampling_positions(x, noise), "warped": warp(x, noise)}
