"""Families of meta-parameters φ: how raw tensors become pre-training hyperparameters.

The four families of Raghu et al. (2021) and a shared example-weight network, each an object
with the same surface:
``init()`` → its entries of φ (a dict of tensors, the starting point), ``summary(phi)`` →
a few readable numbers for logs and reports, ``row_sparse`` → whether a batch's hypergradient
touches only a few rows (then :mod:`metapt.optim`'s lazy optimisers update only those).

* :class:`TaskWeights` — one weight per pre-training task, 2·sigmoid(logit);
* :class:`ExampleWeights` — one weight per pre-training example, read with a row-sparse gradient;
* :class:`ExampleWeightNet` — example weights from one small network of per-example features
  (the example's current loss, its share of observed labels): Meta-Weight-Net, Shu et al. (2019);
* :class:`AugmentationNetwork` — the parameters of an augmentation module;
* noise models: :class:`GaussianNoiseScales` (additive, reparameterised) and
  :class:`LabelFlipRates` (per-task label noise, exact expectation).
"""

from .augmentation import AugmentationNetwork
from .noise import GaussianNoiseScales, LabelFlipRates
from .weights import ExampleWeightNet, ExampleWeights, TaskWeights, gather_rows, weight_logits, weights_from_logits


def summarize(families, phi) -> dict[str, float]:
    """Every family's :meth:`summary` of ``phi``, merged (the families' keys must not collide)."""
    out: dict[str, float] = {}
    for family in families:
        out.update(family.summary(phi))
    return out


__all__ = [
    "AugmentationNetwork",
    "ExampleWeightNet",
    "ExampleWeights",
    "GaussianNoiseScales",
    "LabelFlipRates",
    "TaskWeights",
    "gather_rows",
    "summarize",
    "weight_logits",
    "weights_from_logits",
]
