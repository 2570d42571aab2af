"""`metapt diagnose` on an ECG run: a mid-phase checkpoint and a finished phase.

The ECG job learns φ with per-key learning rates (``meta.lr_groups``), so φ's optimiser has two
parameter groups: diagnostics must build its trainer as the run did (``runner.build_trainer``)
for the checkpoint's optimiser state to load.
"""

import math

import pytest

from metapt import run_diagnosis
from metapt.config import load_config
from metapt.diagnostics import DiagnoseOptions
from metapt.jobs import execute, start
from metapt.run_diagnosis import diagnose_run
from metapt.runs import RunFolder

from ecg_records import write_beat_folder

PHASE = "ecg/simclr_meta_warp"
OPTIONS = DiagnoseOptions(horizon=1, directions=1, epsilon=0.05, val_pairs=1, snr_samples=1, lanczos_steps=0)
#: of the compared estimators, the run's own (the ECG job's meta.estimator): what is tested here is the
#: rebuilt state, not the estimators (tests/test_diagnostics.py measures those); all eleven take minutes
KEPT = ("unrolled_T1",)


@pytest.fixture(autouse=True)
def _own_estimator_only(monkeypatch):
    every = run_diagnosis.default_estimators
    monkeypatch.setattr(run_diagnosis, "default_estimators",
                        lambda pt_lr, horizon: {k: v for k, v in every(pt_lr, horizon).items() if k in KEPT})


@pytest.fixture(scope="module")
def ecg_run(tmp_path_factory):
    """ecg-quick, the meta-warp method alone (12 PT steps, a meta-step at steps 6, 9 and 12), a
    checkpoint at PT step 6 kept; evaluation cut to one linear-probe run."""
    beats = write_beat_folder(tmp_path_factory.mktemp("beats"))
    config = load_config("ecg-quick", [f"data_dir={beats}", "methods=[simclr_meta_warp]", "checkpoint.every=6",
                                       "checkpoint.keep=20", "evaluation.seeds=1", "evaluation.label_fractions=[1.0]",
                                       "evaluation.full_finetune=null"])
    folder = start(config, tmp_path_factory.mktemp("run") / "run")  # the folder holds the resolved config
    execute(folder, config)
    return folder, config


def _check(result, config):
    assert result["phase"] == PHASE
    rows = result["estimators"]
    assert set(rows) == set(KEPT) and result["own"] == "unrolled_T1"
    for name, row in rows.items():
        assert math.isfinite(row["cost_pt_steps"]), name
    assert (RunFolder(result["run"]).path / "diagnostics.json").is_file()


def test_diagnose_a_mid_phase_ecg_checkpoint(ecg_run):
    folder, config = ecg_run
    mid = [p for p in folder.checkpoints() if folder.load_checkpoint(p).get("trainer") is not None]
    state = folder.load_checkpoint(mid[0]) if len(mid) == 1 else {}
    assert state.get("phase") == PHASE
    assert len(state["trainer"]["meta_opt"]["param_groups"]) == 2  # φ's per-key rates: the case at stake
    result = diagnose_run(folder.path, options=OPTIONS)
    _check(result, config)
    assert result["step"] == 6 and "checkpoint" in result["source"]


def test_diagnose_a_finished_ecg_phase(ecg_run):
    folder, config = ecg_run
    for path in folder.checkpoints():  # keep only what a finished run keeps: each phase's θ and φ
        if folder.load_checkpoint(path).get("trainer") is not None:
            path.unlink()
    result = diagnose_run(folder.path, phase=PHASE, options=OPTIONS, warm_steps=3)
    _check(result, config)
    assert "recorded end of phase" in result["source"] and result["step"] == 3
