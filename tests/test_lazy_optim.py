"""metapt.optim: lazy optimisers against dense references and naive per-row loops."""

import pytest
import torch

from metapt.metaparams import gather_rows
from metapt.optim import LazyAdam, LazySGD, accepts_sparse_grad


def _sparse(rows, values, n):
    return torch.sparse_coo_tensor(torch.tensor(rows).unsqueeze(0), torch.tensor(values, dtype=torch.float64), (n,), check_invariants=False)


def test_lazy_adam_with_dense_gradients_is_torch_adam():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(7, 3, generator=g, dtype=torch.float64)
    b = a.clone()
    lazy = LazyAdam([a], lr=0.05, betas=(0.8, 0.95), eps=1e-6)
    ref = torch.optim.Adam([b], lr=0.05, betas=(0.8, 0.95), eps=1e-6, foreach=False)
    for _ in range(6):
        grad = torch.randn(7, 3, generator=g, dtype=torch.float64)
        a.grad, b.grad = grad.clone(), grad.clone()
        lazy.step(), ref.step()
    assert torch.equal(a, b)  # bit for bit: the same operations in the same order
    # the same state layout: an Adam checkpoint loads into LazyAdam and continues identically
    lazy2 = LazyAdam([b.clone()], lr=0.05, betas=(0.8, 0.95), eps=1e-6)
    lazy2.load_state_dict(ref.state_dict())
    assert set(lazy2.state_dict()["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}


def test_lazy_adam_updates_touched_rows_as_a_per_row_adam():
    n, lr, (b1, b2), eps = 6, 0.1, (0.9, 0.99), 1e-8
    phi = torch.zeros(n, dtype=torch.float64)
    opt = LazyAdam([phi], lr=lr, betas=(b1, b2), eps=eps)
    steps = [([1, 3, 3], [0.5, -2.0, 1.0]), ([3, 4], [0.25, 3.0]), ([1], [-1.0])]
    # naive reference: each row its own scalar Adam, advanced only when touched
    ref = [{"m": 0.0, "v": 0.0, "k": 0, "x": 0.0} for _ in range(n)]
    for rows, vals in steps:
        phi.grad = _sparse(rows, vals, n)
        opt.step()
        total = {}
        for r, v in zip(rows, vals):
            total[r] = total.get(r, 0.0) + v  # repeated rows sum, as a gradient would
        for r, gr in total.items():
            s = ref[r]
            s["k"] += 1
            s["m"] = b1 * s["m"] + (1 - b1) * gr
            s["v"] = b2 * s["v"] + (1 - b2) * gr * gr
            s["x"] -= lr * (s["m"] / (1 - b1 ** s["k"])) / ((s["v"] / (1 - b2 ** s["k"])) ** 0.5 + eps)
    expected = torch.tensor([s["x"] for s in ref], dtype=torch.float64)
    torch.testing.assert_close(phi, expected, rtol=1e-12, atol=1e-14)
    assert phi[0] == 0 and phi[2] == 0 and phi[5] == 0  # never touched, never moved
    assert opt.state[phi]["step"].tolist() == [0, 2, 0, 2, 1, 0]


def test_lazy_sgd_moves_rows_in_proportion_to_their_gradient():
    n, lr, beta = 5, 0.1, 0.9
    phi = torch.zeros(n, dtype=torch.float64)
    opt = LazySGD([phi], lr=lr, beta=beta, eps=0.0)
    phi.grad = _sparse([0, 2], [1e-6, 3e-6], n)  # tiny, as one example's hypergradient is
    opt.step()
    # s = (1 − β)·mean(g²), bias-corrected by 1 − β: the RMS of this step's entries
    rms = ((1e-12 + 9e-12) / 2) ** 0.5
    torch.testing.assert_close(phi, torch.tensor([-lr * 1e-6 / rms, 0, -lr * 3e-6 / rms, 0, 0], dtype=torch.float64),
                               rtol=1e-12, atol=0)
    phi.grad = _sparse([4], [2e-6], n)
    opt.step()
    s = beta * (1 - beta) * 5e-12 + (1 - beta) * 4e-12
    assert phi[4] == pytest.approx(-lr * 2e-6 / (s / (1 - beta**2)) ** 0.5, rel=1e-12)
    assert phi[2] == pytest.approx(-lr * 3e-6 / rms, rel=1e-12)  # untouched this step


def test_lazy_sgd_dense_equals_sparse_with_every_row():
    a = torch.zeros(4, dtype=torch.float64)
    b = torch.zeros(4, dtype=torch.float64)
    oa, ob = LazySGD([a], lr=0.3), LazySGD([b], lr=0.3)
    for vals in ([1.0, -2.0, 0.5, 4.0], [0.1, 0.2, -0.3, 0.0]):
        a.grad = torch.tensor(vals, dtype=torch.float64)
        b.grad = _sparse([0, 1, 2, 3], vals, 4)
        oa.step(), ob.step()
    torch.testing.assert_close(a, b, rtol=1e-14, atol=1e-14)


def test_checkpoint_round_trip_continues_identically():
    def run(split):
        phi = torch.zeros(8, dtype=torch.float64)
        opt = LazyAdam([phi], lr=0.1)
        grads = [_sparse([i % 8, (3 * i) % 8], [1.0 + i, -0.5], 8) for i in range(6)]
        for i, gr in enumerate(grads):
            if i == split:
                state = {"phi": phi.clone(), "opt": opt.state_dict()}
                phi = state["phi"].clone()
                opt = LazyAdam([phi], lr=0.1)
                opt.load_state_dict(state["opt"])
            phi.grad = gr
            opt.step()
        return phi

    torch.testing.assert_close(run(split=3), run(split=-1), rtol=0, atol=0)


def test_gather_rows_gradient_is_sparse_and_equals_dense_indexing():
    table = torch.randn(10, 3, dtype=torch.float64, requires_grad=True)
    rows = torch.tensor([4, 1, 4, 9])
    w = torch.randn(4, 3, dtype=torch.float64)
    (sparse,) = torch.autograd.grad((gather_rows(table, rows) * w).sum(), table)
    (dense,) = torch.autograd.grad((table[rows] * w).sum(), table)
    assert sparse.is_sparse
    torch.testing.assert_close(sparse.to_dense(), dense, rtol=0, atol=1e-15)


def test_which_optimisers_take_sparse_gradients():
    p = [torch.zeros(3, requires_grad=True)]
    assert accepts_sparse_grad(LazyAdam(p)) and accepts_sparse_grad(LazySGD(p))
    assert accepts_sparse_grad(torch.optim.SGD(p, lr=0.1))
    assert not accepts_sparse_grad(torch.optim.SGD(p, lr=0.1, momentum=0.9))
    assert not accepts_sparse_grad(torch.optim.Adam(p))


class _WeightedRegression:
    """Least squares with one weight per example (read row-sparse); the meta-objective a clean set."""

    def __init__(self, n=40, d=5):
        from metapt.metaparams import ExampleWeights

        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, d, generator=g, dtype=torch.float64)
        w = torch.randn(d, generator=g, dtype=torch.float64)
        self.y = self.x @ w
        self.y[:10] = -self.y[:10]  # planted: the first 10 labels are wrong
        self.val = (torch.randn(16, d, generator=g, dtype=torch.float64),)
        self.val = (self.val[0], self.val[0] @ w)
        self.weights = ExampleWeights(n)
        self.n, self.d = n, d

    def pretrain_loss(self, params, metaparams, rows):
        r = (self.x[rows] @ params["w"] - self.y[rows]) ** 2
        return (self.weights.weights(metaparams, rows) * r).mean()

    def finetune_loss(self, params, head, batch):
        x, y = batch
        return ((x @ params["w"]) * head["scale"] - y).pow(2).mean()

    def pretrain_batch(self, index):
        return torch.arange(8) + 8 * (index % 4)  # rows 0..31 only: 32..39 are never read

    def finetune_batch(self, index):
        return self.val

    def metaval_batch(self, index):
        return self.val

    def describe_metaparams(self, metaparams):
        return self.weights.summary(metaparams)


def _trainer(problem, opt):
    from metapt import MetaPretrainer, MetaSchedule
    from metapt.hypergrad import Neumann, sgd

    return MetaPretrainer(problem, {"w": torch.zeros(problem.d, dtype=torch.float64)},
                          {"scale": torch.ones((), dtype=torch.float64)}, problem.weights.init(torch.float64),
                          pt_optimizer=lambda ps: torch.optim.SGD(ps, lr=0.05), meta_optimizer=opt,
                          inner_optimizer=sgd(0.01), solver=Neumann(steps=2, alpha=0.05),
                          schedule=MetaSchedule(interval=1))


@pytest.mark.parametrize("opt", [lambda ps: LazyAdam(ps, lr=0.05), lambda ps: LazySGD(ps, lr=0.05)],
                         ids=["LazyAdam", "LazySGD"])
def test_trainer_takes_row_sparse_steps_and_resumes_exactly(opt):
    problem = _WeightedRegression()
    t = _trainer(problem, opt)
    t.run_until(12)
    phi = t.metaparams["example_logits"].detach()
    assert torch.count_nonzero(phi[32:]) == 0  # never in a batch: never moved
    assert phi[:10].mean() < 0 < phi[10:32].mean()  # the planted wrong labels are weighted down
    # checkpoint at step 12, continue to 24; compare with an uninterrupted run
    state = t.state_dict()
    t.run_until(24)
    resumed = _trainer(_WeightedRegression(), opt)
    resumed.load_state_dict(state)
    resumed.run_until(24)
    torch.testing.assert_close(resumed.metaparams["example_logits"], t.metaparams["example_logits"], rtol=0, atol=0)
    torch.testing.assert_close(resumed.params["w"], t.params["w"], rtol=0, atol=0)


def test_trainer_makes_a_row_sparse_hypergradient_dense_for_a_dense_optimiser():
    problem = _WeightedRegression()
    dense = _trainer(problem, lambda ps: torch.optim.SGD(ps, lr=1e3, momentum=0.5))
    dense.run_until(3)  # SGD with momentum refuses sparse gradients: the trainer densifies
    lazy = _trainer(_WeightedRegression(), lambda ps: torch.optim.SGD(ps, lr=1e3))
    lazy.run_until(1)
    one = _trainer(_WeightedRegression(), lambda ps: torch.optim.SGD(ps, lr=1e3, momentum=0.5))
    one.run_until(1)
    # first step: momentum buffer = gradient, so both take the same step
    torch.testing.assert_close(lazy.metaparams["example_logits"], one.metaparams["example_logits"], rtol=1e-12, atol=0)


def test_lazy_adam_continues_an_adam_state_with_row_sparse_steps():
    phi = torch.zeros(4, dtype=torch.float64)
    adam = torch.optim.Adam([phi], lr=0.1)
    phi.grad = torch.tensor([1.0, -1.0, 0.5, 2.0], dtype=torch.float64)
    adam.step()
    lazy = LazyAdam([phi], lr=0.1)
    lazy.load_state_dict(adam.state_dict())
    m_before = lazy.state[phi]["exp_avg"].clone()
    phi.grad = _sparse([2], [1.0], 4)
    lazy.step()
    assert lazy.state[phi]["step"].tolist() == [1, 1, 2, 1]
    torch.testing.assert_close(lazy.state[phi]["exp_avg"][[0, 1, 3]], m_before[[0, 1, 3]], rtol=0, atol=0)
