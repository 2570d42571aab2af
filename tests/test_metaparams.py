"""metapt.metaparams: every family's φ₀, its transform of φ, its gradient and its summary."""

import math

import pytest
import torch

from metapt.metaparams import (
    AugmentationNetwork,
    ExampleWeights,
    GaussianNoiseScales,
    LabelFlipRates,
    TaskWeights,
    summarize,
)

F64 = torch.float64


def test_task_weights_start_uniform_and_summarise_by_name():
    fam = TaskWeights(3, names=["a", "b", "c"])
    phi = fam.init(F64)
    torch.testing.assert_close(fam.weights(phi), torch.ones(3, dtype=F64), rtol=0, atol=0)
    phi = {"task_logits": torch.tensor([0.0, math.log(3.0), -math.log(3.0)], dtype=F64)}  # 2σ: 1, 1.5, 0.5
    s = fam.summary(phi)
    assert s["task_weight/b"] == pytest.approx(1.5) and s["task_weight/c"] == pytest.approx(0.5)
    assert s["task_weight_min"] == pytest.approx(0.5) and s["task_weight_mean"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="one name per task"):
        TaskWeights(3, names=["a"])


def test_example_weights_gradient_is_row_sparse_and_exact():
    fam = ExampleWeights(100)
    logits = (0.1 * torch.arange(100, dtype=F64)).requires_grad_(True)
    rows = torch.tensor([5, 7, 5, 99])
    coef = torch.tensor([1.0, -2.0, 3.0, 0.5], dtype=F64)
    (grad,) = torch.autograd.grad((fam.weights({"example_logits": logits}, rows) * coef).sum(), logits)
    assert grad.is_sparse and grad.coalesce()._nnz() == 3
    # d/dφ_r Σ_b c_b 2σ(φ_rows_b) = Σ_{b: rows_b = r} c_b · 2σ(φ_r)(1 − σ(φ_r))
    s = torch.sigmoid(logits.detach())
    expected = torch.zeros(100, dtype=F64)
    expected.index_add_(0, rows, coef * 2 * s[rows] * (1 - s[rows]))
    torch.testing.assert_close(grad.to_dense(), expected, rtol=1e-14, atol=0)
    summary = fam.summary({"example_logits": torch.tensor([-10.0, 0.0, 10.0, 0.0] * 25)})
    assert summary["example_weight_below_0.5"] == pytest.approx(0.25)
    assert summary["example_weight_above_1.5"] == pytest.approx(0.25)
    assert ExampleWeights.row_sparse and not TaskWeights.row_sparse


@pytest.mark.parametrize("max_std", [None, 2.0])
def test_gaussian_noise_scales_start_at_init_and_scale_eps_per_channel(max_std):
    fam = GaussianNoiseScales(3, 0.5, key="sigma", max_std=max_std)
    phi = fam.init(F64)
    torch.testing.assert_close(fam.std(phi), torch.full((3,), 0.5, dtype=F64), rtol=1e-14, atol=0)
    eps = torch.randn(4, 3, 6, generator=torch.Generator().manual_seed(0), dtype=F64)
    phi = {"sigma": phi["sigma"] + torch.tensor([0.0, 0.3, -0.3], dtype=F64)}
    out = fam.noise(phi, eps, dim=1)
    torch.testing.assert_close(out, eps * fam.std(phi).view(1, 3, 1), rtol=0, atol=0)
    # reparameterised: d(σ_c ε)/dφ_c = ε dσ_c/dφ_c, checked by central differences
    leaf = phi["sigma"].clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(fam.noise({"sigma": leaf}, eps, dim=1).sum(), leaf)
    h = 1e-6
    for c in range(3):
        e = torch.zeros(3, dtype=F64)
        e[c] = h
        fd = (fam.noise({"sigma": phi["sigma"] + e}, eps, dim=1).sum() - fam.noise({"sigma": phi["sigma"] - e}, eps, dim=1).sum()) / (2 * h)
        assert float(grad[c]) == pytest.approx(float(fd), rel=1e-7)
    assert set(fam.summary(phi)) == {"sigma_mean", "sigma_min", "sigma_max"}
    with pytest.raises(ValueError, match="init_std"):
        GaussianNoiseScales(3, 3.0, max_std=2.0)


def test_label_flip_rates_smooth_towards_the_flipped_label_and_keep_missing_labels():
    fam = LabelFlipRates(2, init_rate=0.1)
    phi = fam.init(F64)
    torch.testing.assert_close(fam.rates(phi), torch.full((2,), 0.1, dtype=F64), rtol=1e-14, atol=0)
    y = torch.tensor([[1.0, 0.0], [float("nan"), 1.0]], dtype=F64)
    out = fam.smooth(phi, y)
    assert torch.isnan(out[1, 0])
    torch.testing.assert_close(out[0], torch.tensor([0.9, 0.1], dtype=F64), rtol=1e-14, atol=0)
    # the gradient through a missing label is 0, not NaN
    leaf = phi["label_flip"].clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(torch.nan_to_num(fam.smooth({"label_flip": leaf}, y)).sum(), leaf)
    assert torch.isfinite(grad).all()
    with pytest.raises(ValueError, match="max_rate"):
        LabelFlipRates(2, max_rate=0.7)


def test_augmentation_network_is_the_module_with_phi_swapped_in():
    torch.manual_seed(0)
    module = torch.nn.Linear(3, 2).double()
    fam = AugmentationNetwork(module, prefix="aug.", describe=lambda m: {"bias_sum": float(m.bias.detach().sum())})
    phi = fam.init()
    assert set(phi) == {"aug.weight", "aug.bias"}
    x = torch.randn(4, 3, dtype=F64)
    torch.testing.assert_close(fam(phi, x), module(x), rtol=0, atol=0)
    shifted = {**phi, "aug.bias": phi["aug.bias"] + 1.0}
    torch.testing.assert_close(fam(shifted, x), module(x) + 1.0, rtol=1e-14, atol=1e-14)
    s = fam.summary(shifted)
    assert s["augment_parameters"] == 8 and s["bias_sum"] == pytest.approx(float(module.bias.detach().sum()) + 2.0)
    assert torch.equal(module.bias, phi["aug.bias"])  # the module itself is never changed


def test_summarize_merges_every_family():
    families = [TaskWeights(2), ExampleWeights(5), LabelFlipRates(2), GaussianNoiseScales(4, 0.1, key="feature_noise")]
    phi = {}
    for f in families:
        phi.update(f.init())
    s = summarize(families, phi)
    for key in ("task_weight_mean", "example_weight_mean", "label_flip_mean", "feature_noise_mean"):
        assert key in s
