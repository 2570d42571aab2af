"""The accumulated estimator's mixed term against exact second derivatives."""

import pytest
import torch

from metapt.hypergrad import directional_mixed_term


def _exact_mixed(loss, theta, phi, u):
    """∂/∂φ ⟨∇θ L, u⟩ by double backward."""
    th = {k: v.detach().clone().requires_grad_(True) for k, v in theta.items()}
    ph = {k: v.detach().clone().requires_grad_(True) for k, v in phi.items()}
    grads = torch.autograd.grad(loss(th, ph), list(th.values()), create_graph=True)
    dot = sum((g * u[k]).sum() for g, k in zip(grads, th))
    return dict(zip(ph, torch.autograd.grad(dot, list(ph.values()))))


def _weighted_tasks(th, ph):
    # L = Σ_t 2σ(φ_t) ℓ_t(θ), ℓ_t nonlinear in θ
    x = torch.linspace(-1, 1, 12, dtype=torch.float64).view(3, 4)
    losses = torch.log(torch.cosh(x @ th["a"] + th["b"])).sum(1) + (th["a"] ** 4).sum() * torch.tensor([0.1, 0.2, 0.3],
                                                                                                       dtype=torch.float64)
    return (2 * torch.sigmoid(ph["logits"]) * losses).sum()


def test_matches_double_backward_on_a_nonlinear_loss():
    g = torch.Generator().manual_seed(0)
    theta = {"a": torch.randn(4, 5, generator=g, dtype=torch.float64), "b": torch.randn(5, generator=g, dtype=torch.float64)}
    phi = {"logits": torch.randn(3, generator=g, dtype=torch.float64)}
    u = {k: torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in theta.items()}
    exact = _exact_mixed(_weighted_tasks, theta, phi, u)["logits"]
    fd = directional_mixed_term(_weighted_tasks, theta, phi, u, relative_step=1e-4)["logits"]
    torch.testing.assert_close(fd, exact, rtol=1e-6, atol=1e-9)
    assert not phi["logits"].requires_grad  # left as given


def test_exact_for_a_quadratic_loss():
    # L = ½θᵀAθ + φᵀBθ: ∂/∂φ⟨∇θ L, u⟩ = B u exactly, whatever the step
    g = torch.Generator().manual_seed(1)
    a = torch.randn(6, 6, generator=g, dtype=torch.float64)
    a = a @ a.T
    b = torch.randn(3, 6, generator=g, dtype=torch.float64)
    loss = lambda th, ph: 0.5 * th["x"] @ a @ th["x"] + ph["p"] @ b @ th["x"]  # noqa: E731
    theta = {"x": torch.randn(6, generator=g, dtype=torch.float64)}
    phi = {"p": torch.randn(3, generator=g, dtype=torch.float64)}
    u = {"x": torch.randn(6, generator=g, dtype=torch.float64)}
    for step in (1e-6, 1e-2, 1.0):
        out = directional_mixed_term(loss, theta, phi, u, relative_step=step)["p"]
        torch.testing.assert_close(out, b @ u["x"], rtol=1e-8, atol=1e-10)


def test_both_points_draw_the_same_random_mask_and_leave_the_rng_alone():
    # dropout-like randomness: with one mask M, L = Σ 2σ(φ) ⊙ (M ⊙ θ)²; ∂/∂φ⟨∇θ L, u⟩ = 2σ'·2 (M² θ u)
    theta = {"x": torch.linspace(0.5, 2.0, 8)}
    phi = {"p": torch.zeros(8)}
    u = {"x": torch.ones(8)}

    def loss(th, ph):
        mask = (torch.rand(8) > 0.5).float() * 2.0
        return (2 * torch.sigmoid(ph["p"]) * (mask * th["x"]) ** 2).sum()

    torch.manual_seed(3)
    before = torch.get_rng_state()
    out = directional_mixed_term(loss, theta, phi, u)["p"]
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(3)
    mask = (torch.rand(8) > 0.5).float() * 2.0
    expected = 0.5 * 2 * mask ** 2 * theta["x"]  # d(2σ)/dφ at 0 is 0.5; d/dθ of (mθ)² along u=1 is 2m²θ
    torch.testing.assert_close(out, expected, rtol=1e-3, atol=1e-4)


def test_unreached_entries_are_zero_and_zero_direction_gives_zero():
    loss = lambda th, ph: (ph["used"] * th["x"] ** 2).sum()  # noqa: E731
    theta, phi = {"x": torch.ones(3)}, {"used": torch.ones(3), "unused": torch.ones(2)}
    out = directional_mixed_term(loss, theta, phi, {"x": torch.ones(3)})
    assert torch.equal(out["unused"], torch.zeros(2))
    torch.testing.assert_close(out["used"], torch.full((3,), 2.0), rtol=1e-3, atol=1e-4)
    zero = directional_mixed_term(loss, theta, phi, {"x": torch.zeros(3)})
    assert all(torch.equal(v, torch.zeros_like(v)) for v in zero.values())
    with pytest.raises(ValueError, match="relative_step"):
        directional_mixed_term(loss, theta, phi, {"x": torch.ones(3)}, relative_step=0)


def test_fused_backward_leaves_the_pt_gradient_and_a_forward_difference_mixed_term():
    from metapt.hypergrad import pretrain_backward_with_mixed_term

    g = torch.Generator().manual_seed(2)
    theta = {"a": torch.randn(4, 5, generator=g, dtype=torch.float64, requires_grad=True),
             "b": torch.randn(5, generator=g, dtype=torch.float64, requires_grad=True)}
    phi = {"logits": torch.randn(3, generator=g, dtype=torch.float64)}
    u = {k: torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in theta.items()}
    loss, mixed = pretrain_backward_with_mixed_term(_weighted_tasks, theta, phi, u, relative_step=1e-6)
    plain = {k: v.detach().clone().requires_grad_(True) for k, v in theta.items()}
    expected_loss = _weighted_tasks(plain, phi)
    expected_grad = torch.autograd.grad(expected_loss, list(plain.values()))
    assert float(loss) == pytest.approx(float(expected_loss.detach()))
    for (k, v), e in zip(theta.items(), expected_grad):
        torch.testing.assert_close(v.grad, e)  # exactly what the PT step's backward leaves
    exact = _exact_mixed(_weighted_tasks, theta, phi, u)["logits"]
    torch.testing.assert_close(mixed["logits"], exact, rtol=1e-4, atol=1e-7)
    assert phi["logits"].grad is None and not phi["logits"].requires_grad  # φ untouched
