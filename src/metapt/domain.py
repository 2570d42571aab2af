"""What a domain declares to be run: its methods, how to build one method's pre-training, its data.

A domain (molecules, ECG, synthetic, or your own) implements :class:`Domain`; methods are data
(:class:`Method`); a method's pre-training is a :class:`Pretraining`. :func:`metapt.runner.run_experiment`
runs any domain the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from rich.console import Console
from torch import nn

from .evaluation import Downstream
from .problem import MetaProblem, Params

__all__ = ["Domain", "Method", "Pretraining"]


@dataclass(frozen=True)
class Method:
    """One way of producing the encoder that is fine-tuned downstream.

    Attributes:
        name: the key in configs and run folders (``meta_task_weights``).
        label: what tables and plots call it (``meta task weights``).
        pretrain: False: a randomly initialised encoder (no pre-training).
        phi: ``learned`` (meta-learned online), ``frozen`` (held at φ₀: plain
            pre-training with the same φ₀, the control for meta-learning), ``random`` (φ₀ plus
            standard normal noise drawn from the pre-training seed, held there: a random
            weighting, one draw per pre-training seed) or ``none``.
        variant: the domain's own selector of what φ is (``task_weights``, ``warp``).
    """

    name: str
    label: str
    pretrain: bool = True
    phi: Literal["learned", "frozen", "random", "none"] = "learned"
    variant: str = ""


@dataclass
class Pretraining:
    """What a domain builds for one method's pre-training.

    Attributes:
        problem: the :class:`metapt.MetaProblem` (losses and batches).
        params, head, metaparams: θ₀, ψ₀, φ₀ (φ₀ may be empty for φ ``none``).
        encoder: pre-trained θ → the ``nn.Module`` fine-tuned downstream.
        emb_dim: the encoder's output width.
        buffers: a module whose buffers (batch norm) data-parallel runs keep in sync.
    """

    problem: MetaProblem
    params: Params
    head: Params
    metaparams: Params
    encoder: Callable[[Params], nn.Module]
    emb_dim: int
    buffers: nn.Module | None = None


class Domain(Protocol):
    """What a domain declares to be run by :func:`run_experiment`.

    ``config`` is the job's configuration, an instance of the domain's pydantic class
    with the shared sections ``pretrain``, ``meta``, ``evaluation``, ``checkpoint``,
    ``methods`` and ``device``.
    """

    name: str
    methods: Mapping[str, Method]
    #: paired differences reported, (better, baseline) method names
    gains: Sequence[tuple[str, str]]

    def settings(self, config: Any) -> Sequence[str]:
        """Downstream settings run one after the other (``("b3db", "heldout")``; one name if just one)."""
        ...

    def load(self, config: Any, setting: str, console: Console) -> Any:
        """The data of one setting (printed briefly on ``console``)."""
        ...

    def pretraining(self, config: Any, data: Any, method: Method, seed: int, device: torch.device) -> Pretraining:
        """One method's problem and initial values; ``seed`` is the pre-training seed. The problem's
        own tensors and modules go on ``device`` (the runner moves θ₀, ψ₀, φ₀ and every batch)."""
        ...

    def downstream(self, config: Any, data: Any) -> Downstream:
        """The labelled downstream splits 'train', 'valid', 'test'."""
        ...

    def data_summary(self, config: Any, data: Any) -> dict[str, Any]:
        """What the data of a setting is (sizes, groups, records), JSON-able, for the summary."""
        ...

    def describe(self, config: Any, data: Any, method: Method, metaparams: Params) -> dict[str, Any]:
        """A readable, JSON-able summary of a learned φ (task names → weights, warp size)."""
        ...

    def plots(self, folder: Path, summary: dict[str, Any]) -> None:
        """Extra plots from the run folder (may do nothing)."""
        ...

    # Optional: ``check(config)``, called before a run folder is made, raises
    # :class:`metapt.errors.UserError` for what the configuration cannot express but the run
    # cannot do without (the ECG job: a data folder that exists). A domain without it accepts
    # every configuration its schema accepts.
