"""Task and example weights, parameterised as in the paper: w = 2·sigmoid(logit), w₀ = 1.

The factor 2 keeps a weight's range (0, 2) centred on the uniform weighting and
makes the logit's gradient at initialisation 1/2 of the weight's, so a zero
logit is the plain, unweighted loss.

Example weights are row-sparse: a batch reads B of the N logits, so its
hypergradient has at most B non-zero entries. :func:`gather_rows` reads them
with a gradient that is a sparse COO tensor (B rows), not a dense [N] tensor of
zeros, so a meta-step's cost does not grow with N; :class:`metapt.optim.LazyAdam`
and :class:`metapt.optim.LazySGD` then update only those rows.

A weight per example learns slowly, because an example is in few of the meta-steps' batches.
:class:`ExampleWeightNet` (Meta-Weight-Net, Shu et al. 2019) instead learns one small network
from per-example features (the example's current loss, the share of its labels observed) to
its weight: every meta-step updates the weight of every example, seen or not.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["ExampleWeightNet", "ExampleWeights", "TaskWeights", "gather_rows", "weight_logits", "weights_from_logits"]


def weights_from_logits(logits: Tensor) -> Tensor:
    """w = 2·sigmoid(logits), elementwise, in (0, 2)."""
    return 2.0 * torch.sigmoid(logits)


def weight_logits(num: int, *, dtype: torch.dtype | None = None) -> Tensor:
    """Logits of ``num`` weights all equal to 1 (the uniform starting point)."""
    if num < 1:
        raise ValueError(f"weight_logits: need at least one weight, got {num}")
    return torch.zeros(num, dtype=dtype)


class _GatherRows(torch.autograd.Function):
    """``table[rows]`` whose gradient with respect to ``table`` is a sparse COO tensor."""

    @staticmethod
    def forward(table: Tensor, rows: Tensor) -> Tensor:
        return table.index_select(0, rows)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        table, rows = inputs
        ctx.save_for_backward(rows)
        ctx.table_shape = table.shape

    @staticmethod
    def backward(ctx, grad: Tensor):
        (rows,) = ctx.saved_tensors
        # ∂/∂table of Σ_b ⟨grad_b, table[rows_b]⟩: grad_b added at row rows_b (repeats sum on coalesce)
        return torch.sparse_coo_tensor(rows.unsqueeze(0), grad, ctx.table_shape, check_invariants=False), None


def gather_rows(table: Tensor, rows: Tensor) -> Tensor:
    """``table[rows]`` (rows of the first dimension) with a row-sparse gradient.

    The value is ``table.index_select(0, rows)``; the gradient with respect to ``table``
    is a sparse COO tensor holding only the rows read (repeated rows sum), which equals the
    dense gradient of ``table[rows]`` once made dense. Differentiable once in ``table``
    (enough for the hypergradient: its mixed term differentiates the forward once).
    """
    if rows.dtype != torch.long or rows.dim() != 1:
        raise ValueError(f"gather_rows: rows must be a 1-D long tensor of row indices, got {rows.dtype} {tuple(rows.shape)}")
    if not table.requires_grad:
        return table.index_select(0, rows)
    return _GatherRows.apply(table, rows)


def _spread(w: Tensor) -> dict[str, float]:
    w = w.detach().double()
    return {"mean": float(w.mean()), "min": float(w.min()), "max": float(w.max()),
            "std": float(w.std()) if w.numel() > 1 else 0.0}


class TaskWeights:
    """One weight per pre-training task, w_t = 2·sigmoid(φ_t) (the paper's task weighting).

    With ``normalize``, w = T·softmax(φ) instead: the weights sum to T whatever φ is, so a
    drift that every logit shares (batch noise common to all tasks) changes nothing and only
    the tasks' ratios are learned. φ₀ = 0 is the uniform weighting either way.

    Args:
        num_tasks: T.
        key: φ's entry holding the T logits.
        names: optional task names, for the per-task part of :meth:`summary`.
        normalize: T·softmax(φ) instead of 2·sigmoid(φ).
    """

    row_sparse = False

    def __init__(self, num_tasks: int, *, key: str = "task_logits", names: Sequence[str] | None = None,
                 normalize: bool = False):
        if num_tasks < 1:
            raise ValueError(f"TaskWeights: need at least one task, got {num_tasks}")
        if names is not None and len(names) != num_tasks:
            raise ValueError(f"TaskWeights: {len(names)} names for {num_tasks} tasks; give one name per task")
        self.num_tasks, self.key, self.names = num_tasks, key, list(names) if names is not None else None
        self.normalize = normalize

    def init(self, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
        """φ₀: every weight 1."""
        return {self.key: weight_logits(self.num_tasks, dtype=dtype)}

    def weights(self, phi: Mapping[str, Tensor]) -> Tensor:
        """[T] weights, differentiable in φ."""
        logits = phi[self.key]
        if self.normalize:
            return self.num_tasks * torch.softmax(logits, dim=0)
        return weights_from_logits(logits)

    def summary(self, phi: Mapping[str, Tensor]) -> dict[str, float]:
        """Mean, min, max and std of the weights (as ``task_weight_*``), and each named task's weight."""
        w = self.weights({self.key: phi[self.key].detach()})
        out = {f"task_weight_{k}": v for k, v in _spread(w).items()}
        if self.names is not None:
            out.update({f"task_weight/{n}": float(x) for n, x in zip(self.names, w.tolist())})
        return out


class ExampleWeights:
    """One weight per pre-training example, w_i = 2·sigmoid(φ_i) (data reweighting).

    Row-sparse: :meth:`weights` of a batch's rows has a sparse COO gradient (see
    :func:`gather_rows`), so with :class:`metapt.optim.LazyAdam` or :class:`metapt.optim.LazySGD`
    a meta-step costs the same for 10 or 10⁶ examples.

    With ``normalize``, a batch's weights are scaled to sum to its size (Ren et al. 2018
    normalise within the batch): the loss's scale stays that of uniform weights, and what a
    meta-step learns is which examples of a batch count more than the others.

    Args:
        num_examples: N.
        key: φ's entry holding the N logits.
        normalize: scale each batch's weights to mean 1.
    """

    row_sparse = True

    def __init__(self, num_examples: int, *, key: str = "example_logits", normalize: bool = False):
        if num_examples < 1:
            raise ValueError(f"ExampleWeights: need at least one example, got {num_examples}")
        self.num_examples, self.key, self.normalize = num_examples, key, normalize

    def init(self, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
        """φ₀: every weight 1."""
        return {self.key: weight_logits(self.num_examples, dtype=dtype)}

    def weights(self, phi: Mapping[str, Tensor], rows: Tensor) -> Tensor:
        """[B] weights of examples ``rows``, with a row-sparse gradient in φ."""
        w = weights_from_logits(gather_rows(phi[self.key], rows))
        return w * (len(w) / w.sum()) if self.normalize else w

    def summary(self, phi: Mapping[str, Tensor]) -> dict[str, float]:
        """Mean, min, max, std of the weights, and the share of examples weighted below 1/2 and above 3/2."""
        w = weights_from_logits(phi[self.key].detach())
        out = {f"example_weight_{k}": v for k, v in _spread(w).items()}
        out["example_weight_below_0.5"] = float((w < 0.5).double().mean())
        out["example_weight_above_1.5"] = float((w > 1.5).double().mean())
        return out


class ExampleWeightNet:
    """One small network from an example's features to its weight (Meta-Weight-Net, Shu et al. 2019).

    w_i = 2·sigmoid(MLP(f̂_i)), the MLP features → ``hidden`` tanh units → 1 logit, its
    parameters φ's entries ``<prefix>w1``, ``b1``, ``w2``, ``b2``. The features of example i
    (:meth:`features`, from the batch's own logits and labels, detached) are

    * its current PT loss: the masked BCE averaged over its observed tasks;
    * the fraction of its tasks that are observed.

    Why a network and not one logit per example (:class:`ExampleWeights`): an example is in a
    handful of the meta-steps' batches in a run, so its own logit barely moves; the network's
    parameters are shared, so every meta-step moves every example's weight, and the learned
    rule (e.g. "weight down what the model fits worst") applies to examples no meta-step drew.

    Why detached features: the weight is a function of where the example stands, not a path for
    θ's gradient; the θ-gradient of the weighted loss is Σ_i w_i ∇θ ℓ_i with w held fixed, as in
    Shu et al.'s code. (The accumulated estimator's finite difference along θ re-evaluates the
    features at the shifted θ, so its draws also see the features move with θ: an O(1) term the
    autograd estimators leave out.)

    Why standardised within the batch, f̂ = (f − mean)/(std + ``eps``) over the batch's examples
    with at least one observed label (population std): the loss's scale drifts as pre-training
    proceeds (and differs between tasks and domains), while the rule to learn is about an
    example's loss *relative* to the others it is trained with; standardised inputs also keep the
    tanh units out of saturation whatever the scale. A batch whose feature is constant gives it 0.
    Examples without an observed label are left out of the mean and std (their loss is 0 by
    convention and their weight multiplies nothing).

    φ₀ is deterministic (the first layer drawn from ``torch.Generator().manual_seed(seed)``) and
    gives every weight exactly 1: the last layer is zero, so the logit is 0 for any input. Dense:
    every entry of φ is read by every batch (``row_sparse`` False).

    With ``normalize``, a batch's weights are B·softmax of the network's logits over its B
    examples (mean 1), not 2·sigmoid scaled to mean 1. Why: only the ratios between examples act
    then, and softmax's ratios exp(lᵢ − lⱼ) neither depend on a shift of every logit (a shared drift
    gets no gradient at all) nor saturate. With 2·sigmoid the shared drift was free to move, and on
    ChEMBL it carried every weight to the ceiling 2, where no ratio can move any more
    (planted_noise_weight_net_4000_rate*.md: weight ≈ 2.0 from standardised loss −1 to +2).

    Args:
        hidden: width of the hidden layer.
        prefix: prepended to the entry names in φ (``wnet.`` gives ``wnet.w1`` …; also the stem of
            :meth:`summary`'s keys, without the trailing dot).
        normalize: each batch's weights B·softmax(logits) (mean 1) instead of 2·sigmoid(logits).
        seed: the generator seed of the first layer's φ₀.
        eps: added to the within-batch std of each feature.
    """

    row_sparse = False
    #: the per-example features, in the order of the network's inputs
    FEATURES = ("loss", "observed_fraction")

    def __init__(self, hidden: int = 16, *, prefix: str = "wnet.", normalize: bool = False, seed: int = 0,
                 eps: float = 1e-6):
        if hidden < 1:
            raise ValueError(f"ExampleWeightNet: hidden must be >= 1, got {hidden}")
        if not eps > 0:
            raise ValueError(f"ExampleWeightNet: eps must be > 0, got {eps}")
        self.hidden, self.prefix, self.normalize, self.seed, self.eps = hidden, prefix, normalize, seed, eps
        self.keys = [prefix + k for k in ("w1", "b1", "w2", "b2")]
        self.name = prefix.rstrip("._/") or "wnet"

    def init(self, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
        """φ₀: a seeded first layer (W₁ ~ N(0, 1/inputs), b₁ ~ N(0, 1/4)), a zero last layer (every weight 1)."""
        g = torch.Generator().manual_seed(self.seed)
        n_in = len(self.FEATURES)
        w1 = torch.randn(self.hidden, n_in, generator=g, dtype=torch.float64) / n_in**0.5
        b1 = 0.5 * torch.randn(self.hidden, generator=g, dtype=torch.float64)
        dtype = dtype or torch.get_default_dtype()
        return dict(zip(self.keys, (w1.to(dtype), b1.to(dtype), torch.zeros(1, self.hidden, dtype=dtype),
                                    torch.zeros(1, dtype=dtype))))

    @staticmethod
    def features(logits: Tensor, labels: Tensor) -> Tensor:
        """[B, 2] raw features of a batch, detached: each example's BCE averaged over its observed
        tasks (0 with none observed) and the fraction of its tasks observed.

        ``logits`` and ``labels`` [B, T] (NaN: not observed) are the ones the PT loss reads, from
        the same forward: no second forward is needed.
        """
        logits, labels = logits.detach(), labels.detach().to(logits.dtype)
        observed = ~torch.isnan(labels)
        bce = F.binary_cross_entropy_with_logits(logits, torch.where(observed, labels, 0.0), reduction="none")
        count = observed.sum(1)
        loss = torch.where(observed, bce, 0.0).sum(1) / count.clamp(min=1)
        return torch.stack([loss, count.to(logits.dtype) / labels.shape[1]], 1)

    def standardize(self, features: Tensor) -> Tensor:
        """(f − mean)/(std + eps) per feature, the statistics over the rows with an observed label
        (observed fraction > 0; all rows if none has one)."""
        valid = features[:, 1] > 0
        ref = features[valid] if bool(valid.any()) else features
        mean, std = ref.mean(0), ref.std(0, unbiased=False) if len(ref) > 1 else torch.zeros_like(ref[0])
        return (features - mean) / (std + self.eps)

    def logits(self, phi: Mapping[str, Tensor], standardized: Tensor) -> Tensor:
        """[B] the network's output for already standardised features [B, 2]."""
        w1, b1, w2, b2 = (phi[k] for k in self.keys)
        x = standardized.to(w1.dtype)
        return (torch.tanh(x @ w1.T + b1) @ w2.T + b2).squeeze(1)

    def net(self, phi: Mapping[str, Tensor], standardized: Tensor) -> Tensor:
        """[B] weights 2·sigmoid(logits) of already standardised features (no normalisation)."""
        return weights_from_logits(self.logits(phi, standardized))

    def weights(self, phi: Mapping[str, Tensor], features: Tensor) -> Tensor:
        """[B] weights of a batch from its raw :meth:`features`, differentiable in φ (standardised
        within the batch; with ``normalize``, B·softmax of the logits)."""
        z = self.standardize(features.detach())
        if self.normalize:
            return len(z) * torch.softmax(self.logits(phi, z), 0)
        return self.net(phi, z)

    def summary(self, phi: Mapping[str, Tensor]) -> dict[str, float]:
        """The weight the network gives at standardised loss −2, −1, 0, +1, +2 (observed fraction at
        its batch mean), as ``<name>_weight_at_loss_-2`` …; the slopes (w(+1) − w(−1))/2 along the
        loss and along the observed fraction; and ``<name>_decreasing_in_loss``, 1 if the five
        weights strictly decrease, else 0. With ``normalize`` only ratios act, so the weights are
        relative to the one at the batch mean: exp(l(f̂) − l(0)), 1 at loss 0."""
        own = {k: phi[k].detach().double().cpu() for k in self.keys}
        levels = (-2, -1, 0, 1, 2)
        points = torch.tensor([[x, 0.0] for x in levels] + [[0.0, -1.0], [0.0, 1.0]], dtype=torch.float64)
        logits = self.logits(own, points)
        w = (torch.exp(logits - logits[2]) if self.normalize else weights_from_logits(logits)).tolist()
        out = {f"{self.name}_weight_at_loss_{x:+d}" if x else f"{self.name}_weight_at_loss_0": v
               for x, v in zip(levels, w[:5])}
        out[f"{self.name}_loss_slope"] = (w[3] - w[1]) / 2
        out[f"{self.name}_observed_slope"] = (w[6] - w[5]) / 2
        out[f"{self.name}_decreasing_in_loss"] = float(all(w[i + 1] < w[i] for i in range(4)))
        return out
