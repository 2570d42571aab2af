"""Fine-tune a pre-trained encoder downstream and score it: full fine-tuning or linear probe,
epochs picked on validation, test AUROC over seeds with a 95 % confidence interval.

Domain-agnostic: a domain hands over an encoder factory and a function that
iterates ``(inputs, labels)`` batches of a named split. Labels are [B, T] with NaN
where a label is missing (multi-task, multi-label) or [B] for one binary task.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
from pydantic import Field
from scipy import stats
from sklearn.metrics import roc_auc_score
from torch import Tensor, nn

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
    """Mean and the half-width of its 95 % Student-t confidence interval."""
    x = np.asarray([v for v in values if math.isfinite(v)], dtype=float)
    if x.size == 0:
        return float("nan"), float("nan")
    if x.size == 1:
        return float(x[0]), float("nan")
    half = stats.t.ppf(0.975, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size)
    return float(x.mean()), float(half)


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
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    batch_size: int = Field(default=64, ge=1)


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
        ys.append(y.float().reshape(len(y), -1).numpy())
        ss.append(model(x).float().reshape(len(y), -1).numpy())
    return np.concatenate(ys), np.concatenate(ss)


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
) -> dict[str, float]:
    """Fine-tune a copy of ``encoder`` with a fresh head on 'train'; score 'valid' and 'test'.

    Returns ``{"valid_auroc", "test_auroc", "best_epoch"}`` where the test score is
    taken at the epoch with the best validation AUROC.
    """
    torch.manual_seed(seed)
    model = _Classifier(copy.deepcopy(encoder), emb_dim, num_tasks)
    if config.linear_probe:
        # frozen features are computed once per split; then only the head trains
        iterate = _embedded(model.encoder, iterate)
        model.encoder = nn.Identity()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(trainable, lr=config.lr, weight_decay=config.weight_decay)
    best = {"valid_auroc": -math.inf, "test_auroc": float("nan"), "best_epoch": -1}
    for epoch in range(config.epochs):
        model.train()
        for x, y in iterate("train", config.batch_size, True, seed * 10_007 + epoch):
            opt.zero_grad(set_to_none=True)
            labels = y.reshape(len(y), -1)
            masked_bce(model(x).reshape(labels.shape), labels).backward()
            opt.step()
        val = masked_auroc(*_scores(model, iterate("valid", 256, False, 0)))
        if val > best["valid_auroc"] or best["best_epoch"] < 0:
            test = masked_auroc(*_scores(model, iterate("test", 256, False, 0)))
            best = {"valid_auroc": val, "test_auroc": test, "best_epoch": epoch}
        if progress is not None:
            progress()
    return best
