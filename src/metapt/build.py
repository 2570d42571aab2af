"""The one construction of a :class:`metapt.MetaPretrainer` from a run's configuration.

Every pre-training phase of a run (:mod:`metapt.runner`), the diagnostics of a checkpointed state
(:mod:`metapt.diagnostics`) and the benchmarks that drive phases themselves build their trainer
here, so a checkpoint's optimiser states load in any of them.
"""

from __future__ import annotations

from typing import Any

import torch

from .devices import OnDevice, check_device
from .domain import Method, Pretraining
from .hypergrad import sgd
from .optim import LazyAdam
from .problem import MetaProblem, Params
from .strategy import ReusePTGraph, Strategy
from .trainer import MetaPretrainer

__all__ = ["build_trainer", "trainer_from_config"]


def build_trainer(built: Pretraining, config: Any, method: Method, seed: int, dist: Any = None,
                  device: torch.device = torch.device("cpu")) -> MetaPretrainer:
    """The :class:`MetaPretrainer` of one phase, as the runner configures it from ``config``
    (seeds this process's dropout and other draws from ``seed``; checks the device placement).
    Benchmarks that drive phases themselves (e.g. a black-box search over φ) start here."""
    meta = config.meta
    rank = dist.rank if dist is not None else 0
    torch.manual_seed(seed * 1_000_003 + 1 + rank)  # dropout and other draws; per process
    learn = method.phi == "learned" and bool(built.metaparams)
    phi = built.metaparams if built.metaparams else {}
    problem = OnDevice(built.problem, device) if device.type != "cpu" else built.problem
    problem = dist.shard(problem) if dist is not None else problem
    strategy: Strategy | None
    if dist is not None and dist.distributed:
        strategy = dist.strategy(sync_buffers_of=built.buffers)
    else:
        strategy = ReusePTGraph() if meta.reuse_pt_graph and learn else None
    trainer = trainer_from_config(problem, built.params, built.head, phi, pt_lr=config.pretrain.lr, meta=meta,
                                  learn=learn, strategy=strategy)
    check_device(trainer, device)
    return trainer


def trainer_from_config(problem: MetaProblem, params: Params, head: Params, metaparams: Params, *, pt_lr: float,
                        meta: Any, learn: bool = True, strategy: Strategy | None = None) -> MetaPretrainer:
    """The one construction of a :class:`MetaPretrainer` from a run's configuration: Adam on θ at
    ``pt_lr``; φ's optimiser from ``meta`` (:class:`metapt.schema.MetaConfig`: LazyAdam with
    ``meta.lr_groups``); SGD at ``meta.inner_lr`` for the FT steps, capped as ``meta.inner_lr_cap`` says; ``meta.estimator``'s
    estimator; ``meta``'s schedule (no meta-steps unless ``learn``). Every phase of a run
    (:func:`build_trainer`) and the diagnostics of a run's state are built here, so a checkpoint's
    optimiser states load in either."""
    keys = list(metaparams)
    return MetaPretrainer(
        problem, params, head, metaparams,
        pt_optimizer=lambda ps: torch.optim.Adam(ps, lr=pt_lr),
        meta_optimizer=lambda ps: _meta_optimizer(meta, dict(zip(keys, ps))),
        inner_optimizer=sgd(meta.inner_lr),
        inner_lr_cap=meta.inner_lr_cap,
        estimator=meta.estimator.estimator(pt_lr),
        schedule=meta.schedule(learn_phi=learn),
        strategy=strategy,
    )


def _meta_optimizer(meta: Any, phi: Params) -> torch.optim.Optimizer:
    """Adam on φ with the configured per-key rates (an optimiser of nothing when φ is empty).

    :class:`metapt.optim.LazyAdam`: on dense hypergradients exactly Adam; on row-sparse ones
    (example weights) it updates only the rows a meta-step touched, at a cost independent of |φ|.
    """
    if not phi:
        return torch.optim.SGD([torch.zeros(0, requires_grad=True)], lr=0.0)
    return LazyAdam(meta.param_groups(phi), lr=meta.lr, betas=(meta.momentum, 0.999))
