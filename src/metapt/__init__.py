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

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # what static tools (type checkers, the API docs) read
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
        ExampleWeightNet,
        ExampleWeights,
        GaussianNoiseScales,
        LabelFlipRates,
        TaskWeights,
        weight_logits,
        weights_from_logits,
    )
    from .problem import EpochShuffler, MetaProblem, Params
    from .strategy import ReusePTGraph, Strategy
    from .errors import NonFiniteLossError
    from .schedule import MetaSchedule
    from .trainer import MetaPretrainer, MetricsLogger, TrainerSnapshot

#: public name -> the module that defines it; imported on first use, so that `metapt --help`
#: and `metapt config --list` start without importing torch
_WHERE = {
    "adam": ".hypergrad",
    "AugmentationNetwork": ".metaparams",
    "ConjugateGradient": ".hypergrad",
    "EpochShuffler": ".problem",
    "ExampleWeightNet": ".metaparams",
    "ExampleWeights": ".metaparams",
    "GaussianNoiseScales": ".metaparams",
    "HypergradInfo": ".hypergrad",
    "Identity": ".hypergrad",
    "LabelFlipRates": ".metaparams",
    "MetaPretrainer": ".trainer",
    "MetaProblem": ".problem",
    "MetaSchedule": ".schedule",
    "MetricsLogger": ".trainer",
    "Neumann": ".hypergrad",
    "NonFiniteLossError": ".errors",
    "Params": ".problem",
    "pretraining_hypergradient": ".hypergrad",
    "ReusePTGraph": ".strategy",
    "sgd": ".hypergrad",
    "SolverInfo": ".hypergrad",
    "Strategy": ".strategy",
    "TaskWeights": ".metaparams",
    "TrainerSnapshot": ".trainer",
    "unrolled_finetune": ".hypergrad",
    "weight_logits": ".metaparams",
    "weights_from_logits": ".metaparams",
}

__version__ = "0.1.0"

__all__ = [
    "AugmentationNetwork",
    "ConjugateGradient",
    "EpochShuffler",
    "ExampleWeightNet",
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


def __getattr__(name: str):
    if name in _WHERE:
        from importlib import import_module

        value = getattr(import_module(_WHERE[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'metapt' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
