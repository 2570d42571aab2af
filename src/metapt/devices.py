"""Where a run's tensors live: the device a configuration names, batches moved to it, a check.

:func:`resolve_device` reads ``device:`` (``auto``, ``cpu``, ``cuda:N``; under torchrun the
process's own GPU); :class:`OnDevice` moves every batch a problem hands out; :func:`place` moves
θ₀, ψ₀ and φ₀; :func:`check_device` refuses a trainer with anything elsewhere.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch

from .domain import Pretraining
from .errors import ConfigError
from .evaluation import to_device
from .problem import MetaProblem

if TYPE_CHECKING:
    from .trainer import MetaPretrainer

__all__ = ["OnDevice", "check_device", "place", "resolve_device"]


def resolve_device(setting: str, dist: Any = None) -> torch.device:
    """``auto``: CUDA when available, else CPU. Under torchrun with CUDA, process r takes
    ``cuda:LOCAL_RANK`` (the distributed context's device), whatever index was named."""
    if setting == "auto":
        setting = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(setting)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {setting!r}: CUDA is not available on this machine; use device=cpu or auto")
        if dist is not None and dist.distributed:
            if dist.device.type != "cuda":
                raise ConfigError(f"device {setting!r} under torchrun needs the NCCL backend; launch with "
                                  "`metapt run` (which picks it from the config) or use device=cpu")
            return dist.device
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device {setting!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


class OnDevice:
    """A problem whose batches (of every stream) are moved to ``device``; everything else is the problem's."""

    def __init__(self, problem: MetaProblem, device: torch.device):
        self.base, self.device = problem, device

    def pretrain_batch(self, index: int) -> Any:
        return to_device(self.base.pretrain_batch(index), self.device)

    def finetune_batch(self, index: int) -> Any:
        return to_device(self.base.finetune_batch(index), self.device)

    def metaval_batch(self, index: int) -> Any:
        return to_device(self.base.metaval_batch(index), self.device)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.base, name)


def place(built: Pretraining, device: torch.device) -> Pretraining:
    """``built`` with θ₀, ψ₀ and φ₀ on ``device`` (the problem places its own tensors)."""
    move = lambda tree: {k: v.to(device) for k, v in tree.items()}  # noqa: E731
    return replace(built, params=move(built.params), head=move(built.head), metaparams=move(built.metaparams))


def check_device(trainer: MetaPretrainer, device: torch.device) -> None:
    """Raise unless θ, ψ, φ, their optimisers' states and a batch of every stream are on ``device``."""
    off = []

    def visit(name: str, value: Any) -> None:
        if isinstance(value, torch.Tensor):
            if value.device.type != device.type or (device.index is not None and value.device.index != device.index):
                off.append(f"{name} ({value.device})")
        elif isinstance(value, Mapping):
            for k, v in value.items():
                visit(f"{name}.{k}", v)
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                visit(f"{name}[{i}]", v)
        elif hasattr(value, "to_dict"):  # a PyG batch
            visit(name, value.to_dict())

    for group in ("params", "head", "metaparams"):
        visit(group, getattr(trainer, group))
    for name, opt in (("pt optimiser", trainer.pt_opt), ("meta optimiser", trainer.meta_opt)):
        visit(name, {str(i): st for i, st in enumerate(opt.state.values())})
    problem = trainer.problem
    visit("pretrain batch", problem.pretrain_batch(0))
    visit("finetune batch", problem.finetune_batch(0))
    visit("metaval batch", problem.metaval_batch(0))
    if off:
        raise RuntimeError(f"not on {device}: " + ", ".join(off[:8]) + (f" and {len(off) - 8} more" if len(off) > 8 else ""))
