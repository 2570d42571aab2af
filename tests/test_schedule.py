"""metapt.schedule: the meta-step schedule, its batch-index rules and its renamed keywords."""

import dataclasses

import pytest

from metapt.config import load_config
from metapt.schedule import MetaSchedule, pt_batch_index


def test_the_index_rules_are_the_documented_formulas():
    s = MetaSchedule(interval=3, batches=2, unroll_steps=2, head_steps=3)
    for m in range(4):
        for j in range(2):
            i = s.sample_index(m, j)
            assert i == m * 2 + j  # metaval_batch(m * batches + j)
            assert [s.finetune_index(i, k) for k in range(2)] == [i * 2, i * 2 + 1]
        assert [s.head_index(m, c) for c in range(3)] == [m * 3, m * 3 + 1, m * 3 + 2]
    assert MetaSchedule(unroll_steps=0).finetune_index(5, 0) == 5  # max(unroll_steps, 1)
    assert pt_batch_index(10, -1, 0) == 9 and pt_batch_index(10, -1, 2) == 7 and pt_batch_index(1, -1, 3) == 0
    assert pt_batch_index(10, 0, 2, stride=4) == 18


def test_the_config_keys_and_the_schedule_fields_have_one_name():
    meta = load_config("synthetic").meta
    schedule = meta.schedule()
    assert (schedule.interval, schedule.batches) == (meta.interval, meta.batches)
    fields = {f.name for f in dataclasses.fields(MetaSchedule)}
    assert {"interval", "batches"} <= fields and not {"meta_interval", "meta_batches"} & fields


def test_the_old_keywords_still_work_with_a_deprecation_warning():
    with pytest.deprecated_call(match="use interval="):
        old = MetaSchedule(meta_interval=4, warmup_steps=2)
    assert old == MetaSchedule(interval=4, warmup_steps=2)
    with pytest.deprecated_call(match="use batches="):
        assert MetaSchedule(meta_batches=3).batches == 3
    with pytest.deprecated_call(match="use .interval"):
        assert old.meta_interval == 4
    with pytest.raises(TypeError, match="interval= only"):
        MetaSchedule(interval=4, meta_interval=4)
    with pytest.raises(ValueError, match="interval must be >= 1"):
        MetaSchedule(interval=0)
