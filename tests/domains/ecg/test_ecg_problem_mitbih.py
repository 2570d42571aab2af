"""ECGSimCLRProblem on the real MIT-BIH subset in ../shared/data/mitbih (skipped where it is absent)."""

from pathlib import Path

import numpy as np
import pytest
import torch

from metapt import MetaPretrainer, MetaSchedule
from metapt.domains.ecg.data import load_ecg_folder
from metapt.domains.ecg.problem import ECGProblemConfig, ECGSimCLRProblem
from metapt.domains.ecg.splits import split_ecg
from metapt.hypergrad import Neumann, sgd

MITBIH = Path(__file__).resolve().parents[3].parent / "shared" / "data" / "mitbih"

pytestmark = pytest.mark.skipif(
    not (MITBIH / "README.md").is_file(),
    reason=f"MIT-BIH subset not found at {MITBIH} (the repository's sibling shared/data/mitbih)",
)


@pytest.fixture(scope="module")
def mitbih():
    ds = load_ecg_folder(MITBIH, expected_fs=360)
    return ds, split_ecg(ds)


def test_four_groups_are_disjoint_by_record_and_every_labelled_group_has_pvcs(mitbih):
    ds, split = mitbih
    records = {name: set(ds.patient_ids[idx]) for name, idx in split.groups().items()}
    names = list(records)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not records[a] & records[b], (a, b)
    assert set().union(*records.values()) == set(ds.patient_ids)
    for name in ("ft_train", "metaval", "test"):
        assert ds.labels[torch.from_numpy(split.groups()[name])].sum() >= 20, name
    assert {name: set(r) for name, r in split.records.items()} == records


def test_meta_steps_on_real_beats_are_finite_and_move_the_warp(mitbih):
    ds, split = mitbih
    problem = ECGSimCLRProblem.from_dataset(ds, split, ECGProblemConfig(pretrain_batch_size=16, finetune_batch_size=32))
    phi0 = problem.initial_metaparams()
    trainer = MetaPretrainer(
        problem, problem.initial_params(), problem.initial_head(), phi0,
        pt_optimizer=lambda ps: torch.optim.Adam(ps, lr=1e-3),
        meta_optimizer=lambda ps: torch.optim.Adam(ps, lr=1e-2),
        inner_optimizer=sgd(0.1), solver=Neumann(1, alpha=1e-3),
        schedule=MetaSchedule(interval=2, warmup_steps=2),
    )
    trainer.run_until(6)
    assert trainer.meta_step_count == 2 and trainer.skipped == 0
    moved = {k: float((trainer.metaparams[k].detach() - phi0[k]).abs().max()) for k in phi0}
    assert moved["log_magnitude"] > 1e-3 and all(np.isfinite(list(moved.values())))
    assert np.isfinite(problem.describe_metaparams(trainer.metaparams)["mean_abs_shift"])
