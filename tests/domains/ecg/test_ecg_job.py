"""run_ecg end to end on generated WFDB records (quick preset), and its report pieces."""

import json
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from metapt.domains.ecg.job import EvalConfig, preset_config, run_ecg

with warnings.catch_warnings():  # wfdb trips pandas deprecation warnings at import time
    warnings.simplefilter("ignore")
    import wfdb
from metapt.evaluation import FinetuneConfig

FS = 360


def write_beat_record(folder: Path, name: str, seed: int, seconds: int = 20, pvc_every: int = 4) -> None:
    """A WFDB record of narrow normal beats and wide, inverted 'PVCs', plus its beats CSV."""
    rng = np.random.default_rng(seed)
    n = seconds * FS
    t = np.arange(n)
    centres = np.arange(200, n - 200, 280) + rng.integers(-20, 20, size=len(np.arange(200, n - 200, 280)))
    pvc = (np.arange(len(centres)) % pvc_every == 1).astype(int)
    sig = 0.05 * rng.standard_normal(n) + 0.2 * np.sin(2 * np.pi * t / (3 * FS) + seed)
    for c, p in zip(centres, pvc):
        sig += (-1.5 if p else 2.0) * np.exp(-0.5 * ((t - c) / (12.0 if p else 4.0)) ** 2)
    wfdb.wrsamp(name, fs=FS, units=["mV"], sig_name=["MLII"], p_signal=sig[:, None], fmt=["16"],
                write_dir=str(folder))
    pd.DataFrame({"sample": centres, "pvc": pvc}).to_csv(folder / f"{name}_beats.csv", index=False)


@pytest.fixture(scope="module")
def beat_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("beats")
    for i in range(8):
        write_beat_record(folder, f"{100 + i}", seed=i)
    return folder


@pytest.fixture(scope="module")
def quick_run(beat_folder, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("run")
    return out, run_ecg(out, beat_folder, preset="quick")


def test_run_folder_has_every_artefact(quick_run):
    out, summary = quick_run
    for name in ("config.json", "metrics.jsonl", "evaluation.jsonl", "warp_phi.npz", "encoder_simclr.npz",
                 "encoder_simclr_fixed_warp.npz", "encoder_simclr_meta_warp.npz", "summary.json", "summary.md",
                 "warp_examples.png",
                 "warp_magnitude.png", "auroc.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert json.loads((out / "summary.json").read_text())["methods"].keys() == summary["methods"].keys()
    config = json.loads((out / "config.json").read_text())
    assert config["config"]["pretrain"]["steps"] == preset_config("quick").pretrain.steps
    assert config["data"]["layout"] == "beats"


def test_fixed_warp_control_keeps_phi0_but_changes_pretraining(quick_run):
    out, summary = quick_run
    with np.load(out / "encoder_simclr.npz") as a, np.load(out / "encoder_simclr_fixed_warp.npz") as b:
        assert a.files == b.files and any(not np.array_equal(a[k], b[k]) for k in a.files)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert not any("meta_loss" in r for r in rows if r["phase"] == "simclr_fixed_warp")


def test_metrics_have_one_phase_per_pretrained_method_and_meta_steps(quick_run):
    out, _ = quick_run
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    phases = {r["phase"] for r in rows}
    assert phases == {"simclr", "simclr_fixed_warp", "simclr_meta_warp"}
    steps = preset_config("quick").pretrain.steps
    for phase in phases:
        assert [r["step"] for r in rows if r["phase"] == phase] == list(range(1, steps + 1))
    meta = [r for r in rows if r["phase"] == "simclr_meta_warp" and "meta_loss" in r]
    assert meta and all(r["phi/magnitude"] > 0 for r in meta)


def test_learned_warp_loads_without_pickle_and_moved(quick_run):
    out, summary = quick_run
    with np.load(out / "warp_phi.npz", allow_pickle=False) as z:
        phi = {k: z[k] for k in z.files}
    assert "log_magnitude" in phi and any(k.startswith("features.") for k in phi)
    # φ₀ has magnitude 0.01: the meta-steps must have changed it
    assert abs(float(np.exp(phi["log_magnitude"])) - 0.01) > 1e-6
    assert summary["learned_warp"]["magnitude"] == pytest.approx(float(np.exp(phi["log_magnitude"])), rel=1e-6)


def test_summary_table_and_paired_gains(quick_run):
    out, summary = quick_run
    ev = preset_config("quick").evaluation
    for method in ("no_pretrain", "simclr", "simclr_fixed_warp", "simclr_meta_warp"):
        for mode in ("full_finetune", "linear_probe"):
            for f in ev.label_fractions:
                cell = summary["methods"][method][mode][str(f)]
                assert len(cell["test_auroc"]) == len(ev.seeds)
                assert all(0.0 <= a <= 1.0 for a in cell["test_auroc"])
                assert cell["mean"] == pytest.approx(np.mean(cell["test_auroc"]))
    assert set(summary["gains"]) == {"simclr_meta_warp - simclr", "simclr_meta_warp - simclr_fixed_warp",
                                     "simclr_fixed_warp - simclr", "simclr - no_pretrain"}
    first = str(ev.label_fractions[0])
    gain = summary["gains"]["simclr_meta_warp - simclr"]["linear_probe"][first]
    meta, base = (summary["methods"][m]["linear_probe"][first]["test_auroc"] for m in ("simclr_meta_warp", "simclr"))
    expected = [a - b for a, b in zip(meta, base)]
    assert gain["diff"] == pytest.approx(expected)
    table = (out / "summary.md").read_text()
    assert table.count("\n| ") >= 4 and "simclr_meta_warp" in table and "±" in table and "paired" in table
    assert summary["timing"]["simclr_meta_warp"]["meta_step_cost_ratio"] > 0
    rows = [json.loads(line) for line in (out / "evaluation.jsonl").read_text().splitlines()]
    assert len(rows) == 4 * 2 * len(ev.label_fractions) * len(ev.seeds)


def test_test_records_are_unseen_by_pretraining_and_meta_learning(quick_run):
    out, summary = quick_run
    groups = json.loads((out / "config.json").read_text())["data"]["groups"]
    records = {name: set(g["record_ids"]) for name, g in groups.items()}
    assert all(records.values())
    assert not records["test"] & (records["pretrain"] | records["ft_train"] | records["metaval"])
    assert not records["metaval"] & (records["pretrain"] | records["ft_train"])
    assert not records["ft_train"] & records["pretrain"]


def test_user_mistakes_are_one_line_value_errors(beat_folder, tmp_path):
    with pytest.raises(ValueError, match="unknown ECG preset 'fast'.*quick"):
        run_ecg(tmp_path, beat_folder, preset="fast")
    with pytest.raises(ValueError, match="raise pretrain_steps"):
        run_ecg(tmp_path, beat_folder, preset="quick", pretrain_steps=2)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        run_ecg(tmp_path, beat_folder, preset="quick", label_fractions=[0.0])
    with pytest.raises(ValueError, match="linear_probe=True"):
        EvalConfig(linear_probe=FinetuneConfig())


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
    quick = preset_config("quick")
    config = replace(quick, evaluation=replace(quick.evaluation, seeds=(0,), label_fractions=(1.0,), full_finetune=None),
                     data=replace(quick.data, max_labelled_per_record=None))
    summary = run_ecg(tmp_path / "run", data, preset=config)
    assert summary["data"]["layout"] == "ptbxl"
    assert summary["data"]["classes"] == ["NORM", "MI", "STTC", "CD", "HYP"]
    groups = summary["data"]["groups"]
    assert groups["test"]["examples"] == 4 and groups["metaval"]["examples"] == 4  # folds 10 and 9
    assert groups["pretrain"]["examples"] == 32 and len(groups["test"]["positives"]) == 5
    assert not set(groups["test"]["record_ids"]) & set(groups["pretrain"]["record_ids"])
    auroc = summary["methods"]["simclr_meta_warp"]["linear_probe"]["1.0"]["test_auroc"]
    assert len(auroc) == 1 and 0.0 <= auroc[0] <= 1.0



def test_cap_keeping_positives_leaves_both_classes():
    # Three records of 100 beats, 2 positives each, capped at 10 per record: keep_positives keeps
    # every positive and fills with negatives; the uniform subsample keeps 10 as well.
    import dataclasses

    import numpy as np
    import torch

    from metapt.domains.ecg.job import _cap_labelled

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
    capped = _cap_labelled(ds, split, cap=10, seed=0, keep_positives=True)
    for group, pos in zip((capped.ft_train, capped.metaval, capped.test), ([17, 83], [117, 183], [217, 283])):
        assert len(group) == 10 and set(pos) <= set(group.tolist())
    uniform = _cap_labelled(ds, split, cap=10, seed=0)
    assert all(len(g) == 10 for g in (uniform.ft_train, uniform.metaval, uniform.test))
