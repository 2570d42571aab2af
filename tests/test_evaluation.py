"""Evaluation: AUROC with missing labels, confidence intervals, and a fine-tuning loop that learns."""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from metapt.evaluation import FinetuneConfig, finetune_and_score, holm, masked_auroc, mean_ci95, t_test
from metapt.losses import masked_bce


def test_masked_auroc_against_pair_counting():
    # AUROC = P(score of a positive > score of a negative), ties counting 1/2
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, size=(40, 3)).astype(float)
    s = rng.normal(size=(40, 3)) + y
    y[::5, 1] = np.nan
    y[:, 2] = 1.0  # one class only: skipped
    want = []
    for t in range(2):
        seen = ~np.isnan(y[:, t])
        pos, neg = s[seen, t][y[seen, t] == 1], s[seen, t][y[seen, t] == 0]
        want.append(np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg]))
    assert masked_auroc(y, s) == pytest.approx(np.mean(want), abs=1e-12)
    assert math.isnan(masked_auroc(np.ones(5), np.arange(5.0)))


def test_mean_ci95_is_the_t_interval():
    x = [0.71, 0.74, 0.69, 0.75, 0.72]
    mean, half = mean_ci95(x)
    lo, hi = stats.t.interval(0.95, 4, loc=np.mean(x), scale=stats.sem(x))
    assert mean == pytest.approx(np.mean(x)) and half == pytest.approx((hi - lo) / 2)


def test_t_test_matches_scipy_at_any_confidence():
    d = [0.012, -0.004, 0.031, 0.008, 0.019, 0.002]
    res = stats.ttest_1samp(d, 0.0)
    for confidence in (0.95, 1 - 0.05 / 12):
        got = t_test(d + [float("nan")], confidence)
        lo, hi = stats.t.interval(confidence, 5, loc=np.mean(d), scale=stats.sem(d))
        assert got["n"] == 6 and got["p"] == pytest.approx(res.pvalue)
        assert got["mean"] == pytest.approx(np.mean(d)) and got["half_width"] == pytest.approx((hi - lo) / 2)
    assert math.isnan(t_test([0.1])["p"])


def test_holm_known_answers():
    # sorted p 0.005, 0.01, 0.03, 0.04 -> 4p, 3p, 2p, 1p = 0.02, 0.03, 0.06, 0.04 -> running max
    got = holm([0.01, 0.04, 0.03, 0.005])
    assert [g["p_adjusted"] for g in got] == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert [g["reject"] for g in got] == [True, False, False, True]
    assert [g["level"] for g in got] == pytest.approx([0.05 / 3, 0.05, 0.05 / 2, 0.05 / 4])
    # step-down: 0.04 is below its own step's level 0.05, but 0.03 failed at 0.025 first
    assert [g["reject"] for g in holm([0.03, 0.04])] == [False, False]
    assert holm([float("nan"), 0.001])[0]["p_adjusted"] == 1.0


def test_masked_bce_ignores_missing_labels():
    logits = torch.tensor([[0.3, -1.0], [2.0, 0.5]])
    labels = torch.tensor([[1.0, float("nan")], [0.0, 1.0]])
    want = torch.nn.functional.binary_cross_entropy_with_logits(torch.tensor([0.3, 2.0, 0.5]), torch.tensor([1.0, 0.0, 1.0]))
    torch.testing.assert_close(masked_bce(logits, labels), want)


@pytest.mark.parametrize("linear_probe", [False, True])
def test_finetuning_learns_a_separable_task(linear_probe):
    g = torch.Generator().manual_seed(0)
    data = {}
    for split, n in (("train", 200), ("valid", 100), ("test", 100)):
        x = torch.randn(n, 8, generator=g)
        data[split] = (x, (x[:, 0] + 0.3 * x[:, 1] > 0).float())

    def iterate(split, batch_size, shuffle, seed):
        x, y = data[split]
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(len(x))
        for i in range(0, len(x), batch_size):
            yield x[order[i : i + batch_size]], y[order[i : i + batch_size]]

    encoder = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.ReLU())
    before = [p.clone() for p in encoder.parameters()]
    res = finetune_and_score(encoder, 64, 1, iterate, FinetuneConfig(linear_probe=linear_probe, epochs=15, lr=1e-2), seed=0)
    assert res["test"] > 0.9 and 0 <= res["best_epoch"] < 15
    assert all(torch.equal(a, b) for a, b in zip(before, encoder.parameters()))  # the caller's encoder is untouched
