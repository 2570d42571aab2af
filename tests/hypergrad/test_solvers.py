"""Inverse-HVP solvers against a dense solve on seeded SPD matrices."""

import pytest
import torch

from metapt.hypergrad import ConjugateGradient, Identity, Neumann


def _spd(n, cond=20.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    eig = torch.logspace(0, torch.log10(torch.tensor(cond)).item(), n, dtype=torch.float64)
    return q @ torch.diag(eig) @ q.T, eig


def _split(vec):
    # A two-leaf dict, so the solvers' tree handling is exercised.
    return {"a": vec[:3].reshape(3, 1), "b": vec[3:]}


def _join(tree):
    return torch.cat([tree["a"].reshape(-1), tree["b"]])


def _hvp(h):
    return lambda v: _split(h @ _join(v))


def test_cg_matches_dense_solve():
    h, _ = _spd(12)
    b = torch.randn(12, dtype=torch.float64)
    x, info = ConjugateGradient(max_iter=50, tol=1e-12)(_hvp(h), _split(b))
    torch.testing.assert_close(_join(x), torch.linalg.solve(h, b), rtol=1e-9, atol=0)
    assert not info.diverged and info.iterations <= 12 + 2
    assert info.residual_norm <= 1e-12 * info.rhs_norm


def test_cg_damping_solves_shifted_system():
    h, _ = _spd(6)
    b = torch.randn(6, dtype=torch.float64)
    x, _ = ConjugateGradient(max_iter=30, tol=1e-13, damping=0.7)(_hvp(h), _split(b))
    torch.testing.assert_close(_join(x), torch.linalg.solve(h + 0.7 * torch.eye(6, dtype=h.dtype), b), rtol=1e-9, atol=0)


def _krylov_minimiser(h, b, j):
    """argmin over the Krylov space K_j(H, b) of ½xᵀHx − bᵀx: the CG iterate after j steps."""
    basis = torch.stack([torch.linalg.matrix_power(h, i) @ b for i in range(j)], dim=1)
    q, _ = torch.linalg.qr(basis)
    return q @ torch.linalg.solve(q.T @ h @ q, q.T @ b)


def test_cg_stops_at_negative_curvature_with_its_last_good_iterate():
    h = torch.diag(torch.tensor([2.0, 1.0, -1.0, 1.5, 3.0, 0.5], dtype=torch.float64))
    b = torch.tensor([1.0, 1.0, 0.3, 1.0, 1.0, 1.0], dtype=torch.float64)
    x, info = ConjugateGradient(max_iter=20)(_hvp(h), _split(b))
    assert info.negative_curvature and not info.diverged
    good = info.iterations - 1  # the last product found pᵀHp ≤ 0
    assert good >= 1
    torch.testing.assert_close(_join(x), _krylov_minimiser(h, b, good), rtol=1e-9, atol=1e-12)
    assert info.residual_norm == pytest.approx(float((b - h @ _join(x)).norm()), rel=1e-9)


def test_cg_negative_curvature_on_the_first_direction_takes_the_cauchy_like_step():
    h = torch.diag(torch.tensor([1.0, -3.0, 0.0, 0.0, 0.0, 0.0], dtype=torch.float64))
    b = torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    x, info = ConjugateGradient(max_iter=20)(_hvp(h), _split(b))
    # bᵀHb = −2, ‖b‖² = 2: x = (2/2)·b
    torch.testing.assert_close(_join(x), b, rtol=1e-12, atol=0)
    assert info.negative_curvature and not info.diverged


def test_cg_damping_from_the_spectrum_solves_the_shifted_system():
    eig = torch.tensor([-2.0, -0.5, 0.5, 1.0, 2.0, 4.0], dtype=torch.float64)
    g = torch.Generator().manual_seed(4)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    h = q @ torch.diag(eig) @ q.T
    b = torch.randn(6, generator=g, dtype=torch.float64)
    x, info = ConjugateGradient(max_iter=50, tol=1e-13, spectrum_steps=6)(_hvp(h), _split(b))
    assert info.lambda_min == pytest.approx(-2.0, abs=1e-9) and info.damping == pytest.approx(4.0, abs=1e-8)
    shifted = h + info.damping * torch.eye(6, dtype=h.dtype)
    torch.testing.assert_close(_join(x), torch.linalg.solve(shifted, b), rtol=1e-8, atol=0)
    assert not info.negative_curvature and info.relative_residual <= 1e-13


def test_neumann_damping_inverts_the_shifted_indefinite_hessian():
    eig = torch.tensor([-0.5, 0.2, 1.0, 2.0, 3.0, 3.5], dtype=torch.float64)
    g = torch.Generator().manual_seed(6)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    h = q @ torch.diag(eig) @ q.T
    b = torch.randn(6, generator=g, dtype=torch.float64)
    x, info = Neumann(steps=400, alpha=0.2, damping=1.0, divergence_factor=1e6)(_hvp(h), _split(b))
    exact = torch.linalg.solve(h + torch.eye(6, dtype=h.dtype), b)
    torch.testing.assert_close(_join(x), exact, rtol=1e-9, atol=1e-12)
    assert not info.diverged


def test_neumann_alpha_from_lambda_max_converges_whatever_the_given_alpha():
    h, eig = _spd(10, cond=5.0, seed=2)
    b = torch.randn(10, dtype=torch.float64)
    # alpha=1.0 would diverge (λmax = 5); the spectrum picks α = 1/λmax
    x, info = Neumann(steps=300, alpha=1.0, spectrum_steps=10, divergence_factor=1e6)(_hvp(h), _split(b))
    assert info.lambda_max == pytest.approx(float(eig.max()), rel=1e-9)
    torch.testing.assert_close(_join(x), torch.linalg.solve(h, b), rtol=1e-9, atol=1e-12)
    assert info.iterations == 300 + 10


def test_neumann_error_falls_with_steps_and_converges():
    h, eig = _spd(10, cond=5.0)
    alpha = 1.0 / eig.max().item()  # < 2/λmax
    b = torch.randn(10, dtype=torch.float64)
    exact = torch.linalg.solve(h, b)
    errors = []
    for m in (0, 1, 3, 10, 30, 100):
        x, info = Neumann(steps=m, alpha=alpha)(_hvp(h), _split(b))
        errors.append(float((_join(x) - exact).norm() / exact.norm()))
        assert info.iterations == m and not info.diverged
    assert all(e1 > e2 for e1, e2 in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-6


def test_neumann_matches_its_closed_form():
    # α Σ_{j≤M} (I − αH)^j b, written densely.
    h, _ = _spd(5)
    b = torch.randn(5, dtype=torch.float64)
    a = 0.05
    step = torch.eye(5, dtype=torch.float64) - a * h
    want = a * sum(torch.linalg.matrix_power(step, j) @ b for j in range(4))
    x, info = Neumann(steps=3, alpha=a)(_hvp(h), _split(b))
    torch.testing.assert_close(_join(x), want, rtol=1e-12, atol=0)
    # its residual is that of the series one term shorter
    prev = a * sum(torch.linalg.matrix_power(step, j) @ b for j in range(3))
    assert info.residual_norm == pytest.approx(float((b - h @ prev).norm()), rel=1e-10)


def test_neumann_reports_divergence():
    h, eig = _spd(6)
    b = torch.randn(6, dtype=torch.float64)
    _, info = Neumann(steps=20, alpha=3.0 / eig.max().item())(_hvp(h), _split(b))
    assert info.diverged


def test_identity_is_alpha_b_and_uses_no_hvp():
    b = torch.randn(6, dtype=torch.float64)

    def no_hvp(v):
        raise AssertionError("Identity must not call hvp")

    x, info = Identity(alpha=0.3)(no_hvp, _split(b))
    torch.testing.assert_close(_join(x), 0.3 * b, rtol=0, atol=0)
    assert info.iterations == 0


@pytest.mark.parametrize(
    "make, field",
    [
        (lambda: Neumann(steps=-1), "steps"),
        (lambda: Neumann(alpha=0.0), "alpha"),
        (lambda: ConjugateGradient(max_iter=0), "max_iter"),
        (lambda: ConjugateGradient(damping=-1.0), "damping"),
        (lambda: Identity(alpha=-2.0), "alpha"),
    ],
)
def test_bad_options_name_the_field(make, field):
    with pytest.raises(ValueError, match=field):
        make()


def test_hessian_vector_product_of_a_non_quadratic_loss_is_the_dense_hessian_times_v():
    from metapt.hypergrad import hessian_vector_product

    # loss = Σ exp(a)·b² + (aᵀa)² over the two leaves: the Hessian from torch.autograd.functional
    # on the flat vector is the exact answer; a leaf the loss never reads has zero curvature
    def flat_loss(z):
        a, b = z[:3], z[3:]
        return (torch.exp(a).sum() * (b**2).sum()) + (a @ a) ** 2

    z = torch.tensor([0.3, -0.2, 0.5, 1.0, -0.7, 0.4], dtype=torch.float64)
    dense = torch.autograd.functional.hessian(flat_loss, z)
    point = {**_split(z), "unused": torch.ones(2, dtype=torch.float64)}
    hvp = hessian_vector_product(lambda p: flat_loss(_join(p)), point)
    v = torch.tensor([1.0, 2.0, -1.0, 0.5, 0.0, 3.0], dtype=torch.float64)
    out = hvp({**_split(v), "unused": torch.ones(2, dtype=torch.float64)})
    torch.testing.assert_close(_join(out), dense @ v, rtol=1e-12, atol=1e-12)
    assert torch.equal(out["unused"], torch.zeros(2, dtype=torch.float64))
    # and CG on it (plus damping, which keeps it positive definite here) solves the dense system
    x, info = ConjugateGradient(max_iter=40, tol=1e-12, damping=50.0)(
        hvp, {**_split(v), "unused": torch.zeros(2, dtype=torch.float64)})
    torch.testing.assert_close(_join(x), torch.linalg.solve(dense + 50.0 * torch.eye(6, dtype=torch.float64), v),
                               rtol=1e-8, atol=1e-10)
