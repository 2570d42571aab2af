"""The shared experiment runner: methods as data, one evaluation protocol, one summary."""

import json
import math

import pytest
from scipy import stats
import torch
from torch import nn

from metapt.config import load_config
from metapt.evaluation import Downstream, FinetuneConfig, finetune_and_score, label_subset
from metapt.jobs import execute
from metapt.domain import Method
from metapt.summary import aggregate, write_summary
from metapt.runs import RunFolder
from metapt.trainer import MetaPretrainer, MetaSchedule


def test_synthetic_known_answer_through_the_runner(tmp_path):
    config = load_config("synthetic", ["pretrain.steps=600", "evaluation.seeds=2"])
    summary = execute(RunFolder.create(tmp_path / "run", "job: synthetic\n"), config)
    res = summary["settings"]["synthetic"]
    learned = res["learned"]["meta_task_weights"]
    assert learned["helpful_weight"] > 1.0 > learned["noise_weight"]
    scores = res["scores"]
    mse = {m: scores[m]["linear probe"]["1"]["mean"] for m in scores}
    assert mse["meta task weights"] < 0.5 * mse["uniform weights"] < mse["no pre-training"]
    gain = res["gains"]["meta task weights − uniform weights"]["linear probe"]["1"]
    assert gain["mean"] < 0 and gain["ci95"] < abs(gain["mean"])  # lower MSE, every seed
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert not any("meta_loss" in r for r in rows if r["phase"] == "synthetic/uniform")
    assert any("phi/noise_weight" in r for r in rows)  # the weight curves are logged and plotted
    assert (tmp_path / "run" / "losses.png").is_file() and (tmp_path / "run" / "task_weights.png").is_file()


def test_pretraining_seeds_give_cis_and_paired_gains_over_pretraining_seeds(tmp_path):
    config = load_config("synthetic", ["pretrain.steps=300", "pretrain.seeds=3", "evaluation.seeds=2",
                                       "methods=[uniform, meta_task_weights, random_task_weights]"])
    summary = execute(RunFolder.create(tmp_path / "run", "job: synthetic\n"), config)
    res = summary["settings"]["synthetic"]
    assert res["ci_over"] == "pretraining seeds"
    assert set(summary["pretraining"]) == {f"synthetic/{m}/seed{s}" for m in ("uniform", "meta_task_weights",
                                                                            "random_task_weights") for s in range(3)}
    cells = {m: res["scores"][m]["linear probe"]["1"] for m in res["scores"]}
    for cell in cells.values():
        assert len(cell["test"]) == 6 and len(cell["per_pretrain_seed"]) == 3
        assert cell["per_pretrain_seed"][1] == pytest.approx(sum(cell["test"][2:4]) / 2)  # seed 1's two FT seeds
        assert cell["mean"] == pytest.approx(sum(cell["per_pretrain_seed"]) / 3)
    gain = res["gains"]["meta task weights − random task weights"]["linear probe"]["1"]
    expected = [a - b for a, b in zip(cells["meta task weights"]["per_pretrain_seed"],
                                      cells["random task weights"]["per_pretrain_seed"])]
    assert gain["diff"] == pytest.approx(expected) and gain["mean"] < 0  # learned beats random (lower MSE)
    by_seed = res["learned"]["meta_task_weights"]["by_pretrain_seed"]
    assert set(by_seed) == {"0", "1", "2"} and len({tuple(v["task_weights"]) for v in by_seed.values()}) == 3
    md = (tmp_path / "run" / "summary.md").read_text()
    assert md.startswith("# synthetic: downstream test scores, mean ± 95 % CI over pre-training seeds")
    assert "the CIs and paired gains are over pre-training seeds" in md
    # the seeds' agreement on the learned φ, recomputed here from the reported weights (ranks of
    # 2·sigmoid(logit) are the logits' ranks); random φ is not learned and gets none
    agreement = res["agreement"]["meta task weights"]["task_logits"]
    vectors = [by_seed[s]["task_weights"] for s in ("0", "1", "2")]
    pairs = [stats.spearmanr(vectors[i], vectors[j]).statistic for i, j in ((0, 1), (0, 2), (1, 2))]
    assert agreement["pairwise_mean"] == pytest.approx(sum(pairs) / 3) and agreement["seeds"] == 3
    assert set(res["agreement"]) == {"meta task weights"}
    assert "Seed agreement, meta task weights (task_logits): Spearman ρ" in md


def test_random_phi_is_a_seeded_draw_held_fixed():
    from metapt.runner import _random_phi

    phi = {"task_logits": torch.zeros(8)}
    a, b, c = _random_phi(phi, 0), _random_phi(phi, 0), _random_phi(phi, 1)
    assert torch.equal(a["task_logits"], b["task_logits"]) and not torch.equal(a["task_logits"], c["task_logits"])
    assert 0.3 < float(a["task_logits"].std()) < 3


# ---- the evaluation protocol -------------------------------------------------------------------


def _toy_downstream(test_labels_flipped: bool) -> Downstream:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, generator=g)
    x = {k: torch.randn(n, 8, generator=g) for k, n in (("train", 200), ("valid", 100), ("test", 100))}
    y = {k: (v @ w > 0).float() for k, v in x.items()}
    if test_labels_flipped:
        y["test"] = 1 - y["test"]
    return Downstream(batch=lambda s, i: (x[s][i], y[s][i]), labels=y, num_tasks=1)


def test_epoch_selection_never_looks_at_the_test_split():
    # the same run with the test labels flipped: the same epoch and valid score, the mirrored test score
    runs = []
    for flipped in (False, True):
        torch.manual_seed(0)
        encoder = nn.Linear(8, 4)
        runs.append(finetune_and_score(encoder, 4, 1, _toy_downstream(flipped).iterate(), FinetuneConfig(epochs=8, lr=0.05,
                                                                                                        batch_size=32), seed=3))
    a, b = runs
    assert a["best_epoch"] == b["best_epoch"] and a["valid"] == b["valid"]
    assert a["test"] == pytest.approx(1 - b["test"], abs=1e-9)


def test_label_subsets_keep_both_classes_and_are_seeded():
    labels = torch.zeros(1000)
    labels[[5, 500]] = 1
    a, b = label_subset(labels, 0.01, seed=1), label_subset(labels, 0.01, seed=1)
    assert torch.equal(a, b) and labels[a].sum() >= 1 and (labels[a] == 0).any()
    assert torch.equal(label_subset(labels, 1.0, seed=4), torch.arange(1000))


def test_nonfinite_scores_are_counted_not_dropped_silently(tmp_path):
    from metapt.evaluation import EvalConfig

    ev = EvalConfig(seeds=3, linear_probe=FinetuneConfig(linear_probe=True))
    rows = [{"method": "m", "pt_seed": None, "mode": "linear probe", "fraction": 1.0, "seed": s, "test": t,
             "valid": 0.5, "best_epoch": 0} for s, t in enumerate([0.7, math.nan, 0.9])]
    cell = aggregate(rows, [Method("m", "m")], ev, [0])["m"]["linear probe"]["1"]
    assert cell["nonfinite"] == 1 and cell["mean"] == pytest.approx(0.8)
    folder = RunFolder.create(tmp_path / "r", "job: synthetic\n")
    summary = {"job": "x", "config": {"pretrain": {"seed": 0}}, "pretraining": {},
               "settings": {"s": {"metric": "auroc", "sizes": {}, "scores": {"m": {"linear probe": {"1": cell}}},
                                  "gains": {}}}}
    write_summary(folder, summary)
    text = (folder.path / "summary.json").read_text()
    assert "NaN" not in text and json.loads(text)["settings"]["s"]["scores"]["m"]["linear probe"]["1"]["test"][1] is None
    assert "(1 non-finite)" in (folder.path / "summary.md").read_text()
    assert "Every score" not in (folder.path / "summary.md").read_text()
    nan_cell = aggregate([{**r, "test": math.nan} for r in rows], [Method("m", "m")], ev, [0])["m"]["linear probe"]["1"]
    summary["settings"]["s"]["scores"]["m"]["linear probe"]["1"] = nan_cell
    write_summary(folder, summary)
    assert "**Every score of s is NaN**" in (folder.path / "summary.md").read_text()


# ---- batch norm: only PT steps update the statistics ------------------------------------------


class _BatchNormProblem:
    """A linear encoder with batch norm whose running statistics are the problem's state."""

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(64, 5, generator=g) * 3 + 1
        self.y = self.x @ torch.randn(5, generator=g)
        self.bn = nn.BatchNorm1d(5)

    def _features(self, params, x):
        return torch.func.functional_call(self.bn, {}, (x @ params["w"]).T.T) if False else self.bn(x) @ params["w"]

    def pretrain_loss(self, params, phi, batch):
        return ((self._features(params, self.x[batch]) * torch.exp(phi["s"])).sum(1) - self.y[batch]).pow(2).mean()

    def finetune_loss(self, params, head, batch):
        return ((self._features(params, self.x[batch]) * head["v"]).sum(1) - self.y[batch]).pow(2).mean()

    def pretrain_batch(self, i):
        return torch.arange(16) + 16 * (i % 4)

    finetune_batch = metaval_batch = pretrain_batch

    def describe_metaparams(self, phi):
        return {}

    def state_dict(self):
        return {k: v.clone() for k, v in self.bn.named_buffers()}

    def load_state_dict(self, state):
        with torch.no_grad():
            for k, v in self.bn.named_buffers():
                v.copy_(state[k])


def test_only_pretraining_steps_update_batch_norm_statistics():
    problem = _BatchNormProblem()
    t = MetaPretrainer(problem, {"w": torch.eye(5)}, {"v": torch.zeros(5)}, {"s": torch.zeros(5)},
                       pt_optimizer=lambda ps: torch.optim.Adam(ps, lr=0.01),
                       meta_optimizer=lambda ps: torch.optim.SGD(ps, lr=0.01),
                       schedule=MetaSchedule(interval=1, warmup_steps=1, head_steps=2))
    t.run_until(1)  # a PT step and a warm-up head step
    after_pt = problem.state_dict()
    assert int(after_pt["num_batches_tracked"]) == 1
    t.pretrain_step()
    before_meta = problem.state_dict()
    t.meta_step()  # head catch-up, unroll, hypergradient: several forwards in train mode
    for k, v in problem.state_dict().items():
        assert torch.equal(v, before_meta[k]), k
    assert int(before_meta["num_batches_tracked"]) == 2


# ---- start-up: the registry and the package are lazy ---------------------------------------------


def test_help_and_preset_list_start_without_importing_torch_or_any_domain():
    import subprocess
    import sys

    code = ("import sys\nfrom typer.testing import CliRunner\nfrom metapt.cli import app\n"
            "r = CliRunner()\nassert r.invoke(app, ['--help']).exit_code == 0\n"
            "out = r.invoke(app, ['config', '--list'])\nassert out.exit_code == 0 and 'molecules' in out.output\n"
            "heavy = [m for m in sys.modules if m == 'torch' or m.startswith('metapt.domains.')]\n"
            "assert not heavy, heavy\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr


def test_every_public_name_resolves_lazily():
    import metapt

    assert set(metapt._WHERE) == set(metapt.__all__)
    for name in metapt.__all__:
        assert getattr(metapt, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        metapt.nope  # noqa: B018


def test_a_config_loads_only_its_own_domain():
    import subprocess
    import sys

    code = ("import sys\nfrom metapt.config import load_config\nload_config('synthetic')\n"
            "loaded = {m.split('.')[2] for m in sys.modules if m.startswith('metapt.domains.') and m.count('.') >= 2}\n"
            "assert loaded == {'synthetic'}, loaded\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr


# ---- device placement (checked on CPU; benchmarks/gpu_smoke.py runs the jobs on CUDA) -------------


def test_device_check_names_every_tensor_that_is_elsewhere():
    from metapt.domains.synthetic.problem import SyntheticConfig, SyntheticTaskWeighting
    from metapt.devices import check_device

    problem = SyntheticTaskWeighting(SyntheticConfig())
    t = MetaPretrainer(problem, problem.initial_params(0), problem.initial_head(), problem.initial_metaparams(),
                       pt_optimizer=lambda ps: torch.optim.Adam(ps), meta_optimizer=lambda ps: torch.optim.Adam(ps))
    check_device(t, torch.device("cpu"))  # everything is on the CPU
    t.head["weight"] = torch.empty(4, device="meta")  # one tensor elsewhere
    with pytest.raises(RuntimeError, match=r"not on cpu: head\.weight \(meta\)"):
        check_device(t, torch.device("cpu"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_asking_for_cuda_without_it_is_a_clear_error(tmp_path):
    from metapt.config import ConfigError
    from metapt.devices import resolve_device

    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ConfigError, match="CUDA is not available"):
        resolve_device("cuda:0")
    with pytest.raises(ConfigError, match="device must be auto, cpu, cuda or cuda:INDEX"):
        load_config("synthetic", ["device=tpu"])


def test_diagnose_and_report_on_a_run_folder(tmp_path):
    from typer.testing import CliRunner

    from metapt.cli import app

    out = tmp_path / "run"
    runner = CliRunner()
    res = runner.invoke(app, ["run", "synthetic", "--out", str(out), "--set", "pretrain.steps=150",
                              "--set", "evaluation.seeds=1"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["diagnose", str(out), "--directions", "2"])
    assert res.exit_code == 0, res.output
    found = json.loads((out / "diagnostics.json").read_text())
    assert found["phase"] == "synthetic/meta_task_weights"
    unrolled = found["estimators"]["unrolled_T1"]  # the default estimator; the known answer agrees with its truth
    assert unrolled["sign_agreement_exact"] >= 0.5 and found["truth"]["fd_vs_exact_correlation"] > 0.9
    assert runner.invoke(app, ["report", str(out)]).exit_code == 0
    assert "Hypergradient health" in (out / "report.html").read_text()


def test_diagnose_a_phase_of_one_pretraining_seed(tmp_path):
    # with several pre-training seeds a phase is SETTING/METHOD/seedN; diagnose rebuilds that seed's phase
    from typer.testing import CliRunner

    from metapt.cli import app

    out = tmp_path / "run"
    runner = CliRunner()
    res = runner.invoke(app, ["run", "synthetic", "--out", str(out), "--set", "pretrain.steps=120", "--set",
                              "pretrain.seeds=2", "--set", "evaluation.seeds=1", "--set", "methods=[meta_task_weights]"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["diagnose", str(out), "--directions", "1", "--phase", "synthetic/meta_task_weights/seed1"])
    assert res.exit_code == 0, res.output
    found = json.loads((out / "diagnostics.json").read_text())
    assert found["phase"] == "synthetic/meta_task_weights/seed1" and "seed1" in found["source"]
    res = runner.invoke(app, ["diagnose", str(out), "--phase", "synthetic/meta_task_weights/seed7"])
    assert res.exit_code != 0 and "seed7" in res.output
