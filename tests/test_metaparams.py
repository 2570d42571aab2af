"""metapt.metaparams: every family's φ₀, its transform of φ, its gradient and its summary."""

import math

import pytest
import torch

from metapt.metaparams import (
    AugmentationNetwork,
    ExampleWeightNet,
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
    families = [TaskWeights(2), ExampleWeights(5), LabelFlipRates(2), GaussianNoiseScales(4, 0.1, key="feature_noise"),
                ExampleWeightNet()]
    phi = {}
    for f in families:
        phi.update(f.init())
    s = summarize(families, phi)
    for key in ("task_weight_mean", "example_weight_mean", "label_flip_mean", "feature_noise_mean",
                "wnet_weight_at_loss_0", "wnet_decreasing_in_loss"):
        assert key in s


def _batch(b=6, t=4, seed=0, dtype=F64):
    """Logits and labels [b, t] with missing labels, one example with none observed."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, t, generator=g, dtype=dtype)
    labels = (torch.rand(b, t, generator=g, dtype=dtype) < 0.5).to(dtype)
    missing = torch.rand(b, t, generator=g) < 0.4
    missing[0] = True  # no label observed
    missing[1] = False  # every label observed
    return logits, labels.masked_fill(missing, float("nan"))


@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("normalize", [False, True])
def test_example_weight_net_starts_at_exactly_one_and_deterministic(dtype, normalize):
    fam = ExampleWeightNet(normalize=normalize)
    phi = fam.init(dtype)
    assert list(phi) == ["wnet.w1", "wnet.b1", "wnet.w2", "wnet.b2"] and not ExampleWeightNet.row_sparse
    assert all(v.dtype == dtype for v in phi.values())
    again = ExampleWeightNet(normalize=normalize).init(dtype)
    assert all(torch.equal(phi[k], again[k]) for k in phi)  # a fixed generator, not the global one
    assert phi["wnet.w1"].abs().sum() > 0  # the first layer is drawn; the last is zero
    logits, labels = _batch(dtype=dtype)
    w = fam.weights(phi, fam.features(100 * logits, labels))
    assert torch.equal(w, torch.ones(6, dtype=dtype))
    s = fam.summary(phi)
    assert {s[f"wnet_weight_at_loss_{k}"] for k in ("-2", "-1", "0", "+1", "+2")} == {1.0}
    assert s["wnet_loss_slope"] == 0.0 and s["wnet_decreasing_in_loss"] == 0.0


def test_example_weight_net_features_are_each_examples_loss_and_observed_share_standardised_in_the_batch():
    fam = ExampleWeightNet()
    logits, labels = _batch()
    f = fam.features(logits.clone().requires_grad_(True), labels)
    assert not f.requires_grad
    observed = ~torch.isnan(labels)
    for i in range(6):
        o = observed[i]
        bce = torch.nn.functional.binary_cross_entropy_with_logits(logits[i, o], labels[i, o], reduction="sum")
        assert float(f[i, 0]) == pytest.approx(float(bce) / max(int(o.sum()), 1), rel=1e-12)
        assert float(f[i, 1]) == pytest.approx(float(o.sum()) / 4)
    z = fam.standardize(f)
    has = observed.any(1)
    assert not has[0] and has.sum() >= 4
    rest = z[has]  # statistics over the examples with an observed label: mean 0, std 1 there
    torch.testing.assert_close(rest.mean(0), torch.zeros(2, dtype=F64), rtol=0, atol=1e-12)
    torch.testing.assert_close(rest.std(0, unbiased=False), torch.ones(2, dtype=F64), rtol=1e-5, atol=0)
    # relative: an affine change of a feature's scale (the loss drifting) leaves the weights as they were
    phi = {k: v + 0.5 * torch.randn(v.shape, generator=torch.Generator().manual_seed(1), dtype=F64)
           for k, v in fam.init(F64).items()}
    moved = f * torch.tensor([3.0, 1.0], dtype=F64) + torch.tensor([2.0, 0.0], dtype=F64)
    moved[~has] = f[~has]  # an unobserved example's loss stays 0
    torch.testing.assert_close(fam.weights(phi, moved)[has], fam.weights(phi, f)[has], rtol=1e-6, atol=0)
    # a constant feature standardises to 0, and a batch of one to 0
    assert torch.equal(fam.standardize(torch.tensor([[0.7, 1.0], [0.7, 1.0]], dtype=F64)), torch.zeros(2, 2, dtype=F64))
    assert torch.equal(fam.standardize(torch.tensor([[0.7, 1.0]], dtype=F64)), torch.zeros(1, 2, dtype=F64))


@pytest.mark.parametrize("normalize", [False, True])
def test_example_weight_net_weights_are_differentiable_in_phi(normalize):
    fam = ExampleWeightNet(hidden=3, normalize=normalize)
    g = torch.Generator().manual_seed(2)
    leaves = [(v + 0.5 * torch.randn(v.shape, generator=g, dtype=F64)).requires_grad_(True)
              for v in fam.init(F64).values()]
    feats = fam.features(*_batch())

    def weights(*values):
        return fam.weights(dict(zip(fam.keys, values)), feats)

    assert torch.autograd.gradcheck(weights, leaves, eps=1e-6, atol=1e-8, rtol=1e-6)
    # and twice (the hypergradient differentiates ∂L/∂θ in φ)
    assert torch.autograd.gradgradcheck(weights, leaves, eps=1e-6, atol=1e-8, rtol=1e-6)


def test_example_weight_net_theta_gradient_holds_the_weights_fixed():
    # features detached: ∇θ Σ_i w_i ℓ_i = Σ_i w_i ∇θ ℓ_i with w at its value, not through the losses
    from metapt.losses import masked_bce

    fam = ExampleWeightNet(hidden=4)
    g = torch.Generator().manual_seed(3)
    phi = {k: v + 0.5 * torch.randn(v.shape, generator=g, dtype=F64) for k, v in fam.init(F64).items()}
    x = torch.randn(6, 5, generator=g, dtype=F64)
    theta = torch.randn(5, 4, generator=g, dtype=F64, requires_grad=True)
    _, labels = _batch()
    logits = x @ theta
    loss = masked_bce(logits, labels, None, fam.weights(phi, fam.features(logits, labels)))
    (grad,) = torch.autograd.grad(loss, theta)
    w = fam.weights(phi, fam.features(x @ theta.detach(), labels))
    assert w.std() > 0.05  # the weights differ: a gradient through them would show
    observed = ~torch.isnan(labels)
    manual = torch.zeros_like(theta)
    for i in range(6):
        o = observed[i]
        if o.any():
            li = torch.nn.functional.binary_cross_entropy_with_logits((x[i] @ theta)[o], labels[i, o], reduction="sum")
            manual += w[i] * torch.autograd.grad(li, theta)[0] / observed.sum()
    torch.testing.assert_close(grad, manual, rtol=1e-12, atol=1e-14)


def test_example_weight_net_summary_says_whether_the_weight_falls_with_the_loss():
    fam = ExampleWeightNet(hidden=1, prefix="mwn.")
    falling = {"mwn.w1": torch.tensor([[1.0, 0.0]]), "mwn.b1": torch.zeros(1), "mwn.w2": torch.tensor([[-2.0]]),
               "mwn.b2": torch.zeros(1)}
    s = fam.summary(falling)  # logit −2·tanh(f̂_loss)
    assert s["mwn_weight_at_loss_-2"] > s["mwn_weight_at_loss_0"] > s["mwn_weight_at_loss_+2"]
    assert s["mwn_weight_at_loss_0"] == pytest.approx(1.0)
    assert s["mwn_weight_at_loss_+1"] == pytest.approx(2 * torch.sigmoid(torch.tensor(-2 * math.tanh(1.0))).item())
    assert s["mwn_decreasing_in_loss"] == 1.0 and s["mwn_loss_slope"] < 0 and s["mwn_observed_slope"] == 0.0
    rising = {**falling, "mwn.w2": torch.tensor([[2.0]])}
    assert fam.summary(rising)["mwn_decreasing_in_loss"] == 0.0 and fam.summary(rising)["mwn_loss_slope"] > 0
    assert all("/" not in k for k in s)  # the molecules problem logs only keys without a "/"


def test_normalized_example_weight_net_is_b_softmax_of_its_logits_and_blind_to_a_shared_shift():
    # the closed form: w_i = B·exp(l_i)/Σ_j exp(l_j), so w_i/w_j = exp(l_i − l_j), and adding c to
    # every logit (the last bias) changes nothing, not even the gradient's other entries
    fam = ExampleWeightNet(hidden=3, normalize=True)
    g = torch.Generator().manual_seed(4)
    phi = {k: (v + 0.5 * torch.randn(v.shape, generator=g, dtype=F64)).requires_grad_(True)
           for k, v in fam.init(F64).items()}
    feats = fam.features(*_batch())
    z = fam.standardize(feats)
    logits = fam.logits(phi, z)
    w = fam.weights(phi, feats)
    e = torch.exp(logits.detach())
    torch.testing.assert_close(w.detach(), len(e) * e / e.sum(), rtol=1e-12, atol=0)
    assert float(w.detach().mean()) == pytest.approx(1.0, abs=1e-12)
    shifted = {**phi, "wnet.b2": phi["wnet.b2"] + 5.0}
    torch.testing.assert_close(fam.weights(shifted, feats), w, rtol=1e-12, atol=0)
    target = torch.arange(len(w), dtype=F64)
    (grad_b2,) = torch.autograd.grad((w * target).sum(), phi["wnet.b2"])
    assert float(grad_b2.abs().max()) < 1e-12  # a shared drift of all logits gets no gradient
    s = fam.summary(phi)  # relative to the weight at the batch mean
    assert s["wnet_weight_at_loss_0"] == 1.0
    l = fam.logits({k: v.detach() for k, v in phi.items()}, torch.tensor([[2.0, 0.0], [0.0, 0.0]], dtype=F64))
    assert s["wnet_weight_at_loss_+2"] == pytest.approx(float(torch.exp(l[0] - l[1])), rel=1e-12)
