"""The math of metapt: pure functions over dict[str, Tensor], no modules, data or I/O."""

from ._tree import tree_dot, tree_norm
from .accumulate import accumulated_hypergradient, directional_mixed_term, pretrain_backward_with_mixed_term
from .core import (
    HypergradInfo,
    PretrainGraph,
    pretrain_graph,
    pretraining_hypergradient,
)
from .curvature import Spectrum, gauss_newton_product, hessian_spectrum, hessian_vector_product, lanczos
from .estimators import (
    Estimator,
    GaussNewtonProblem,
    adam_preconditioner,
    default_estimator,
    differentiable_pt_optimizer,
    draw_scale,
    estimate_hypergradient,
    pretrain_lookahead,
    unrolled_pretraining_hypergradient,
)
from .optim import AdamState, InnerOptimizer, SGDState, adam, sgd
from .solvers import ConjugateGradient, Identity, Neumann, Solver, SolverInfo
from .unroll import unrolled_finetune

__all__ = [
    "AdamState",
    "ConjugateGradient",
    "Estimator",
    "GaussNewtonProblem",
    "HypergradInfo",
    "Identity",
    "InnerOptimizer",
    "Neumann",
    "PretrainGraph",
    "SGDState",
    "Solver",
    "SolverInfo",
    "Spectrum",
    "accumulated_hypergradient",
    "adam",
    "adam_preconditioner",
    "default_estimator",
    "directional_mixed_term",
    "pretrain_backward_with_mixed_term",
    "differentiable_pt_optimizer",
    "draw_scale",
    "estimate_hypergradient",
    "gauss_newton_product",
    "hessian_spectrum",
    "hessian_vector_product",
    "lanczos",
    "pretrain_lookahead",
    "pretrain_graph",
    "pretraining_hypergradient",
    "sgd",
    "tree_dot",
    "tree_norm",
    "unrolled_finetune",
    "unrolled_pretraining_hypergradient",
]
