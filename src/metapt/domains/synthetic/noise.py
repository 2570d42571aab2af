"""A synthetic pre-training problem whose learned noise model has a known right direction.

Inputs x ∈ R^d, d = informative + nuisance features, x ~ N(0, I). The pre-training target
uses both groups, y_PT = aᵀx + noise: the nuisance features are a shortcut that pre-training
can exploit. The downstream target uses the informative features only, y_FT = a_Sᵀx_S + noise,
and downstream the nuisance features carry nothing. The encoder is linear with a bottleneck
(``width`` < d), so weight it puts on nuisance features is noise in the downstream features.

φ is a noise model: per-feature Gaussian input noise in pre-training, x̃ = x + σ ⊙ ε
(:class:`metapt.metaparams.GaussianNoiseScales`, σ = exp(φ)). Noise on a feature acts as a
ridge penalty σ_j²‖W_{:,j}‖² on the encoder's use of it, so the right answer is known: σ up on
the nuisance features (the encoder drops the shortcut), σ down on the informative ones. The
reparameterisation: ε is drawn per PT batch from a generator seeded by the batch index, so
the noisy input is a deterministic, differentiable function of (φ, batch).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from ...metaparams import GaussianNoiseScales
from ...problem import EpochShuffler, LabelledBatches, Params
from ...schema import schema

__all__ = ["FeatureNoiseConfig", "SyntheticFeatureNoise"]


@schema
class FeatureNoiseConfig:
    """Shape of the synthetic feature-noise problem.

    Attributes:
        informative, nuisance: feature counts of the two groups.
        width: the encoder's bottleneck (below informative + nuisance).
        shortcut: size of the nuisance part of the PT target relative to the informative part.
        init_std: σ₀ of the learned input noise, every feature.
        label_noise: std of the noise on both targets.
    """

    informative: int = 4
    nuisance: int = 4
    width: int = 2
    shortcut: float = 1.0
    init_std: float = 0.5
    label_noise: float = 0.1
    pretrain_examples: int = 256
    finetune_examples: int = 64
    metaval_examples: int = 64
    test_examples: int = 2000
    batch_size: int = 32
    seed: int = 0


class SyntheticFeatureNoise(LabelledBatches):
    """The synthetic noise-model problem; implements :class:`metapt.problem.MetaProblem`."""

    def __init__(self, config: FeatureNoiseConfig = FeatureNoiseConfig(), dtype: torch.dtype = torch.float32):
        c = self.config = config
        if c.width >= c.informative + c.nuisance:
            raise ValueError(f"FeatureNoiseConfig: width ({c.width}) must be below the feature count "
                             f"({c.informative + c.nuisance}), or the encoder need not choose")
        self.dtype = dtype
        self.dim = c.informative + c.nuisance
        self.informative = torch.arange(self.dim) < c.informative
        names = [f"{'informative' if i < c.informative else 'nuisance'}_{i}" for i in range(self.dim)]
        self.noise_model = GaussianNoiseScales(self.dim, c.init_std, key="feature_noise", names=names)
        g = torch.Generator().manual_seed(c.seed)
        a = torch.randn(self.dim, generator=g, dtype=torch.float64)
        a = a / a[: c.informative].norm()
        a[c.informative:] *= c.shortcut * (c.informative / c.nuisance) ** 0.5 / a[c.informative:].norm() * a[: c.informative].norm()
        a_ft = torch.where(self.informative, a, torch.zeros_like(a))

        def labelled(n, w):
            x = torch.randn(n, self.dim, generator=g, dtype=torch.float64)
            y = x @ w + c.label_noise * torch.randn(n, generator=g, dtype=torch.float64)
            return x.to(dtype), y.to(dtype)

        self.x_pt, self.y_pt = labelled(c.pretrain_examples, a)
        self.ft_train, self.metaval, self.test = (labelled(n, a_ft) for n in
                                                  (c.finetune_examples, c.metaval_examples, c.test_examples))
        self._pt_order = EpochShuffler(c.pretrain_examples, c.batch_size, seed=c.seed)
        self._ft_order = EpochShuffler(c.finetune_examples, c.batch_size, seed=c.seed + 1)
        self._val_order = EpochShuffler(c.metaval_examples, c.batch_size, seed=c.seed + 2)

    # ---- initial values -------------------------------------------------------------------

    def initial_params(self, seed: int = 0) -> Params:
        c, g = self.config, torch.Generator().manual_seed(seed)
        return {
            "encoder": (torch.randn(c.width, self.dim, generator=g) / self.dim**0.5).to(self.dtype),
            "pt_head.weight": (torch.randn(c.width, generator=g) / c.width**0.5).to(self.dtype),
            "pt_head.bias": torch.zeros((), dtype=self.dtype),
        }

    def initial_head(self) -> Params:
        return {"weight": torch.zeros(self.config.width, dtype=self.dtype), "bias": torch.zeros((), dtype=self.dtype)}

    def initial_metaparams(self) -> Params:
        return self.noise_model.init(self.dtype)

    # ---- MetaProblem ----------------------------------------------------------------------

    def pretrain_loss(self, params: Params, metaparams: Params, batch: tuple[Tensor, Tensor]) -> Tensor:
        """Squared error of the PT head on inputs with learned Gaussian noise, x + σ ⊙ ε."""
        rows, eps = batch
        x = self.x_pt[rows] + self.noise_model.noise(metaparams, eps)
        pred = (x @ params["encoder"].T) @ params["pt_head.weight"] + params["pt_head.bias"]
        return (pred - self.y_pt[rows]).pow(2).mean()

    def finetune_loss(self, params: Params, head: Params, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        pred = (x @ params["encoder"].T) @ head["weight"] + head["bias"]
        return (pred - y).pow(2).mean()

    def pretrain_batch(self, index: int) -> tuple[Tensor, Tensor]:
        """(rows, ε): the batch's examples and its standard normal noise, both a function of ``index``."""
        rows = self._pt_order.indices(index)
        g = torch.Generator().manual_seed(self.config.seed * 1_000_003 + index)
        return rows, torch.randn(len(rows), self.dim, generator=g, dtype=torch.float64).to(self.dtype)

    def describe_metaparams(self, metaparams: Params) -> Mapping[str, float]:
        """Mean learned σ on the informative and on the nuisance features."""
        s = self.noise_model.std({k: v.detach() for k, v in metaparams.items()})
        return {"informative_noise": float(s[self.informative].mean()), "nuisance_noise": float(s[~self.informative].mean())}

    # ---- evaluation -----------------------------------------------------------------------

    def nuisance_share(self, params: Params) -> float:
        """‖W_nuisance‖² / ‖W‖²: how much of the encoder reads the shortcut (0 is the downstream optimum)."""
        w = params["encoder"].detach().double()
        return float(w[:, ~self.informative].pow(2).sum() / w.pow(2).sum())

    def probe_test_mse(self, params: Params, ridge: float = 1e-3) -> float:
        """Test MSE of a ridge linear probe fitted on FT-train features (closed form)."""
        enc = params["encoder"].detach().double()

        def feats(x):
            return torch.cat([x.double() @ enc.T, torch.ones(len(x), 1, dtype=torch.float64)], 1)

        f, y = feats(self.ft_train[0]), self.ft_train[1].double()
        coef = torch.linalg.solve(f.T @ f + ridge * torch.eye(f.shape[1], dtype=torch.float64), f.T @ y)
        return float((feats(self.test[0]) @ coef - self.test[1].double()).pow(2).mean())
