"""The lookahead truth against exact answers: a ridge problem whose pre-training converges."""

import math

import pytest
import torch

from metapt import MetaPretrainer
from metapt.diagnostics import DiagnoseOptions, StateProbe, diagnose, lookahead_agreement
from metapt.run_diagnosis import format_table
from metapt.hypergrad import ConjugateGradient, Estimator, Identity, sgd

N, D = 12, 4


class Ridge:
    """L_PT(θ, φ) = mean_i w_i (x_iᵀθ − y_i)² + λ‖θ‖², w = 2σ(φ) per example; L_V = ½‖Aθ − b‖².

    Full batch every step, so pre-training by SGD converges to θ*(φ) = (XᵀWX/n + λI)⁻¹ XᵀWy/n.
    """

    lam = 0.3

    def __init__(self, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(N, D, generator=g, dtype=torch.float64)
        self.y = torch.randn(N, generator=g, dtype=torch.float64)
        self.a = torch.randn(3, D, generator=g, dtype=torch.float64)
        self.b = torch.randn(3, generator=g, dtype=torch.float64)

    def pretrain_loss(self, params, metaparams, batch):
        w = 2 * torch.sigmoid(metaparams["logits"])
        r = self.x @ params["theta"] - self.y
        return (w * r**2).mean() + self.lam * (params["theta"] ** 2).sum()

    def finetune_loss(self, params, head, batch):
        return 0.5 * ((self.a @ params["theta"] - self.b) ** 2).sum() + 0.0 * head["h"].sum()

    def pretrain_batch(self, index):
        return None

    def finetune_batch(self, index):
        return None

    def metaval_batch(self, index):
        return None

    def describe_metaparams(self, metaparams):
        return {}

    def solution(self, logits):
        w = 2 * torch.sigmoid(logits)
        h = (self.x.T * w) @ self.x / N + self.lam * torch.eye(D, dtype=torch.float64)
        return torch.linalg.solve(h, (self.x.T * w) @ self.y / N)

    def exact_hypergradient(self, logits):
        def objective(lg):
            return 0.5 * ((self.a @ self.solution(lg) - self.b) ** 2).sum()

        return torch.func.grad(objective)(logits)


def _trainer(problem, logits, lr=0.2):
    theta = problem.solution(logits)
    trainer = MetaPretrainer(problem, {"theta": theta}, {"h": torch.zeros(1, dtype=torch.float64)},
                             {"logits": logits}, pt_optimizer=lambda ps: torch.optim.SGD(ps, lr=lr),
                             meta_optimizer=lambda ps: torch.optim.Adam(ps, lr=0.1), inner_optimizer=sgd(0.1))
    trainer.schedule = type(trainer.schedule)(interval=10, unroll_steps=0, warmup_steps=0)
    return trainer


def test_lookahead_finite_difference_equals_exact_hypergradient_on_converged_ridge():
    problem = Ridge()
    logits = torch.linspace(-1, 1, N, dtype=torch.float64)
    trainer = _trainer(problem, logits)
    probe = StateProbe(trainer, val_pairs=1)
    exact = {"logits": problem.exact_hypergradient(logits)}
    # the implicit estimator with an exact solve on the (only) batch is the converged hypergradient
    ift, info, _ = probe.estimate(Estimator(solver=ConjugateGradient(max_iter=50, tol=1e-14), upcoming=True))
    torch.testing.assert_close(ift["logits"], exact["logits"], rtol=1e-9, atol=1e-14)
    result = lookahead_agreement(probe, {"exact": exact, "negated": {"logits": -exact["logits"]}},
                                 horizon=400, directions=6, epsilon=1e-4, seed=3)
    dirs_pred = []
    g = torch.Generator().manual_seed(3 + 7919)
    for _ in range(6):
        d = torch.randn(N, generator=g, dtype=torch.float64)
        dirs_pred.append(float(exact["logits"] @ (d / d.norm())))
    for fd, pred in zip(result["random_fd"], dirs_pred):
        assert fd == pytest.approx(pred, rel=1e-4)
    assert result["exact"]["own_fd"] == pytest.approx(float(exact["logits"].norm()), rel=1e-4)
    assert result["exact"]["sign_agreement"] == 1.0 and result["exact"]["correlation"] > 0.9999
    assert result["negated"]["sign_agreement"] == 0.0 and result["negated"]["correlation"] < -0.9999
    assert result["negated"]["own_fd"] < 0


def test_exact_t_step_derivative_matches_its_finite_differences_off_convergence():
    problem = Ridge(1)
    logits = torch.linspace(-1, 1, N, dtype=torch.float64)
    trainer = _trainer(problem, logits, lr=0.05)
    with torch.no_grad():
        trainer.params["theta"].add_(0.5)  # away from θ*: the T-step answer is not the converged one
    probe = StateProbe(trainer, val_pairs=1)
    exact = probe.exact_derivative(5)
    result = lookahead_agreement(probe, {"exact5": exact}, horizon=5, directions=4, epsilon=1e-5, seed=1)
    assert result["exact5"]["own_fd"] == pytest.approx(float(exact["logits"].norm()), rel=1e-6)
    assert result["exact5"]["sign_agreement"] == 1.0


def test_diagnose_reports_every_estimator_with_finite_numbers():
    problem = Ridge(2)
    logits = torch.zeros(N, dtype=torch.float64)
    trainer = _trainer(problem, logits, lr=0.1)
    # the PT optimiser is SGD here; Adam-only estimators are left out
    ests = {"identity_next": Estimator(solver=Identity(0.1), upcoming=True), "unrolled_T3": Estimator(horizon=3)}
    result = diagnose(trainer, ests, DiagnoseOptions(horizon=3, directions=3, epsilon=1e-4, val_pairs=1,
                                                     snr_samples=2, lanczos_steps=4))
    assert set(result["estimators"]) == set(ests)
    # every batch is the same here, so independent samples agree exactly
    assert result["estimators"]["identity_next"]["mean_pairwise_cos"] == pytest.approx(1.0, abs=1e-12)
    assert result["estimators"]["unrolled_T3"]["cos_exact"] == pytest.approx(1.0, abs=1e-12)
    h = (problem.x.T * 2 * torch.sigmoid(logits)) @ problem.x * (2 / N) + 2 * problem.lam * torch.eye(D, dtype=torch.float64)
    assert result["curvature"]["lambda_max"] == pytest.approx(float(torch.linalg.eigvalsh(h)[-1]), rel=1e-8)
    assert all(math.isfinite(r["cost_pt_steps"]) for r in result["estimators"].values())
    assert "identity_next" in format_table(result)


def _quick_options(horizon=3):
    return DiagnoseOptions(horizon=horizon, directions=3, epsilon=0.5, val_pairs=2, snr_samples=2, lanczos_steps=4)


def _meta_config(interval):
    from metapt.schema import MetaConfig

    return MetaConfig(interval=interval, warmup_steps=5, inner_lr=0.1, lr=0.05)


def _check_state_result(result, options):
    rows = result["estimators"]
    unrolled = rows[f"unrolled_T{options.horizon}"]
    # the truncated estimator IS the exact T-step derivative, and the finite differences agree with it
    assert unrolled["cos_exact"] == pytest.approx(1.0, abs=1e-6)
    assert result["truth"]["fd_vs_exact_correlation"] > 0.9
    for name, row in rows.items():
        assert math.isfinite(row["cos_exact"]) and math.isfinite(row["cost_pt_steps"]), name
        assert row["usable"], name


def test_diagnose_state_on_the_synthetic_problem():
    from metapt.diagnostics import diagnose_state
    from metapt.domains.synthetic.problem import SyntheticTaskWeighting

    problem = SyntheticTaskWeighting()
    meta = _meta_config(5)
    trainer = MetaPretrainer(problem, problem.initial_params(0), problem.initial_head(), problem.initial_metaparams(),
                             pt_optimizer=lambda ps: torch.optim.Adam(ps, lr=0.01),
                             meta_optimizer=lambda ps: torch.optim.Adam(ps, lr=0.05), inner_optimizer=sgd(0.1),
                             schedule=meta.schedule())
    trainer.run_until(30)
    options = _quick_options()
    result = diagnose_state(problem, trainer.state_dict(), pt_lr=0.01, meta=meta, options=options)
    _check_state_result(result, options)
    assert result["step"] == 30
    # the state dict was only read: the same state diagnosed twice gives the same numbers
    again = diagnose_state(problem, trainer.state_dict(), pt_lr=0.01, meta=meta, options=options)
    assert again["estimators"]["identity_next"]["cos_exact"] == result["estimators"]["identity_next"]["cos_exact"]


def test_diagnose_state_on_a_small_molecules_problem():
    from metapt.diagnostics import diagnose_state
    from metapt.domains.molecules.models import GINEncoder
    from metapt.domains.molecules.problem import MoleculesProblem, WeightingConfig, load_molecule_data

    data = load_molecule_data("b3db", max_pretrain=200, max_downstream=100)
    torch.manual_seed(0)
    problem = MoleculesProblem(data, GINEncoder(num_layers=2, emb_dim=16, dropout=0.0, norm="layer"),
                               WeightingConfig(), pt_batch_size=32)
    meta = _meta_config(5)
    trainer = MetaPretrainer(problem, problem.initial_params(), problem.initial_head(), problem.initial_metaparams(),
                             pt_optimizer=lambda ps: torch.optim.Adam(ps, lr=1e-3),
                             meta_optimizer=lambda ps: torch.optim.Adam(ps, lr=0.05), inner_optimizer=sgd(0.1),
                             schedule=meta.schedule())
    trainer.run_until(10)
    options = _quick_options(2)
    result = diagnose_state(problem, trainer.state_dict(), pt_lr=1e-3, meta=meta, options=options)
    _check_state_result(result, options)
    assert result["curvature"]["lambda_max"] > 0


def test_report_section_renders_the_diagnostics_table(tmp_path):
    from metapt.report import _hypergradient_health

    problem = Ridge(3)
    trainer = _trainer(problem, torch.zeros(N, dtype=torch.float64), lr=0.1)
    result = diagnose(trainer, {"identity_next": Estimator(solver=Identity(0.1), upcoming=True)},
                      DiagnoseOptions(horizon=2, directions=2, epsilon=1e-3, val_pairs=1, snr_samples=2, lanczos_steps=2))
    import json

    from metapt.schema import jsonable

    path = tmp_path / "diagnostics.json"
    path.write_text(json.dumps(jsonable(result)))
    page = _hypergradient_health(path)
    assert "<table>" in page and "identity_next" in page
