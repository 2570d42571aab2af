"""A synthetic multitask pre-training problem with a known right answer.

Inputs x ∈ R^d. The downstream (FT) task is linear in a k-dimensional subspace S
of the inputs. Half the pre-training tasks are helpful (linear targets inside S);
the other half are pure label noise (fixed random labels on the finite PT set).
The encoder is a linear bottleneck of width k, so every unit of capacity spent
memorising noise is taken from S: good task weights are high on the helpful
tasks and low on the noise tasks, and meta-learning should find that.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from pydantic import Field
from torch import Tensor

from ...metaparams import TaskWeights
from ...problem import EpochShuffler, LabelledBatches, Params
from ...schema import MAX_SEED, schema


@schema
class SyntheticConfig:
    """The synthetic problem's data (``seed`` draws it all).

    Attributes:
        dim: d, the input dimension.
        subspace: k, the dimension of the subspace S the downstream target lives in, and the
            width of the linear bottleneck encoder.
        helpful_tasks: pre-training tasks with linear targets inside S.
        noise_tasks: pre-training tasks whose labels are fixed random noise.
        pretrain_examples: size of the pre-training set.
        finetune_examples: size of the FT-train set.
        metaval_examples: size of the MetaFT-validation set.
        test_examples: size of the test set.
        valid_examples: size of the downstream 'valid' set on which evaluation picks its epoch.
        batch_size: examples per batch of every stream (set by ``pretrain.batch_size`` in a job).
        noise_scale: standard deviation of the noise tasks' labels.
        seed: seed of the data.
    """

    dim: int = Field(default=32, ge=1)
    subspace: int = Field(default=4, ge=1)
    helpful_tasks: int = Field(default=4, ge=1)
    noise_tasks: int = Field(default=4, ge=0)
    pretrain_examples: int = Field(default=64, ge=1)
    finetune_examples: int = Field(default=24, ge=1)
    metaval_examples: int = Field(default=24, ge=1)
    test_examples: int = Field(default=2000, ge=1)
    valid_examples: int = Field(default=500, ge=1)
    batch_size: int = Field(default=32, ge=1)
    noise_scale: float = Field(default=1.5, ge=0)
    seed: int = Field(default=0, ge=0, le=MAX_SEED)

    def __post_init__(self):
        if self.subspace > self.dim:
            raise ValueError(f"subspace ({self.subspace}) must be at most dim ({self.dim})")
        examples = (self.pretrain_examples + self.finetune_examples + self.metaval_examples + self.test_examples
                    + self.valid_examples)
        if examples * self.dim > MAX_ELEMENTS:
            raise ValueError(f"the data would hold {examples:,} examples x {self.dim} dims = {examples * self.dim:,} "
                             f"numbers; the synthetic problem is capped at {MAX_ELEMENTS:,}")


#: The most numbers the synthetic data may hold (about 400 MB in float64): a demo, not a benchmark.
MAX_ELEMENTS = 50_000_000


class SyntheticTaskWeighting(LabelledBatches):
    """Task weighting on the synthetic problem; implements :class:`metapt.problem.MetaProblem`."""

    def __init__(self, config: SyntheticConfig = SyntheticConfig(), dtype: torch.dtype = torch.float32, *,
                 normalize_weights: bool = False):
        c = config
        self.config, self.dtype, self.normalize_weights = c, dtype, normalize_weights
        g = torch.Generator().manual_seed(c.seed)
        basis, _ = torch.linalg.qr(torch.randn(c.dim, c.dim, generator=g, dtype=torch.float64))
        signal = basis[:, : c.subspace]  # orthonormal basis of S
        helpful_dirs = signal[:, torch.arange(c.helpful_tasks) % c.subspace]  # S's basis, cycled: covers S evenly
        ft_dir = signal @ torch.randn(c.subspace, generator=g, dtype=torch.float64)
        ft_dir = ft_dir / ft_dir.norm() * 2.0

        def inputs(n):
            return torch.randn(n, c.dim, generator=g, dtype=torch.float64)

        x_pt = inputs(c.pretrain_examples)
        y_helpful = x_pt @ helpful_dirs
        y_noise = c.noise_scale * torch.randn(c.pretrain_examples, c.noise_tasks, generator=g, dtype=torch.float64)
        self.x_pt = x_pt.to(dtype)
        self.y_pt = torch.cat([y_helpful, y_noise], dim=1).to(dtype)
        self.helpful = torch.arange(c.helpful_tasks + c.noise_tasks) < c.helpful_tasks

        def labelled(n):
            x = inputs(n)
            return x.to(dtype), (x @ ft_dir + 0.1 * torch.randn(n, generator=g, dtype=torch.float64)).to(dtype)

        self.ft_train, self.metaval, self.test = (
            labelled(c.finetune_examples), labelled(c.metaval_examples), labelled(c.test_examples)
        )
        self.valid = labelled(c.valid_examples)  # downstream epoch selection; drawn last, so the rest is unchanged
        self._pt_order = EpochShuffler(c.pretrain_examples, c.batch_size, seed=c.seed)
        self._ft_order = EpochShuffler(c.finetune_examples, c.batch_size, seed=c.seed + 1)
        self._val_order = EpochShuffler(c.metaval_examples, c.batch_size, seed=c.seed + 2)

    @property
    def task_weights(self) -> TaskWeights:
        """φ's family: one weight per PT task, 2·sigmoid(logit) (K·softmax with ``normalize_weights``)."""
        return TaskWeights(self.num_tasks, normalize=self.normalize_weights)

    @property
    def num_tasks(self) -> int:
        return self.config.helpful_tasks + self.config.noise_tasks

    # ---- initial values -------------------------------------------------------------------

    def initial_params(self, seed: int = 0) -> Params:
        c, g = self.config, torch.Generator().manual_seed(seed)
        return {
            "encoder": (torch.randn(c.subspace, c.dim, generator=g) / c.dim**0.5).to(self.dtype),
            "pt_head.weight": (torch.randn(self.num_tasks, c.subspace, generator=g) / c.subspace**0.5).to(self.dtype),
            "pt_head.bias": torch.zeros(self.num_tasks, dtype=self.dtype),
        }

    def initial_head(self) -> Params:
        return {"weight": torch.zeros(self.config.subspace, dtype=self.dtype), "bias": torch.zeros((), dtype=self.dtype)}

    def initial_metaparams(self) -> Params:
        return self.task_weights.init(self.dtype)

    # ---- MetaProblem ----------------------------------------------------------------------

    def pretrain_loss(self, params: Params, metaparams: Params, batch: Tensor) -> Tensor:
        feats = self.x_pt[batch] @ params["encoder"].T  # [B, k]
        pred = feats @ params["pt_head.weight"].T + params["pt_head.bias"]  # [B, T]
        per_task = (pred - self.y_pt[batch]).pow(2).mean(0)  # [T]
        return (self.task_weights.weights(metaparams) * per_task).mean()

    def finetune_loss(self, params: Params, head: Params, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        pred = (x @ params["encoder"].T) @ head["weight"] + head["bias"]
        return (pred - y).pow(2).mean()

    def pretrain_batch(self, index: int) -> Tensor:
        return self._pt_order.indices(index)

    def describe_metaparams(self, metaparams: Params) -> Mapping[str, float]:
        w = self.task_weights.weights({"task_logits": metaparams["task_logits"].detach()})
        return {"helpful_weight": float(w[self.helpful].mean()), "noise_weight": float(w[~self.helpful].mean())}

    # ---- evaluation -----------------------------------------------------------------------

    def probe_test_mse(self, params: Params, ridge: float = 1e-3) -> float:
        """Test MSE of a ridge linear probe fitted on FT-train features (closed form)."""
        enc = params["encoder"].detach().double()
        x, y = self.ft_train
        f = torch.cat([x.double() @ enc.T, torch.ones(len(x), 1, dtype=torch.float64)], 1)
        coef = torch.linalg.solve(f.T @ f + ridge * torch.eye(f.shape[1], dtype=torch.float64), f.T @ y.double())
        xt, yt = self.test
        ft = torch.cat([xt.double() @ enc.T, torch.ones(len(xt), 1, dtype=torch.float64)], 1)
        return float((ft @ coef - yt.double()).pow(2).mean())
