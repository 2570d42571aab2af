"""metapt: meta-learn the hyperparameters of pre-training by gradient.

The public API, in one place. To meta-learn φ for your own pre-training, write a
:class:`MetaProblem` (your losses and index-addressed batches) and hand it to
:class:`MetaPretrainer`; to get one hypergradient of your own losses, call
:func:`pretraining_hypergradient`. Everything else here is what those two take or return.
The subpackages hold more: :mod:`metapt.hypergrad` (the math: solvers, estimators,
curvature), :mod:`metapt.metaparams` (families of φ), :mod:`metapt.optim` (optimisers for
row-sparse φ).

Warnings about skipped meta-steps, diverged solves and rejected fine-tuning heads go to
the standard :mod:`logging` logger ``"metapt"``.
"""

from .hypergrad import (
    ConjugateGradient,
    HypergradInfo,
    Identity,
    Neumann,
    SolverInfo,
    adam,
    pretraining_hypergradient,
    sgd,
    unrolled_finetune,
)
from .metaparams import (
    AugmentationNetwork,
    ExampleWeights,
    GaussianNoiseScales,
    LabelFlipRates,
    TaskWeights,
    weight_logits,
    weights_from_logits,
)
from .problem import EpochShuffler, MetaProblem, Params
from .strategy import ReusePTGraph, Strategy
from .trainer import MetaPretrainer, MetaSchedule, MetricsLogger, NonFiniteLossError, TrainerSnapshot

__version__ = "0.1.0"

__all__ = [
    "AugmentationNetwork",
    "ConjugateGradient",
    "EpochShuffler",
    "ExampleWeights",
    "GaussianNoiseScales",
    "HypergradInfo",
    "Identity",
    "LabelFlipRates",
    "MetaPretrainer",
    "MetaProblem",
    "MetaSchedule",
    "MetricsLogger",
    "Neumann",
    "NonFiniteLossError",
    "Params",
    "ReusePTGraph",
    "SolverInfo",
    "Strategy",
    "TaskWeights",
    "TrainerSnapshot",
    "adam",
    "pretraining_hypergradient",
    "sgd",
    "unrolled_finetune",
    "weight_logits",
    "weights_from_logits",
]
