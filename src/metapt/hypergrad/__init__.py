"""The math of metapt: pure functions over dict[str, Tensor], no modules, data or I/O."""

from .core import (
    HypergradInfo,
    PretrainGraph,
    pretrain_graph,
    pretraining_hypergradient,
)
from .optim import AdamState, InnerOptimizer, SGDState, adam, sgd
from .solvers import ConjugateGradient, Identity, Neumann, Solver, SolverInfo
from .unroll import unrolled_finetune

__all__ = [
    "AdamState",
    "ConjugateGradient",
    "HypergradInfo",
    "Identity",
    "InnerOptimizer",
    "Neumann",
    "PretrainGraph",
    "SGDState",
    "Solver",
    "SolverInfo",
    "adam",
    "pretrain_graph",
    "pretraining_hypergradient",
    "sgd",
    "unrolled_finetune",
]
