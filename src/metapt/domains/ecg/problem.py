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

from collections.abc import Mapping
from dataclasses import replace
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from ...problem import EpochShuffler, LabelledBatches, Params
from ...schema import schema
from ...metaparams import AugmentationNetwork, GaussianNoiseScales
from .augment import BandNoiseConfig, LearnedWarp, WarpConfig, band_split, default_augment
from .data import ECGDataset
from .losses import nt_xent
from .models import EncoderConfig, ProjectionHead, ResNet1dEncoder
from .splits import ECGSplit

__all__ = [
    "ECGProblemConfig",
    "ECGSimCLRProblem",
    "PretrainBatch",
    "SimCLRNet",
]


# --------------------------------------------------------------------------- splits


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
