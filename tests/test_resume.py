"""Exact resume: a run killed with SIGKILL at several moments, then resumed, ends bitwise identical
to an uninterrupted run; checkpoints are atomic, pruned and loadable with weights_only=True."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from metapt.atomic import atomic_path
from metapt.rng import capture_rng, restore_rng
from metapt.runs import RunFolder, RunFolderError
from metapt.session import Session

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "metapt", *args, "--threads", "1"]


def _lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def _newest_checkpoint(folder: Path) -> int:
    found = sorted((folder / "checkpoints").glob("ckpt-*.pt")) if (folder / "checkpoints").is_dir() else []
    return int(found[-1].stem.split("-")[1]) if found else 0


def _run_and_kill(cmd: list[str], when, timeout: float = 240) -> bool:
    """Start ``cmd``; SIGKILL it as soon as ``when()`` holds. True if it was killed, False if it finished."""
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        if when():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"{cmd} did not finish in {timeout} s")
        time.sleep(0.005)
    assert proc.returncode == 0, proc.stderr.read().decode()
    return False


def _finish(cmd: list[str]) -> None:
    res = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr


def _final_state(folder: Path) -> dict:
    run = RunFolder(folder)
    state = run.latest_checkpoint()
    assert state is not None and state["phase"] is None  # the last checkpoint closes the run
    results = run.load_results(state["results"])
    assert results.keys() == state["results"].keys()  # every indexed result file is there and intact
    return results


def _newest_state(folder: Path) -> dict:
    state = RunFolder(folder).latest_checkpoint()
    assert state is not None
    return state


def _summary(folder: Path) -> dict:
    summary = json.loads((folder / "summary.json").read_text())
    summary.pop("wall_seconds")
    return summary


def _assert_same_run(a: Path, b: Path) -> None:
    assert _summary(a) == _summary(b)
    assert (a / "metrics.jsonl").read_bytes() == (b / "metrics.jsonl").read_bytes()
    ra, rb = _final_state(a), _final_state(b)
    assert ra.keys() == rb.keys()
    for key in ra:
        for group in ("params", "metaparams"):
            if isinstance(ra[key], dict) and group in ra[key]:
                for name, tensor in ra[key][group].items():
                    assert torch.equal(tensor, rb[key][group][name]), (key, group, name)


def test_synthetic_run_killed_four_times_resumes_bitwise(tmp_path):
    overrides = ["--set", "pretrain.steps=120", "--set", "checkpoint.every=25", "--set", "meta.warmup_steps=20"]
    ref, run = tmp_path / "reference", tmp_path / "killed"
    _finish(_cli("run", "synthetic", "--out", str(ref), *overrides))
    total = _lines(ref / "metrics.jsonl")
    assert total == 240
    # the preset's meta-learning settings with only the overridden key changed (an override used to
    # rebuild the whole meta section from the class defaults: interval 10, lr 0.05, solver M=1)
    import yaml

    from metapt.config import load_config, to_yaml

    ran, preset = yaml.safe_load((ref / "config.yaml").read_text()), yaml.safe_load(to_yaml(load_config("synthetic")))
    assert ran["meta"] == {**preset["meta"], "warmup_steps": 20} and ran["meta"]["interval"] == 5
    assert ran["checkpoint"] == {**preset["checkpoint"], "every": 25}

    # before the first checkpoint, just after one (mid-phase), in the second phase, right at the end;
    # each kill must happen (a run that finished first would make the test vacuous) and where meant
    lines = lambda: _lines(run / "metrics.jsonl")  # noqa: E731
    assert _run_and_kill(_cli("run", "synthetic", "--out", str(run), *overrides), lambda: lines() >= 3), \
        "the run finished before the first kill point"
    # killed early in the first phase: before its first checkpoint (step 25), or, when the process ran
    # ahead of the kill (a synthetic step takes about a millisecond), right after it
    if _newest_checkpoint(run):
        first = _newest_state(run)
        assert first["phase"] == "synthetic/uniform" and first["trainer"]["counters"]["step"] <= 25, \
            "the first kill came later than the first checkpoint of the first phase"
    assert _run_and_kill(_cli("resume", str(run)), lambda: _newest_checkpoint(run) >= 2 and lines() >= 60), \
        "kill 2 did not happen"
    assert _newest_state(run)["phase"] == "synthetic/uniform"  # mid-phase
    assert _run_and_kill(_cli("resume", str(run)), lambda: lines() >= 170), "kill 3 did not happen"
    assert _newest_state(run)["phase"] == "synthetic/meta_task_weights"  # in the second phase
    assert _run_and_kill(_cli("resume", str(run)), lambda: lines() >= total - 3), "kill 4 did not happen"
    assert not (run / "summary.json").exists()  # before the run could finish
    _finish(_cli("resume", str(run)))
    _assert_same_run(ref, run)
    assert len(list((run / "checkpoints").glob("ckpt-*.pt"))) <= 3  # checkpoint.keep
    assert not list((run / "checkpoints").glob("*.tmp"))


def test_molecules_run_killed_in_pretraining_and_in_evaluation_resumes_bitwise(tmp_path):
    ref, run = tmp_path / "reference", tmp_path / "killed"
    dropout = ["--set", "model.dropout=0.2"]  # dropout draws from torch's RNG: its state must be restored
    _finish(_cli("run", "molecules-test", "--out", str(ref), *dropout))
    import yaml

    model = yaml.safe_load((ref / "config.yaml").read_text())["model"]  # the preset's tiny GIN, not the default 3x64
    assert (model["num_layers"], model["emb_dim"], model["dropout"]) == (2, 16, 0.2)
    pt_rows = _lines(ref / "metrics.jsonl")
    # mid-way through the second method's pre-training, then during the fine-tuning evaluations
    assert _run_and_kill(_cli("run", "molecules-test", "--out", str(run), *dropout),
                         lambda: _lines(run / "metrics.jsonl") >= 45), "the pre-training kill did not happen"
    assert _newest_state(run)["phase"] is not None  # killed mid-phase
    evaluations_started = _newest_checkpoint(ref)  # every evaluation unit is one checkpoint
    assert _run_and_kill(_cli("resume", str(run)), lambda: _lines(run / "metrics.jsonl") >= pt_rows
                         and _newest_checkpoint(run) >= evaluations_started - 4), "the evaluation kill did not happen"
    assert any(k.startswith("eval/") for k in _newest_state(run)["results"])  # during the evaluations
    assert not (run / "summary.json").exists()
    _finish(_cli("resume", str(run)))
    _assert_same_run(ref, run)


# ---- the pieces -------------------------------------------------------------------------------


def test_atomic_write_leaves_old_file_when_interrupted(tmp_path):
    target = tmp_path / "state.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half of the new")
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["state.txt"]


def test_rng_states_round_trip_through_a_weights_only_checkpoint(tmp_path):
    import random

    import numpy as np

    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    state = capture_rng()
    torch.save(state, tmp_path / "rng.pt")
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(99), np.random.seed(99), random.seed(99)
    restore_rng(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]


def test_existing_run_folder_is_refused_and_left_alone(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(RunFolderError, match="already exists"):
        RunFolder.create(tmp_path, "job: synthetic\n")
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    folder = RunFolder.create(tmp_path / "run", "job: synthetic\n")
    session = Session(folder)
    session.record("a", {"x": torch.ones(2)})
    session.record("b", {"x": torch.zeros(2)})
    session.close()
    newest = folder.checkpoints()[-1]
    newest.write_bytes(newest.read_bytes()[:20])  # a disk fault: truncated file
    state = folder.latest_checkpoint()
    assert set(state["results"]) == {"a"}
    assert torch.equal(folder.load_results(state["results"])["a"]["x"], torch.ones(2))


def test_resume_with_a_changed_config_is_refused(tmp_path):
    from metapt.domains.synthetic.job import SyntheticJob
    from metapt.jobs import execute
    from metapt.schema import PretrainConfig
    from metapt.session import Session as _Session

    folder = RunFolder.create(tmp_path / "run", "job: synthetic\n")
    job = SyntheticJob(pretrain=PretrainConfig(steps=30, lr=0.01, batch_size=32), meta={"warmup_steps": 5},
                       checkpoint={"every": 10})
    session = _Session(folder, job.checkpoint)
    session._save("renamed-phase", _trainer_for(job), None)  # a checkpoint from a differently named phase
    session.close()
    with pytest.raises(RunFolderError, match="configuration changed"):
        execute(folder, job, resume=True)


def test_a_run_folder_written_with_meta_solver_resumes(tmp_path):
    """A run folder made before ``meta.solver`` became ``meta.estimator`` (config.yaml and every
    checkpoint say ``solver:``) resumes, and so does one whose config.yaml was rewritten in the
    new spelling since (as ``metapt eval`` rewrites it); a real edit is still refused."""
    from metapt.config import load_config, to_yaml
    from metapt.jobs import execute, start

    config = load_config("synthetic", ["pretrain.steps=40", "checkpoint.every=10", "checkpoint.keep=50",
                                       "meta.warmup_steps=10", "methods=[uniform, meta_task_weights]",
                                       "evaluation.seeds=1"])
    ref = start(config, tmp_path / "ref")
    execute(ref, config)
    old_text = to_yaml(config).replace("\n  estimator:\n", "\n  solver:\n")
    assert "\n  solver:\n    kind: neumann\n" in old_text
    folder = RunFolder.create(tmp_path / "old", old_text)
    with pytest.warns(FutureWarning, match="meta.solver is deprecated"):
        old_config = load_config(folder.config_file)
    assert old_config == config
    execute(folder, old_config)
    folder.unlock()
    assert all("\n  solver:\n" in torch.load(p, weights_only=False)["config"] for p in folder.checkpoints())

    def back_to_mid_phase() -> None:  # the run as if killed 30 PT steps into its meta-learned phase
        states = [(p, torch.load(p, weights_only=False)) for p in RunFolder(tmp_path / "old").checkpoints()]
        keep = next(i for i, (_, s) in enumerate(states)
                    if s["phase"] == "synthetic/meta_task_weights" and s["trainer"]["counters"]["step"] == 30)
        assert "\n  solver:\n" in states[keep][1]["config"]  # made with the old spelling
        for path, _ in states[keep + 1:]:
            path.unlink()

    def resume(config_yaml: str) -> None:
        (tmp_path / "old" / "config.yaml").write_text(config_yaml)
        folder = RunFolder.open(tmp_path / "old")
        try:
            with pytest.warns(FutureWarning) if "solver:" in config_yaml else contextlib.nullcontext():
                resolved = load_config(folder.config_file)
            execute(folder, resolved, resume=True)
        finally:
            folder.unlock()

    back_to_mid_phase()
    resume(old_text)  # config.yaml as the old version wrote it
    _assert_same_run(tmp_path / "ref", tmp_path / "old")
    back_to_mid_phase()
    resume(to_yaml(config))  # config.yaml in the new spelling, checkpoints in the old
    _assert_same_run(tmp_path / "ref", tmp_path / "old")
    back_to_mid_phase()
    with pytest.raises(RunFolderError, match=r"meta\.estimator\.terms \(5 → 6\)"):
        resume(to_yaml(config).replace("terms: 5", "terms: 6"))


def _trainer_for(job):
    from metapt import MetaPretrainer
    from metapt.domains.synthetic.problem import SyntheticTaskWeighting

    problem = SyntheticTaskWeighting(job.problem)
    return MetaPretrainer(problem, problem.initial_params(), problem.initial_head(), problem.initial_metaparams(),
                          pt_optimizer=lambda ps: torch.optim.Adam(ps), meta_optimizer=lambda ps: torch.optim.Adam(ps))


def test_atomic_files_get_the_usual_permissions(tmp_path):
    umask = os.umask(0o022)
    os.umask(umask)
    with atomic_path(tmp_path / "summary.json") as tmp:
        tmp.write_text("{}")
    assert (tmp_path / "summary.json").stat().st_mode & 0o777 == 0o666 & ~umask
