"""Default SimCLR ECG augmentations and the learned, reparameterised time-warp (phi)."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from metapt.domains.ecg.augment import LearnedWarp, WarpConfig, default_augment, warp_signal
from metapt.domains.ecg.losses import nt_xent
from metapt.domains.ecg.models import EncoderConfig, ProjectionHead, ResNet1dEncoder


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def ecg_like(n: int, leads: int, length: int, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    """Smooth beat-like signals: a sharp peak mid-window plus slow waves and a little noise."""
    g = gen(seed)
    t = torch.linspace(-1, 1, length, dtype=dtype)
    peak = torch.exp(-0.5 * (t / 0.03) ** 2)
    slow = torch.sin(3 * math.pi * t + torch.rand(n, leads, 1, generator=g, dtype=dtype) * 6)
    return 3 * peak + 0.5 * slow + 0.05 * torch.randn(n, leads, length, generator=g, dtype=dtype)


# ---------------------------------------------------------------- default augmentations


def masked_runs(x: torch.Tensor) -> list[tuple[int, int]]:
    """(start, length) of the zero run of each [lead] row; asserts there is at most one run."""
    runs = []
    for row in x.reshape(-1, x.shape[-1]):
        zero = (row == 0).int()
        edges = torch.diff(torch.cat([torch.tensor([0]), zero, torch.tensor([0])]))
        starts, ends = torch.nonzero(edges == 1).flatten(), torch.nonzero(edges == -1).flatten()
        assert len(starts) <= 1, "masking must be one contiguous segment per lead"
        runs.append((int(starts[0]), int(ends[0] - starts[0])) if len(starts) else (0, 0))
    return runs


def test_masking_is_one_segment_per_lead_up_to_half_the_length():
    x = torch.rand(200, 3, 100) + 1.0  # never 0, so zeros are exactly the mask
    out = default_augment(x, gen(0), max_noise_std=0.0)
    lengths = torch.tensor([length for _, length in masked_runs(out)], dtype=torch.float32)
    assert lengths.max() <= 50 and lengths.max() >= 45  # uniform on {0..50}
    assert abs(lengths.mean().item() - 25) < 2.5
    torch.testing.assert_close(out[out != 0], x[out != 0])  # nothing else changed
    # per lead: the three leads of an example are masked independently
    per_lead = lengths.view(200, 3)
    assert (per_lead[:, 0] != per_lead[:, 1]).float().mean() > 0.9


def test_noise_std_is_up_to_a_tenth_of_each_leads_std():
    g = gen(1)
    # long signals so the empirical std of the added noise is within ~1 % of its sigma
    x = torch.randn(100, 2, 10_000, generator=g) * torch.tensor([1.0, 30.0])[None, :, None]
    out = default_augment(x, gen(2), max_mask_fraction=0.0)
    ratio = (out - x).std(dim=-1) / x.std(dim=-1)  # [100, 2], each ~ U[0, 0.1]
    assert 0.095 < ratio.max() < 0.104
    assert abs(ratio.mean().item() - 0.05) < 0.01
    assert abs(ratio[:, 0].mean() - ratio[:, 1].mean()) < 0.02  # relative to each lead's own std


def test_default_augment_is_seeded_and_leaves_input_alone():
    x = torch.randn(8, 2, 64)
    x0 = x.clone()
    a, b = default_augment(x, gen(5)), default_augment(x, gen(5))
    assert torch.equal(a, b) and torch.equal(x, x0)
    assert not torch.equal(a, default_augment(x, gen(6)))
    assert a.dtype == x.dtype and a.shape == x.shape


@pytest.mark.parametrize("kwargs", [{"max_mask_fraction": 1.5}, {"max_noise_std": -0.1}])
def test_default_augment_validates(kwargs):
    with pytest.raises(ValueError):
        default_augment(torch.randn(2, 1, 10), **kwargs)
    with pytest.raises(ValueError):
        default_augment(torch.randn(2, 10))


# ---------------------------------------------------------------- learned warp


def phi_of(warp: LearnedWarp, **override: float) -> dict[str, torch.Tensor]:
    phi = {k: v.detach().clone() for k, v in warp.named_parameters()}
    for k, v in override.items():
        phi[k] = torch.tensor(v, dtype=phi[k].dtype)
    return phi


@pytest.mark.parametrize("method", ["grid_sample", "lerp"])
@pytest.mark.parametrize("length", [256, 1000])
def test_zero_magnitude_is_exactly_the_identity(method, length):
    warp = LearnedWarp(WarpConfig(in_channels=2))
    x = ecg_like(4, 2, length) * 10
    noise = warp.sample_noise(4, gen(0))
    out = functional_call(warp, phi_of(warp, log_magnitude=-math.inf), (x, noise, method))
    torch.testing.assert_close(out, x, atol=1e-6, rtol=0)
    torch.testing.assert_close(warp(x, torch.zeros_like(noise), method), x, atol=1e-6, rtol=0)
    assert (warp(x, noise, method) - x).abs().max() > 1e-3  # the default warp does warp


def test_same_phi_and_noise_give_the_same_output():
    warp = LearnedWarp()
    x = ecg_like(5, 1, 128)
    phi, noise = phi_of(warp), warp.sample_noise(5, gen(3))
    first = functional_call(warp, phi, (x, noise))
    assert torch.equal(first, functional_call(warp, phi, (x, noise)))
    assert torch.equal(warp.sample_noise(5, gen(3)), noise)
    assert not torch.equal(warp(x, noise), warp(x, warp.sample_noise(5, gen(4))))


@pytest.mark.parametrize("magnitude", [0.01, 0.05, 0.2])
def test_warp_is_monotone_with_fixed_ends(magnitude):
    warp = LearnedWarp()
    x = ecg_like(32, 1, 256, seed=1)
    noise = warp.sample_noise(32, gen(1))
    with torch.no_grad():
        warp.log_magnitude.fill_(math.log(magnitude))
        pos = warp.sampling_positions(x, noise)
        raw = torch.arange(256.0) + warp.velocity(x, noise)
    assert (pos.diff(dim=1) > 0).all()
    assert (pos[:, 0] == 0).all() and (pos[:, -1] == 255).all()
    assert (pos - torch.arange(256.0)).abs().max() > 0.5 * magnitude / 0.01  # it moves samples
    if magnitude >= 0.2:  # adding the velocity directly would fold time; the flow does not
        assert (raw.diff(dim=1) <= 0).any()


def test_large_warps_stay_monotone_in_float64():
    warp = LearnedWarp().double()
    x = ecg_like(16, 1, 256, seed=2, dtype=torch.float64)
    with torch.no_grad():
        warp.log_magnitude.fill_(math.log(1.0))
        pos = warp.sampling_positions(x, warp.sample_noise(16, gen(2), dtype=torch.float64))
    assert (pos.diff(dim=1) > 0).all()


def test_grid_sample_and_handwritten_lerp_agree():
    warp = LearnedWarp(WarpConfig(in_channels=3)).double()
    x = ecg_like(4, 3, 200, dtype=torch.float64)
    noise = warp.sample_noise(4, gen(0), dtype=torch.float64)
    with torch.no_grad():
        warp.log_magnitude.fill_(math.log(0.1))
    torch.testing.assert_close(warp(x, noise, "grid_sample"), warp(x, noise, "lerp"),
                               atol=1e-10, rtol=0)


@pytest.mark.parametrize("method", ["grid_sample", "lerp"])
def test_warp_signal_gradients_in_signal_and_positions(method):
    g = gen(0)
    x = torch.randn(2, 2, 12, dtype=torch.float64, generator=g, requires_grad=True)
    pos = torch.sort(torch.rand(2, 12, dtype=torch.float64, generator=g) * 11, dim=1).values
    pos.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, p: warp_signal(a, p, method), (x, pos))


def test_grid_sample_double_backward_is_supported():
    """The design relies on it (see augment.py); fails loudly if a torch upgrade drops it."""
    g = gen(0)
    img = torch.randn(2, 2, 1, 9, dtype=torch.float64, generator=g, requires_grad=True)
    grid = torch.rand(2, 1, 9, 2, dtype=torch.float64, generator=g) * 1.8 - 0.9
    grid[..., 1] = 0
    grid.requires_grad_()
    assert torch.autograd.gradgradcheck(
        lambda a, b: F.grid_sample(a, b, mode="bilinear", align_corners=True), (img, grid))


def flat(ts) -> torch.Tensor:
    return torch.cat([t.flatten() for t in ts])


def test_gradient_wrt_phi_matches_central_differences():
    torch.manual_seed(0)
    warp = LearnedWarp(WarpConfig(in_channels=2, init_magnitude=0.05)).double()
    x = ecg_like(3, 2, 96, dtype=torch.float64)
    noise = warp.sample_noise(3, gen(1), dtype=torch.float64)
    w = torch.randn(3, 2, 96, dtype=torch.float64, generator=gen(2))
    names = [k for k, _ in warp.named_parameters()]
    phi = [p.detach().clone().requires_grad_() for _, p in warp.named_parameters()]

    def f(ps):
        return (functional_call(warp, dict(zip(names, ps)), (x, noise)) * w).sum()

    grad = flat(torch.autograd.grad(f(phi), phi))
    assert grad.abs().max() > 1e-3 and grad[names.index("log_magnitude")].abs() > 1e-3
    eps = 1e-6
    for seed in range(3):
        d = [torch.randn(p.shape, dtype=p.dtype, generator=gen(10 + seed)) for p in phi]
        with torch.no_grad():
            fd = f([p + eps * v for p, v in zip(phi, d)]) - f([p - eps * v for p, v in zip(phi, d)])
        assert (grad @ flat(d)).item() == pytest.approx(fd.item() / (2 * eps), rel=1e-5, abs=1e-8)


def test_second_order_through_the_warp_matches_finite_differences():
    """d/dphi <grad_theta L_PT(theta, phi), v>: what the hypergradient engine differentiates."""
    torch.manual_seed(0)
    dt = torch.float64
    warp = LearnedWarp(WarpConfig(init_magnitude=0.05)).to(dt)
    enc = ResNet1dEncoder(EncoderConfig(widths=(4, 4, 8, 8), kernel_size=5, norm="none")).to(dt)
    proj = ProjectionHead(8, out_dim=8).to(dt)
    x = ecg_like(6, 1, 64, dtype=dt)
    v1, v2 = default_augment(x, gen(1)), default_augment(x, gen(2))
    n1, n2 = warp.sample_noise(6, gen(3), dtype=dt), warp.sample_noise(6, gen(4), dtype=dt)
    theta_names = [k for k, _ in enc.named_parameters()]
    theta = [p.detach().clone().requires_grad_() for _, p in enc.named_parameters()]
    phi_names = [k for k, _ in warp.named_parameters()]
    phi = [p.detach().clone().requires_grad_() for _, p in warp.named_parameters()]
    vec = [torch.randn(p.shape, dtype=dt, generator=gen(5)) for p in theta]

    def g_dot_v(ps, create_graph):
        ph = dict(zip(phi_names, ps))
        th = dict(zip(theta_names, theta))
        z1 = proj(functional_call(enc, th, (functional_call(warp, ph, (v1, n1)),)))
        z2 = proj(functional_call(enc, th, (functional_call(warp, ph, (v2, n2)),)))
        gtheta = torch.autograd.grad(nt_xent(z1, z2), theta, create_graph=create_graph)
        return sum((g * v).sum() for g, v in zip(gtheta, vec))

    hyper = flat(torch.autograd.grad(g_dot_v(phi, True), phi))
    assert hyper.abs().max() > 1e-4 and hyper[phi_names.index("log_magnitude")].abs() > 1e-6
    eps = 1e-6
    for seed in range(2):
        d = [torch.randn(p.shape, dtype=dt, generator=gen(20 + seed)) for p in phi]
        plus = g_dot_v([(p + eps * u).detach() for p, u in zip(phi, d)], False)
        minus = g_dot_v([(p - eps * u).detach() for p, u in zip(phi, d)], False)
        fd = (plus - minus).item() / (2 * eps)
        assert (hyper @ flat(d)).item() == pytest.approx(fd, rel=1e-4, abs=1e-8)


def test_paper_config_has_about_50k_parameters():
    n = sum(p.numel() for p in LearnedWarp(WarpConfig.paper()).parameters())
    assert 45_000 <= n <= 55_000
    assert sum(p.numel() for p in LearnedWarp().parameters()) < 5_000


def test_warp_validates_inputs():
    warp = LearnedWarp()
    with pytest.raises(ValueError, match="noise"):
        warp(torch.randn(2, 1, 50), torch.randn(2, 3))
    with pytest.raises(ValueError, match="leads"):
        warp(torch.randn(2, 3, 50), warp.sample_noise(2))
    with pytest.raises(ValueError, match="positions"):
        warp_signal(torch.randn(2, 1, 50), torch.zeros(2, 49))
    with pytest.raises(ValueError, match="init_magnitude"):
        WarpConfig(init_magnitude=0.0)
