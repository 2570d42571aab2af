"""The guide's table of batch indices is what the trainer asks for: the default estimator and the
paper's, measured on a small problem that records every request (issue 22: the guide once
documented the paper's ``pretrain_batch(n - 1)`` after the default had changed)."""

import html
from pathlib import Path

import torch

import metapt
from metapt.hypergrad import Neumann, sgd

ROOT = Path(__file__).resolve().parent.parent


class _Recording(metapt.MetaProblem):
    def __init__(self):
        torch.manual_seed(0)
        self.x = torch.randn(64, 4)
        self.calls: list[tuple[str, int]] = []

    def _batch(self, kind, index):
        self.calls.append((kind, index))
        rows = torch.arange(8) + (index * 8) % 56
        return self.x[rows]

    def pretrain_loss(self, params, metaparams, batch):
        return ((batch @ params["w"]) ** 2 * torch.exp(metaparams["s"])).mean()

    def finetune_loss(self, params, head, batch):
        return ((batch @ params["w"]) * head["v"] - 1).pow(2).mean()

    def pretrain_batch(self, index):
        return self._batch("pretrain", index)

    def finetune_batch(self, index):
        return self._batch("finetune", index)

    def metaval_batch(self, index):
        return self._batch("metaval", index)


def _meta_step_requests(schedule, **kw):
    """{n: sorted requests of the meta-step after PT step n}, each PT step's own batch removed."""
    problem = _Recording()
    trainer = metapt.MetaPretrainer(
        problem, {"w": torch.randn(4)}, {"v": torch.ones(())}, {"s": torch.zeros(())},
        pt_optimizer=lambda p: torch.optim.Adam(p, lr=1e-2), meta_optimizer=lambda p: torch.optim.Adam(p, lr=1e-2),
        inner_optimizer=sgd(0.1), schedule=schedule, **kw)
    out = {}
    for n in range(1, 3 * schedule.interval + 1):
        problem.calls.clear()
        trainer.run_until(n)
        calls = list(problem.calls)
        calls.remove(("pretrain", n - 1))  # the PT step itself: pretrain_batch(s)
        if n % schedule.interval == 0:
            out[n] = sorted(set(calls))
        else:
            assert not calls, (n, calls)
    return out


SCHEDULE = metapt.MetaSchedule(interval=3, batches=2, unroll_steps=2, head_steps=1)


def _expected(n, m, pretrain):
    b, k_max, c_max = SCHEDULE.batches, SCHEDULE.unroll_steps, SCHEDULE.head_steps
    calls = {("pretrain", i) for i in pretrain}
    calls |= {("finetune", m * c_max + c) for c in range(c_max)}
    calls |= {("finetune", (m * b + j) * max(k_max, 1) + k) for j in range(b) for k in range(k_max)}
    calls |= {("metaval", m * b + j) for j in range(b)}
    return sorted(calls)


def test_default_estimator_asks_for_the_upcoming_pt_batches():
    requests = _meta_step_requests(SCHEDULE)
    for m, (n, calls) in enumerate(sorted(requests.items())):
        # pretrain_batch(n + j), j = 0 .. batches - 1: the batches the next PT steps take
        assert calls == _expected(n, m, [n + j for j in range(SCHEDULE.batches)]), (n, calls)


def test_papers_estimator_asks_for_the_pt_batch_just_taken():
    requests = _meta_step_requests(SCHEDULE, solver=Neumann(1, alpha=1e-2))
    for m, (n, calls) in enumerate(sorted(requests.items())):
        expected = [n - 1] + [max(n - 1 - j, 0) for j in range(1, SCHEDULE.batches)]
        assert calls == _expected(n, m, expected), (n, calls)


def test_the_guide_documents_both():
    guide = html.unescape((ROOT / "docs" / "guide.md").read_text())
    for row in ("`pretrain_batch(n + j)`", "`pretrain_batch(n - 1)`", "`pretrain_batch(max(n - 1 - j, 0))`",
                "`finetune_batch(m * head_steps + c)`",
                "`finetune_batch((m * batches + j) * max(unroll_steps, 1) + k)`",
                "`metaval_batch(m * batches + j)`"):
        assert row in guide, row
