"""The front door (issue 22): --version, described presets, and the MIT-BIH conversion script."""

import re
import sys
from pathlib import Path

import numpy as np
from typer.testing import CliRunner

from metapt._presets import preset_description, presets
from metapt.cli import app
from run_folders import load_file

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()


def test_version_option_prints_the_version():
    import metapt

    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0 and res.output.strip() == f"metapt {metapt.__version__}"


def test_every_preset_has_a_one_line_description_that_fits_80_columns():
    res = runner.invoke(app, ["config", "--list"])
    assert res.exit_code == 0, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == len(presets())
    for name, line in zip(presets(), lines):
        description = preset_description(name)
        assert description and line.split()[0] == name and line.endswith(description), line
        assert len(line) <= 80, line
    for smoke in ("molecules-test", "ecg-quick", "ecg-benchmark", "synthetic"):
        assert smoke in res.output


def _script():
    return load_file("mitbih_beats", ROOT / "scripts" / "mitbih_beats.py")


def test_mitbih_script_writes_the_layout_the_loader_reads(tmp_path):
    import wfdb

    from metapt.domains.ecg.data import load_beat_folder

    source, out = tmp_path / "mitdb", tmp_path / "beats"
    source.mkdir()
    rng = np.random.default_rng(0)
    fs, n = 360, 360 * 20
    for name, leads in (("100", ["MLII", "V5"]), ("102", ["V5", "V2"])):
        sig = rng.normal(0, 0.1, (n, 2))
        peaks = np.arange(300, n - 300, 300)
        sig[peaks] += 1.0
        wfdb.wrsamp(name, fs=fs, units=["mV", "mV"], sig_name=leads, p_signal=sig, fmt=["16", "16"],
                    write_dir=str(source))
        samples = np.concatenate([[10], peaks])  # a rhythm annotation first, then beats
        symbols = ["+"] + ["V" if i % 4 == 0 else "N" for i in range(len(peaks))]
        wfdb.wrann(name, "atr", samples, symbols, write_dir=str(source))
    assert _script().convert(source, out) == ["100", "102"]
    header = (out / "100_beats.csv").read_text().splitlines()
    assert header[0] == "sample,pvc" and header[1] == "300,1" and len(header) == 1 + len(peaks)
    ds = load_beat_folder(out, window=128)
    assert len(ds) > 0 and ds.labels.sum() > 0


def test_script_runs_from_the_command_line(tmp_path):
    import subprocess

    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "mitbih_beats.py"), "--help"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "mitdb" in res.stdout + res.stderr


def test_readme_shows_the_preset_list_as_printed():
    res = runner.invoke(app, ["config", "--list"])
    readme = (ROOT / "README.md").read_text()
    assert f"```text\n{res.output.strip()}\n```" in readme


# ---- metapt compare at 80 columns ----------------------------------------------------------------


def _first_column(output: str) -> str:
    """The first column of rich's tables, its folded pieces joined."""
    return "".join(line.split("│")[1].strip() for line in output.splitlines() if line.startswith("│"))


def test_compare_at_80_columns_keeps_every_key_whole_and_says_no_differences(tmp_path):
    import shutil

    import yaml

    from metapt.report import compare
    from metapt.runs import RunFolder

    first = tmp_path / "first"
    res = runner.invoke(app, ["run", "synthetic", "--out", str(first), "--set", "pretrain.steps=110",
                              "--set", "methods=[uniform]", "--set", "evaluation.seeds=1", "--threads", "1"])
    assert res.exit_code == 0, res.output
    second, third = tmp_path / "second_run_with_a_long_name", tmp_path / "third"
    for other, solver in ((second, {"kind": "neumann", "adam_preconditioner": False, "upcoming": False}),
                          (third, {"kind": "cg", "adam_preconditioner": False, "gauss_newton": True})):
        shutil.copytree(first, other)
        config = yaml.safe_load((other / "config.yaml").read_text())
        config["meta"]["estimator"] = solver
        (other / "config.yaml").write_text(yaml.safe_dump(config))
    wide = runner.invoke(app, ["compare", str(first), str(second), str(third)], env={"COLUMNS": "80"})
    assert wide.exit_code == 0, wide.output
    assert "…" not in wide.output
    assert max(len(line) for line in wide.output.splitlines()) <= 80
    keys = _first_column(wide.output)
    _, _, diffs = compare([RunFolder.open(p) for p in (first, second, third)])
    assert len(diffs) >= 3
    for key, _ in diffs:
        assert key in keys, key
    same = runner.invoke(app, ["compare", str(first), str(first)], env={"COLUMNS": "80"})
    assert same.exit_code == 0 and "no differences" in same.output and "so are the scores" in same.output


# ---- metapt diagnose: config kinds, the run's own estimator, 80 columns, a verdict -------------


def test_every_diagnosed_estimator_is_a_meta_estimator_config():
    from metapt.diagnostics import default_estimators, estimator_configs
    from metapt.schema import EstimatorConfig

    for horizon in (1, 5, 10):
        estimators, configs = default_estimators(0.003, horizon), estimator_configs(horizon)
        assert set(estimators) == set(configs)
        for name, config in configs.items():
            assert EstimatorConfig(**config).estimator(0.003) == estimators[name], name
    assert EstimatorConfig().estimator(0.003) == default_estimators(0.003, 10)["unrolled_T1"]  # the default


def test_diagnose_prints_progress_80_columns_the_runs_estimator_and_a_verdict(tmp_path):
    import json

    out = tmp_path / "run"
    res = runner.invoke(app, ["run", "synthetic", "--out", str(out), "--set", "pretrain.steps=110",
                              "--set", "methods=[meta_task_weights]", "--set", "evaluation.seeds=1",
                              "--set", "meta.estimator.kind=unrolled", "--set", "meta.estimator.terms=null",
                              "--set", "meta.estimator.alpha=null", "--threads", "1"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["diagnose", str(out), "--directions", "1", "--threads", "1"], env={"COLUMNS": "80"})
    assert res.exit_code == 0, res.output
    text = res.output
    assert "estimator 1/" in text and "lookahead finite differences" in text  # progress, as it goes
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "* unrolled_T1" in text and "unrolled_T1: {kind: unrolled}" in text  # marked; its config kind
    assert "neumann1_past (paper): {kind: neumann, upcoming: false, adam_preconditioner:" in text
    verdict = [line for line in text.splitlines() if line.startswith("verdict: this run's estimator (unrolled_T1)")]
    assert verdict, text
    flat = " ".join(text.split())
    assert re.search(r"state: PT step \d+ of 110 of phase", flat) or "the step counter restarts" in flat  # explained
    found = json.loads((out / "diagnostics.json").read_text())
    assert found["own"] == "unrolled_T1" and found["configs"]["unrolled_T1"] == {"kind": "unrolled"}
    md = runner.invoke(app, ["diagnose", str(out), "--directions", "0", "--format", "md", "--threads", "1"])
    assert md.exit_code == 0 and "| **unrolled_T1** (this run's) | `{kind: unrolled}` |" in md.output
    js = runner.invoke(app, ["diagnose", str(out), "--directions", "0", "--format", "json", "--threads", "1"])
    assert js.exit_code == 0 and '"own": "unrolled_T1"' in js.output
    bad = runner.invoke(app, ["diagnose", str(out), "--format", "html"])
    assert bad.exit_code == 2
