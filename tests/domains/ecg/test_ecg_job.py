"""The ECG domain through the shared runner on generated WFDB records (quick preset)."""

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from metapt.config import load_config
from metapt.jobs import execute
from metapt.runs import RunFolder

from ecg_records import write_beat_folder

with warnings.catch_warnings():  # wfdb trips pandas deprecation warnings at import time
    warnings.simplefilter("ignore")
    import wfdb


@pytest.fixture(scope="module")
def beat_folder(tmp_path_factory) -> Path:
    return write_beat_folder(tmp_path_factory.mktemp("beats"))


@pytest.fixture(scope="module")
def quick_run(beat_folder, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("run")
    config = load_config("ecg-quick", [f"data_dir={beat_folder}"])
    folder = RunFolder.create(out / "run", "job: ecg\n")
    return folder.path, execute(folder, config), config


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_run_folder_has_every_artefact(quick_run):
    out, summary, config = quick_run
    for name in ("metrics.jsonl", "summary.json", "summary.md", "losses.png", "scores_ecg.png", "warp_magnitude.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert json.loads((out / "summary.json").read_text())["settings"]["ecg"]["data"]["layout"] == "beats"


def test_every_phase_runs_through_the_trainer_and_the_fixed_warp_never_moves(quick_run):
    out, summary, config = quick_run
    rows = _rows(out)
    phases = {r["phase"] for r in rows}
    assert phases == {"ecg/simclr", "ecg/simclr_fixed_warp", "ecg/simclr_meta_warp"}
    for phase in phases:
        assert [r["step"] for r in rows if r["phase"] == phase] == list(range(1, config.pretrain.steps + 1))
    assert not any("meta_loss" in r for r in rows if r["phase"] != "ecg/simclr_meta_warp")
    meta = [r for r in rows if r["phase"] == "ecg/simclr_meta_warp" and "meta_loss" in r]
    expected = (config.pretrain.steps - config.meta.warmup_steps) // config.meta.interval
    assert len(meta) == expected and all(r["phi/magnitude"] > 0 for r in meta)
    health = summary["pretraining"]
    assert health["ecg/simclr_fixed_warp"]["meta_steps"] == 0 and health["ecg/simclr_meta_warp"]["meta_steps"] == expected


def test_learned_warp_moved_from_its_initial_magnitude(quick_run):
    out, summary, config = quick_run
    learned = summary["settings"]["ecg"]["learned"]
    assert set(learned) == {"simclr_meta_warp"}  # the fixed warp is a frozen φ: nothing learned to report
    assert abs(learned["simclr_meta_warp"]["magnitude"] - config.problem.warp.init_magnitude) > 1e-6


def test_summary_table_and_paired_gains(quick_run):
    out, summary, config = quick_run
    ev = config.evaluation
    res = summary["settings"]["ecg"]
    assert list(res["scores"]) == ["no pre-training", "SimCLR", "SimCLR + fixed warp", "SimCLR + meta warp"]
    for by_mode in res["scores"].values():
        assert list(by_mode) == ["full fine-tuning", "linear probe"]
        for by_fraction in by_mode.values():
            assert list(by_fraction) == [f"{f:g}" for f in ev.label_fractions]
            for cell in by_fraction.values():
                finite = [t for t in cell["test"] if t is not None]
                assert len(cell["test"]) == ev.seeds and cell["nonfinite"] == ev.seeds - len(finite)
                if finite:
                    assert cell["mean"] == pytest.approx(np.mean(finite))
    gain = res["gains"]["SimCLR + meta warp − SimCLR"]["linear probe"]["1"]
    meta = res["scores"]["SimCLR + meta warp"]["linear probe"]["1"]["test"]
    base = res["scores"]["SimCLR"]["linear probe"]["1"]["test"]
    assert gain["diff"] == pytest.approx([a - b for a, b in zip(meta, base)])
    table = (out / "summary.md").read_text()
    assert "SimCLR + meta warp" in table and "±" in table and "(paired)" in table


def test_test_records_are_unseen_by_pretraining_and_meta_learning(quick_run):
    out, summary, config = quick_run
    groups = summary["settings"]["ecg"]["data"]["groups"]
    records = {name: set(g["record_ids"]) for name, g in groups.items() if "record_ids" in g}
    assert all(records.values())
    assert not records["test"] & (records["pretrain"] | records["ft_train"] | records["metaval"])
    assert not records["metaval"] & (records["pretrain"] | records["ft_train"])
    assert not records["ft_train"] & records["pretrain"]
    assert groups["valid"]["examples"] > 0  # carved out of FT-train before meta-learning saw it


def test_user_mistakes_are_clear_errors(beat_folder):
    from metapt.config import ConfigError

    with pytest.raises(ConfigError, match="meta.warmup_steps .* must be below pretrain.steps"):
        load_config("ecg-quick", [f"data_dir={beat_folder}", "pretrain.steps=2"])
    with pytest.raises(ConfigError, match=r"\(0, 1\]"):
        load_config("ecg-quick", ["evaluation.label_fractions=[0.0]"])
    with pytest.raises(ConfigError, match="linear_probe must have linear_probe: true"):
        load_config("ecg-quick", ["evaluation.linear_probe.linear_probe=false"])
    with pytest.raises(ConfigError, match="set by pretrain.batch_size"):
        load_config("ecg-quick", ["problem.pretrain_batch_size=4"])


# ---------------------------------------------------------------- PTB-XL layout (generated fixture only)

PTBXL_LEADS = ("I", "II", "III", "AVR", "AVL", "AVF", "V1", "V2", "V3", "V4", "V5", "V6")
PTBXL_CODES = ["{'NORM': 100.0}", "{'IMI': 50.0}", "{'NDT': 100.0, 'SR': 0.0}", "{'CLBBB': 100.0, 'NDT': 50.0}",
               "{'LVH': 35.0, 'NORM': 0.0}"]


def make_ptbxl_folder(folder: Path, n: int = 40) -> Path:
    """A PTB-XL-shaped folder: n 12-lead 10 s records at 100 Hz, 4 per strat_fold, 5 superclasses."""
    rng = np.random.default_rng(0)
    (folder / "records100" / "00000").mkdir(parents=True)
    t = np.arange(1000)
    rows = []
    for i in range(1, n + 1):
        sig = 0.1 * rng.standard_normal((1000, 12)) + np.sin(2 * np.pi * t / (60 + 10 * (i % 5)))[:, None]
        wfdb.wrsamp(f"{i:05d}_lr", fs=100, units=["mV"] * 12, sig_name=list(PTBXL_LEADS), p_signal=sig,
                    fmt=["16"] * 12, write_dir=str(folder / "records100" / "00000"))
        rows.append({"ecg_id": i, "patient_id": float(i), "scp_codes": PTBXL_CODES[(i + i // 10) % 5],
                     "strat_fold": (i - 1) % 10 + 1, "filename_lr": f"records100/00000/{i:05d}_lr",
                     "filename_hr": f"records500/00000/{i:05d}_hr"})
    pd.DataFrame(rows).to_csv(folder / "ptbxl_database.csv", index=False)
    pd.DataFrame({"diagnostic_class": ["NORM", "MI", "STTC", "CD", "HYP", None]},
                 index=pd.Index(["NORM", "IMI", "NDT", "CLBBB", "LVH", "SR"])).to_csv(folder / "scp_statements.csv")
    return folder


def test_ptbxl_layout_runs_multilabel_with_strat_folds(tmp_path):
    """PTB-XL is exercised only on this generated fixture (no real PTB-XL on this machine)."""
    data = make_ptbxl_folder(tmp_path / "ptbxl")
    config = load_config("ecg-quick", [f"data_dir={data}", "evaluation.seeds=1", "evaluation.label_fractions=[1.0]",
                                       "evaluation.full_finetune=null", "data.max_labelled_per_record=null"])
    summary = execute(RunFolder.create(tmp_path / "run", "job: ecg\n"), config)
    info = summary["settings"]["ecg"]["data"]
    assert info["layout"] == "ptbxl" and info["classes"] == ["NORM", "MI", "STTC", "CD", "HYP"]
    groups = info["groups"]
    assert groups["test"]["examples"] == 4 and groups["metaval"]["examples"] == 4  # folds 10 and 9
    assert groups["pretrain"]["examples"] == 32 and len(groups["test"]["positives"]) == 5
    assert not set(groups["test"]["record_ids"]) & set(groups["pretrain"]["record_ids"])
    cell = summary["settings"]["ecg"]["scores"]["SimCLR + meta warp"]["linear probe"]["1"]
    assert len(cell["test"]) == 1


def test_cap_keeping_positives_leaves_both_classes():
    # Three records of 100 beats, 2 positives each, capped at 10 per record: keep_positives keeps
    # every positive and fills with negatives; the uniform subsample keeps 10 as well.
    import dataclasses

    import numpy as np
    import torch

    from metapt.domains.ecg.splits import cap_labelled

    labels = torch.zeros(300, 1)
    positives = [17, 83, 117, 183, 217, 283]
    labels[positives] = 1.0
    ds = type("DS", (), {"patient_ids": np.repeat(["a", "b", "c"], 100), "labels": labels})

    @dataclasses.dataclass(frozen=True)
    class Split:
        ft_train: np.ndarray
        metaval: np.ndarray
        test: np.ndarray

    split = Split(np.arange(0, 100), np.arange(100, 200), np.arange(200, 300))
    capped = cap_labelled(ds, split, cap=10, seed=0, keep_positives=True)
    for group, pos in zip((capped.ft_train, capped.metaval, capped.test), ([17, 83], [117, 183], [217, 283])):
        assert len(group) == 10 and set(pos) <= set(group.tolist())
    uniform = cap_labelled(ds, split, cap=10, seed=0)
    assert all(len(g) == 10 for g in (uniform.ft_train, uniform.metaval, uniform.test))


def test_every_ecg_phase_resumes_mid_phase_after_sigkill(beat_folder, tmp_path):
    """Killed in the plain SimCLR phase, in the meta-warp phase and during evaluation: bitwise identical."""
    from tests.test_resume import _assert_same_run, _cli, _finish, _lines, _newest_state, _run_and_kill

    args = ["--data", str(beat_folder), "--set", "pretrain.steps=40", "--set", "checkpoint.every=5",
            "--set", "evaluation.seeds=1", "--set", "evaluation.label_fractions=[1.0]"]
    ref, run = tmp_path / "reference", tmp_path / "killed"
    _finish(_cli("run", "ecg-quick", "--out", str(ref), *args))
    assert _lines(ref / "metrics.jsonl") == 120  # 3 pre-trained methods x 40 steps
    metrics = lambda: _lines(run / "metrics.jsonl")  # noqa: E731
    assert _run_and_kill(_cli("run", "ecg-quick", "--out", str(run), *args), lambda: metrics() >= 23), \
        "the SimCLR-phase kill did not happen"
    assert _newest_state(run)["phase"] == "ecg/simclr"  # mid-phase, after a checkpoint
    assert _run_and_kill(_cli("resume", str(run)), lambda: metrics() >= 107), "the meta-warp kill did not happen"
    assert _newest_state(run)["phase"] == "ecg/simclr_meta_warp"
    assert _run_and_kill(_cli("resume", str(run)), lambda: any(
        k.startswith("eval/") for k in _newest_state(run)["results"]) if metrics() >= 120 else False), \
        "the evaluation kill did not happen"
    assert not (run / "summary.json").exists()
    _finish(_cli("resume", str(run)))
    _assert_same_run(ref, run)


def test_the_noise_models_frozen_control_keeps_its_initial_amplitude(beat_folder, tmp_path):
    config = load_config("ecg-quick", [f"data_dir={beat_folder}", "methods=[simclr_fixed_noise, simclr_meta_noise]",
                                       "evaluation.seeds=1", "evaluation.linear_probe=null"])
    folder = RunFolder.create(tmp_path / "run", "job: ecg\n")
    summary = execute(folder, config)
    health = summary["pretraining"]
    assert health["ecg/simclr_fixed_noise"]["meta_steps"] == 0 and health["ecg/simclr_meta_noise"]["meta_steps"] > 0
    assert set(summary["settings"]["ecg"]["learned"]) == {"simclr_meta_noise"}
    rows = _rows(folder.path)
    assert any("phi/band_noise_mean" in r for r in rows if r["phase"] == "ecg/simclr_meta_noise")
    assert "SimCLR + meta noise − SimCLR + fixed noise" in summary["settings"]["ecg"]["gains"]
