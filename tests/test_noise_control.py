"""Noise control in meta-learning (issue 20): the accumulated estimator, φ averaging, normalised
weights and planted junk tasks; each against a known answer."""

import functools
import math

import pytest
import torch

from metapt.domains.synthetic.problem import SyntheticConfig, SyntheticTaskWeighting
from metapt.hypergrad import Estimator, Identity, sgd
from metapt.metaparams import ExampleWeightNet, ExampleWeights, TaskWeights
from metapt.strategy import Strategy
from metapt.trainer import MetaPretrainer, MetaSchedule


class _NotPlain(Strategy):
    """A strategy with a PT backward of its own: the PT steps' draws take the two-forward central difference."""

    def pretrain_backward(self, trainer, batch):
        return super().pretrain_backward(trainer, batch)


def _trainer(problem, schedule, estimator, meta_opt=lambda ps: torch.optim.Adam(ps, lr=0.1), strategy=None):
    return MetaPretrainer(
        problem, problem.initial_params(0), problem.initial_head(), problem.initial_metaparams(),
        pt_optimizer=lambda ps: torch.optim.Adam(ps, lr=0.01), meta_optimizer=meta_opt,
        inner_optimizer=sgd(0.1), estimator=estimator, schedule=schedule, strategy=strategy)


def test_fused_draw_in_the_pt_step_matches_the_central_difference():
    # the plain strategy draws inside the PT step's own forward (one forward more, O(h) error);
    # other strategies take two forwards (O(h²)): both estimate the same mixed term
    problem = SyntheticTaskWeighting(SyntheticConfig(seed=0))
    sched = MetaSchedule(interval=5, warmup_steps=20)
    sgd_phi = lambda ps: torch.optim.SGD(ps, lr=1e3)  # noqa: E731
    fused = _trainer(problem, sched, Estimator(accumulate=1), meta_opt=sgd_phi)
    central = _trainer(problem, sched, Estimator(accumulate=1), meta_opt=sgd_phi, strategy=_NotPlain())
    fused.run_until(60)
    central.run_until(60)
    a, b = fused.metaparams["task_logits"].detach(), central.metaparams["task_logits"].detach()
    assert float((a - problem.initial_metaparams()["task_logits"]).abs().max()) > 1e-2  # φ moved
    # every φ step is a mean of PT draws (fused: O(h), central: O(h²)) and SGD at 1e3 amplifies
    # their difference over 8 meta-steps; a wrong sign or scale would be off by 100 %
    torch.testing.assert_close(a, b, rtol=5e-2, atol=2e-3)
    for k in fused.params:  # the PT trajectories differ only through φ's small differences
        torch.testing.assert_close(fused.params[k], central.params[k], rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("seed", [0, 1])
def test_accumulated_estimator_finds_the_noise_tasks(seed):
    # the synthetic problem's known answer: helpful tasks up, pure-noise tasks down
    problem = SyntheticTaskWeighting(SyntheticConfig(seed=seed))
    trainer = _trainer(problem, MetaSchedule(interval=5, warmup_steps=100), Estimator(accumulate=1))
    trainer.run_until(800)
    w = problem.describe_metaparams(trainer.metaparams)
    assert w["noise_weight"] < 0.8 and w["helpful_weight"] > 1.0, w
    assert trainer.skipped == 0


def test_each_meta_step_averages_the_pt_steps_draws_and_draws_afresh_only_when_none_wait(monkeypatch):
    # the pooling arithmetic, with the draws replaced by known numbers (the n-th draw is
    # values[n]·1); SGD(lr=1) on φ exposes the hypergradient each meta-step used
    problem = SyntheticTaskWeighting(SyntheticConfig(seed=0))
    trainer = _trainer(problem, MetaSchedule(interval=4, warmup_steps=4), Estimator(accumulate=2),
                       meta_opt=lambda ps: torch.optim.SGD(ps, lr=1.0), strategy=_NotPlain())
    calls, values = [], [100.0, 8.0, 10.0, 300.0, 7.0]
    alpha = trainer.estimator.solver.alpha  # a draw is −α · the mixed term

    def fake_mixed_term(pretrain_loss, theta, phi, direction, **kwargs):
        calls.append(trainer.step)
        return {k: torch.full_like(v, -values[len(calls) - 1] / alpha) for k, v in phi.items()}

    # the PT steps' draws (the trainer) and the meta-step's own (metapt.hypergrad.accumulate)
    import metapt.hypergrad.accumulate
    import metapt.trainer

    monkeypatch.setattr(metapt.trainer, "directional_mixed_term", fake_mixed_term)
    monkeypatch.setattr(metapt.hypergrad.accumulate, "directional_mixed_term", fake_mixed_term)
    phi0 = trainer.metaparams["task_logits"].detach().clone()
    trainer.run_until(8)  # meta-step after PT step 8: no direction before it, so only its fresh draw
    assert calls == [8]
    step1 = trainer.metaparams["task_logits"].detach().clone()
    direct = 0.0  # the synthetic L_V does not read φ
    torch.testing.assert_close(phi0 - step1, torch.full_like(phi0, 100.0 + direct))
    trainer.run_until(12)  # PT steps 8..11 (0-based index s before the update): draws at s = 8, 10
    assert calls == [8, 8, 10]  # PT steps drew since the last meta-step: it takes no fresh draw of its own
    # the mean of the PT draws 8 and 10, plus the direct term
    step2 = trainer.metaparams["task_logits"].detach().clone()
    torch.testing.assert_close(step1 - step2, torch.full_like(phi0, 9.0 + direct))
    trainer.run_until(16)
    assert calls == [8, 8, 10, 12, 14]
    torch.testing.assert_close(step2 - trainer.metaparams["task_logits"].detach(), torch.full_like(phi0, 153.5))


@pytest.mark.parametrize("kind", ["polyak", "ema"])
def test_averaged_phi_is_the_average_of_the_meta_steps_phi(kind):
    problem = SyntheticTaskWeighting(SyntheticConfig(seed=0))
    sched = MetaSchedule(interval=5, warmup_steps=10, average=kind, average_decay=0.5)
    trainer = _trainer(problem, sched, Estimator(accumulate=1))
    seen = []
    for step in range(15, 80, 5):
        trainer.run_until(step)
        seen.append(trainer.metaparams["task_logits"].detach().clone())
    avg = trainer.averaged_metaparams["task_logits"]
    if kind == "polyak":
        expected = torch.stack(seen).mean(0)
    else:
        expected = problem.initial_metaparams()["task_logits"].clone()
        for n, phi in enumerate(seen, start=1):
            decay = min(0.5, (1 + n) / (10 + n))
            expected = decay * expected + (1 - decay) * phi
    torch.testing.assert_close(avg, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(avg, seen[-1])  # not the last φ
    assert torch.equal(trainer.snapshot().averaged_metaparams["task_logits"], avg)


@pytest.mark.parametrize("head_start, decay", [("carried", 0.0), ("initial", 0.9)])
def test_accumulated_and_averaged_run_resumes_exactly(head_start, decay):
    problem = SyntheticTaskWeighting(SyntheticConfig(seed=0))
    sched = MetaSchedule(interval=5, warmup_steps=10, average="ema", head_start=head_start)
    estimator = Estimator(accumulate=1, direction_decay=decay)
    straight = _trainer(problem, sched, estimator)
    straight.run_until(43)
    first = _trainer(problem, sched, estimator)
    first.run_until(27)  # between two meta-steps: draws are waiting in the accumulator
    assert first._accumulated_count > 0
    state = first.state_dict()
    second = _trainer(problem, sched, estimator)
    second.load_state_dict(state)
    second.run_until(43)
    for k in straight.metaparams:
        assert torch.equal(straight.metaparams[k], second.metaparams[k])
        assert torch.equal(straight.averaged_metaparams[k], second.averaged_metaparams[k])


def test_estimator_rejects_options_it_would_not_read():
    with pytest.raises(ValueError, match="accumulate"):
        Estimator(accumulate=1, horizon=1)
    with pytest.raises(ValueError, match="accumulate"):
        Estimator(accumulate=1, upcoming=True)
    with pytest.raises(ValueError, match="accumulate must be"):
        Estimator(accumulate=-1)
    assert Estimator(accumulate=3, solver=Identity(0.5)).accumulate == 3
    with pytest.raises(ValueError, match="average"):
        MetaSchedule(average="mean")


def test_normalized_task_weights_sum_to_the_task_count_and_ignore_a_shared_shift():
    tw = TaskWeights(4, normalize=True)
    phi = {"task_logits": torch.tensor([0.3, -1.0, 2.0, 0.0], requires_grad=True)}
    w = tw.weights(phi)
    torch.testing.assert_close(w.sum(), torch.tensor(4.0))
    shifted = tw.weights({"task_logits": phi["task_logits"].detach() + 5.0})
    torch.testing.assert_close(shifted, w.detach())
    torch.testing.assert_close(tw.weights(tw.init()), torch.ones(4))
    # a loss that weights every task alike has zero gradient along the shared shift
    grad, = torch.autograd.grad((w * torch.tensor([1.0, 2.0, 3.0, 4.0])).sum(), phi["task_logits"])
    assert abs(float(grad.sum())) < 1e-6


def test_normalized_example_weights_have_mean_one_per_batch():
    ew = ExampleWeights(10, normalize=True)
    logits = torch.linspace(-2, 2, 10).requires_grad_(True)
    rows = torch.tensor([1, 4, 4, 9])
    w = ew.weights({"example_logits": logits}, rows)
    torch.testing.assert_close(w.mean(), torch.tensor(1.0))
    plain = 2 * torch.sigmoid(logits.detach()[rows])
    torch.testing.assert_close(w.detach(), plain / plain.mean())
    w.sum().backward()  # row-sparse gradient still works
    assert logits.grad is not None and math.isfinite(float(logits.grad.to_dense().abs().sum()))


def test_seed_agreement_known_answers():
    from metapt.evaluation import seed_agreement

    a = [0.1, 0.5, 0.2, 0.9, 0.4]
    same = seed_agreement([a, [2 * x + 1 for x in a], a])
    assert same["pairwise_mean"] == pytest.approx(1.0) and same["leave_one_out_mean"] == pytest.approx(1.0)
    opposite = seed_agreement([a, [-x for x in a]])
    assert opposite["pairwise_mean"] == pytest.approx(-1.0)
    assert math.isnan(opposite["leave_one_out_ci95"])  # two seeds give no CI, not a CI of 0
    assert math.isnan(seed_agreement([a])["pairwise_mean"])
    assert math.isnan(seed_agreement([a, [1.0] * 5])["pairwise_mean"])  # a φ that never moved


def test_junk_tasks_are_label_permuted_copies():
    from metapt.domains.molecules.problem import add_junk_tasks, is_junk_task, MoleculeData

    labels = torch.tensor([[1.0, float("nan")], [0.0, 1.0], [1.0, 0.0], [float("nan"), 1.0], [0.0, 0.0],
                           [1.0, float("nan")]])
    data = MoleculeData(pretrain=None, pretrain_positions=torch.arange(6), pretrain_labels=labels,
                        downstream=None, downstream_labels=torch.zeros(0, 1), split={},
                        pretrain_task_names=["A", "B"], downstream_task_names=["D"])
    out = add_junk_tasks(data, 3, seed=0)
    again = add_junk_tasks(data, 3, seed=0)
    assert torch.equal(out.pretrain_labels.nan_to_num(-1), again.pretrain_labels.nan_to_num(-1))  # seeded
    assert out.pretrain_labels.shape == (6, 5) and torch.equal(out.pretrain_labels[:, :2].nan_to_num(-1),
                                                                labels.nan_to_num(-1))
    names = out.pretrain_task_names
    assert [is_junk_task(n) for n in names] == [False, False, True, True, True]
    for j, name in enumerate(names[2:], start=2):
        source = names.index(name.split(":", 1)[1])
        junk, real = out.pretrain_labels[:, j], labels[:, source]
        assert torch.equal(torch.isnan(junk), torch.isnan(real))  # same molecules observed
        assert sorted(junk[~torch.isnan(junk)].tolist()) == sorted(real[~torch.isnan(real)].tolist())  # same balance
    assert add_junk_tasks(data, 0, seed=0) is data
    with pytest.raises(ValueError, match="junk_tasks"):
        add_junk_tasks(data, -1, seed=0)


def test_draws_for_cosine_half_against_simulated_signal_plus_noise():
    from metapt.diagnostics import draws_for_cosine

    assert draws_for_cosine(0.2) == pytest.approx(4.0) and draws_for_cosine(0.04) == pytest.approx(24.0)
    assert draws_for_cosine(-0.1) == math.inf and draws_for_cosine(0.9) == 1.0
    # simulate: draws s + n in 400 dims with ‖s‖²/E‖n‖² = 0.1; single-draw cosine ≈ 0.09
    g = torch.Generator().manual_seed(0)
    d, r = 400, 0.1
    s = torch.randn(d, generator=g)
    s = s / s.norm() * math.sqrt(r * d)
    draw = lambda: s + torch.randn(d, generator=g)  # noqa: E731
    cos = lambda a, b: float(a @ b / (a.norm() * b.norm()))  # noqa: E731
    single = sum(cos(draw(), draw()) for _ in range(400)) / 400
    n = round(draws_for_cosine(single))
    avg = lambda: sum(draw() for _ in range(n)) / n  # noqa: E731
    averaged = sum(cos(avg(), avg()) for _ in range(200)) / 200
    assert 0.42 < averaged < 0.58, (single, n, averaged)


def test_normalize_weights_reaches_every_domain_or_is_refused():
    from metapt.config import ConfigError, load_config
    from metapt.domains.synthetic.job import DOMAIN as SYNTHETIC

    config = load_config("synthetic", ["meta.normalize_weights=true"])
    data = SYNTHETIC.load(config, "synthetic", None)
    assert data.task_weights.normalize
    with pytest.raises(ConfigError, match="normalize_weights"):
        load_config("ecg-quick", ["meta.normalize_weights=true"])


def test_accumulated_estimator_config_builds_its_estimator_and_refuses_other_kinds_keys():
    from metapt.config import ConfigError, load_config

    config = load_config("synthetic", ["meta.estimator={kind: accumulated, every: 3, alpha: 0.5}"])
    est = config.meta.estimator.estimator(0.01)
    assert est.accumulate == 3 and est.solver == Identity(0.5) and est.adam_preconditioner
    with pytest.raises(ConfigError, match="horizon"):
        load_config("synthetic", ["meta.estimator={kind: accumulated, horizon: 2}"])
    with pytest.raises(ConfigError, match="every"):
        load_config("molecules-test", ["meta.estimator.every=2"])  # the default kind, unrolled, reads no every


def test_signal_to_noise_split_half_agreement_on_known_draws():
    from metapt.diagnostics import signal_to_noise

    draws = [torch.tensor([1.0, 0.0]), torch.tensor([1.0, 2.0]), torch.tensor([1.0, 0.0]), torch.tensor([1.0, -2.0])]

    class Probe:
        def estimate(self, estimator, sample=0):
            return {"phi": draws[sample]}, None, 0.0

    out = signal_to_noise(Probe(), None, 4)
    # halves: (1,0)+(1,2) = (2,2) and (1,0)+(1,-2) = (2,-2): cosine 0
    assert out["split_half_cos"] == pytest.approx(0.0, abs=1e-7)
    pairs = [1.0, 1 / math.sqrt(5), 1 / math.sqrt(5), 1 / math.sqrt(5), 1 / math.sqrt(5), -3 / 5]
    assert out["mean_pairwise_cos"] == pytest.approx(sum(pairs) / 6)


class _FlippedLogistic:
    """A known answer for example weights: logistic regression whose PT labels are 20 % flipped,
    validated on clean labels (the data-reweighting setting of Ren et al. 2018)."""

    def __init__(self, n=2000, d=10, seed=0):
        g = torch.Generator().manual_seed(seed)
        w_true = torch.randn(d, generator=g)
        self.x = torch.randn(n, d, generator=g)
        y = (self.x @ w_true > 0).float()
        self.flipped = torch.rand(n, generator=g) < 0.2
        self.y = torch.where(self.flipped, 1 - y, y)
        self.xv = torch.randn(500, d, generator=g)
        self.yv = (self.xv @ w_true > 0).float()
        self.weights = ExampleWeights(n)
        self.n = n

    def pretrain_loss(self, th, ph, rows):
        from metapt.losses import masked_bce

        z = self.x[rows] @ th["w"] + th["b"]
        return masked_bce(z[:, None], self.y[rows][:, None], None, self.weights.weights(ph, rows))

    def finetune_loss(self, th, head, batch):
        from metapt.losses import masked_bce

        xs, ys = batch
        return masked_bce(((xs @ th["w"] + th["b"]) * head["s"] + head["c"])[:, None], ys[:, None])

    def pretrain_batch(self, i):
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(i))[:64]

    def finetune_batch(self, i):
        rows = torch.randperm(500, generator=torch.Generator().manual_seed(10**6 + i))[:64]
        return self.xv[rows], self.yv[rows]

    metaval_batch = finetune_batch

    def describe_metaparams(self, phi):
        return {}


def _flip_auroc(estimator):
    from sklearn.metrics import roc_auc_score

    from metapt.optim import LazySGD

    problem = _FlippedLogistic()
    trainer = MetaPretrainer(
        problem, {"w": torch.zeros(10), "b": torch.zeros(())}, {"s": torch.ones(()), "c": torch.zeros(())},
        problem.weights.init(), pt_optimizer=lambda ps: torch.optim.Adam(ps, lr=0.01),
        meta_optimizer=lambda ps: LazySGD(ps, lr=1.0), inner_optimizer=sgd(0.1), estimator=estimator,
        schedule=MetaSchedule(interval=10, warmup_steps=20))
    trainer.run_until(3000)
    w = problem.weights.weights(trainer.metaparams, torch.arange(problem.n)).detach()
    return roc_auc_score(problem.flipped.numpy(), -w.numpy())


@functools.cache
def _accumulated_flip_auroc():
    """One run for the three tests that compare against per-example logits (deterministic)."""
    return _flip_auroc(Estimator(accumulate=1, adam_preconditioner=True))


def test_accumulated_example_weights_find_flipped_labels_better_than_one_draw_per_meta_step():
    from metapt.hypergrad import default_estimator

    accumulated = _accumulated_flip_auroc()
    one_draw = _flip_auroc(default_estimator(0.01))
    assert accumulated > 0.78 and accumulated > one_draw + 0.03, (accumulated, one_draw)


class _FlippedLogisticNet(_FlippedLogistic):
    """The same planted problem, the example weights from one shared network of each example's
    current loss and observed share (:class:`ExampleWeightNet`, Meta-Weight-Net) instead of one
    logit per example: every meta-step moves every example's weight."""

    def __init__(self, normalize: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.net = ExampleWeightNet(hidden=16, normalize=normalize)

    def logits(self, th, rows):
        return (self.x[rows] @ th["w"] + th["b"])[:, None]

    def pretrain_loss(self, th, ph, rows):
        from metapt.losses import masked_bce

        z, y = self.logits(th, rows), self.y[rows][:, None]  # the features come from this same forward
        return masked_bce(z, y, None, self.net.weights(ph, self.net.features(z, y)))

    def all_weights(self, th, ph):
        """Every example's weight at θ, standardised over all of them (the ranking of the run's end)."""
        rows = torch.arange(self.n)
        with torch.no_grad():
            return self.net.weights(ph, self.net.features(self.logits(th, rows), self.y[rows][:, None]))


@pytest.mark.parametrize("normalize", [False, True])
def test_example_weight_net_finds_flipped_labels_and_weights_down_high_loss(normalize):
    from sklearn.metrics import roc_auc_score

    problem = _FlippedLogisticNet(normalize=normalize)
    trainer = MetaPretrainer(
        problem, {"w": torch.zeros(10), "b": torch.zeros(())}, {"s": torch.ones(()), "c": torch.zeros(())},
        problem.net.init(), pt_optimizer=lambda ps: torch.optim.Adam(ps, lr=0.01),
        meta_optimizer=lambda ps: torch.optim.Adam(ps, lr=0.01), inner_optimizer=sgd(0.1),
        estimator=Estimator(accumulate=1, adam_preconditioner=True), schedule=MetaSchedule(interval=10, warmup_steps=20))
    trainer.run_until(3000)
    w = problem.all_weights(trainer.params, trainer.metaparams)
    auroc = roc_auc_score(problem.flipped.numpy(), -w.numpy())
    # one logit per example, the same run otherwise (the test above: > 0.78 with this estimator)
    logits_auroc = _accumulated_flip_auroc()
    assert auroc >= 0.8 and auroc > logits_auroc, (auroc, logits_auroc)
    s = problem.net.summary(trainer.metaparams)
    assert s["wnet_decreasing_in_loss"] == 1.0 and s["wnet_loss_slope"] < -0.1, s
    assert s["wnet_weight_at_loss_+2"] < 0.5 < s["wnet_weight_at_loss_-2"], s
    assert trainer.skipped == 0
    if normalize:  # B·softmax: the whole data set's weights (one "batch" here) have mean 1
        assert float(w.mean()) == pytest.approx(1.0, abs=1e-5)


class _OneBatch(SyntheticTaskWeighting):
    """Every PT, FT and MetaFT-validation index reads the same batch: independent draws are one draw."""

    def pretrain_batch(self, index):
        return super().pretrain_batch(0)

    def finetune_batch(self, index):
        return super().finetune_batch(0)

    def metaval_batch(self, index):
        return super().metaval_batch(0)


def test_phase_signal_known_answers_and_leaves_everything_as_it_was():
    from metapt.diagnostics import phase_signal

    sched = MetaSchedule(interval=5, warmup_steps=5)
    same = _trainer(_OneBatch(SyntheticConfig(seed=0)), sched, Estimator(horizon=1))
    same.run_until(30)
    got = phase_signal(same, draws=4)
    assert got["mean_pairwise_cos"] == pytest.approx(1.0, abs=1e-5) and got["draws_for_half"] == 1.0

    trainer = _trainer(SyntheticTaskWeighting(SyntheticConfig(seed=0)), sched, Estimator(horizon=1))
    trainer.run_until(30)
    before = ({k: v.clone() for k, v in trainer.metaparams.items()}, {k: v.clone() for k, v in trainer.params.items()})
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    got = phase_signal(trainer, draws=4)
    assert torch.equal(torch.get_rng_state(), rng)  # the run's next random draws are the ones it would have made
    assert all(torch.equal(trainer.metaparams[k], v) for k, v in before[0].items())
    assert all(torch.equal(trainer.params[k], v) for k, v in before[1].items())
    assert -1.0 <= got["mean_pairwise_cos"] < 0.999 and got["draws"] == 4  # other batches: not one draw four times


def test_summary_says_the_signal_and_when_agreement_needs_more_seeds():
    from metapt.summary import signal, summary_markdown

    res = signal({"meta task weights": [{"mean_pairwise_cos": 0.05, "split_half_cos": 0.1, "draws": 8},
                                        {"mean_pairwise_cos": 0.15, "split_half_cos": 0.3, "draws": 8}]})
    s = res["meta task weights"]
    # c = 0.1: N = (0.5/0.5)·(1 − 0.1)/0.1 = 9 draws for cosine 0.5
    assert s["pairwise_cos"] == pytest.approx(0.1) and s["draws_for_half"] == pytest.approx(9.0) and s["seeds"] == 2
    summary = {"job": "x", "config": {"pretrain": {"seed": 0, "seeds": 1}},
               "settings": {"s": {"metric": "auroc", "scores": {}, "gains": {}, "sizes": {}, "signal": res}},
               "pretraining": {}}
    md = summary_markdown(summary)
    assert "agree at cosine 0.10, mean over 2 pre-training seeds; about 9 draws must be averaged" in md
    assert "Seed agreement, meta task weights: not measured with one pre-training seed" in md
    none = signal({"m": [{"mean_pairwise_cos": -0.02, "split_half_cos": 0.0, "draws": 8}]})
    assert math.isinf(none["m"]["draws_for_half"])


def test_report_puts_the_signal_beside_the_verdict():
    from metapt.report import results_verdicts

    res = {"metric": "auroc", "gains": {"meta task weights − uniform weights": {"full fine-tuning": {"1": {
        "mean": 0.01, "ci95": 0.02}}}},
        "signal": {"meta task weights": {"pairwise_cos": 0.06, "draws_for_half": 14.2}},
        "agreement": {"meta task weights": {"task_logits": {"leave_one_out_mean": -0.18,
                                                            "leave_one_out_ci95": float("nan")}}}}
    lines = results_verdicts({"settings": {"b3db": res}})
    assert lines[0].startswith("Verdict, b3db") and "indistinguishable" in lines[0]
    assert lines[1] == ("Signal, b3db: meta task weights: hypergradient draws agree at cosine 0.06 (about 14 draws "
                        "for 0.5), seeds' task_logits agree at ρ -0.18.")


def test_direction_decay_averages_the_meta_steps_validation_directions_exactly():
    # φ frozen (lr 0): θ, and so every meta-step's validation direction, is the same with any
    # decay; the decayed trainer must hold exactly d·v₁ + (1 − d)·v₂ after two meta-steps
    problem = SyntheticTaskWeighting(SyntheticConfig(seed=0))
    sched = MetaSchedule(interval=5, warmup_steps=10)
    frozen = lambda ps: torch.optim.SGD(ps, lr=0.0)  # noqa: E731
    plain = _trainer(problem, sched, Estimator(accumulate=1), meta_opt=frozen)
    decayed = _trainer(problem, sched, Estimator(accumulate=1, direction_decay=0.75), meta_opt=frozen)
    plain.run_until(15)
    v1 = {k: v.clone() for k, v in plain._direction.items()}
    plain.run_until(20)
    v2 = plain._direction
    decayed.run_until(20)
    assert any(float((v1[k] - v2[k]).abs().max()) > 1e-6 for k in v1)  # two different directions
    for k in v1:
        torch.testing.assert_close(decayed._direction[k], 0.75 * v1[k] + 0.25 * v2[k], rtol=1e-5, atol=1e-8)
    with pytest.raises(ValueError, match="direction_decay"):
        Estimator(accumulate=1, direction_decay=1.0)
    with pytest.raises(ValueError, match="direction_decay"):
        Estimator(horizon=1, direction_decay=0.5)


def test_direction_decay_config_is_read_by_the_accumulated_kind_only():
    from metapt.config import ConfigError, load_config

    config = load_config("synthetic", ["meta.estimator={kind: accumulated, direction_decay: 0.9}"])
    assert config.meta.estimator.estimator(0.01).direction_decay == 0.9
    with pytest.raises(ConfigError, match="direction_decay"):
        load_config("synthetic", ["meta.estimator={kind: neumann, direction_decay: 0.9}"])
    with pytest.raises(ConfigError, match="direction_decay"):
        load_config("synthetic", ["meta.estimator={kind: accumulated, direction_decay: 1.5}"])


def test_head_start_initial_fine_tunes_from_the_initial_head_every_meta_step():
    # the same state with the head at ψ₀ and carried must take the same meta-step as
    # head_start=initial; the carried head a run has trained takes another (the test can fail)
    import copy

    problem = SyntheticTaskWeighting(SyntheticConfig(seed=0))
    initial = _trainer(problem, MetaSchedule(interval=5, warmup_steps=10, head_start="initial"), Estimator(horizon=1))
    carried = _trainer(problem, MetaSchedule(interval=5, warmup_steps=10), Estimator(horizon=1))
    initial.run_until(10)
    carried.run_until(10)
    psi0 = problem.initial_head()
    assert all(torch.equal(initial.head[k], psi0[k]) for k in psi0)  # no warm-up head steps
    assert any(not torch.equal(carried.head[k], psi0[k]) for k in psi0)
    initial.run_until(24)  # past two meta-steps: self.head holds the last fine-tuned one
    assert all(torch.equal(initial.start_head[k], psi0[k]) for k in psi0)
    twin = copy.deepcopy(initial)
    twin.schedule = MetaSchedule(interval=5, warmup_steps=10)
    twin.head = {k: v.clone() for k, v in psi0.items()}
    stale = copy.deepcopy(twin)
    stale.head = {k: v.clone() for k, v in initial.head.items()}  # the last meta-step's head, carried
    for t in (initial, twin, stale):
        t.run_until(25)
    for k in initial.metaparams:
        torch.testing.assert_close(initial.metaparams[k], twin.metaparams[k])
    assert any(not torch.allclose(initial.metaparams[k], stale.metaparams[k]) for k in initial.metaparams)
    with pytest.raises(ValueError, match="head_start"):
        MetaSchedule(head_start="last")
