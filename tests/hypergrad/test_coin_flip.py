"""A nonlinear multitask problem with coin-flip tasks: the default estimator must down-weight them.

An MLP encoder with one linear head per pre-training task. Three tasks are thresholds of
directions in a 2-D subspace of the input, the same subspace the downstream task lives in; three
are coin flips (labels drawn once, independent of the input: memorisable noise). Meta-learning the
task weights with the trainer's default estimator must put the coin-flip tasks below the real ones
at every seed, and ascending the meta-objective instead (``maximize=True``) must reverse that: a
test that fails when the hypergradient's sign or direction is wrong.
"""

from __future__ import annotations

import torch

from metapt import MetaPretrainer, MetaSchedule
from metapt.hypergrad import sgd

N_REAL, N_COIN, DIM = 3, 3, 8
HIDDEN = 16
SPREAD = torch.pi / 2  # the real tasks' directions span this angle


class CoinFlipTasks:
    def __init__(self, seed: int, n: int = 512, batch: int = 32):
        g = torch.Generator().manual_seed(seed)
        basis, _ = torch.linalg.qr(torch.randn(DIM, 2, generator=g))  # the shared 2-D subspace
        self.x = torch.randn(n, DIM, generator=g)
        angles = torch.arange(N_REAL) * SPREAD / N_REAL + torch.rand((), generator=g) * 2 * torch.pi
        dirs = basis @ torch.stack([angles.cos(), angles.sin()])  # [DIM, N_REAL], spread over the subspace
        real = (self.x @ dirs > 0).float()
        coin = (torch.rand(n, N_COIN, generator=g) > 0.5).float()
        self.y = torch.cat([real, coin], 1)
        self.ft_x = torch.randn(256, DIM, generator=g)
        self.ft_y = (self.ft_x @ dirs[:, :1] > 0).float()  # downstream: the first real task's direction
        self.n, self.batch, self.seed = n, batch, seed

    def initial_params(self):
        g = torch.Generator().manual_seed(self.seed + 1)
        return {"w1": torch.randn(DIM, HIDDEN, generator=g) / DIM**0.5, "b1": torch.zeros(HIDDEN),
                "w2": torch.randn(HIDDEN, HIDDEN, generator=g) / HIDDEN**0.5, "b2": torch.zeros(HIDDEN),
                "heads": torch.randn(HIDDEN, N_REAL + N_COIN, generator=g) / HIDDEN**0.5}

    def _embed(self, p, x):
        return torch.tanh(torch.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"])

    def _rows(self, index, n):
        g = torch.Generator().manual_seed(self.seed * 7919 + index)
        return torch.randint(0, n, (self.batch,), generator=g)

    def pretrain_loss(self, params, metaparams, rows):
        logits = self._embed(params, self.x[rows]) @ params["heads"]
        bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, self.y[rows], reduction="none").mean(0)
        return (2 * torch.sigmoid(metaparams["task_logits"]) * bce).mean()

    def finetune_loss(self, params, head, rows):
        logits = self._embed(params, self.ft_x[rows]) @ head["w"] + head["b"]
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, self.ft_y[rows])

    def pretrain_batch(self, index):
        return self._rows(index, self.n)

    def finetune_batch(self, index):
        return self._rows(10**6 + index, 128)  # FT-train: the first half

    def metaval_batch(self, index):
        return 128 + self._rows(2 * 10**6 + index, 128)  # MetaFT-validation: the second half

    def describe_metaparams(self, metaparams):
        return {}


def learned_weights(seed: int, *, maximize: bool = False, meta_batches: int = 1, steps: int = 400,
                    **trainer_kwargs) -> torch.Tensor:
    problem = CoinFlipTasks(seed)
    torch.manual_seed(seed)
    trainer = MetaPretrainer(
        problem, problem.initial_params(), {"w": torch.zeros(HIDDEN, 1), "b": torch.zeros(1)},
        {"task_logits": torch.zeros(N_REAL + N_COIN)},
        pt_optimizer=lambda ps: torch.optim.Adam(ps, lr=1e-2),
        meta_optimizer=lambda ps: torch.optim.Adam(ps, lr=0.05, maximize=maximize),
        inner_optimizer=sgd(0.5),
        schedule=MetaSchedule(interval=5, unroll_steps=1, warmup_steps=40, batches=meta_batches),
        **trainer_kwargs,
    )
    trainer.run_until(steps)
    return 2 * torch.sigmoid(trainer.metaparams["task_logits"].detach())


def test_default_estimator_down_weights_coin_flip_tasks_and_the_negated_objective_up_weights_them():
    for seed in range(3):
        w = learned_weights(seed)
        assert w[N_REAL:].mean() < w[:N_REAL].mean() - 0.05, (seed, w)
        w_neg = learned_weights(seed, maximize=True)
        assert w_neg[N_REAL:].mean() > w_neg[:N_REAL].mean() + 0.05, (seed, w_neg)


def test_cg_at_negative_curvature_is_used_not_skipped():
    """On this non-convex problem CG without damping meets negative curvature; the meta-step must
    still update φ (truncated Newton-CG), and the log must say it stopped there."""
    from metapt.hypergrad import ConjugateGradient, Estimator

    problem = CoinFlipTasks(0)
    logged = []

    class Log:
        def log(self, step, metrics):
            logged.append(metrics)

    torch.manual_seed(0)
    trainer = MetaPretrainer(
        problem, problem.initial_params(), {"w": torch.zeros(HIDDEN, 1), "b": torch.zeros(1)},
        {"task_logits": torch.zeros(N_REAL + N_COIN)},
        pt_optimizer=lambda ps: torch.optim.Adam(ps, lr=1e-2),
        meta_optimizer=lambda ps: torch.optim.Adam(ps, lr=0.05), inner_optimizer=sgd(0.5),
        schedule=MetaSchedule(interval=5, unroll_steps=1, warmup_steps=40),
        estimator=Estimator(solver=ConjugateGradient(max_iter=50, damping=0.0)), loggers=[Log()],
    )
    trainer.run_until(100)
    meta = [m for m in logged if "solver_negative_curvature" in m]
    assert len(meta) == 12 and trainer.skipped == 0
    assert sum(m["solver_negative_curvature"] for m in meta) > 0
    assert float(trainer.metaparams["task_logits"].detach().abs().sum()) > 0
