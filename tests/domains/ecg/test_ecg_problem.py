"""ECGSimCLRProblem: the warp hypergradient against finite differences, the clean baseline,
deterministic batches and leak-free splits."""

import math

import numpy as np
import pytest
import torch

from metapt.domains.ecg.augment import BandNoiseConfig, WarpConfig, band_split
from metapt.domains.ecg.data import ECGDataset
from metapt.domains.ecg.models import EncoderConfig
from metapt.domains.ecg.problem import ECGProblemConfig, ECGSimCLRProblem
from metapt.domains.ecg.splits import (
    PTBXLFolds,
    RecordFractions,
    cross_validation_folds,
    split_beats_by_record,
    split_beats_cross_validation,
    split_ptbxl_by_fold,
)
from metapt.evaluation import label_subset
from metapt.hypergrad import ConjugateGradient, pretraining_hypergradient, sgd, unrolled_finetune
from metapt.problem import MetaProblem

F64 = torch.float64


def beats(n: int, length: int = 32, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    """Beat-like windows: a sharp peak (wide for 'PVCs', the odd examples) on slow waves and noise."""
    g = torch.Generator().manual_seed(seed)
    t = torch.linspace(-1, 1, length, dtype=dtype)
    width = torch.where(torch.arange(n) % 2 == 1, 0.15, 0.05).to(dtype)[:, None]
    peak = torch.exp(-0.5 * (t / width) ** 2)
    slow = torch.sin(3 * math.pi * t + 6 * torch.rand(n, 1, generator=g, dtype=dtype))
    x = 3 * peak + 0.5 * slow + 0.05 * torch.randn(n, length, generator=g, dtype=dtype)
    return x[:, None, :]


def labels(n: int) -> torch.Tensor:
    return (torch.arange(n) % 2 == 1).float()[:, None]


TINY = ECGProblemConfig(
    encoder=EncoderConfig(widths=(2,), blocks=(1,), kernel_size=3, norm="group"),
    projection_dim=3,
    warp=WarpConfig(widths=(2,), kernel_size=3, n_knots=3, init_magnitude=0.05),
    pretrain_batch_size=6,
    finetune_batch_size=6,
)


def tiny_problem(config: ECGProblemConfig = TINY, dtype=F64) -> ECGSimCLRProblem:
    return ECGSimCLRProblem(beats(12, seed=0), (beats(6, seed=1), labels(6)), (beats(6, seed=2), labels(6)),
                            config, dtype)


def test_is_a_meta_problem_with_warp_parameters_as_phi():
    problem = tiny_problem()
    assert isinstance(problem, MetaProblem)
    phi = problem.initial_metaparams()
    assert "log_magnitude" in phi and any(k.startswith("features.") for k in phi)
    assert set(phi) == {k for k, _ in problem.warp.named_parameters()}
    theta = problem.initial_params()
    assert any(k.startswith("encoder.") for k in theta) and any(k.startswith("projector.") for k in theta)
    assert problem.describe_metaparams(phi)["magnitude"] == pytest.approx(0.05)


# ---------------------------------------------------------------- the hypergradient, exactly


def _flat(p: dict) -> torch.Tensor:
    return torch.cat([v.reshape(-1) for v in p.values()])


def _unflat(vec: torch.Tensor, like: dict) -> dict:
    out, i = {}, 0
    for k, v in like.items():
        out[k] = vec[i:i + v.numel()].view_as(v)
        i += v.numel()
    return out


NOISY = ECGProblemConfig(**{**TINY.__dict__, "use_noise": True, "noise": BandNoiseConfig(bands=3, init_amplitude=0.2)})
NOISE_ONLY = ECGProblemConfig(**{**NOISY.__dict__, "use_warp": False})


@pytest.mark.parametrize("config, coords", [
    (TINY, [("log_magnitude", ()), ("scale_head.weight", (0, 1)), ("features.0.weight", (1, 0, 2))]),
    (NOISE_ONLY, [("band_noise", (0,)), ("band_noise", (1,)), ("band_noise", (2,))]),
    (NOISY, [("log_magnitude", ()), ("band_noise", (2,))]),
], ids=["warp", "noise", "warp+noise"])
def test_hypergradient_matches_finite_differences_of_the_implicit_solution(config, coords):
    """dL_V(θ*(φ))/dφ for θ*(φ) = argmin_θ L_PT(θ, φ) − ⟨c, θ⟩ + λ/2 ‖θ − θ₀‖², exactly.

    The tilt c = ∇θ L_PT(θ₀, φ₀) makes θ₀ the exact stationary point at φ₀, and λ makes the
    objective strongly convex there, so for φ₀ ± ε the minimiser is O(ε) away and Newton's
    method finds it to machine precision. Neither the tilt (no φ, zero Hessian) nor the
    proximal term (Hessian λI, no φ) changes the mixed partial, so the implicit function
    theorem says the engine on the *problem's own* pretrain_loss with
    ConjugateGradient(damping=λ) must reproduce central finite differences of the whole
    pipeline: warp → NT-Xent → θ* → one unrolled head step on FT-train → BCE on
    MetaFT-validation. A sign flip anywhere fails this.
    """
    lam = 5.0
    problem = tiny_problem(config)
    batch = problem.pretrain_batch(0)
    theta0 = problem.initial_params(seed=1)
    phi = problem.initial_metaparams(seed=2)
    head0 = {k: 0.3 * torch.randn(v.shape, dtype=F64, generator=torch.Generator().manual_seed(3))
             for k, v in problem.initial_head().items()}
    ft_batch, val_batch = problem.finetune_batch(0), problem.metaval_batch(0)
    flat0 = _flat(theta0)

    def pretrain(flat_theta, ph):
        return problem.pretrain_loss(_unflat(flat_theta, theta0), ph, batch)

    tilt = torch.func.grad(pretrain)(flat0, phi)

    def objective(flat_theta, ph):
        return pretrain(flat_theta, ph) - tilt @ flat_theta + 0.5 * lam * (flat_theta - flat0).pow(2).sum()

    def solve(ph):
        x = flat0.clone()
        for _ in range(20):
            g = torch.func.grad(objective)(x, ph)
            if g.norm() < 1e-14:
                break
            x = x - torch.linalg.solve(torch.func.hessian(objective)(x, ph), g)
        assert g.norm() < 1e-12, "Newton did not converge; the toy is not strongly convex enough"
        return x

    def meta_loss(th):
        head = unrolled_finetune(lambda h, k: problem.finetune_loss(th, h, ft_batch), head0, sgd(0.5), 1)
        return problem.finetune_loss(th, head, val_batch)

    assert torch.func.grad(objective)(flat0, phi).norm() < 1e-13  # θ₀ = θ*(φ₀)
    assert torch.linalg.eigvalsh(torch.func.hessian(objective)(flat0, phi)).min() > 0.5  # strongly convex
    hyper, info = pretraining_hypergradient(
        lambda th, ph: problem.pretrain_loss(th, ph, batch), meta_loss, theta0,
        phi, ConjugateGradient(max_iter=500, tol=1e-13, damping=lam),
    )
    assert info.usable and info.solver.residual_norm <= 1e-12 * info.solver.rhs_norm + 1e-15

    eps = 1e-5
    for name, idx in coords:
        values = []
        for sign in (1, -1):
            shifted = {k: v.clone() for k, v in phi.items()}
            shifted[name][idx] += sign * eps
            values.append(float(meta_loss(_unflat(solve(shifted), theta0)).detach()))
        fd = (values[0] - values[1]) / (2 * eps)
        assert abs(fd) > 1e-6, f"{name}{idx} has no effect; the check would be vacuous"
        assert float(hyper[name][idx]) == pytest.approx(fd, rel=1e-5, abs=1e-10), name


def test_pretrain_loss_depends_on_phi_through_the_warped_views():
    problem = tiny_problem()
    theta, phi, batch = problem.initial_params(), problem.initial_metaparams(), problem.pretrain_batch(3)
    bigger = {**phi, "log_magnitude": phi["log_magnitude"] + 1.0}
    assert float(problem.pretrain_loss(theta, phi, batch)) != float(problem.pretrain_loss(theta, bigger, batch))


# ---------------------------------------------------------------- the clean baseline


def test_baseline_has_no_warp_and_phi_cannot_change_its_loss():
    config = ECGProblemConfig(**{**TINY.__dict__, "use_warp": False})
    base, warped = tiny_problem(config), tiny_problem()
    assert base.warp is None and base.initial_metaparams() == {} and base.describe_metaparams({}) == {}
    assert not any("warp" in name for name, _ in base.net.named_modules())
    theta = base.initial_params()
    b_base, b_warp = base.pretrain_batch(5), warped.pretrain_batch(5)
    assert b_base.noise1 is None and b_base.noise2 is None
    # the same default-augmented views as the warp problem's batch: only the warp differs
    torch.testing.assert_close(b_base.view1, b_warp.view1, rtol=0, atol=0)
    torch.testing.assert_close(b_base.view2, b_warp.view2, rtol=0, atol=0)
    loss = base.pretrain_loss(theta, {}, b_base)
    # a warp problem whose warp is exactly the identity (magnitude 0) gives the same loss
    identity = {**warped.initial_metaparams(), "log_magnitude": torch.tensor(-math.inf, dtype=F64)}
    torch.testing.assert_close(warped.pretrain_loss(theta, identity, b_warp), loss, rtol=1e-12, atol=0)
    assert float(warped.pretrain_loss(theta, warped.initial_metaparams(), b_warp)) != float(loss)
    # there is no φ to change: handing it one is an error, not silently ignored
    with pytest.raises(ValueError, match="baseline.*use_warp=True"):
        base.pretrain_loss(theta, warped.initial_metaparams(), b_base)


def test_batchnorm_is_refused_with_a_fix():
    with pytest.raises(ValueError, match="norm='group'"):
        ECGProblemConfig(encoder=EncoderConfig(norm="batch"))


# ---------------------------------------------------------------- determinism


def test_batches_are_a_pure_function_of_the_index():
    a, b = tiny_problem(dtype=torch.float32), tiny_problem(dtype=torch.float32)
    for i in (0, 1, 7, 0):
        for x, y in zip(a.pretrain_batch(i), b.pretrain_batch(i)):
            torch.testing.assert_close(x, y, rtol=0, atol=0)
        for fa, fb in ((a.finetune_batch, b.finetune_batch), (a.metaval_batch, b.metaval_batch)):
            for x, y in zip(fa(i), fb(i)):
                torch.testing.assert_close(x, y, rtol=0, atol=0)
    # different indices differ (views, noise) and the two views of a batch differ
    p0, p1 = a.pretrain_batch(0), a.pretrain_batch(1)
    assert not torch.equal(p0.view1, p1.view1) and not torch.equal(p0.noise1, p1.noise1)
    assert not torch.equal(p0.view1, p0.view2) and not torch.equal(p0.noise1, p0.noise2)


def test_finetune_loss_is_bce_of_a_linear_head_on_the_embedding():
    problem = tiny_problem()
    theta, x, y = problem.initial_params(), *problem.finetune_batch(0)
    head = {"weight": torch.randn(1, problem.embedding_dim, dtype=F64), "bias": torch.tensor([0.2], dtype=F64)}
    emb = problem.encoder_module(theta)(x)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(emb @ head["weight"].T + 0.2, y)
    torch.testing.assert_close(problem.finetune_loss(theta, head, (x, y)), expected)


# ---------------------------------------------------------------- splits


def _dataset(records: dict[str, int], per_record: int = 10) -> ECGDataset:
    """``per_record`` beats per record, the first ``records[r]`` of them positive."""
    ids = np.repeat(list(records), per_record)
    y = np.concatenate([(np.arange(per_record) < p).astype(np.float32) for p in records.values()])
    n = len(ids)
    return ECGDataset(torch.zeros(n, 1, 8), torch.from_numpy(y)[:, None], ids.astype(str), ids.astype(str),
                      ("PVC",), ("MLII",), 360.0, "beats")


def test_record_split_is_disjoint_complete_and_has_positives_everywhere_but_pretraining():
    ds = _dataset({"a": 9, "b": 0, "c": 5, "d": 0, "e": 4, "f": 0, "g": 0, "h": 3})
    for seed in range(4):
        split = split_beats_by_record(ds, RecordFractions(), seed=seed, min_positives=3)
        groups = split.groups()
        records = [set(ds.patient_ids[i]) for i in groups.values()]
        for i, r in enumerate(records):
            for s in records[i + 1:]:
                assert not r & s, "a record is in two groups"
        assert sorted(np.concatenate(list(groups.values()))) == list(range(len(ds)))
        for name in ("ft_train", "metaval", "test"):
            assert ds.labels[torch.from_numpy(groups[name])].sum() >= 3, name
        again = split_beats_by_record(ds, RecordFractions(), seed=seed, min_positives=3)
        assert all(np.array_equal(x, y) for x, y in zip(groups.values(), again.groups().values()))
        assert split.records == again.records
    with pytest.raises(ValueError, match="lower min_positives"):
        split_beats_by_record(ds, min_positives=10)


def test_ptbxl_split_holds_out_the_test_and_metaval_folds():
    folds = np.array([1, 2, 3, 4, 5, 6, 7, 8, 9, 10] * 2)
    ds = ECGDataset(torch.zeros(20, 12, 8), torch.zeros(20, 5), np.arange(20).astype(str),
                    (np.arange(20) // 2).astype(str), ("NORM", "MI", "STTC", "CD", "HYP"), tuple("abcdefghijkl"),
                    100.0, "ptbxl", folds)
    split = split_ptbxl_by_fold(ds)
    assert set(folds[split.test]) == {10} and set(folds[split.metaval]) == {9}
    assert not set(split.test) & (set(split.pretrain) | set(split.ft_train) | set(split.metaval))
    with pytest.raises(ValueError, match="disjoint"):
        PTBXLFolds(pretrain=(1, 10))


def test_label_subset_of_ecg_labels_is_seeded_sized_and_has_both_classes():
    """The ECG job draws its label fractions with the runner's metapt.evaluation.label_subset."""
    y = torch.zeros(1000, 1)
    y[:20] = 1
    a, b = label_subset(y, 0.01, seed=3), label_subset(y, 0.01, seed=3)
    assert np.array_equal(a, b) and not np.array_equal(a, label_subset(y, 0.01, seed=4))
    assert 10 <= len(a) <= 12 and y[a].sum() >= 1 and (1 - y[a]).sum() >= 1
    assert len(label_subset(y, 1.0, seed=0)) == 1000
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        label_subset(y, 0.0, seed=0)


# ---------------------------------------------------------------- the learned noise model


def test_noise_gradient_matches_finite_differences_in_float64():
    problem = tiny_problem(NOISY)
    theta, batch = problem.initial_params(seed=1), problem.pretrain_batch(2)
    phi = problem.initial_metaparams()
    phi["band_noise"] = torch.tensor([-1.0, -2.0, -0.5], dtype=F64)
    leaf = phi["band_noise"].clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(problem.pretrain_loss(theta, {**phi, "band_noise": leaf}, batch), leaf)
    h = 1e-6
    for b in range(3):
        e = torch.zeros(3, dtype=F64)
        e[b] = h
        fd = (problem.pretrain_loss(theta, {**phi, "band_noise": phi["band_noise"] + e}, batch)
              - problem.pretrain_loss(theta, {**phi, "band_noise": phi["band_noise"] - e}, batch)) / (2 * h)
        assert abs(float(fd)) > 1e-8
        assert float(grad[b]) == pytest.approx(float(fd), rel=1e-6, abs=1e-11)


def test_noise_lies_in_its_band_with_the_learned_amplitude():
    # only band 1 on (a = 0.3, the others exp(−60)): the added noise has rFFT bins in band 1 only
    # and variance a² · (lead variance) up to sampling error
    length, bands = 64, 4
    config = ECGProblemConfig(**{**NOISE_ONLY.__dict__, "noise": BandNoiseConfig(bands=bands)})
    x = beats(400, length=length, seed=4, dtype=F64)
    problem = ECGSimCLRProblem(x, (x[:6], labels(6)), (x[:6], labels(6)), config, F64)
    white = torch.randn(x.shape, generator=torch.Generator().manual_seed(0), dtype=F64)
    phi = {"band_noise": torch.tensor([-60.0, math.log(0.3), -60.0, -60.0], dtype=F64)}
    added = problem.augment(phi, x, None, band_split(white, bands)) - x
    lead_std = x.std(dim=-1, keepdim=True, unbiased=False)
    spectrum = torch.fft.rfft(added / lead_std, dim=-1).abs()
    bins = length // 2 + 1
    in_band = (torch.arange(bins) * bands // bins) == 1
    assert spectrum[..., ~in_band].max() < 1e-12 * spectrum[..., in_band].max()
    assert float((added / lead_std).var()) == pytest.approx(0.09, rel=0.1)
    # the bands of a draw are its spectrum cut in pieces: undo the unit-variance scaling and they sum back
    which = torch.arange(bins) * bands // bins
    scales = torch.tensor([(bins / int((which == b).sum())) ** 0.5 for b in range(bands)], dtype=F64)
    torch.testing.assert_close((band_split(white, bands) / scales.view(1, -1, 1, 1)).sum(1), white, rtol=0, atol=1e-12)


def test_noise_only_problem_learns_the_amplitudes_alone():
    problem = tiny_problem(NOISE_ONLY)
    phi = problem.initial_metaparams()
    assert set(phi) == {"band_noise"} and problem.warp is None
    torch.testing.assert_close(phi["band_noise"].exp(), torch.full((3,), 0.2, dtype=F64), rtol=1e-12, atol=0)
    summary = problem.describe_metaparams(phi)
    assert summary["band_noise/b0"] == pytest.approx(0.2) and "magnitude" not in summary
    batch = problem.pretrain_batch(1)
    assert batch.bands1.shape == (6, 3, 1, 32) and batch.noise1 is None
    torch.testing.assert_close(problem.pretrain_batch(1).bands2, batch.bands2, rtol=0, atol=0)
    # the clean views are the baseline's: only the learned noise differs
    base = tiny_problem(ECGProblemConfig(**{**TINY.__dict__, "use_warp": False}))
    torch.testing.assert_close(base.pretrain_batch(1).view1, batch.view1, rtol=0, atol=0)


def test_cross_validation_tests_every_record_once_and_pretrains_on_all_the_others():
    ds = _dataset({"a": 9, "b": 0, "c": 5, "d": 0, "e": 4, "f": 0, "g": 1, "h": 3, "i": 0})
    folds = cross_validation_folds(ds, 4, seed=1)
    assert sorted(r for g in folds for r in g) == sorted(set(ds.patient_ids)), "a record is not tested exactly once"
    positives = ds.positives_per_patient(0)
    # the snake deal: the four records with most positives open the four folds
    assert sorted(max(g, key=lambda r: positives.get(r, 0)) for g in folds) == ["a", "c", "e", "h"]
    for k, test in enumerate(folds):
        split = split_beats_cross_validation(ds, 4, k, RecordFractions(), seed=1, min_positives=1)
        assert split.records["test"] == test
        tested = np.isin(ds.patient_ids, np.array(test))
        assert np.array_equal(split.test, np.flatnonzero(tested))
        assert np.array_equal(split.pretrain, np.flatnonzero(~tested)), "pre-training must take every other record"
        assert not set(split.ft_train) & set(split.metaval)
        assert set(split.ft_train) | set(split.metaval) == set(split.pretrain)
        for name in ("ft_train", "metaval"):
            assert ds.labels[torch.from_numpy(getattr(split, name))].sum() >= 1, name
    with pytest.raises(ValueError, match="no positives"):
        cross_validation_folds(ds, 7)  # only 5 records have positives
    with pytest.raises(ValueError, match="cv_fold"):
        split_beats_cross_validation(ds, 4, 4)
    with pytest.raises(ValueError, match="cv_folds must be between"):
        cross_validation_folds(ds, 8)


def test_data_config_refuses_a_fold_without_folds():
    from metapt.domains.ecg.splits import DataConfig

    with pytest.raises(ValueError, match="needs data.cv_folds"):
        DataConfig(cv_fold=2)
    with pytest.raises(ValueError, match="below data.cv_folds"):
        DataConfig(cv_folds=3, cv_fold=3)
