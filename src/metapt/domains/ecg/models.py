"""1-D ResNet encoder and heads for ECG (Raghu et al. 2021, section 4.2 / appendix).

The encoder is a plain-PyTorch module with no in-place parameter tricks, so it runs under
``torch.func.functional_call(model, params, (x,))`` and supports double backward (the
hypergradient engine needs Hessian-vector products of the pre-training loss).
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor, nn

from ...schema import schema

__all__ = [
    "EncoderConfig",
    "BasicBlock1d",
    "ResNet1dEncoder",
    "ClassifierHead",
    "ProjectionHead",
    "count_parameters",
]

Norm = Literal["batch", "group", "none"]


@schema
class EncoderConfig:
    """Shape of the 1-D ResNet.

    The default is CPU-sized (widths 16/32/64/64, one basic block per stage, 254K parameters
    for one lead); :meth:`paper` gives the paper-sized ResNet-18-like network.
    ``norm="batch"`` is the paper's choice; ``"group"`` (GroupNorm, groups of up to 8 channels)
    and ``"none"`` avoid batch statistics and running-stat buffers, which is convenient when
    unrolled inner loops must be a pure function of the parameters.

    Attributes:
        in_channels: ECG leads in the input.
        widths: output channels of each stride-2 stage.
        blocks: basic residual blocks per stage (one entry per width).
        kernel_size: odd convolution kernel length, in samples.
        norm: ``batch``, ``group`` (GroupNorm) or ``none``.
    """

    in_channels: int = 1
    widths: tuple[int, ...] = (16, 32, 64, 64)
    blocks: tuple[int, ...] = (1, 1, 1, 1)
    kernel_size: int = 15
    norm: Norm = "batch"

    def __post_init__(self) -> None:
        if self.in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {self.in_channels}")
        if len(self.widths) == 0 or len(self.widths) != len(self.blocks):
            raise ValueError(
                f"widths and blocks need one entry per stage and the same length; got "
                f"widths={self.widths}, blocks={self.blocks}"
            )
        if any(w < 1 for w in self.widths) or any(b < 1 for b in self.blocks):
            raise ValueError(f"widths and blocks must be >= 1; got {self.widths}, {self.blocks}")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(
                f"kernel_size must be odd so 'same' padding keeps lengths; got {self.kernel_size}"
            )
        if self.norm not in ("batch", "group", "none"):
            raise ValueError(f"norm must be 'batch', 'group' or 'none', got {self.norm!r}")

    @classmethod
    def paper(cls, in_channels: int = 12, norm: Norm = "batch") -> "EncoderConfig":
        """ResNet-18-like: 4 stages of 2 basic blocks, widths 64/128/256/512, kernel 15."""
        return cls(in_channels, (64, 128, 256, 512), (2, 2, 2, 2), 15, norm)

    @property
    def embedding_dim(self) -> int:
        return self.widths[-1]


def _norm(kind: Norm, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm1d(channels)
    if kind == "group":
        # About 8 channels per group; the group count must divide the channel count.
        groups = max(1, channels // 8)
        while channels % groups:
            groups -= 1
        return nn.GroupNorm(groups, channels)
    return nn.Identity()


class BasicBlock1d(nn.Module):
    """ResNet basic block (two k-wide convs) with a 1x1 projection shortcut when shapes change."""

    def __init__(self, c_in: int, c_out: int, stride: int, kernel_size: int, norm: Norm) -> None:
        super().__init__()
        pad = kernel_size // 2
        bias = norm == "none"
        self.conv1 = nn.Conv1d(c_in, c_out, kernel_size, stride, pad, bias=bias)
        self.norm1 = _norm(norm, c_out)
        self.conv2 = nn.Conv1d(c_out, c_out, kernel_size, 1, pad, bias=bias)
        self.norm2 = _norm(norm, c_out)
        self.act = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv1d(c_in, c_out, 1, stride, bias=bias), _norm(norm, c_out)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.act(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return self.act(out + self.shortcut(x))


class ResNet1dEncoder(nn.Module):
    """``[N, leads, L] -> [N, widths[-1]]``: stem conv, one stride-2 stage per width, global mean.

    Any L >= 1 works (stride-2 convs with 'same' padding round lengths up); the global average
    pool makes the embedding independent of the input length.
    """

    def __init__(self, config: EncoderConfig | None = None) -> None:
        super().__init__()
        self.config = cfg = config or EncoderConfig()
        bias = cfg.norm == "none"
        self.stem = nn.Sequential(
            nn.Conv1d(cfg.in_channels, cfg.widths[0], cfg.kernel_size, 1, cfg.kernel_size // 2,
                      bias=bias),
            _norm(cfg.norm, cfg.widths[0]),
            nn.ReLU(),
        )
        stages = []
        c_in = cfg.widths[0]
        for width, n_blocks in zip(cfg.widths, cfg.blocks):
            blocks = [BasicBlock1d(c_in, width, 2, cfg.kernel_size, cfg.norm)]
            blocks += [BasicBlock1d(width, width, 1, cfg.kernel_size, cfg.norm)
                       for _ in range(n_blocks - 1)]
            stages.append(nn.Sequential(*blocks))
            c_in = width
        self.stages = nn.Sequential(*stages)

    @property
    def embedding_dim(self) -> int:
        return self.config.embedding_dim

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 3 or x.shape[1] != self.config.in_channels:
            raise ValueError(
                f"ResNet1dEncoder expects [N, {self.config.in_channels}, L] signals, got "
                f"{tuple(x.shape)}; set EncoderConfig.in_channels to the number of leads"
            )
        return self.stages(self.stem(x)).mean(dim=-1)


class ClassifierHead(nn.Linear):
    """Linear head on the embedding: logits for BCE-with-logits (multi-label or binary)."""

    def __init__(self, embedding_dim: int, n_classes: int) -> None:
        super().__init__(embedding_dim, n_classes)


class ProjectionHead(nn.Module):
    """SimCLR's MLP projection g(h) = W2 ReLU(W1 h); NT-Xent is computed on its output."""

    def __init__(self, embedding_dim: int, hidden_dim: int | None = None,
                 out_dim: int = 64) -> None:
        super().__init__()
        hidden_dim = hidden_dim or embedding_dim
        self.net = nn.Sequential(
            nn.Linear(embedding_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, out_dim)
        )

    def forward(self, h: Tensor) -> Tensor:
        return self.net(h)


def count_parameters(module: nn.Module) -> int:
    """Number of trainable scalars (what the paper quotes as model size)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
