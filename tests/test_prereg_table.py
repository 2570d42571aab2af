"""benchmarks/prereg_table.py (issue 24): the pre-registered table from results files with known
paired differences: the right pairs are read, the statistics are the t-test and Holm's, a verdict
follows the pre-registered rule, and a results file not yet written leaves its cells 'not run'."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture()
def pt(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("prereg_table", ROOT / "benchmarks" / "prereg_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _molecules(gains: dict[tuple[str, str], list[float]], agreement=None) -> dict:
    """A molecules_auroc results file holding ``gains`` (per pre-training seed) in both settings."""
    from metapt.domains.molecules.job import METHODS
    cell = lambda d: {"full fine-tuning": {"1": {"diff": d}}, "linear probe": {"1": {"diff": [x / 2 for x in d]}}}  # noqa: E731
    setting = {"gains": {f"{METHODS[a].label} − {METHODS[b].label}": cell(d) for (a, b), d in gains.items()},
               "agreement": agreement or {}}
    return {"command": "x", "commit": "c" * 40, "preregistration_commit": "p" * 40,
            "settings": {"heldout": setting, "b3db": setting}}


def _ecg(method: str, control: str, diffs: list[float]) -> dict:
    folds = [{"scores": {method: {"full fine-tuning": {"1": {"test": 0.8 + d}}, "linear probe": {"1": {"test": 0.8}}},
                         control: {"full fine-tuning": {"1": {"test": 0.8}}, "linear probe": {"1": {"test": 0.8}}}},
              "learned": {}} for d in diffs]
    return {"command": "x", "commit": "c" * 40, "per_fold": folds}


def test_table_from_known_differences(pt, tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    strong = list(0.03 + 0.002 * rng.standard_normal(10))  # a gain no correction can hide
    null = list(0.01 * rng.standard_normal(10))
    worse = list(-0.03 + 0.002 * rng.standard_normal(10))
    agree = {"meta label noise": {"label_noise": {"leave_one_out_mean": 0.6, "leave_one_out_ci95": 0.1,
                                                   "pairwise_mean": 0.5, "seeds": 10}}}
    files = {"molecules_auroc_prereg_molecules": _molecules({
        ("meta_label_noise", "uniform"): strong, ("meta_label_noise", "frozen_label_noise"): strong,
        ("meta_task_weights", "uniform"): null, ("meta_task_weights", "random_task_weights"): worse}, agree),
        "ecg_cv_prereg_noise": _ecg("simclr_meta_noise", "simclr_fixed_noise", [0.01, -0.02, 0.0, 0.03, 0.01, -0.01])}
    for name, record in files.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(record))
    written = {}
    monkeypatch.setattr(pt, "RESULTS", tmp_path)
    monkeypatch.setattr(pt, "write", lambda name, result, md: written.update(result=result, md=md))
    monkeypatch.setattr(sys, "argv", ["prereg_table.py", "--allow-dirty"])
    pt.main()
    cells = {c["cell"]: c for c in written["result"]["cells"]}

    assert cells["P1"]["diffs"] == pytest.approx(strong) and cells["P4"]["diffs"] == pytest.approx(worse)
    assert cells["P1"]["p"] == pytest.approx(stats.ttest_1samp(strong, 0).pvalue)
    assert cells["P10"]["diffs"] == pytest.approx([0.01, -0.02, 0.0, 0.03, 0.01, -0.01])
    verdicts = {k: c["verdict"] for k, c in cells.items()}
    assert verdicts["P1"] == verdicts["P2"] == verdicts["P5"] == "supports"
    assert verdicts["P4"] == verdicts["P8"] == "contradicts"
    assert verdicts["P3"] == verdicts["P10"] == "inconclusive"
    assert verdicts["P9"] == verdicts["P11"] == verdicts["P12"] == "not run"  # files not written: never dropped
    # Holm over all 12 cells (missing ones count p = 1): the strictest level goes to the smallest p
    ps = [c["p"] if math.isfinite(c["p"]) else 1.0 for c in cells.values()]
    smallest = min(cells.values(), key=lambda c: c["p"])
    assert smallest["holm_level"] == pytest.approx(0.05 / 12) and smallest["p_holm"] == pytest.approx(12 * min(ps))
    lo = smallest["mean"] - smallest["holm_half_width"]
    want_lo, _ = stats.t.interval(1 - 0.05 / 12, 9, loc=np.mean(smallest["diffs"]), scale=stats.sem(smallest["diffs"]))
    assert lo == pytest.approx(want_lo)
    # success needs both cells and seed agreement: label noise on held-out has them, task weights not
    per = {(s["setting"], s["method"]): s for s in written["result"]["settings"]}
    assert per[("held-out ChEMBL targets", "meta_label_noise")]["success"]
    assert not per[("held-out ChEMBL targets", "meta_task_weights")]["success"]
    assert "Not run yet: molecules_auroc_prereg_motifs, ecg_cv_prereg_warp" in written["md"]
    assert "meta-learning improves pre-training in held-out ChEMBL targets (meta label noise)" in written["md"]
