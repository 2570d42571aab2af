"""Lanczos against torch.linalg.eigvalsh; Gauss–Newton products against a dense JᵀH_ℓJ."""

import torch

from metapt.hypergrad import ConjugateGradient, gauss_newton_product, lanczos, pretraining_hypergradient


def _sym(n, eig, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q @ torch.diag(eig) @ q.T


def _op(a):
    return lambda v: {"x": (a @ v["x"].reshape(-1)).reshape(v["x"].shape)}


def test_lanczos_full_steps_gives_every_eigenvalue():
    eig = torch.tensor([-3.0, -0.5, 0.1, 0.7, 1.0, 2.0, 4.0, 9.0], dtype=torch.float64)
    a = _sym(8, eig)
    spec = lanczos(_op(a), {"x": torch.zeros(2, 4, dtype=torch.float64)}, steps=8, seed=1)
    torch.testing.assert_close(torch.tensor(spec.ritz_values, dtype=torch.float64), torch.linalg.eigvalsh(a),
                               rtol=0, atol=1e-9)


def test_lanczos_finds_separated_extremes_in_few_steps():
    eig = torch.cat([torch.tensor([-5.0]), torch.linspace(0.0, 1.0, 58, dtype=torch.float64), torch.tensor([10.0])])
    a = _sym(60, eig.to(torch.float64), seed=3)
    spec = lanczos(_op(a), {"x": torch.zeros(60, dtype=torch.float64)}, steps=20, seed=2)
    ref = torch.linalg.eigvalsh(a)
    assert abs(spec.lambda_max - float(ref[-1])) < 1e-8
    assert abs(spec.lambda_min - float(ref[0])) < 1e-8
    assert spec.iterations == 20


def _mlp_problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 3, generator=g, dtype=torch.float64)
    y = (torch.rand(6, 2, generator=g) > 0.5).to(torch.float64)
    mask = torch.rand(6, 2, generator=g) > 0.3
    theta = {"w1": torch.randn(3, 4, generator=g, dtype=torch.float64),
             "w2": torch.randn(4, 2, generator=g, dtype=torch.float64)}
    phi = {"logits": torch.randn(2, generator=g, dtype=torch.float64)}

    def outputs(th):
        return torch.tanh(x @ th["w1"]) @ th["w2"]

    def output_loss(out, ph):
        w = 2 * torch.sigmoid(ph["logits"])
        bce = torch.nn.functional.binary_cross_entropy_with_logits(out, y, reduction="none")
        return (w * bce * mask).sum() / mask.sum()

    return theta, phi, outputs, output_loss


def _flat(th):
    return torch.cat([v.reshape(-1) for v in th.values()])


def _unflat(vec, like):
    out, i = {}, 0
    for k, v in like.items():
        out[k] = vec[i:i + v.numel()].reshape(v.shape)
        i += v.numel()
    return out


def test_gauss_newton_product_equals_dense_jt_h_j_and_is_psd():
    theta, phi, outputs, output_loss = _mlp_problem()
    ph = {k: v.detach() for k, v in phi.items()}
    flat = _flat(theta)
    jac = torch.autograd.functional.jacobian(lambda f: outputs(_unflat(f, theta)).reshape(-1), flat)  # (12, 20)
    out = outputs(theta)
    h_out = torch.autograd.functional.hessian(lambda o: output_loss(o.reshape(out.shape), ph), out.reshape(-1))
    dense = jac.T @ h_out @ jac
    gnvp = gauss_newton_product(outputs, lambda o: output_loss(o, ph), theta)
    g = torch.Generator().manual_seed(5)
    for _ in range(3):
        v = torch.randn(flat.numel(), generator=g, dtype=torch.float64)
        torch.testing.assert_close(_flat(gnvp(_unflat(v, theta))), dense @ v, rtol=1e-10, atol=1e-12)
    assert float(torch.linalg.eigvalsh(dense).min()) > -1e-12
    # while the true Hessian of this non-converged MLP loss is indefinite
    hess = torch.autograd.functional.hessian(lambda f: output_loss(outputs(_unflat(f, theta)), ph), flat)
    assert float(torch.linalg.eigvalsh(hess).min()) < -1e-6


def test_hypergradient_with_gauss_newton_curvature_matches_dense():
    theta, phi, outputs, output_loss = _mlp_problem(1)
    target = {k: torch.ones_like(v) for k, v in theta.items()}

    def meta_loss(th):
        return 0.5 * sum(((th[k] - target[k]) ** 2).sum() for k in th)

    ph = {k: v.detach() for k, v in phi.items()}
    gnvp = gauss_newton_product(outputs, lambda o: output_loss(o, ph), theta)
    hyper, info = pretraining_hypergradient(lambda th, p: output_loss(outputs(th), p), meta_loss, theta, phi,
                                            ConjugateGradient(max_iter=100, tol=1e-13, damping=1e-3), curvature=gnvp)
    # dense: −Bᵀ (G + λI)⁻¹ g with B = ∂²L/∂θ∂φ
    flat = _flat(theta)
    jac = torch.autograd.functional.jacobian(lambda f: outputs(_unflat(f, theta)).reshape(-1), flat)
    out = outputs(theta)
    h_out = torch.autograd.functional.hessian(lambda o: output_loss(o.reshape(out.shape), ph), out.reshape(-1))
    gmat = jac.T @ h_out @ jac + 1e-3 * torch.eye(flat.numel(), dtype=torch.float64)
    mixed = torch.autograd.functional.jacobian(
        lambda p: torch.autograd.functional.jacobian(
            lambda f: output_loss(outputs(_unflat(f, theta)), {"logits": p}), flat, create_graph=True),
        phi["logits"])  # (20, 2)
    g = flat - _flat(target)
    expected = -mixed.T @ torch.linalg.solve(gmat, g)
    torch.testing.assert_close(hyper["logits"], expected, rtol=1e-7, atol=1e-12)
    assert info.usable
