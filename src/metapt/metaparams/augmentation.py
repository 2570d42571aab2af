"""An augmentation network as a meta-parameter family: φ = the parameters of an ``nn.Module``."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

__all__ = ["AugmentationNetwork"]


class AugmentationNetwork:
    """φ = a module's parameters, applied with ``torch.func.functional_call``.

    Args:
        module: the augmentation network (its own parameters are φ₀; it is never updated in place).
        prefix: prepended to the module's parameter names in φ ("" keeps them as they are).
        describe: optional ``describe(module_holding_phi) -> dict[str, float]`` for :meth:`summary`
            (e.g. the learned warp's magnitude and mean displacement).
    """

    row_sparse = False

    def __init__(self, module: nn.Module, *, prefix: str = "",
                 describe: Callable[[nn.Module], Mapping[str, float]] | None = None):
        self.module, self.prefix, self.describe = module, prefix, describe
        self.keys = [prefix + k for k, _ in module.named_parameters()]

    def init(self, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
        return {self.prefix + k: v.detach().clone().to(dtype or v.dtype) for k, v in self.module.named_parameters()}

    def own(self, phi: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The module's entries of φ, under the module's own parameter names."""
        n = len(self.prefix)
        return {k[n:]: phi[k] for k in self.keys}

    def __call__(self, phi: Mapping[str, Tensor], *args: Any, **kwargs: Any) -> Any:
        """The module's forward with φ's parameters (differentiable in φ)."""
        return functional_call(self.module, self.own(phi), args, kwargs)

    def summary(self, phi: Mapping[str, Tensor]) -> dict[str, float]:
        """The parameter count and norm, and ``describe``'s numbers when given."""
        own = {k: v.detach() for k, v in self.own(phi).items()}
        norm = float(torch.sqrt(sum((v.double() ** 2).sum() for v in own.values())))
        out = {"augment_parameters": float(sum(v.numel() for v in own.values())), "augment_norm": norm}
        if self.describe is not None:
            import copy

            module = copy.deepcopy(self.module)
            module.load_state_dict(own, strict=False)
            out.update({k: float(v) for k, v in self.describe(module).items()})
        return out
