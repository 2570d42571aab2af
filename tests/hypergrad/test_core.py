"""pretraining_hypergradient against exact answers: closed forms and finite differences."""

import pytest
import torch

from metapt.hypergrad import ConjugateGradient, Identity, Neumann, pretraining_hypergradient, sgd, unrolled_finetune
from tests.conftest import rel_err

D, T, N = 6, 4, 20  # features, PT tasks, examples per task
LAM = 0.5  # ridge penalty


def _ridge_problem(dtype=torch.float64, seed=0):
    """Weighted multitask ridge regression as PT, a linear head fine-tuned by K GD steps."""
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(T, N, D, generator=g, dtype=dtype)
    ys = torch.randn(T, N, generator=g, dtype=dtype)
    x_ft = torch.randn(16, D, generator=g, dtype=dtype)
    y_ft = torch.randn(16, generator=g, dtype=dtype)
    x_val = torch.randn(16, D, generator=g, dtype=dtype)
    y_val = torch.randn(16, generator=g, dtype=dtype)
    head0 = {"s": torch.tensor(0.7, dtype=dtype), "b": torch.tensor(0.1, dtype=dtype)}

    def weights(logits):
        return 2 * torch.sigmoid(logits)

    def pretrain_loss(theta, phi):
        w = weights(phi["logits"])
        resid = torch.einsum("tnd,d->tn", xs, theta["w"]) - ys  # [T, N]
        return (w * resid.pow(2).mean(1)).sum() + LAM * theta["w"].pow(2).sum()

    def solve(logits):
        # θ*(φ): (Σ_t w_t X_tᵀX_t / N + λ I) θ = Σ_t w_t X_tᵀ y_t / N
        w = weights(logits)
        a = torch.einsum("t,tnd,tne->de", w, xs, xs) / N + LAM * torch.eye(D, dtype=dtype)
        rhs = torch.einsum("t,tnd,tn->d", w, xs, ys) / N
        return torch.linalg.solve(a, rhs)

    def meta_loss_of(w_enc, steps=3, lr=0.1):
        def ft_loss(head, k):
            return ((head["s"] * (x_ft @ w_enc) + head["b"] - y_ft) ** 2).mean()

        head = unrolled_finetune(ft_loss, head0, sgd(lr), steps)
        return ((head["s"] * (x_val @ w_enc) + head["b"] - y_val) ** 2).mean()

    return pretrain_loss, solve, meta_loss_of


def _exact_hypergradient(solve, meta_loss_of, logits):
    logits = logits.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(meta_loss_of(solve(logits)), logits)
    return g


def test_cg_matches_autograd_through_the_closed_form_solve():
    pretrain_loss, solve, meta_loss_of = _ridge_problem()
    logits = torch.tensor([0.3, -0.5, 1.0, 0.0], dtype=torch.float64)
    theta = {"w": solve(logits)}
    hyper, info = pretraining_hypergradient(
        pretrain_loss, lambda th: meta_loss_of(th["w"]), theta, {"logits": logits}, ConjugateGradient(50, 1e-14)
    )
    exact = _exact_hypergradient(solve, meta_loss_of, logits)
    assert rel_err(hyper["logits"], exact) <= 1e-6
    assert info.usable and info.solver.residual_norm <= 1e-12


def test_sign_flip_would_be_caught():
    # The comparison above is not symmetric in sign: the negated hypergradient is far off.
    pretrain_loss, solve, meta_loss_of = _ridge_problem(seed=3)
    logits = torch.zeros(T, dtype=torch.float64)
    hyper, _ = pretraining_hypergradient(
        pretrain_loss, lambda th: meta_loss_of(th["w"]), {"w": solve(logits)}, {"logits": logits}, ConjugateGradient(50)
    )
    exact = _exact_hypergradient(solve, meta_loss_of, logits)
    assert rel_err(-hyper["logits"], exact) > 1.0


def test_neumann_error_falls_as_steps_grow():
    pretrain_loss, solve, meta_loss_of = _ridge_problem(seed=1)
    logits = torch.tensor([0.2, 0.1, -0.3, 0.4], dtype=torch.float64)
    theta = {"w": solve(logits)}
    # α < 2/λmax(H) makes the series converge
    h = torch.autograd.functional.hessian(lambda v: pretrain_loss({"w": v}, {"logits": logits}), theta["w"])
    alpha = 1.0 / torch.linalg.eigvalsh(h).max().item()
    exact = _exact_hypergradient(solve, meta_loss_of, logits)
    errs = []
    for m in (0, 2, 8, 32, 128):
        hyper, info = pretraining_hypergradient(
            pretrain_loss, lambda th: meta_loss_of(th["w"]), theta, {"logits": logits}, Neumann(m, alpha)
        )
        assert not info.solver.diverged
        errs.append(rel_err(hyper["logits"], exact))
    assert all(a > b for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < 1e-4


def test_identity_is_alpha_times_mixed_partial_times_g():
    pretrain_loss, solve, meta_loss_of = _ridge_problem(seed=2)
    logits = torch.tensor([0.5, -0.2, 0.0, 0.8], dtype=torch.float64)
    theta_w = solve(logits)
    (g,) = torch.autograd.grad(meta_loss_of(theta_w.requires_grad_(True)), theta_w)
    # dense mixed partial J[i, j] = ∂²L_PT / ∂θ_i ∂φ_j
    mixed = torch.autograd.functional.jacobian(
        lambda lg: torch.func.grad(lambda th: pretrain_loss({"w": th}, {"logits": lg}))(theta_w.detach()), logits
    )
    hyper, info = pretraining_hypergradient(
        pretrain_loss, lambda th: meta_loss_of(th["w"]), {"w": theta_w.detach()}, {"logits": logits}, Identity(0.25)
    )
    torch.testing.assert_close(hyper["logits"], -0.25 * mixed.T @ g, rtol=1e-12, atol=1e-14)
    assert info.solver.iterations == 0


# ---- nonlinear: weighted logistic regression, re-solved, against finite differences ----


def _logistic_problem():
    g = torch.Generator().manual_seed(7)
    n, d = 40, 5
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = (torch.rand(n, generator=g, dtype=torch.float64) < torch.sigmoid(x @ torch.ones(d, dtype=torch.float64))).double()
    x_ft, x_val = torch.randn(12, d, generator=g, dtype=torch.float64), torch.randn(12, d, generator=g, dtype=torch.float64)
    y_ft, y_val = (x_ft[:, 0] > 0).double(), (x_val[:, 0] > 0).double()
    bce = torch.nn.functional.binary_cross_entropy_with_logits

    def pretrain_loss(theta, phi):
        w = 2 * torch.sigmoid(phi["example_logits"])  # one weight per PT example
        per_example = bce(x @ theta["w"], y, reduction="none")
        return (w * per_example).mean() + 0.05 * theta["w"].pow(2).sum()

    def solve(logits):
        # Newton to machine precision: θ*(φ) is a genuine optimum.
        theta = torch.zeros(d, dtype=torch.float64)
        for _ in range(30):
            f = lambda v: pretrain_loss({"w": v}, {"example_logits": logits})
            grad = torch.func.grad(f)(theta)
            theta = theta - torch.linalg.solve(torch.func.hessian(f)(theta), grad)
        return theta

    def meta_loss_of(w_enc):
        # fine-tune the whole model for two GD steps, then score on validation
        out = unrolled_finetune(lambda p, k: bce(x_ft @ p["w"], y_ft), {"w": w_enc}, sgd(0.5), 2)
        return bce(x_val @ out["w"], y_val)

    return pretrain_loss, solve, meta_loss_of, n


def test_logistic_example_weights_match_central_differences():
    pretrain_loss, solve, meta_loss_of, n = _logistic_problem()
    logits = torch.linspace(-1, 1, n, dtype=torch.float64)
    hyper, info = pretraining_hypergradient(
        pretrain_loss, lambda th: meta_loss_of(th["w"]), {"w": solve(logits)}, {"example_logits": logits},
        ConjugateGradient(100, 1e-14),
    )
    assert info.usable
    eps = 1e-5
    for j in (0, 7, 19, 33):
        e = torch.zeros(n, dtype=torch.float64)
        e[j] = eps
        fd = (meta_loss_of(solve(logits + e)) - meta_loss_of(solve(logits - e))) / (2 * eps)
        assert hyper["example_logits"][j].item() == pytest.approx(fd.item(), rel=1e-5, abs=1e-10)


def test_forward_over_reverse_agrees_with_double_backward():
    pretrain_loss, solve, meta_loss_of, n = _logistic_problem()
    logits = torch.zeros(n, dtype=torch.float64)
    args = (pretrain_loss, lambda th: meta_loss_of(th["w"]), {"w": solve(logits)}, {"example_logits": logits})
    a, _ = pretraining_hypergradient(*args, Neumann(5, 0.5))
    b, _ = pretraining_hypergradient(*args, Neumann(5, 0.5), forward_over_reverse=True)
    torch.testing.assert_close(a["example_logits"], b["example_logits"], rtol=1e-10, atol=1e-14)


# ---- contract: direct term, dtypes, modules as φ, errors, non-finite reporting ----


def test_direct_term_from_a_meta_loss_that_closes_over_phi():
    # L_PT = ½‖θ − φ‖², θ* = φ, L_V = ½‖θ‖² + c·φ₀  =>  dL_V/dφ = θ* + c e₀ = φ + c e₀
    phi = {"p": torch.tensor([0.4, -1.2], dtype=torch.float64)}
    c = 3.0
    hyper, info = pretraining_hypergradient(
        lambda th, ph: 0.5 * (th["t"] - ph["p"]).pow(2).sum(),
        lambda th: 0.5 * th["t"].pow(2).sum() + c * phi["p"][0],
        {"t": phi["p"].clone()},
        phi,
        ConjugateGradient(5),
    )
    torch.testing.assert_close(hyper["p"], torch.tensor([0.4 + c, -1.2], dtype=torch.float64))
    assert info.direct_norm == pytest.approx(c)
    assert not phi["p"].requires_grad  # restored


def test_float32_and_an_nn_module_as_phi():
    # φ = the parameters of a small network that rescales PT inputs: θ* has a closed form
    # per φ only implicitly, so check against float64 of the same pipeline.
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Tanh())
    x, y = torch.randn(30, 3), torch.randn(30)
    x_val, y_val = torch.randn(10, 3), torch.randn(10)

    def run(dtype):
        m = net.to(dtype)
        phi = {k: v.detach().clone() for k, v in m.named_parameters()}

        def pretrain_loss(th, ph):
            feats = torch.func.functional_call(m, ph, (x.to(dtype),))
            return ((feats @ th["w"] - y.to(dtype)) ** 2).mean() + 0.1 * th["w"].pow(2).sum()

        theta = {"w": torch.zeros(3, dtype=dtype)}
        for _ in range(500):  # gradient descent to (near) the optimum
            g = torch.func.grad(lambda t: pretrain_loss({"w": t}, phi))(theta["w"])
            theta["w"] = theta["w"] - 0.3 * g
        return pretraining_hypergradient(
            pretrain_loss, lambda th: ((x_val.to(dtype) @ th["w"] - y_val.to(dtype)) ** 2).mean(),
            theta, phi, ConjugateGradient(10, 1e-12),
        )

    h32, info32 = run(torch.float32)
    h64, _ = run(torch.float64)
    assert set(h32) == {"0.weight", "0.bias"} and h32["0.weight"].shape == (3, 3)
    assert h32["0.weight"].dtype == torch.float32 and info32.usable
    for k in h64:
        assert rel_err(h32[k].double(), h64[k]) < 1e-3


def test_phi_entry_that_does_not_reach_pretrain_loss_is_named():
    with pytest.raises(ValueError, match=r"phi\['unused'\]"):
        pretraining_hypergradient(
            lambda th, ph: ((th["t"] - ph["used"]) ** 2).sum(),
            lambda th: th["t"].sum(),
            {"t": torch.zeros(2)},
            {"used": torch.ones(2), "unused": torch.ones(3)},
            Identity(1.0),
        )


def test_phi_that_shifts_the_loss_only_gets_a_zero_implicit_term():
    # L_PT = ½‖θ‖² + φ: φ reaches L_PT but not ∇θ L_PT, so dθ*/dφ = 0.
    hyper, _ = pretraining_hypergradient(
        lambda th, ph: 0.5 * th["t"].pow(2).sum() + ph["shift"].sum(),
        lambda th: th["t"].sum(), {"t": torch.ones(2)}, {"shift": torch.ones(1)}, Identity(1.0),
    )
    assert torch.equal(hyper["shift"], torch.zeros(1))


def test_meta_loss_ignoring_theta_is_an_error():
    captured = torch.ones(2, requires_grad=True)
    with pytest.raises(ValueError, match="meta_loss does not depend"):
        pretraining_hypergradient(
            lambda th, ph: (th["t"] * ph["p"]).sum() ** 2, lambda th: captured.sum(),
            {"t": torch.ones(2)}, {"p": torch.ones(2)}, Identity(1.0),
        )


def test_non_finite_hypergradient_is_reported():
    hyper, info = pretraining_hypergradient(
        lambda th, ph: ((th["t"] - ph["p"]) ** 2).sum(),
        lambda th: torch.log(th["t"] - 1.0).sum(),  # log(0): g = inf
        {"t": torch.ones(2)}, {"p": torch.ones(2)}, Identity(1.0),
    )
    assert not info.finite and not info.usable


def test_non_scalar_losses_and_derived_phi_are_rejected():
    with pytest.raises(ValueError, match="scalar"):
        pretraining_hypergradient(
            lambda th, ph: (th["t"] * ph["p"]), lambda th: th["t"].sum(),
            {"t": torch.ones(2)}, {"p": torch.ones(2)}, Identity(1.0),
        )
    leaf = torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match="leaf"):
        pretraining_hypergradient(
            lambda th, ph: (th["t"] * ph["p"]).sum(), lambda th: th["t"].sum(),
            {"t": torch.ones(2)}, {"p": 2 * torch.sigmoid(leaf)}, Identity(1.0),
        )
