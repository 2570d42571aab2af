"""ECG augmentations: the paper's default SimCLR augmentations and the learned time-warp (phi).

Raghu et al. 2021 pre-train with two fixed augmentations (per-lead zero-masking and Gaussian
noise) and meta-learn an augmentation network applied on top of them: a random time-warp whose
flow is drawn from a Gaussian (reparameterised: the noise is an *input*), scaled per example by a
small CNN and by a learned global magnitude, smoothed, integrated into a diffeomorphism by scaling
and squaring, and applied with ``grid_sample``.

Why grid_sample is safe here: the engine differentiates d/dphi of grad_theta L_PT. That needs the
first derivative of ``grid_sample`` with respect to the grid *inside* a graph built with
``create_graph=True``; ``torch.autograd.gradgradcheck`` on ``grid_sample`` (bilinear, both input
and grid requiring grad) passes on CPU in torch 2.13 (tests/domains/ecg/test_ecg_augment.py checks
it), so no hand-written interpolation is needed for the signal. The scaling-and-squaring
compositions use a hand-written 1-D linear interpolation (gather + lerp) because they resample a
displacement *field* along one axis, where a 2-D grid_sample would only add reshapes.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...schema import schema

__all__ = [
    "BandNoiseConfig",
    "band_split",
    "default_augment",
    "WarpConfig",
    "LearnedWarp",
    "interp1d",
    "warp_signal",
]


def _check_signal(x: Tensor, name: str = "x") -> None:
    if not isinstance(x, Tensor) or x.dim() != 3:
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a [N, leads, length] tensor, got {got}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")


def _rand(shape: tuple[int, ...], generator: torch.Generator | None, like: Tensor) -> Tensor:
    """Uniform [0, 1) draws from ``generator`` (on its own device), moved to ``like``'s device."""
    device = generator.device if generator is not None else like.device
    return torch.rand(shape, generator=generator, device=device, dtype=like.dtype).to(like.device)


def default_augment(
    x: Tensor,
    generator: torch.Generator | None = None,
    *,
    max_mask_fraction: float = 0.5,
    max_noise_std: float = 0.1,
) -> Tensor:
    """The paper's default SimCLR ECG augmentations, drawn independently per example and lead.

    1. Gaussian noise: std ~ U[0, max_noise_std] x the lead's own std (over time, per example),
       so the noise level is relative and independent of units or normalisation.
    2. Zero-masking: a contiguous segment of length ~ U{0, ..., floor(max_mask_fraction * L)} at a
       uniform start is set to exactly 0 (masking after the noise keeps masked samples at 0).

    Returns a new tensor; ``x`` is not modified. Same generator state, same output.
    """
    _check_signal(x)
    if not 0.0 <= max_mask_fraction <= 1.0:
        raise ValueError(f"max_mask_fraction must be in [0, 1], got {max_mask_fraction}")
    if not (math.isfinite(max_noise_std) and max_noise_std >= 0.0):
        raise ValueError(f"max_noise_std must be finite and >= 0, got {max_noise_std}")
    n, c, length = x.shape
    lead_std = x.detach().std(dim=-1, keepdim=True, unbiased=False)
    sigma = _rand((n, c, 1), generator, x) * max_noise_std * lead_std
    device = generator.device if generator is not None else x.device
    noise = torch.randn((n, c, length), generator=generator, device=device, dtype=x.dtype)
    out = x + sigma * noise.to(x.device)

    max_len = int(math.floor(max_mask_fraction * length))
    mask_len = torch.floor(_rand((n, c, 1), generator, x) * (max_len + 1)).clamp(max=max_len)
    start = torch.floor(_rand((n, c, 1), generator, x) * (length - mask_len + 1))
    start = torch.minimum(start, length - mask_len)
    t = torch.arange(length, device=x.device, dtype=x.dtype)
    mask = (t >= start) & (t < start + mask_len)
    return out.masked_fill(mask, 0.0)


@schema
class BandNoiseConfig:
    """The learned additive noise model: band-limited Gaussian noise with a learned amplitude per band.

    ``bands`` equal-width frequency bands from 0 to the Nyquist frequency; band b's noise is white
    Gaussian noise filtered to that band and scaled to unit variance per sample, then multiplied by
    its learned amplitude a_b = exp(φ_b) and the lead's own std (as the default noise is).
    ``init_amplitude``: a₀, every band.

    Attributes:
        bands: equal-width frequency bands from 0 to the Nyquist frequency, one learned amplitude each.
        init_amplitude: a₀, the initial amplitude of every band (φ₀), relative to the lead's std.
    """

    bands: int = 4
    init_amplitude: float = 0.05

    def __post_init__(self) -> None:
        if self.bands < 1:
            raise ValueError(f"BandNoiseConfig: bands must be >= 1, got {self.bands}")
        if not (self.init_amplitude > 0 and math.isfinite(self.init_amplitude)):
            raise ValueError(f"BandNoiseConfig: init_amplitude must be finite and > 0, got {self.init_amplitude}")


def band_split(noise: Tensor, bands: int) -> Tensor:
    """White noise ``[N, C, L]`` split into ``bands`` equal-width frequency bands: ``[N, bands, C, L]``.

    Band b keeps the rFFT bins ``k`` with ``floor(k · bands / (L//2 + 1)) == b`` and is scaled by
    ``sqrt((L//2 + 1) / bins_b)``, so for unit white noise each band has about unit variance per
    sample; the bands of one draw are independent (disjoint bins). Every band is empty-free: at
    most ``L//2 + 1`` bands.
    """
    _check_signal(noise, "noise")
    n, c, length = noise.shape
    bins = length // 2 + 1
    if not 1 <= bands <= bins:
        raise ValueError(f"band_split: bands must be in [1, {bins}] for length {length}, got {bands}")
    spectrum = torch.fft.rfft(noise, dim=-1)  # [N, C, bins]
    which = torch.div(torch.arange(bins) * bands, bins, rounding_mode="floor")  # band of each bin
    out = []
    for b in range(bands):
        mask = (which == b).to(noise.dtype)
        scale = (bins / mask.sum()) ** 0.5
        out.append(torch.fft.irfft(spectrum * mask, n=length, dim=-1) * scale)
    return torch.stack(out, dim=1)


@schema
class WarpConfig:
    """Shape of the learned warp.

    ``widths``/``kernel_size``: the per-example scale CNN (stride-2 convs + ReLU, global mean,
    linear, softplus). ``n_knots``: interior points of the coarse velocity grid (the flow is 0 at
    both ends, so the warp maps [0, L-1] onto itself). ``smooth_sigma``: Gaussian smoothing width
    in knot spacings. ``squarings``: k in scaling and squaring (the flow is integrated over 2^k
    steps). ``init_magnitude``: initial global magnitude, the velocity std at the knots as a
    fraction of the signal length (0.01 = 2.6 samples for a 256-sample beat).

    Attributes:
        in_channels: ECG leads the warp network reads.
        widths: channels of the per-example scale CNN's stride-2 convolutions.
        kernel_size: odd kernel length of that CNN.
        n_knots: interior points of the coarse velocity grid.
        smooth_sigma: Gaussian smoothing width of the velocity, in knot spacings.
        squarings: k of scaling and squaring (the flow is integrated over 2^k steps).
        init_magnitude: initial global magnitude (φ₀): velocity std at the knots as a fraction of
            the signal length.
    """

    in_channels: int = 1
    widths: tuple[int, ...] = (8, 16)
    kernel_size: int = 7
    n_knots: int = 8
    smooth_sigma: float = 0.5
    squarings: int = 6
    init_magnitude: float = 0.01

    def __post_init__(self) -> None:
        if self.in_channels < 1 or not self.widths or any(w < 1 for w in self.widths):
            raise ValueError(
                f"in_channels and widths must be >= 1; got {self.in_channels}, {self.widths}"
            )
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {self.kernel_size}")
        if self.n_knots < 1:
            raise ValueError(f"n_knots must be >= 1, got {self.n_knots}")
        if not (self.smooth_sigma >= 0 and math.isfinite(self.smooth_sigma)):
            raise ValueError(f"smooth_sigma must be finite and >= 0, got {self.smooth_sigma}")
        if not 0 <= self.squarings <= 20:
            raise ValueError(f"squarings must be in [0, 20], got {self.squarings}")
        if not (self.init_magnitude > 0 and math.isfinite(self.init_magnitude)):
            raise ValueError(f"init_magnitude must be finite and > 0, got {self.init_magnitude}")

    @classmethod
    def paper(cls, in_channels: int = 12) -> "WarpConfig":
        """About 50K parameters for 12 leads, the size the paper quotes for its warp network."""
        return cls(in_channels=in_channels, widths=(32, 64, 72), kernel_size=7, n_knots=16)


def interp1d(values: Tensor, positions: Tensor) -> Tensor:
    """Linear interpolation of ``values[n, :]`` at fractional sample ``positions[n, :]``.

    Positions are clamped to [0, L-1]. Written with gather and a lerp, so it is differentiable to
    any order in both arguments (piecewise linear in the positions).
    """
    length = values.shape[-1]
    if length < 2:
        raise ValueError(f"interp1d needs at least 2 samples, got {length}")
    pos = positions.clamp(0, length - 1)
    left = pos.detach().floor().long().clamp(max=length - 2)
    frac = pos - left.to(pos.dtype)
    v0 = values.gather(-1, left)
    v1 = values.gather(-1, left + 1)
    return v0 * (1 - frac) + v1 * frac  # exact at frac 0 and 1, unlike v0 + frac * (v1 - v0)


def warp_signal(
    x: Tensor, positions: Tensor, method: Literal["grid_sample", "lerp"] = "grid_sample"
) -> Tensor:
    """Resample ``x [N, C, L]`` at sample ``positions [N, L]`` (shared by all leads).

    ``grid_sample`` sees the signal as an image ``[N, C, 1, L]``; ``align_corners=True`` makes grid
    coordinates -1 and +1 the centres of samples 0 and L-1, so position p maps to
    ``2 p / (L - 1) - 1`` and integer positions reproduce the signal. ``padding_mode="border"``
    only matters for positions outside [0, L-1], which the warp never produces. The sampling runs
    in float64 and is cast back: in float32 the round trip of the positions through [-1, 1] moves
    them by ~1e-5 samples, enough for a 7e-5 error on the *identity* warp of a unit-std beat.
    ``method="lerp"`` is the same bilinear sampling written with gather (exact at integer
    positions in any dtype, differentiable to any order), kept as a cross-check and fallback.
    """
    _check_signal(x)
    n, c, length = x.shape
    if positions.shape != (n, length):
        raise ValueError(f"positions must be [N, L] = {(n, length)}, got {tuple(positions.shape)}")
    if length < 2:
        raise ValueError(f"signals need at least 2 samples to warp, got {length}")
    if method == "lerp":
        flat = interp1d(x.reshape(n * c, length), positions.repeat_interleave(c, dim=0))
        return flat.reshape(n, c, length)
    if method != "grid_sample":
        raise ValueError(f"method must be 'grid_sample' or 'lerp', got {method!r}")
    pos = positions.to(torch.float64)
    gx = pos * (2.0 / (length - 1)) - 1.0
    grid = torch.stack([gx, torch.zeros_like(gx)], dim=-1).unsqueeze(1)  # [N, 1, L, (x, y)]
    out = F.grid_sample(x.to(torch.float64).unsqueeze(2), grid, mode="bilinear",
                        padding_mode="border", align_corners=True)
    return out.squeeze(2).to(x.dtype)


class LearnedWarp(nn.Module):
    """The meta-learned augmentation network phi: ``(x, noise) -> warped x``.

    phi = the scale CNN's parameters and ``log_magnitude`` (the global magnitude is
    ``exp(log_magnitude)``, positive and multiplicative, so log-space steps are scale-free; set it
    to ``-inf`` for exactly the identity warp). The randomness is the explicit input ``noise
    [N, n_knots] ~ N(0, I)`` (see :meth:`sample_noise`), so the output is a deterministic
    function of (phi, x, noise) and works under ``torch.func.functional_call``.
    """

    def __init__(self, config: WarpConfig | None = None) -> None:
        super().__init__()
        self.config = cfg = config or WarpConfig()
        layers: list[nn.Module] = []
        c = cfg.in_channels
        for w in cfg.widths:
            layers += [nn.Conv1d(c, w, cfg.kernel_size, 2, cfg.kernel_size // 2), nn.ReLU()]
            c = w
        self.features = nn.Sequential(*layers)
        self.scale_head = nn.Linear(c, 1)
        with torch.no_grad():  # softplus(0 + log(e - 1)) = 1: unit per-example scale at init
            self.scale_head.bias.fill_(math.log(math.e - 1.0))
        self.log_magnitude = nn.Parameter(torch.tensor(math.log(cfg.init_magnitude)))

    @property
    def magnitude(self) -> Tensor:
        return self.log_magnitude.exp()

    def sample_noise(
        self,
        batch_size: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> Tensor:
        """The reparameterised input: ``[batch_size, n_knots]`` standard normal draws."""
        gen_device = generator.device if generator is not None else device
        z = torch.randn((batch_size, self.config.n_knots), generator=generator,
                        device=gen_device, dtype=dtype or self.log_magnitude.dtype)
        return z.to(device) if device is not None else z

    def scale(self, x: Tensor) -> Tensor:
        """Per-example positive scale ``[N, 1]`` from the signal itself (softplus of the CNN)."""
        return F.softplus(self.scale_head(self.features(x).mean(dim=-1)))

    def velocity(self, x: Tensor, noise: Tensor) -> Tensor:
        """Smooth stationary velocity field ``[N, L]`` in samples, exactly 0 at both ends."""
        n, _, length = x.shape
        mag = self.log_magnitude.exp().to(x.dtype)
        knots = noise.to(x.dtype) * self.scale(x) * mag * (length - 1)
        knots = F.pad(knots, (1, 1))  # pinned ends: the warp fixes samples 0 and L-1
        v = F.interpolate(knots.unsqueeze(1), size=length, mode="linear", align_corners=True)
        sigma = self.config.smooth_sigma * (length - 1) / (self.config.n_knots + 1)
        radius = min(int(math.ceil(3 * sigma)), length - 2)
        if sigma > 0 and radius > 0:
            k = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
            kernel = torch.exp(-0.5 * (k / sigma) ** 2)
            kernel = (kernel / kernel.sum()).view(1, 1, -1)
            # Point reflection about each end (2 v(0) - v(j)) keeps the ends at ~0 and linear
            # trends intact; plain zero or mirror padding would bend the field at the borders.
            left = 2 * v[..., :1] - v[..., 1:radius + 1].flip(-1)
            right = 2 * v[..., -1:] - v[..., length - 1 - radius:length - 1].flip(-1)
            v = F.conv1d(torch.cat([left, v, right], dim=-1), kernel)
        v = v.squeeze(1)
        # Remove the rounding left at the ends exactly, so zero magnitude is exactly the identity.
        s = torch.linspace(0, 1, length, device=x.device, dtype=x.dtype)
        return v - (v[:, :1] * (1 - s) + v[:, -1:] * s)

    def sampling_positions(self, x: Tensor, noise: Tensor) -> Tensor:
        """Where each output sample reads the input: ``[N, L]``, strictly increasing in t.

        Scaling and squaring: start from the small displacement u = v / 2^k and compose the map
        t -> t + u(t) with itself k times (u <- u + u(t + u)), using linear interpolation. Each
        composition of increasing piecewise-linear maps is increasing, so the result is
        monotone whenever |v'| < 2^k (k = 6: any velocity slope below 64 samples per sample).
        """
        self._check_inputs(x, noise)
        length = x.shape[-1]
        t = torch.arange(length, device=x.device, dtype=x.dtype)
        u = self.velocity(x, noise) / (2 ** self.config.squarings)
        for _ in range(self.config.squarings):
            u = u + interp1d(u, t + u)
        return t + u

    def forward(self, x: Tensor, noise: Tensor,
                method: Literal["grid_sample", "lerp"] = "grid_sample") -> Tensor:
        return warp_signal(x, self.sampling_positions(x, noise), method)

    def _check_inputs(self, x: Tensor, noise: Tensor) -> None:
        _check_signal(x)
        cfg = self.config
        if x.shape[1] != cfg.in_channels:
            raise ValueError(
                f"LearnedWarp expects {cfg.in_channels} leads, got x of shape {tuple(x.shape)}; "
                "set WarpConfig.in_channels to the number of leads"
            )
        if x.shape[-1] < 2:
            raise ValueError(f"signals need at least 2 samples to warp, got {x.shape[-1]}")
        if noise.shape != (x.shape[0], cfg.n_knots):
            raise ValueError(
                f"noise must be [N, n_knots] = {(x.shape[0], cfg.n_knots)}, got "
                f"{tuple(noise.shape)}; draw it with LearnedWarp.sample_noise(N)"
            )
