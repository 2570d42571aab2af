"""Nothing lost, nothing silently wrong: run-folder safety and every bad input a clear error.

Processes, locks and signals are tested with real ``metapt`` processes on the synthetic preset
with a few steps; the rest through the CLI in-process or the run-folder API.
"""

from __future__ import annotations

import json
import re
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from metapt import cli
from metapt.cli import app
from metapt.config import ConfigError, load_config
from metapt.errors import RunFolderError, UserError
from run_folders import copy_run as _copy
from metapt.metrics import JsonlLogger, read_jsonl
from metapt.atomic import write_json_atomic
from metapt.runs import MARKER, RunFolder
from metapt.session import Session

runner = CliRunner()
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
FAST = ["--set", "pretrain.steps=60", "--set", "checkpoint.every=20", "--set", "meta.warmup_steps=10", "--threads", "1"]


def _one_line_error(res, code: int = 2) -> str:
    assert res.exit_code == code, res.output
    assert "Traceback" not in res.output
    assert len([line for line in res.output.splitlines() if line.startswith("error:")]) == 1, res.output
    return res.output


def _run(out: Path, *extra: str):
    return runner.invoke(app, ["run", "synthetic", "--out", str(out), *FAST, *extra])


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("safety") / "done"
    res = _run(out)
    assert res.exit_code == 0, res.output
    return out


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()
            and p.name != ".metapt-lock"}


# ---- --overwrite deletes only run folders, and only once the new run is under way -----------------


def test_overwrite_refuses_a_folder_that_is_not_a_run(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("years of work")
    out = _one_line_error(_run(tmp_path / "mine", "--overwrite"))
    assert "not a metapt run folder" in out
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "years of work"
    (tmp_path / "file.txt").write_text("keep")
    assert "not a folder" in _one_line_error(_run(tmp_path / "file.txt", "--overwrite"))
    assert (tmp_path / "file.txt").read_text() == "keep"


def test_overwrite_of_the_working_directory_is_refused(tmp_path, monkeypatch):
    (tmp_path / "notes.txt").write_text("keep")
    (tmp_path / MARKER).write_text("a run folder, even")
    monkeypatch.chdir(tmp_path)
    assert "working directory" in _one_line_error(_run(Path("."), "--overwrite"))
    assert (tmp_path / "notes.txt").read_text() == "keep"


def test_overwrite_through_a_symlink_is_refused(finished, tmp_path):
    run = _copy(finished, tmp_path / "run")
    (tmp_path / "link").symlink_to(run)
    before = _tree(run)
    assert "symbolic link" in _one_line_error(_run(tmp_path / "link", "--overwrite"))
    assert _tree(run) == before


def test_overwrite_keeps_the_old_run_when_the_new_one_cannot_start(finished, tmp_path):
    run = _copy(finished, tmp_path / "run")
    before = _tree(run)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "100.hea").write_text("not a WFDB header\n")
    res = runner.invoke(app, ["run", "ecg-quick", "--data", str(tmp_path / "data"), "--out", str(run), "--overwrite"])
    _one_line_error(res)
    assert _tree(run) == before  # the finished run is back, untouched
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # nothing left aside
    res = _run(run, "--overwrite")  # a new run that starts does replace it
    assert res.exit_code == 0, res.output
    assert not [p for p in tmp_path.iterdir() if ".replaced-" in p.name]


# ---- one process owns a run folder ---------------------------------------------------------------


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "metapt", *args]


def _wait_for(cond, proc, timeout=120.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_a_second_process_is_refused_while_a_run_owns_the_folder(tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen(_cli("run", "synthetic", "--out", str(out), "--set", "pretrain.steps=1000000",
                                  "--set", "checkpoint.every=50", "--threads", "1"),
                             env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: len(RunFolder(out).checkpoints()) >= 1, first)
        for args in (["resume", str(out)], ["run", "synthetic", "--out", str(out), "--overwrite"]):
            second = subprocess.run(_cli(*args, "--threads", "1"), env=ENV, capture_output=True, text=True, timeout=120)
            assert second.returncode == 2, second.stdout + second.stderr
            assert "in use by another metapt process" in second.stderr and f"pid {first.pid}" in second.stderr
            assert first.poll() is None  # the first run was left alone
    finally:  # SIGTERM's own behaviour is test_sigterm_stops_like_ctrl_c_and_the_run_resumes
        first.kill()
        first.communicate(timeout=60)
    text = (out / "metrics.jsonl").read_text()
    rows = [json.loads(line) for line in text[: text.rfind("\n") + 1].splitlines()]  # a SIGKILL may cut the last
    assert len(rows) == len({(r["phase"], r["step"]) for r in rows}) > 0  # one writer: every (phase, step) once


def test_sigterm_stops_like_ctrl_c_and_the_run_resumes(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(_cli("run", "synthetic", "--out", str(out), "--set", "pretrain.steps=1000000",
                                 "--set", "checkpoint.every=50", "--threads", "1"),
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: len(RunFolder(out).checkpoints()) >= 1, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "terminated (SIGTERM)" in err and f"metapt resume {out}" in err
    state = RunFolder(out).latest_checkpoint()
    assert state is not None and state["phase"] is not None  # mid-phase: resumable from there


# ---- resume refuses what it cannot continue exactly -------------------------------------------


def test_resume_refuses_an_edited_config_naming_the_keys(finished, tmp_path):
    run = _copy(finished, tmp_path / "run")
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["pretrain"]["steps"], config["checkpoint"]["keep"] = 50, 7
    (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    before = _tree(run)
    out = _one_line_error(runner.invoke(app, ["resume", str(run)]))
    assert "checkpoint.keep (3 → 7)" in out and "pretrain.steps (60 → 50)" in out and "--allow-change" in out
    assert _tree(run) == before
    out = _one_line_error(runner.invoke(app, ["resume", str(run), "--allow-change", "pretrain.steps"]))
    assert "checkpoint.keep" in out and "pretrain.steps (" not in out


def test_resume_after_a_shape_changing_edit_is_one_line(tmp_path):
    out = tmp_path / "run"  # stops mid-phase (non-finite loss) with a good checkpoint
    _one_line_error(runner.invoke(app, ["run", "synthetic", "--out", str(out), "--set", "pretrain.lr=4e8",
                                        "--set", "checkpoint.every=1", "--threads", "1"]), code=3)
    config = yaml.safe_load((out / "config.yaml").read_text())
    config["problem"]["dim"] = 16
    (out / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    text = _one_line_error(runner.invoke(app, ["resume", str(out), "--allow-change", "problem.dim"]))
    assert "does not fit this run's model" in text


def test_resume_with_no_readable_checkpoint_refuses_and_deletes_nothing(finished, tmp_path):
    run = _copy(finished, tmp_path / "run")
    for path in RunFolder(run).checkpoints():
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    before = _tree(run)
    out = _one_line_error(runner.invoke(app, ["resume", str(run)]))
    assert "can be read" in out and "refusing" in out
    assert _tree(run) == before


def test_a_foreign_checkpoint_file_is_skipped_not_a_traceback(finished, tmp_path):
    run = _copy(finished, tmp_path / "run")
    for path in RunFolder(run).checkpoints():
        path.unlink()
    torch.save([1, 2, 3], run / "checkpoints" / "ckpt-000099.pt")  # loadable, not metapt's
    res = runner.invoke(app, ["resume", str(run)])
    assert "refusing" in _one_line_error(res) and "skipping checkpoint" in res.output


def test_a_flipped_bit_is_caught_by_the_checksum(tmp_path):
    folder = RunFolder.create(tmp_path / "run", "job: synthetic\n")
    session = Session(folder)
    session.record("a", {"x": torch.ones(4)})
    session.record("b", {"x": torch.full((1000,), 2.0)})
    session.close()
    newest = folder.checkpoints()[-1]
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit, inside the file
    newest.write_bytes(bytes(data))
    state = folder.latest_checkpoint()
    assert set(state["results"]) == {"a"}  # the previous checkpoint, not the damaged one
    result = folder.results_dir / state["results"]["a"][0]
    raw = bytearray(result.read_bytes())
    raw[-30] ^= 0x01
    result.write_bytes(bytes(raw))
    assert folder.load_results(state["results"]) == {}  # a damaged result is recomputed, not used


def test_resume_refuses_a_different_process_count_between_phases(tmp_path):
    folder = RunFolder.create(tmp_path / "run", "job: synthetic\n")
    session = Session(folder)
    session.record("phase-1", {"x": torch.ones(2)})  # the newest checkpoint falls between phases
    session.close()
    path = folder.checkpoints()[-1]
    state = torch.load(path, weights_only=True)
    state["rng"] = state["rng"] * 2  # written by 2 processes
    path.unlink()
    folder.save_checkpoint(state, state["number"], 3)
    with pytest.raises(RunFolderError, match="written by 2 process"):
        Session(folder, resume=True)


def test_resume_refuses_a_metrics_file_shorter_than_recorded(finished, tmp_path):
    run = _copy(finished, tmp_path / "run")
    metrics = run / "metrics.jsonl"
    metrics.write_bytes(metrics.read_bytes()[:1000])
    out = _one_line_error(runner.invoke(app, ["resume", str(run)]))
    assert "metrics.jsonl" in out and "cut short" in out
    assert b"\0" not in metrics.read_bytes() and len(metrics.read_bytes()) == 1000


def test_metrics_are_fsynced_before_a_checkpoint_records_their_length(tmp_path, monkeypatch):
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real(fd)))
    log = JsonlLogger(tmp_path / "metrics.jsonl")
    log.log(1, {"loss": 1.0})
    log.flush()
    assert log._file.fileno() in synced
    log.close()


def test_a_fresh_session_never_prunes_checkpoints_it_did_not_write(tmp_path):
    folder = RunFolder.create(tmp_path / "run", "job: synthetic\n")
    first = Session(folder)
    for i in range(3):
        first.record(f"r{i}", i)
    first.close()
    kept = folder.checkpoints()
    with pytest.raises(RunFolderError, match="already has checkpoints"):
        Session(folder)
    assert folder.checkpoints() == kept


def test_the_checkpoint_left_after_a_non_finite_loss_can_go_on(tmp_path):
    out = tmp_path / "run"
    res = runner.invoke(app, ["run", "synthetic", "--out", str(out), "--set", "pretrain.lr=1e30",
                              "--set", "checkpoint.every=1", "--set", "checkpoint.keep=1000", "--threads", "1"])
    assert res.exit_code == 3, res.output
    from metapt.session import _finite

    assert all(_finite(torch.load(p, weights_only=True)["trainer"]) for p in RunFolder(out).checkpoints())
    config = yaml.safe_load((out / "config.yaml").read_text())
    config["pretrain"]["lr"] = 0.01  # the fix the message asks for ...
    (out / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    res = runner.invoke(app, ["resume", str(out), "--allow-change", "pretrain.lr"])
    assert res.exit_code == 0, res.output  # ... works: the newest checkpoint is not the diverged model


def test_non_finite_loss_without_a_checkpoint_does_not_promise_one(tmp_path):
    out = tmp_path / "run"
    res = runner.invoke(app, ["run", "synthetic", "--out", str(out), "--set", "pretrain.lr=1e30", "--threads", "1"])
    text = _one_line_error(res, code=3)
    assert "No checkpoint had been written; nothing was kept" in text and "last good checkpoint" not in text
    assert not out.exists()  # a run that failed before its first checkpoint leaves nothing to block a rerun


# ---- results are written once, apart from the live checkpoint ---------------------------------


def test_each_result_is_written_once_to_its_own_file(tmp_path):
    folder = RunFolder.create(tmp_path / "run", "job: synthetic\n")
    session = Session(folder)
    big = torch.zeros(200_000)
    session.record("pretrain/a", {"params": big})
    first = next(folder.results_dir.iterdir())
    stamp = first.stat().st_mtime_ns, first.stat().st_ino
    for i in range(5):
        session.record(f"eval/{i}", {"auroc": 0.5 + i / 100})
    session.close()
    assert (first.stat().st_mtime_ns, first.stat().st_ino) == stamp  # never rewritten
    assert len(list(folder.results_dir.iterdir())) == 6
    assert all(p.stat().st_size < 100_000 for p in folder.checkpoints())  # the checkpoint indexes, not copies
    resumed = Session(folder, resume=True)
    assert torch.equal(resumed["pretrain/a"]["params"], big) and resumed["eval/4"] == {"auroc": 0.54}
    resumed.close()


def test_wall_seconds_count_every_session(tmp_path):
    folder = RunFolder.create(tmp_path / "run", "job: synthetic\n")
    session = Session(folder)
    time.sleep(0.3)
    session.record("a", 1)
    session.close()
    resumed = Session(folder, resume=True)
    assert resumed.wall_seconds >= 0.3
    resumed.close()


def test_summaries_are_strict_json(tmp_path):
    write_json_atomic(tmp_path / "summary.json", {"auroc": float("nan"), "scores": [1.0, float("inf")]})
    assert json.loads((tmp_path / "summary.json").read_text(), parse_constant=pytest.fail) == \
        {"auroc": None, "scores": [1.0, None]}


# ---- user errors are one line; bugs are crashes -----------------------------------------------


def test_an_internal_value_error_is_a_crash_not_a_user_error(monkeypatch, tmp_path):
    import metapt.config

    def broken(*args, **kwargs):
        raise ValueError("a bug inside metapt")

    monkeypatch.setattr(metapt.config, "load_config", broken)
    res = runner.invoke(app, ["run", "synthetic", "--out", str(tmp_path / "r")])
    assert res.exit_code == 1 and isinstance(res.exception, ValueError)
    assert "error:" not in res.output


def test_debug_keeps_the_type_of_a_user_error(tmp_path):
    res = runner.invoke(app, ["run", "synthetic", "--set", "stepz=1", "--debug", "--out", str(tmp_path / "r")])
    assert isinstance(res.exception, ConfigError) and isinstance(res.exception, UserError)


def test_a_full_disk_is_one_line(tmp_path, monkeypatch):
    import errno

    import metapt.session

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "run" / "results" / "x.pt"))

    monkeypatch.setattr(metapt.session, "save_bytes", full)
    text = _one_line_error(_run(tmp_path / "run"))
    assert "No space left on device" in text


def test_threads_are_capped_at_the_machines_cpus(monkeypatch):
    asked = []
    monkeypatch.setattr(torch, "set_num_threads", asked.append)
    cli._threads(100_000)
    assert asked and asked[0] <= (os.cpu_count() or 1)


def test_run_folder_messages_say_what_is_wrong(tmp_path):
    (tmp_path / "file").write_text("x")
    assert "is not a folder" in _one_line_error(runner.invoke(app, ["resume", str(tmp_path / "file")]))
    fifo = tmp_path / "pipe.yaml"
    os.mkfifo(fifo)
    assert "not a regular file" in _one_line_error(runner.invoke(app, ["config", str(fifo)]))  # and no hang


def test_compare_out_a_folder_and_report_on_a_foreign_summary(finished, tmp_path):
    assert "is a folder" in _one_line_error(runner.invoke(app, ["compare", str(finished), str(finished),
                                                                "--out", str(tmp_path)]))
    run = _copy(finished, tmp_path / "run")
    (run / "summary.json").write_text("[1, 2]")
    assert "not a metapt summary" in _one_line_error(runner.invoke(app, ["report", str(run)]))
    (run / "summary.json").write_text(json.dumps({"config": {"job": "molecules"}}))
    assert "summary of a 'molecules' run" in _one_line_error(runner.invoke(app, ["report", str(run)]))
    (run / "summary.json").write_text("{not json")
    assert "summary.json is not valid JSON" in _one_line_error(runner.invoke(app, ["report", str(run)]))


def test_a_damaged_metrics_line_names_the_file_and_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"step": 1}\n\0\0\0\n')
    with pytest.raises(UserError, match=r"metrics.jsonl, line 2: not valid JSON"):
        read_jsonl(path)


# ---- eval and stored paths --------------------------------------------------------------------


def _fake_molecules_run(tmp_path) -> Path:
    from metapt.config import to_yaml

    run = RunFolder.create(tmp_path / "mol", to_yaml(load_config("molecules-test")))
    run.unlock()
    (run.path / "summary.json").write_text(json.dumps({"config": {"job": "molecules"}}))
    return run.path


def test_eval_changes_config_yaml_only_when_it_succeeds(tmp_path, monkeypatch):
    import metapt.jobs

    run = _fake_molecules_run(tmp_path)
    before = (run / "config.yaml").read_text()

    def fails(*args, **kwargs):
        raise RunFolderError("the evaluation failed")

    monkeypatch.setattr(metapt.jobs, "execute", fails)
    _one_line_error(runner.invoke(app, ["eval", str(run), "--set", "evaluation.seeds=3"]))
    assert (run / "config.yaml").read_text() == before
    seen = {}
    monkeypatch.setattr(metapt.jobs, "execute", lambda folder, config, **kw: seen.update(config=config, folder=folder))
    monkeypatch.setattr(cli, "_finish", lambda *a, **k: None)
    res = runner.invoke(app, ["eval", str(run), "--set", "evaluation.seeds=3"])
    assert res.exit_code == 0, res.output
    assert seen["config"].evaluation.seeds == 3 and seen["folder"].allow_changes == ("evaluation",)
    assert yaml.safe_load((run / "config.yaml").read_text())["evaluation"]["seeds"] == 3


def test_a_relative_data_folder_is_stored_resolved(tmp_path, monkeypatch):
    import metapt.jobs

    (tmp_path / "records").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(metapt.jobs, "execute", lambda folder, config, **kw: RunFolder.commit(folder))
    monkeypatch.setattr(cli, "_finish", lambda *a, **k: None)
    res = runner.invoke(app, ["run", "ecg-quick", "--data", "records", "--out", str(tmp_path / "r")])
    assert res.exit_code == 0, res.output
    assert yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())["data_dir"] == str(tmp_path / "records")


def test_loading_a_trainer_state_copies_the_optimiser_moments():
    from metapt import MetaPretrainer
    from metapt.domains.synthetic.problem import SyntheticTaskWeighting

    def trainer():
        problem = SyntheticTaskWeighting(load_config("synthetic").problem)
        return MetaPretrainer(problem, problem.initial_params(), problem.initial_head(), problem.initial_metaparams(),
                              pt_optimizer=lambda ps: torch.optim.Adam(ps, lr=0.01),
                              meta_optimizer=lambda ps: torch.optim.Adam(ps, lr=0.01))

    source = trainer()
    source.run_until(3)
    state = source.state_dict()
    moments = {k: v.clone() for k, v in state["pt_opt"]["state"][0].items()}
    loaded = trainer()
    loaded.load_state_dict(state)
    loaded.run_until(6)  # training after the load must not write into the dict it was given
    for name, value in state["pt_opt"]["state"][0].items():
        assert torch.equal(value, moments[name]), name


@pytest.mark.parametrize("override, expected", [
    ("problem.dim=0", "problem.dim: Input should be greater than or equal to 1"),
    ("problem.dim=-1", "problem.dim: Input should be greater than or equal to 1"),
    ("problem.subspace=0", "problem.subspace: Input should be greater than or equal to 1"),
    ("problem.subspace=40", "subspace (40) must be at most dim (32)"),
    ("problem.test_examples=1000000000", "the synthetic problem is capped at"),
])
def test_synthetic_problem_sizes_are_checked_before_anything_runs(override, expected):
    with pytest.raises(ConfigError, match=re.escape(expected)):
        load_config("synthetic", [override])


def test_an_empty_molecules_csv_is_a_data_error(tmp_path):
    from metapt.domains.molecules.data import load_chembl_pretraining
    from metapt.errors import DataError

    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(DataError, match="empty.csv is empty"):
        load_chembl_pretraining(tmp_path / "empty.csv")


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the rank-1 worker through /proc")
def test_a_stalled_torchrun_peer_stops_the_run_with_a_message(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "metapt",
           "run", "synthetic", "--out", str(out), "--threads", "1", "--peer-timeout", "0.1",  # 6 s
           "--set", "pretrain.steps=1000000", "--set", "checkpoint.every=20"]
    agent = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    rank0 = rank1 = None
    try:
        _wait_for(lambda: len(RunFolder(out).checkpoints()) >= 1, agent)

        def find_rank(rank: int):
            for pid in filter(str.isdigit, os.listdir("/proc")):
                try:
                    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                except OSError:
                    continue
                if f"RANK={rank}".encode() in environ and str(out).encode() in cmdline:
                    return int(pid)
            return None

        def alive(pid: int) -> bool:
            try:
                return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] not in "ZX"
            except (OSError, IndexError):
                return False

        rank0, rank1 = find_rank(0), find_rank(1)
        assert rank0 is not None and rank1 is not None
        os.kill(rank1, signal.SIGSTOP)  # a peer that stops answering (stalled, swapped out, SIGSTOP)
        started = time.monotonic()
        while alive(rank0):  # rank 0 gives up after --peer-timeout, not torch's 30 min nor the old 12 h
            assert time.monotonic() - started < 60, "rank 0 still waits for its stalled peer"
            time.sleep(0.1)
        os.kill(rank1, signal.SIGKILL)
        _, err = agent.communicate(timeout=60)
    finally:
        if rank1 is not None:
            try:
                os.kill(rank1, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if agent.poll() is None:
            agent.kill()
    assert agent.returncode != 0
    assert "another process of this torchrun job stopped responding" in err and f"metapt resume {out}" in err


def test_error_messages_with_brackets_are_printed_as_text():
    res = runner.invoke(app, ["config", "[/oops]"])  # rich markup would read [/oops] as a closing tag
    assert "no config file or preset named '[/oops]'" in _one_line_error(res)
    res = runner.invoke(app, ["config", "synthetic", "--set", "methods=[bold]"])
    assert "(got 'bold')" in _one_line_error(res) or "[bold]" in res.output


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the swallowing, on purpose
def test_a_stop_signal_whose_exception_was_swallowed_still_stops_the_run(tmp_path):
    """Python raises a signal handler's exception wherever the main thread is; inside a __del__ or
    a GC callback it is printed and dropped. The run must still stop, at its next step."""
    import gc

    from metapt import MetaPretrainer
    from metapt.domains.synthetic.problem import SyntheticTaskWeighting
    from metapt.errors import Interrupted, on_stop_signal, reset_stop

    class Victim:
        def __del__(self):
            on_stop_signal(signal.SIGTERM)  # the handler runs here; its exception is swallowed

    problem = SyntheticTaskWeighting(load_config("synthetic").problem)
    trainer = MetaPretrainer(problem, problem.initial_params(), problem.initial_head(), problem.initial_metaparams(),
                             pt_optimizer=lambda ps: torch.optim.Adam(ps, lr=0.01),
                             meta_optimizer=lambda ps: torch.optim.Adam(ps, lr=0.01))
    folder = RunFolder.create(tmp_path / "run", "job: synthetic\n")
    session = Session(folder)
    try:
        Victim()
        gc.collect()
        with pytest.raises(Interrupted) as err:
            session.train("phase", trainer, 50)
        assert err.value.signum == signal.SIGTERM and trainer.step == 1  # stopped at the first step, not the 50th
    finally:
        reset_stop()
        session.close()


def test_two_runs_racing_for_one_out_folder_cannot_both_start(tmp_path):
    from metapt.runs import lock_folder, unlock_folder

    out = tmp_path / "run"
    out.mkdir()  # the other run has made the folder and holds its lock, but written nothing yet
    key = lock_folder(out)
    try:
        lock = out / ".metapt-lock"
        other = subprocess.run([sys.executable, "-c", "import sys; from metapt.runs import RunFolder; "
                                "RunFolder.create(sys.argv[1], 'job: synthetic\\n')", str(out)],
                               env=ENV, capture_output=True, text=True, timeout=120)
        assert other.returncode != 0 and "in use by another metapt process" in other.stderr
        assert sorted(p.name for p in out.iterdir()) == [lock.name]  # the loser wrote and deleted nothing
    finally:
        unlock_folder(key)


def test_inside_a_run_a_stop_signal_waits_for_the_next_step_boundary():
    """Raised inside a library call (a TensorBoard writer's queue, a file write), the handler's
    exception can leave a lock held that the cleanup then waits on for ever: inside the run's
    loops the handler only records the signal, and check_stop raises it between two steps."""
    from metapt.errors import Interrupted, check_stop, deferred_stop, immediate_stop, on_stop_signal, reset_stop

    try:
        with deferred_stop():
            on_stop_signal(signal.SIGTERM)  # as if it landed in the middle of a write: no exception here
            with pytest.raises(Interrupted) as err:
                check_stop()
            assert err.value.signum == signal.SIGTERM
            reset_stop()
            with immediate_stop(), pytest.raises(Interrupted):  # loading data: it stops at once
                on_stop_signal(signal.SIGINT)
            reset_stop()
        with pytest.raises(Interrupted):  # outside a run, as before: at once
            on_stop_signal(signal.SIGINT)
    finally:
        reset_stop()
