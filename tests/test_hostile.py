"""The last holes a hostile re-probe found (issue 23): nothing lost, nothing silently wrong, and
every user error one line with exit status 2.

Each test failed before its fix. Runs are the synthetic preset with a few steps; processes are
real only where a SIGKILL is the point.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from metapt.cli import app
from metapt.runs import MARKER, RunFolder
from run_folders import copy_run as _copy

runner = CliRunner()
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
FAST = ["--set", "pretrain.steps=60", "--set", "checkpoint.every=20", "--set", "meta.warmup_steps=10", "--threads", "1"]


def _one_line_error(res, code: int = 2) -> str:
    assert res.exit_code == code, res.output
    assert "Traceback" not in res.output, res.output
    assert len([line for line in res.output.splitlines() if line.startswith("error:")]) == 1, res.output
    return " ".join(res.output.split())


def _run(out: Path, *extra: str):
    return runner.invoke(app, ["run", "synthetic", "--out", str(out), *FAST, *extra])


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hostile") / "done"
    res = _run(out)
    assert res.exit_code == 0, res.output
    return out


def _kept(path: Path) -> dict[str, bytes]:
    """What a run must keep: its config, checkpoints, results and step log."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()
            and (p.name in ("config.yaml", "metrics.jsonl", MARKER) or p.parent.name in ("checkpoints", "results"))}


def _asides(run: Path) -> list[Path]:
    return [p for p in run.parent.iterdir() if p.name.startswith(f".{run.name}.replaced-")]


# ---- data lost --------------------------------------------------------------------------------------


def test_overwrite_refuses_a_folder_that_only_looks_like_an_old_run(tmp_path):
    folder = tmp_path / "P"
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "config.yaml").write_text("job: nightly\n")
    (folder / "paper.tex").write_text("years of work")
    (folder / "checkpoints" / "m.pt").write_bytes(b"weights")
    out = _one_line_error(_run(folder, "--overwrite"))
    assert "not a metapt run folder" in out and f"touch {folder / MARKER}" in out
    assert (folder / "paper.tex").read_text() == "years of work"
    assert (folder / "checkpoints" / "m.pt").read_bytes() == b"weights"
    assert not _asides(folder)


def _overwrite_then_sigkill(run: Path, *, checkpoint: bool = False) -> None:
    """A process that starts `--overwrite` of ``run`` and dies by SIGKILL before it can clean up."""
    code = ("import os, signal, sys\n"
            "from metapt.runs import RunFolder\n"
            "folder = RunFolder.create(sys.argv[1], 'job: synthetic\\n', overwrite=True)\n"
            + ("folder.save_checkpoint({'format': 2}, 1, 3)\n" if checkpoint else "")
            + "os.kill(os.getpid(), signal.SIGKILL)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(run)], env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    assert len(_asides(run)) == 1


def test_a_run_set_aside_by_a_sigkilled_overwrite_is_restored_by_the_next_command(finished, tmp_path):
    run = _copy(finished, tmp_path / "run")
    before = _kept(run)
    _overwrite_then_sigkill(run)
    assert _kept(run) != before  # the killed run's own folder took its place
    res = runner.invoke(app, ["resume", str(run), "--threads", "1"])
    assert res.exit_code == 0, res.output
    assert "restored" in res.output
    assert _kept(run) == before and not _asides(run)  # the old run, whole; not the new config resumed


def test_a_run_set_aside_where_no_new_folder_was_made_is_restored(finished, tmp_path):
    run = _copy(finished, tmp_path / "run")
    before = _kept(run)
    os.rename(run, run.with_name(f".{run.name}.replaced-1-2"))  # killed between the rename and the new folder
    res = runner.invoke(app, ["report", str(run)])
    assert res.exit_code == 0, res.output
    assert _kept(run) == before and not _asides(run)


def test_a_set_aside_run_after_the_new_run_started_is_named_not_hidden(finished, tmp_path):
    run = _copy(finished, tmp_path / "run")
    _overwrite_then_sigkill(run, checkpoint=True)  # the new run was under way: which one to keep is the user's call
    aside = _asides(run)[0]
    for args in (["resume", str(run)], ["run", "synthetic", "--out", str(run), "--overwrite"]):
        out = _one_line_error(runner.invoke(app, args))
        assert str(aside) in out and "rm -r" in out
    assert aside.is_dir() and (aside / "summary.json").is_file()


def test_the_message_after_a_rolled_back_overwrite_says_the_old_run_is_back(finished, tmp_path, monkeypatch):
    import metapt.jobs

    run = _copy(finished, tmp_path / "run")
    before = _kept(run)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(metapt.jobs, "execute", interrupted)
    res = _run(run, "--overwrite")
    out = _one_line_error(res, code=130)
    assert "back in" in out and "metapt resume" not in out
    assert _kept(run) == before and not _asides(run)


def test_rank_1_of_torchrun_does_not_say_nothing_was_kept(finished, tmp_path, monkeypatch):
    import contextlib
    import types

    import metapt.distributed
    import metapt.jobs

    run = _copy(finished, tmp_path / "run")
    ctx = types.SimpleNamespace(distributed=True, is_main=False, rank=1, world_size=2)
    monkeypatch.setattr(metapt.distributed, "launch", lambda *a, **k: contextlib.nullcontext(ctx))
    monkeypatch.setattr(metapt.distributed, "on_main", lambda ctx, fn: str(run))  # rank 0 made the folder

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(metapt.jobs, "execute", interrupted)
    out = _one_line_error(_run(tmp_path / "unused"), code=130)
    assert "nothing was kept" not in out and f"metapt resume {run}" in out


# ---- silently wrong ---------------------------------------------------------------------------------


def test_an_lr_groups_key_matching_no_phi_entry_is_an_error_naming_them(tmp_path):
    out = _one_line_error(_run(tmp_path / "run", "--set", "meta.lr_groups={foo: 2}"))
    assert "'foo'" in out and "task_logits" in out
    assert not (tmp_path / "run").exists()


def test_lr_groups_keys_that_match_or_are_the_jobs_defaults_are_accepted():
    from metapt.schema import MetaConfig

    meta = MetaConfig(lr_groups={"task": 0.1, "band_noise": 0.03})
    meta.check_lr_groups(["task_logits"], exempt={"band_noise": 0.03})  # the ECG default names an opt-in method's φ
    with pytest.raises(ValueError, match="'band_noise'.*task_logits"):
        meta.check_lr_groups(["task_logits"])


def test_computing_a_lost_phase_again_does_not_log_its_rows_twice(finished, tmp_path):
    import torch

    run = _copy(finished, tmp_path / "run")
    before = (run / "metrics.jsonl").read_bytes()
    lost = [p for p in (run / "results").iterdir()
            if torch.load(p, weights_only=True)["key"].endswith("meta_task_weights")]
    assert len(lost) == 1
    lost[0].unlink()
    res = runner.invoke(app, ["resume", str(run), "--threads", "1"])
    assert res.exit_code == 0, res.output
    assert "computed again" in res.output
    assert (run / "metrics.jsonl").read_bytes() == before  # as the uninterrupted run's


# ---- user errors: one line, exit status 2 -------------------------------------------------------------


@pytest.mark.parametrize("text", ["job: synthetic\x00\n", "job: synthetic\npretrain:\n  steps: 5\x07\n",
                                  "job: synthetic\n# \ufffe\n"])
def test_control_characters_in_a_config_file_are_one_line(tmp_path, text):
    (tmp_path / "c.yaml").write_text(text, encoding="utf-8")
    assert "not valid YAML" in _one_line_error(runner.invoke(app, ["config", str(tmp_path / "c.yaml")]))


def test_an_undecodable_byte_in_set_is_one_line():
    assert "not valid YAML" in _one_line_error(runner.invoke(app, ["config", "synthetic", "--set", "pretrain.steps=\udcff"]))


def test_a_nul_padded_config_yaml_on_resume_is_one_line(finished, tmp_path):
    run = _copy(finished, tmp_path / "run")
    with open(run / "config.yaml", "ab") as f:
        f.write(b"\x00" * 64)
    assert "not valid YAML" in _one_line_error(runner.invoke(app, ["resume", str(run)]))


@pytest.mark.parametrize("value", ["inf", "1e300"])
def test_an_infinite_peer_timeout_is_one_line(tmp_path, value):
    out = _one_line_error(_run(tmp_path / "run", "--peer-timeout", value))
    assert "--peer-timeout" in out and not (tmp_path / "run").exists()


@pytest.mark.parametrize("key", ["pretrain.seed", "problem.seed"])
def test_seeds_beyond_the_generators_range_are_config_errors(tmp_path, key):
    out = _one_line_error(_run(tmp_path / "run", "--set", f"{key}={2**63}"))
    assert key in out and not (tmp_path / "run").exists()


def test_out_paths_that_cannot_be_folders_are_one_line(tmp_path):
    (tmp_path / "file.txt").write_text("keep")
    for out in (tmp_path / ("a" * 300), tmp_path / "file.txt" / "run", Path("/proc/run")):
        assert "cannot make run folder" in _one_line_error(_run(out))
    assert (tmp_path / "file.txt").read_text() == "keep"


def test_overwrite_of_a_folder_that_cannot_be_moved_is_one_line(finished, tmp_path, monkeypatch):
    import errno

    run = _copy(finished, tmp_path / "run")
    before = _kept(run)
    real = os.rename

    def busy(src, dst, *args, **kwargs):
        if Path(src) == run:
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), str(src))
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "rename", busy)  # as for a mount point
    assert "mount point" in _one_line_error(_run(run, "--overwrite"))
    monkeypatch.undo()
    assert _kept(run) == before
    assert runner.invoke(app, ["resume", str(run), "--threads", "1"]).exit_code == 0  # its lock was let go


def test_a_lock_that_is_a_folder_is_one_line(finished, tmp_path):
    run = _copy(finished, tmp_path / "run")
    (run / ".metapt-lock").mkdir()
    assert ".metapt-lock" in _one_line_error(runner.invoke(app, ["resume", str(run)]))
    assert ".metapt-lock" in _one_line_error(_run(run, "--overwrite"))
    assert (run / "summary.json").is_file()


def test_a_file_where_the_tensorboard_folder_goes_is_one_line(finished, tmp_path):
    import torch

    run = _copy(finished, tmp_path / "run")
    shutil.rmtree(run / "tensorboard")
    (run / "tensorboard").write_text("not a folder")
    for p in (run / "results").iterdir():  # a phase to compute again, which logs to TensorBoard
        if torch.load(p, weights_only=True)["key"].endswith("meta_task_weights"):
            p.unlink()
    assert "tensorboard" in _one_line_error(runner.invoke(app, ["resume", str(run), "--threads", "1"]))


def test_diagnose_after_a_shape_changing_edit_is_refused_as_resume_does(finished, tmp_path):
    import yaml

    run = _copy(finished, tmp_path / "run")
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["problem"]["dim"] = 16
    (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    out = _one_line_error(runner.invoke(app, ["diagnose", str(run), "--directions", "0", "--threads", "1"]))
    assert "problem.dim" in out and "edited" in out


def _beat_record(folder: Path, name: str, seed: int, pvc_every: int = 4) -> None:
    import warnings

    import numpy as np
    import pandas as pd

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import wfdb

    fs, n = 360, 20 * 360
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    centres = np.arange(200, n - 200, 280)
    pvc = (np.arange(len(centres)) % pvc_every == 1).astype(int) if pvc_every else np.zeros(len(centres), int)
    sig = 0.05 * rng.standard_normal(n)
    for c, p in zip(centres, pvc):
        sig += (-1.5 if p else 2.0) * np.exp(-0.5 * ((t - c) / (12.0 if p else 4.0)) ** 2)
    wfdb.wrsamp(name, fs=fs, units=["mV"], sig_name=["MLII"], p_signal=sig[:, None], fmt=["16"], write_dir=str(folder))
    pd.DataFrame({"sample": centres, "pvc": pvc}).to_csv(folder / f"{name}_beats.csv", index=False)


@pytest.mark.parametrize("records,pvc_every", [(1, 4), (6, 0)])
def test_ecg_data_that_cannot_be_split_is_a_data_error(tmp_path, records, pvc_every):
    data = tmp_path / "data"
    data.mkdir()
    for i in range(records):
        _beat_record(data, f"{100 + i}", seed=i, pvc_every=pvc_every)
    res = runner.invoke(app, ["run", "ecg-quick", "--data", str(data), "--out", str(tmp_path / "run"), "--threads", "1"])
    assert "records" in _one_line_error(res)
    assert not (tmp_path / "run").exists()


# ---- minor -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["pretrain.steps", "meta.warmup_steps", "checkpoint.every", "pretrain.batch_size"])
def test_sizes_are_bounded_like_evaluation_seeds(key):
    out = _one_line_error(runner.invoke(app, ["config", "synthetic", "--set", f"{key}={10**26}"]))
    assert key in out and "less than or equal" in out


def _long_run(out: Path, prelude: str = "") -> subprocess.Popen:
    code = (f"import sys\n{prelude}\nfrom metapt.cli import main\n"
            "sys.argv = ['metapt', *sys.argv[1:]]\nmain()\n")
    return subprocess.Popen([sys.executable, "-c", code, "run", "synthetic", "--out", str(out), "--set",
                             "pretrain.steps=1000000", "--set", "checkpoint.every=20", "--threads", "1"],
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _wait_for_checkpoint(out: Path, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not RunFolder(out).checkpoints():
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_a_second_signal_after_the_stop_message_keeps_exit_status_143(tmp_path):
    import signal

    out = tmp_path / "run"
    proc = _long_run(out, "import atexit, time; atexit.register(time.sleep, 3)")  # a slow exit, as torch's can be
    try:
        _wait_for_checkpoint(out, proc)
        proc.send_signal(signal.SIGTERM)
        lines = []
        for line in proc.stderr:  # the stop message is out: the process is on its way to exit
            lines.append(line)
            if line.startswith("error:"):
                break
        proc.send_signal(signal.SIGTERM)
        rest = proc.communicate(timeout=60)[1]
    finally:
        proc.kill()
    assert proc.returncode == 143, "".join(lines) + rest
    assert "terminated (SIGTERM)" in "".join(lines)


def test_sigquit_prints_every_threads_stack_and_the_run_goes_on(tmp_path):
    import signal
    import time

    out = tmp_path / "run"
    proc = _long_run(out)
    try:
        _wait_for_checkpoint(out, proc)
        proc.send_signal(signal.SIGQUIT)
        time.sleep(1.0)
        assert proc.poll() is None  # still running
        proc.send_signal(signal.SIGTERM)
        err = proc.communicate(timeout=60)[1]
    finally:
        proc.kill()
    assert proc.returncode == 143, err
    assert "most recent call first" in err and 'File "' in err
