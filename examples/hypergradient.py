"""The bare hypergradient on your own losses: which training examples should weigh less?

Weighted ridge regression, θ*(φ) = argmin_θ  mean_i w_i (x_iᵀθ − y_i)² + λ‖θ‖²,
w = 2·sigmoid(φ), with a known 10 % of the labels corrupted. The validation loss
L_V(θ*) is clean. ``pretraining_hypergradient`` gives dL_V/dφ without ever forming
θ*'s Jacobian; here L_PT is quadratic in θ, so conjugate gradient solves H x = g
exactly and the result matches a finite difference of the closed-form solution.
A positive entry means "this example's weight should go down".

Run: python examples/hypergradient.py
"""

import torch

from metapt.hypergrad import ConjugateGradient, Neumann, pretraining_hypergradient, sgd, unrolled_finetune

torch.manual_seed(0)
dtype = torch.float64
n, d, lam = 200, 5, 0.1
x, x_val = torch.randn(n, d, dtype=dtype), torch.randn(100, d, dtype=dtype)
w_true = torch.randn(d, dtype=dtype)
y, y_val = x @ w_true, x_val @ w_true
corrupted = torch.arange(n) < n // 10
y[corrupted] = -3 * y[corrupted]  # planted label errors


def pretrain_loss(theta, phi):  # L_PT(θ, φ): use the dicts you are given
    w = 2 * torch.sigmoid(phi["logits"])
    return (w * (x @ theta["w"] - y) ** 2).mean() + lam * theta["w"].pow(2).sum()


def meta_loss(theta):  # L_V(θ): here the clean validation loss of θ itself
    return ((x_val @ theta["w"] - y_val) ** 2).mean()


def solve(phi_logits):  # θ*(φ) in closed form: (XᵀWX/n + λI) θ = XᵀWy/n
    w = 2 * torch.sigmoid(phi_logits)
    a = x.T @ (w[:, None] * x) / n + lam * torch.eye(d, dtype=dtype)
    return torch.linalg.solve(a, x.T @ (w * y) / n)


phi = {"logits": torch.zeros(n, dtype=dtype, requires_grad=True)}  # w = 1 everywhere
theta = {"w": solve(phi["logits"].detach())}  # the implicit function theorem needs θ at the optimum
hypergrad, info = pretraining_hypergradient(pretrain_loss, meta_loss, theta, phi, ConjugateGradient(max_iter=d))

# Check one entry against a central finite difference of L_V(θ*(φ)).
i, eps = 0, 1e-5
bump = torch.zeros(n, dtype=dtype)
bump[i] = eps
finite_difference = (meta_loss({"w": solve(bump)}) - meta_loss({"w": solve(-bump)})) / (2 * eps)
print(f"dL_V/dφ[{i}]: hypergradient {hypergrad['logits'][i]:+.8f}, finite difference {finite_difference:+.8f}")
print(f"solver: {info.solver.iterations} HVPs, residual {info.solver.residual_norm:.1e}")
print(f"mean dL_V/dφ on corrupted examples {hypergrad['logits'][corrupted].mean():+.2e}, "
      f"on clean ones {hypergrad['logits'][~corrupted].mean():+.2e}")

# The same call with the paper's pieces: L_V measured after one unrolled fine-tuning step of a
# head (here a scalar gain on the ridge prediction), and a one-term Neumann series for H⁻¹.
head0 = {"gain": torch.ones((), dtype=dtype)}


def ft_loss(theta, head, batch):
    xb, yb = batch
    return ((head["gain"] * (xb @ theta["w"]) - yb) ** 2).mean()


def meta_loss_after_finetuning(theta):
    head = unrolled_finetune(lambda h, k: ft_loss(theta, h, (x_val[:50], y_val[:50])), head0, sgd(0.1), steps=1)
    return ft_loss(theta, head, (x_val[50:], y_val[50:]))


hypergrad_ft, info_ft = pretraining_hypergradient(
    pretrain_loss, meta_loss_after_finetuning, theta, phi, Neumann(steps=1, alpha=0.1)
)
print(f"after fine-tuning, Neumann(1): corrupted {hypergrad_ft['logits'][corrupted].mean():+.2e}, "
      f"clean {hypergrad_ft['logits'][~corrupted].mean():+.2e}")
