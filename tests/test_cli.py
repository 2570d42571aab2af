"""The command line: run folders, reports, eval, compare, config, and user errors as one line."""

import json

import pytest
import torch
import yaml
from typer.testing import CliRunner

from metapt.cli import app
from metapt.runs import RunFolder

runner = CliRunner()  # stderr is part of .output (click >= 8.2)


def _one_line_error(res, code: int = 2) -> str:
    assert res.exit_code == code, res.output
    assert "Traceback" not in res.output
    lines = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, res.output
    return res.output


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    res = runner.invoke(app, ["run", "synthetic", "--out", str(out), "--set", "pretrain.steps=150", "--threads", "1"])
    assert res.exit_code == 0, res.output
    return out


def test_run_writes_the_whole_run_folder(synthetic_run):
    out = synthetic_run
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "summary.md", "losses.png", "task_weights.png",
                 "report.html"):
        assert (out / name).is_file(), name
    assert list((out / "tensorboard").rglob("events.out.tfevents.*"))
    assert yaml.safe_load((out / "config.yaml").read_text())["pretrain"]["steps"] == 150
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["settings"]["synthetic"]["learned"]) == {"meta_task_weights"}  # uniform's φ is frozen
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 300 and json.loads(lines[-1])["phase"] == "synthetic/meta_task_weights"
    state = torch.load(RunFolder(out).checkpoints()[-1], weights_only=True)
    assert {"synthetic/uniform", "synthetic/meta_task_weights"} <= set(state["results"]) and state["phase"] is None


def test_report_is_one_self_contained_page(synthetic_run):
    (synthetic_run / "report.html").unlink()
    (synthetic_run / "losses.png").unlink()
    res = runner.invoke(app, ["report", str(synthetic_run)])
    assert res.exit_code == 0, res.output
    page = (synthetic_run / "report.html").read_text()
    assert (synthetic_run / "losses.png").is_file()  # plots are redrawn from the metrics
    assert page.count("data:image/png;base64,") == 3 and "<table>" in page  # losses, scores, task weights
    assert "job: synthetic" in page and "checkpoints kept: 3" in page
    assert "src='http" not in page and 'src="http' not in page  # nothing to fetch


def test_compare_puts_runs_side_by_side(synthetic_run, tmp_path):
    other = tmp_path / "other"
    res = runner.invoke(app, ["run", "synthetic", "--out", str(other), "--set", "pretrain.steps=120", "--threads", "1"])
    assert res.exit_code == 0, res.output
    table = tmp_path / "compare.md"
    res = runner.invoke(app, ["compare", str(synthetic_run), str(other), "--out", str(table)])
    assert res.exit_code == 0, res.output
    text = table.read_text()
    assert "| synthetic · meta task weights · linear probe · test MSE |" in text and "| pretrain.steps | 150 | 120 |" in text


def test_config_prints_a_resolved_config_that_runs(tmp_path):
    res = runner.invoke(app, ["config", "molecules", "--set", "meta.estimator=cg"])
    assert res.exit_code == 0, res.output
    config = yaml.safe_load(res.output)
    assert config["meta"]["estimator"]["kind"] == "cg" and config["pretrain"]["steps"] == 2000
    res = runner.invoke(app, ["config", "--list"])
    assert "molecules-paper" in res.output and "ecg-quick" in res.output


def test_eval_redoes_only_the_evaluation(tmp_path):
    out = tmp_path / "mol"
    res = runner.invoke(app, ["run", "molecules-test", "--out", str(out), "--set", "methods=[uniform]",
                              "--set", "evaluation.linear_probe=null", "--threads", "1"])
    assert res.exit_code == 0, res.output
    metrics = (out / "metrics.jsonl").read_bytes()
    res = runner.invoke(app, ["eval", str(out), "--set", "evaluation.seeds=3"])
    assert res.exit_code == 0, res.output
    scores = json.loads((out / "summary.json").read_text())["settings"]["b3db"]["scores"]["uniform weights"]
    assert len(scores["full fine-tuning"]["1"]["test"]) == 3
    assert (out / "metrics.jsonl").read_bytes() == metrics  # no pre-training was redone
    assert yaml.safe_load((out / "config.yaml").read_text())["evaluation"]["seeds"] == 3
    _one_line_error(runner.invoke(app, ["eval", str(out), "--set", "pretrain.steps=5"]))


def test_existing_run_folder_is_refused_without_overwrite(tmp_path):
    (tmp_path / "keep.txt").write_text("precious")
    out = _one_line_error(runner.invoke(app, ["run", "synthetic", "--out", str(tmp_path)]))
    assert "already exists" in out and "metapt resume" in out
    assert (tmp_path / "keep.txt").read_text() == "precious"


def test_config_errors_are_one_line_with_a_suggestion(tmp_path):
    out = _one_line_error(runner.invoke(app, ["run", "molecule", "--out", str(tmp_path / "r")]))
    assert "did you mean 'molecules'" in out
    out = _one_line_error(runner.invoke(app, ["run", "molecules", "--set", "meta.lrr=1", "--out", str(tmp_path / "r")]))
    assert "did you mean 'meta.lr'" in out
    assert not (tmp_path / "r").exists()  # nothing is created for a config that cannot run


def test_debug_shows_the_traceback(tmp_path):
    res = runner.invoke(app, ["run", "molecules", "--set", "meta.lrr=1", "--debug", "--out", str(tmp_path / "r")])
    assert res.exit_code != 0 and res.exception is not None and "meta.lrr" in str(res.exception)


def test_resume_and_report_need_a_run_folder(tmp_path):
    assert "does not exist" in _one_line_error(runner.invoke(app, ["resume", str(tmp_path / "nope")]))
    (tmp_path / "plain").mkdir()
    assert "not a metapt run folder" in _one_line_error(runner.invoke(app, ["report", str(tmp_path / "plain")]))


def test_ecg_job_needs_an_existing_data_folder(tmp_path):
    assert "--data" in _one_line_error(runner.invoke(app, ["run", "ecg", "--out", str(tmp_path / "r")]))
    out = _one_line_error(runner.invoke(app, ["run", "ecg", "--data", str(tmp_path / "missing"),
                                              "--out", str(tmp_path / "r")]))
    assert "does not exist" in out


def test_ecg_data_errors_are_one_line(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "100.hea").write_text("this is not a WFDB header\n")
    for _ in range(2):  # a failed start leaves no folder behind, so the same command can be rerun
        out = _one_line_error(runner.invoke(app, ["run", "ecg-quick", "--data", str(tmp_path / "data"),
                                                  "--out", str(tmp_path / "r")]))
        assert "no ECG layout recognised" in out and "already exists" not in out
        assert not (tmp_path / "r").exists()


def test_non_finite_pretraining_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    out = tmp_path / "r"
    res = runner.invoke(app, ["run", "synthetic", "--out", str(out), "--set", "pretrain.lr=4e8",
                              "--set", "checkpoint.every=1", "--threads", "1"])  # the loss overflows at step 3
    text = _one_line_error(res, code=3)
    assert "pre-training loss became inf at step 3" in text and "last good checkpoint is kept" in text
    assert f"metapt resume {out}" in text
    state = RunFolder(out).latest_checkpoint()
    assert state is not None and state["phase"] == "synthetic/uniform" and state["trainer"]["counters"]["step"] < 3
    assert all(torch.isfinite(v).all() for v in state["trainer"]["params"].values())


def test_diverging_neumann_series_is_skipped_counted_and_explained(tmp_path):
    out = tmp_path / "r"
    res = runner.invoke(app, ["run", "synthetic", "--out", str(out), "--set", "pretrain.steps=130",
                              "--set", "meta.estimator.alpha=1e6", "--threads", "1"])
    assert res.exit_code == 0, res.output
    # the preset's meta-learning settings but α (an override used to reset the whole meta section)
    from metapt.config import load_config, to_yaml
    from metapt.config import flatten as _flatten

    ran = _flatten(yaml.safe_load((out / "config.yaml").read_text()))
    preset = _flatten(yaml.safe_load(to_yaml(load_config("synthetic"))))
    assert {k for k in preset if preset[k] != ran[k]} == {"pretrain.steps", "meta.estimator.alpha"}
    assert "meta-step(s) skipped" in res.output and "meta.estimator=cg" in res.output and "inverse-HVP solve diverged" in res.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["pretraining"]["synthetic/meta_task_weights"]["skipped_meta_steps"] > 0
    learned = summary["settings"]["synthetic"]["learned"]["meta_task_weights"]
    assert learned["task_weights"] == [1.0] * 8  # no unusable step was applied
