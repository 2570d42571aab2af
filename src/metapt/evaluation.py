"""The one downstream evaluation protocol: fine-tune a pre-trained encoder and score it.

Full fine-tuning and linear probe × label fractions × seeds. Each run trains a fresh
head on (a seeded label subset of) the downstream 'train' split, picks the epoch on
the 'valid' split — never on MetaFT-validation, never on test — and reports the
test score at that epoch; results are aggregated as mean ± 95 % CI over seeds and
as per-seed paired gains between methods.

Domain-agnostic: a domain hands over a :class:`Downstream` (how to batch each split)
and an encoder. Labels are [B, T] with NaN where a label is missing (multi-task,
multi-label) or [B] for one task. The metric is AUROC (binary tasks, masked BCE) or
MSE (regression; lower is better).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field
from scipy import stats
from sklearn.metrics import roc_auc_score
from torch import Tensor, nn

from .errors import check_stop
from .losses import masked_bce
from .schema import schema

BatchIter = Callable[[str, int, bool, int], Iterable[tuple[Any, Tensor]]]
"""``iterate(split, batch_size, shuffle, seed) -> (inputs, labels)`` batches."""


def masked_auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Mean AUROC over tasks that have both classes among their observed labels (Hu et al. 2020).

    ``labels`` and ``scores`` are [N] or [N, T]; NaN labels are ignored. NaN when
    no task has both classes.
    """
    labels, scores = np.asarray(labels, dtype=float), np.asarray(scores, dtype=float)
    if labels.ndim == 1:
        labels, scores = labels[:, None], scores[:, None]
    aucs = []
    for t in range(labels.shape[1]):
        seen = ~np.isnan(labels[:, t])
        y = labels[seen, t]
        if y.size and 0 < y.sum() < y.size:
            aucs.append(roc_auc_score(y, scores[seen, t]))
    return float(np.mean(aucs)) if aucs else float("nan")


def mean_ci95(values: Sequence[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95 % Student-t confidence interval, over the finite values
    (count the others with :func:`nonfinite`)."""
    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    if x.size == 0:
        return float("nan"), float("nan")
    if x.size == 1:
        return float(x[0]), float("nan")
    half = stats.t.ppf(0.975, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size)
    return float(x.mean()), float(half)


def t_test(diffs: Sequence[float], confidence: float = 0.95) -> dict[str, float]:
    """Paired differences against 0: mean, SD, n, the half-width of the two-sided Student-t CI at
    ``confidence`` and the two-sided p-value (NaN below 2 finite values)."""
    x = np.asarray([v for v in diffs if v is not None and math.isfinite(v)], dtype=float)
    out = {"mean": float(x.mean()) if x.size else math.nan, "sd": math.nan, "n": int(x.size),
           "half_width": math.nan, "p": math.nan}
    if x.size >= 2:
        sd = float(x.std(ddof=1))
        se = sd / math.sqrt(x.size)
        out.update(sd=sd, half_width=float(stats.t.ppf(0.5 + confidence / 2, x.size - 1) * se),
                   p=float(2 * stats.t.sf(abs(out["mean"]) / se, x.size - 1)) if se > 0 else float(out["mean"] == 0))
    return out


def holm(pvalues: Sequence[float], alpha: float = 0.05) -> list[dict[str, Any]]:
    """Holm's step-down correction, per hypothesis in the given order: its step's level
    (α / (m − rank)), the adjusted p-value (monotone in rank) and whether it is rejected
    (adjusted p ≤ α: every smaller p was rejected at its own step). A NaN p counts as 1."""
    p = [1.0 if v is None or not math.isfinite(v) else float(v) for v in pvalues]
    m = len(p)
    out: list[dict[str, Any]] = [{} for _ in p]
    running = 0.0
    for rank, i in enumerate(sorted(range(m), key=lambda j: p[j])):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = {"rank": rank + 1, "level": alpha / (m - rank), "p_adjusted": running, "reject": running <= alpha}
    return out


def seed_agreement(vectors: Sequence[Sequence[float]]) -> dict[str, float]:
    """How far runs with different seeds learned the same φ: Spearman ρ of their entries.

    ``pairwise_mean``: ρ averaged over pairs of seeds; ``leave_one_out_mean`` and
    ``leave_one_out_ci95``: each seed's ρ with the mean of the others, and the 95 % t-CI over
    seeds (the pairs share seeds, so the CI is over these). NaN with fewer than 2 seeds or
    entries, or when a seed's φ is constant (ρ undefined: nothing was learned).
    """
    vs = [np.asarray(v, dtype=float) for v in vectors]
    nan = {"pairwise_mean": math.nan, "leave_one_out_mean": math.nan, "leave_one_out_ci95": math.nan,
           "seeds": len(vs)}
    if len(vs) < 2 or vs[0].size < 2 or any(np.ptp(v) == 0 for v in vs):
        return nan
    rho = lambda a, b: float(stats.spearmanr(a, b).statistic)  # noqa: E731
    pairs = [rho(vs[i], vs[j]) for i in range(len(vs)) for j in range(i + 1, len(vs))]
    loo = [rho(v, np.mean([w for j, w in enumerate(vs) if j != i], axis=0)) for i, v in enumerate(vs)]
    mean, ci = mean_ci95(loo)
    if len(vs) < 3:  # two seeds: each against the other is one number twice, a CI of 0 would be a lie
        ci = math.nan
    return {"pairwise_mean": float(np.mean(pairs)), "leave_one_out_mean": mean, "leave_one_out_ci95": ci,
            "seeds": len(vs)}


def nonfinite(values: Sequence[float | None]) -> int:
    """How many of ``values`` are NaN, ±inf or None (left out of :func:`mean_ci95`)."""
    return sum(1 for v in values if v is None or not math.isfinite(v))


def label_subset(labels: Tensor, fraction: float, seed: int, min_examples: int = 8) -> Tensor:
    """A seeded ``fraction`` of the examples (at least ``min_examples``), sorted indices.

    Uniform, then topped up with one positive and one negative of every binary class that
    has both in the pool but not in the sample: fine-tuning and AUROC need both.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"label fraction must be in (0, 1], got {fraction}")
    n = labels.shape[0]
    if fraction == 1:
        return torch.arange(n)
    k = min(n, max(min_examples, int(round(fraction * n))))
    rng = np.random.default_rng(seed)
    chosen = set(rng.choice(n, size=k, replace=False).tolist())
    y = labels.reshape(n, -1).float().numpy()
    for c in range(y.shape[1]):
        for value in (1.0, 0.0):
            pool = np.flatnonzero(y[:, c] == value)
            if len(pool) and not any(y[i, c] == value for i in chosen):
                chosen.add(int(rng.choice(pool)))
    return torch.tensor(sorted(chosen), dtype=torch.long)


@dataclass(frozen=True)
class Downstream:
    """The labelled downstream task of a domain: three splits and how to batch them.

    Attributes:
        batch: ``(split, example indices [B]) -> (inputs, labels)`` for split 'train',
            'valid' or 'test'.
        labels: each split's labels, [N] or [N, T] (NaN = missing): sizes and label subsets.
        num_tasks: outputs of the head.
        metric: ``auroc`` (binary labels, masked BCE) or ``mse`` (regression).
    """

    batch: Callable[[str, Tensor], tuple[Any, Tensor]]
    labels: Mapping[str, Tensor]
    num_tasks: int
    metric: Literal["auroc", "mse"] = "auroc"

    def iterate(self, train_subset: Tensor | None = None, min_batches: int = 1) -> BatchIter:
        """The ``iterate`` of :func:`finetune_and_score`. 'train' is restricted to
        ``train_subset``; a shuffled epoch over a small subset repeats it (fresh
        permutations) until it has ``min_batches`` batches."""

        def iterate(split: str, batch_size: int, shuffle: bool, seed: int):
            pool = torch.arange(len(self.labels[split]))
            if split == "train" and train_subset is not None:
                pool = train_subset
            if not shuffle:
                for i in range(0, len(pool), batch_size):
                    yield self.batch(split, pool[i : i + batch_size])
                return
            g = torch.Generator().manual_seed(seed)
            per_epoch = -(-len(pool) // batch_size)
            for _ in range(max(1, -(-min_batches // per_epoch))):
                order = pool[torch.randperm(len(pool), generator=g)]
                for i in range(0, len(order), batch_size):
                    yield self.batch(split, order[i : i + batch_size])

        return iterate


@schema
class FinetuneConfig:
    """How a downstream evaluation fine-tunes.

    Attributes:
        linear_probe: train only a linear head on frozen features (else all weights).
        epochs: passes over the train split; the reported test score is the one at
            the epoch with the best validation AUROC.
        lr: Adam learning rate.
        weight_decay: Adam weight decay.
        batch_size: examples per step.
    """

    linear_probe: bool = False
    epochs: int = Field(default=20, ge=1)
    lr: float = Field(default=1e-3, gt=0, allow_inf_nan=False)
    weight_decay: float = Field(default=0.0, ge=0)
    batch_size: int = Field(default=64, ge=1)


@schema
class EvalConfig:
    """The downstream evaluation grid: modes × label fractions × fine-tuning seeds.

    Attributes:
        seeds: fine-tuning seeds 0 … seeds-1 (label subset, head init, batch order).
        label_fractions: shares of the downstream train labels to fine-tune with.
        full_finetune: fine-tune encoder and head (None: skip).
        linear_probe: train only a linear head on frozen features (None: skip).
        min_batches_per_epoch: an epoch over a tiny label subset repeats it up to this
            many batches, so 1 % of the labels still gets enough steps per validation.
    """

    seeds: int = Field(default=5, ge=1, le=1000)
    label_fractions: tuple[float, ...] = Field(default=(1.0,), min_length=1)
    full_finetune: FinetuneConfig | None = None
    linear_probe: FinetuneConfig | None = None
    min_batches_per_epoch: int = Field(default=1, ge=1)

    def __post_init__(self) -> None:
        if any(not (0 < f <= 1) for f in self.label_fractions):
            raise ValueError(f"label fractions must be in (0, 1], got {list(self.label_fractions)}")
        if len(set(self.label_fractions)) != len(self.label_fractions):
            raise ValueError(f"label fractions must be distinct, got {list(self.label_fractions)}")
        if self.full_finetune is None and self.linear_probe is None:
            raise ValueError("enable full_finetune, linear_probe or both")
        if self.full_finetune is not None and self.full_finetune.linear_probe:
            raise ValueError("full_finetune must have linear_probe: false")
        if self.linear_probe is not None and not self.linear_probe.linear_probe:
            raise ValueError("linear_probe must have linear_probe: true")

    def modes(self) -> dict[str, FinetuneConfig]:
        out = {"full fine-tuning": self.full_finetune, "linear probe": self.linear_probe}
        return {k: v for k, v in out.items() if v is not None}


def _mse(labels: np.ndarray, predictions: np.ndarray) -> float:
    seen = ~np.isnan(labels)
    return float(np.mean((predictions[seen] - labels[seen]) ** 2)) if seen.any() else float("nan")


def _masked_mse(predictions: Tensor, labels: Tensor) -> Tensor:
    seen = ~torch.isnan(labels)
    return (predictions[seen] - labels[seen]).pow(2).mean()


class _Classifier(nn.Module):
    def __init__(self, encoder: nn.Module, emb_dim: int, num_tasks: int):
        super().__init__()
        self.encoder, self.head = encoder, nn.Linear(emb_dim, num_tasks)

    def forward(self, x):
        return self.head(self.encoder(x))


@torch.no_grad()
def _scores(model: nn.Module, batches: Iterable[tuple[Any, Tensor]]) -> tuple[np.ndarray, np.ndarray]:
    model.eval()
    ys, ss = [], []
    for x, y in batches:
        ys.append(y.float().reshape(len(y), -1).cpu().numpy())
        ss.append(model(x).float().reshape(len(y), -1).cpu().numpy())
    return np.concatenate(ys), np.concatenate(ss)


def _moved(iterate: BatchIter, device: torch.device) -> BatchIter:
    """The same batches, on ``device``."""

    def moved(split, batch_size, shuffle, seed):
        for x, y in iterate(split, batch_size, shuffle, seed):
            yield to_device(x, device), to_device(y, device)

    return moved


def to_device(value: Any, device: torch.device) -> Any:
    """A tensor, a container of tensors or an object with ``.to`` (a PyG batch), on ``device``."""
    if isinstance(value, Tensor) or hasattr(value, "to") and not isinstance(value, (type, str)):
        return value.to(device)
    if isinstance(value, Mapping):
        return {k: to_device(v, device) for k, v in value.items()}
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a NamedTuple
        return type(value)(*(to_device(v, device) for v in value))
    if isinstance(value, (list, tuple)):
        return type(value)(to_device(v, device) for v in value)
    return value


def _embedded(encoder: nn.Module, iterate: BatchIter) -> BatchIter:
    """The same splits as frozen [N, emb_dim] features (eval mode: no dropout, fixed statistics)."""
    encoder.eval()
    cache: dict[str, tuple[Tensor, Tensor]] = {}

    @torch.no_grad()
    def features(split: str) -> tuple[Tensor, Tensor]:
        if split not in cache:
            xs, ys = zip(*((encoder(x), y) for x, y in iterate(split, 256, False, 0)))
            cache[split] = torch.cat(xs), torch.cat(ys)
        return cache[split]

    def iterate_features(split, batch_size, shuffle, seed):
        z, y = features(split)
        order = torch.randperm(len(z), generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(len(z))
        for i in range(0, len(z), batch_size):
            yield z[order[i : i + batch_size]], y[order[i : i + batch_size]]

    return iterate_features


def finetune_and_score(
    encoder: nn.Module,
    emb_dim: int,
    num_tasks: int,
    iterate: BatchIter,
    config: FinetuneConfig,
    seed: int,
    progress: Callable[[], None] | None = None,
    metric: Literal["auroc", "mse"] = "auroc",
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Fine-tune a copy of ``encoder`` with a fresh head on 'train'; score 'valid' and 'test'.

    Returns ``{"valid", "test", "best_epoch"}`` (the metric's values) where the test
    score is taken at the epoch with the best validation score; test is scored only
    at epochs that improve on validation.
    """
    if metric not in ("auroc", "mse"):
        raise ValueError(f"metric must be 'auroc' or 'mse', got {metric!r}")
    score_of = masked_auroc if metric == "auroc" else _mse
    loss_of = masked_bce if metric == "auroc" else _masked_mse
    better = (lambda a, b: a > b) if metric == "auroc" else (lambda a, b: a < b)
    torch.manual_seed(seed)
    device = torch.device(device)
    model = _Classifier(copy.deepcopy(encoder), emb_dim, num_tasks).to(device)
    if device.type != "cpu":
        iterate = _moved(iterate, device)
    if config.linear_probe:
        # frozen features are computed once per split; then only the head trains
        iterate = _embedded(model.encoder, iterate)
        model.encoder = nn.Identity()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(trainable, lr=config.lr, weight_decay=config.weight_decay)
    best = {"valid": float("nan"), "test": float("nan"), "best_epoch": -1}
    for epoch in range(config.epochs):
        model.train()
        for x, y in iterate("train", config.batch_size, True, seed * 10_007 + epoch):
            check_stop()  # a run's stop signal ends fine-tuning at a batch boundary
            opt.zero_grad(set_to_none=True)
            labels = y.reshape(len(y), -1)
            loss_of(model(x).reshape(labels.shape), labels).backward()
            opt.step()
        val = score_of(*_scores(model, iterate("valid", 256, False, 0)))
        if best["best_epoch"] < 0 or (math.isfinite(val) and not (math.isfinite(best["valid"])
                                                                  and not better(val, best["valid"]))):
            test = score_of(*_scores(model, iterate("test", 256, False, 0)))
            best = {"valid": val, "test": test, "best_epoch": epoch}
        if progress is not None:
            progress()
    return best
