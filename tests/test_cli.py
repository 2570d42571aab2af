"""The command line: the demo job writes its run folder; user errors are one clear line."""

import json

from typer.testing import CliRunner

from metapt.cli import app

runner = CliRunner()  # stderr is part of .output (click >= 8.2)


def test_synthetic_job_writes_run_folder(tmp_path):
    out = tmp_path / "run"
    res = runner.invoke(app, ["run", "synthetic", "--out", str(out), "--steps", "150"])
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {"uniform", "meta-learned"}
    assert summary["uniform"]["task_weights"] == [1.0] * 8
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 300 and json.loads(lines[-1])["phase"] == "meta-learned"
    assert "meta-learned" in res.output


def test_existing_run_folder_is_refused_without_overwrite(tmp_path):
    (tmp_path / "keep.txt").write_text("precious")
    res = runner.invoke(app, ["run", "synthetic", "--out", str(tmp_path), "--steps", "2"])
    assert res.exit_code != 0 and "already exists" in res.output
    assert (tmp_path / "keep.txt").read_text() == "precious"


def test_unknown_job_is_a_clear_error():
    res = runner.invoke(app, ["run", "nope"])
    assert res.exit_code != 0 and "unknown job" in res.output


def test_ecg_job_needs_an_existing_data_folder(tmp_path):
    res = runner.invoke(app, ["run", "ecg", "--out", str(tmp_path / "r")])
    assert res.exit_code == 2 and "--data" in res.output
    res = runner.invoke(app, ["run", "ecg", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "r")])
    assert res.exit_code == 2 and "does not exist" in res.output


def test_ecg_data_errors_are_one_line(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "100.hea").write_text("this is not a WFDB header\n")
    res = runner.invoke(app, ["run", "ecg", "--data", str(tmp_path / "data"), "--preset", "quick",
                              "--out", str(tmp_path / "r")])
    assert res.exit_code == 2 and "error:" in res.output and "Traceback" not in res.output


def test_unknown_molecules_preset_is_a_clear_error(tmp_path):
    res = runner.invoke(app, ["run", "molecules", "--preset", "huge", "--out", str(tmp_path / "r")])
    assert res.exit_code == 2 and "unknown molecules preset" in res.output
