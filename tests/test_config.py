"""The run configuration: presets, YAML, overrides, and errors that name the key."""

from __future__ import annotations

import pytest

from metapt.config import ConfigError, load_config, presets, to_yaml
from metapt.domains.ecg.job import ECGJob
from metapt.domains.molecules.job import MoleculesJob
from metapt.domains.synthetic.job import SyntheticJob
from metapt.hypergrad import ConjugateGradient, Neumann


def test_every_preset_loads_and_round_trips_through_yaml(tmp_path):
    names = presets()
    assert {"molecules", "molecules-paper", "molecules-test", "ecg", "ecg-quick", "synthetic"} <= set(names)
    for name in names:
        config = load_config(name)
        path = tmp_path / f"{name}.yaml"
        path.write_text(to_yaml(config))
        assert load_config(path) == config
    assert isinstance(load_config("molecules"), MoleculesJob)
    assert isinstance(load_config("ecg-quick"), ECGJob)
    assert isinstance(load_config("synthetic"), SyntheticJob)


def test_paper_preset_has_hu_et_al_encoder():
    paper = load_config("molecules-paper")
    assert (paper.model.num_layers, paper.model.emb_dim, paper.model.norm) == (5, 300, "batch")
    assert paper.data.settings == ("b3db", "heldout")


def test_overrides_are_read_as_yaml_values():
    config = load_config("molecules", ["meta.estimator=cg", "meta.estimator.max_iter=7", "pretrain.lr=3e-4",
                                       "data.settings=[heldout]", "data.max_pretrain=null"])
    assert config.meta.estimator.kind == "cg" and config.meta.estimator.max_iter == 7
    assert isinstance(config.meta.estimator.build(config.pretrain.lr), ConjugateGradient)
    assert config.pretrain.lr == 3e-4 and config.data.settings == ("heldout",)
    solver = load_config("molecules", ["meta.estimator=neumann"]).meta.estimator.build(1e-3)
    assert isinstance(solver, Neumann) and solver.alpha == 1e-3 and solver.steps == 1  # paper: α = PT lr, M = 1


@pytest.mark.parametrize("override, expected", [
    ("meta.lrr=0.1", "unknown key 'meta.lrr'; did you mean 'meta.lr'?"),
    ("modle.emb_dim=8", "unknown key 'modle'; did you mean 'model'?"),
    ("meta.estimator.kindd=cg", "did you mean 'meta.estimator.kind'?"),
    ("meta.lr=-1", "meta.lr: Input should be greater than or equal to 0 (got -1)"),
    ("meta.estimator=newton", "meta.estimator.kind: Input should be 'neumann', 'cg', 'identity', 'unrolled' or 'accumulated' (got 'newton')"),
    ("meta.estimator.terms=3", "estimator kind 'unrolled' does not read terms (terms is read by kind neumann)"),
    ("model.norm=group", "model.norm: Input should be 'layer', 'batch' or 'none'"),
    ("pretrain.steps=many", "pretrain.steps: Input should be a valid integer"),
    ("methods=[uniform, magic]", "methods: Input should be 'no_pretrain', 'uniform'"),
    ("meta.warmup_steps=5000", "meta.warmup_steps (5000) must be below pretrain.steps (2000)"),
])
def test_bad_configs_name_the_key_and_what_is_allowed(override, expected):
    with pytest.raises(ConfigError) as err:
        load_config("molecules", [override])
    assert expected in str(err.value)


def test_ecg_nested_sections_are_checked_too():
    with pytest.raises(ConfigError, match="unknown key 'meta.intervall'; did you mean 'meta.interval'"):
        load_config("ecg-quick", ["meta.intervall=3"])
    with pytest.raises(ConfigError, match=r"evaluation: label fractions must be in \(0, 1\]"):
        load_config("ecg-quick", ["evaluation.label_fractions=[0.5, 2.0]"])


def test_unknown_preset_and_missing_or_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'molecules'"):
        load_config("molecule")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("job: molecules\nmeta: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(bad)
    bad.write_text("pretrain: {steps: 10}\n")
    with pytest.raises(ConfigError, match="'job' must be one of molecules, ecg, synthetic"):
        load_config(bad)
    with pytest.raises(ConfigError, match="must look like key.path=value"):
        load_config("molecules", ["meta.lr"])


def test_configs_execute_no_code(tmp_path):
    evil = tmp_path / "evil.yaml"
    marker = tmp_path / "pwned"
    evil.write_text(f"job: synthetic\nsteps: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(evil)
    assert not marker.exists()


# ---- an override changes exactly the key it names -------------------------------------------


def _flat(config) -> dict:
    import yaml

    from metapt.config import flatten as _flatten

    return _flatten(yaml.safe_load(to_yaml(config)))


@pytest.mark.parametrize("preset, override, key, value", [
    ("synthetic", "meta.lr=0.2", "meta.lr", 0.2),  # used to reset interval 5->10, solver M 5->1, alpha 0.01->null
    ("synthetic", "checkpoint.keep=5", "checkpoint.keep", 5),  # used to reset checkpoint.every 100->200
    ("synthetic", "meta.inner_lr=0.3", "meta.inner_lr", 0.3),
    ("molecules-test", "evaluation.seeds=3", "evaluation.seeds", 3),  # used to reset the fine-tuning epochs
    ("molecules-test", "model.dropout=0.2", "model.dropout", 0.2),  # used to reset the GIN to 3x64
])
def test_an_override_changes_exactly_the_key_it_names(preset, override, key, value):
    before, after = _flat(load_config(preset)), _flat(load_config(preset, [override]))
    assert after[key] == value
    assert {k for k in before if before[k] != after[k]} == ({key} if before[key] != value else set())


def test_an_ecg_override_changes_exactly_the_key_it_names():
    before = _flat(load_config("ecg"))
    after = _flat(load_config("ecg", ["meta.warmup_steps=10"]))
    assert {k for k in before if before[k] != after[k]} == {"meta.warmup_steps"}
    assert after["meta.batches"] == before["meta.batches"] == 4 and after["meta.interval"] == 20


def test_a_partial_section_in_a_file_keeps_the_jobs_defaults(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("job: synthetic\nmeta: {lr: 0.3}\n")
    mine, preset = _flat(load_config(path)), _flat(load_config("synthetic"))
    assert {k for k in preset if preset[k] != mine[k]} == {"meta.lr"}


# ---- what pydantic lets through, and bounds on reading -----------------------------------------


@pytest.mark.parametrize("override, expected", [
    ("pretrain.lr=1e39", "pretrain.lr: must be a finite number that fits in float32"),
    ("meta.lr=.inf", "meta.lr: must be a finite number"),
    ("meta.lr=.nan", "meta.lr: must be a finite number"),
    ("pretrain.steps=true", "pretrain.steps: expected an integer, got true"),
])
def test_non_finite_numbers_and_booleans_for_numbers_are_refused(override, expected):
    with pytest.raises(ConfigError) as err:
        load_config("synthetic", [override])
    assert expected in str(err.value)


def test_duplicate_keys_are_an_error(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("job: synthetic\npretrain: {steps: 10}\npretrain: {steps: 20}\n")
    with pytest.raises(ConfigError, match="found duplicate key 'pretrain'"):
        load_config(path)


def test_a_yaml_alias_bomb_is_refused_quickly_with_a_short_message(tmp_path):
    import time

    levels = ["a: &a [x, x, x, x, x, x, x, x, x]"] + [
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]" for i in range(8)]
    path = tmp_path / "bomb.yaml"
    path.write_text("job: synthetic\nbomb:\n  " + "\n  ".join(levels) + "\n")
    assert path.stat().st_size < 500
    started = time.perf_counter()
    with pytest.raises(ConfigError, match="expands to more than") as err:
        load_config(path)
    assert time.perf_counter() - started < 2 and len(str(err.value)) < 300


def test_size_depth_and_encoding_are_bounded(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_text("job: synthetic\n# " + "x" * (2 << 20) + "\n")
    with pytest.raises(ConfigError, match="a config is at most"):
        load_config(big)
    deep = tmp_path / "deep.yaml"
    deep.write_text("job: synthetic\nx: " + "[" * 200 + "]" * 200 + "\n")
    with pytest.raises(ConfigError, match="nested"):
        load_config(deep)
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("job: synthetic\n# café\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin.yaml is not UTF-8"):
        load_config(latin)


def test_error_messages_are_bounded(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config("synthetic", ["steps=" + "9" * 100_000 + "x"])
    assert len(str(err.value)) <= 2000


def test_choosing_another_estimator_kind_drops_the_old_kinds_keys():
    # the synthetic job's default is {kind: neumann, terms: 5, alpha: 0.01}; another kind starts afresh
    for override in ("meta.estimator=cg", "meta.estimator.kind=cg", "meta.estimator={kind: cg}"):
        estimator = load_config("synthetic", [override]).meta.estimator
        assert estimator.kind == "cg" and estimator.terms is None and estimator.alpha is None, override
    same = load_config("synthetic", ["meta.estimator.kind=neumann", "meta.estimator.alpha=0.5"]).meta.estimator
    assert (same.kind, same.terms, same.alpha) == ("neumann", 5, 0.5)  # the same kind keeps its keys
    cg = load_config("synthetic", ["meta.estimator=cg", "meta.estimator.max_iter=7"]).meta.estimator
    assert cg.max_iter == 7


# ---- meta.solver, the deprecated name of meta.estimator -----------------------------------------

DEPRECATED = "meta.solver is deprecated; use meta.estimator"


def _no_future_warning(source, overrides=()):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        return load_config(source, overrides)


@pytest.mark.parametrize("preset, old, new", [
    ("molecules", ["meta.solver=cg"], ["meta.estimator=cg"]),  # the shorthand: a kind by name
    ("molecules", ["meta.solver=cg", "meta.solver.max_iter=7"], ["meta.estimator=cg", "meta.estimator.max_iter=7"]),
    ("synthetic", ["meta.solver.alpha=0.5"], ["meta.estimator.alpha=0.5"]),  # a nested key; the job's kind kept
    ("synthetic", ["meta.solver.kind=cg"], ["meta.estimator.kind=cg"]),  # another kind drops neumann's keys
    ("synthetic", ["meta.solver={kind: accumulated, every: 3}", "meta.lr=0.2"],
     ["meta.estimator={kind: accumulated, every: 3}", "meta.lr=0.2"]),
    ("synthetic", ["meta={solver: cg, lr: 0.2}"], ["meta={estimator: cg, lr: 0.2}"]),  # in a section's value
])
def test_the_old_name_meta_solver_in_an_override_is_meta_estimator_with_a_warning(preset, old, new):
    expected = _no_future_warning(preset, new)
    assert expected != load_config(preset)  # each case changes the estimator
    with pytest.warns(FutureWarning, match=DEPRECATED) as caught:
        config = load_config(preset, old)
    assert config == expected
    assert sum(DEPRECATED in str(w.message) for w in caught) == sum("solver" in o for o in old)
    if old[0].startswith("meta.solver"):
        assert f"--set meta.estimator{old[0].removeprefix('meta.solver')}" in str(caught[0].message)  # what to write


@pytest.mark.parametrize("old, new", [
    ("meta: {solver: cg}", "meta: {estimator: cg}"),  # the shorthand
    ("meta:\n  lr: 0.3\n  solver: {kind: cg, max_iter: 7}", "meta:\n  lr: 0.3\n  estimator: {kind: cg, max_iter: 7}"),
    ("meta: {solver: {alpha: 0.5}}", "meta: {estimator: {alpha: 0.5}}"),  # a nested key in a partial section
])
def test_the_old_name_meta_solver_in_a_yaml_file_is_meta_estimator_with_a_warning(tmp_path, old, new):
    for head in ("job: synthetic", "extends: synthetic"):  # a file of its own, and one laid over a preset
        (tmp_path / "old.yaml").write_text(f"{head}\n{old}\n")
        (tmp_path / "new.yaml").write_text(f"{head}\n{new}\n")
        expected = _no_future_warning(tmp_path / "new.yaml")
        assert expected != load_config("synthetic")
        with pytest.warns(FutureWarning, match=DEPRECATED):
            assert load_config(tmp_path / "old.yaml") == expected
    # an old file and an override in the new spelling (or the other way round) are one key, laid over each other
    with pytest.warns(FutureWarning, match=DEPRECATED):
        assert load_config(tmp_path / "old.yaml", ["meta.estimator.damping=0.1"]) == \
            load_config(tmp_path / "new.yaml", ["meta.estimator.damping=0.1"])


def test_the_deprecated_name_is_visible_to_a_command_line_user(tmp_path):
    # a DeprecationWarning raised in a library is hidden by Python's default filters; a FutureWarning is not
    import os
    import subprocess
    import sys

    import yaml

    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    res = subprocess.run([sys.executable, "-m", "metapt", "config", "synthetic", "--set", "meta.solver=cg"],
                         env=env, capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 0, res.stderr
    assert "FutureWarning" in res.stderr and DEPRECATED in res.stderr
    assert yaml.safe_load(res.stdout)["meta"]["estimator"]["kind"] == "cg"


def test_meta_solver_and_meta_estimator_together_are_an_error(tmp_path):
    from metapt.config import validate

    (tmp_path / "both.yaml").write_text("job: synthetic\nmeta:\n  solver: cg\n  estimator: {kind: cg}\n")
    for attempt in (lambda: load_config(tmp_path / "both.yaml"),
                    lambda: load_config("synthetic", ["meta.solver=cg", "meta.estimator.max_iter=7"]),
                    lambda: load_config("synthetic", ["meta.estimator=cg", "meta.solver.max_iter=7"]),
                    lambda: validate({"job": "synthetic", "meta": {"solver": "cg", "estimator": "cg"}})):
        with pytest.raises(ConfigError) as err:
            attempt()
        assert "meta.solver" in str(err.value) and "meta.estimator" in str(err.value)


def test_saved_configs_write_estimator_and_compare_equal_to_old_ones():
    import yaml

    from metapt.config import config_changes

    for name in presets():
        meta = yaml.safe_load(to_yaml(load_config(name)))["meta"]
        assert "estimator" in meta and "solver" not in meta, name
    text = to_yaml(load_config("synthetic", ["meta.estimator=cg", "meta.estimator.max_iter=7"]))
    assert "\n  estimator:\n    kind: cg\n" in text and "solver" not in text
    old = text.replace("\n  estimator:\n", "\n  solver:\n")
    assert old != text
    # a checkpoint made before the rename against config.yaml written after it (or the other way round)
    assert config_changes(old, text) == {} and config_changes(text, old) == {}
    changed = config_changes(old, text.replace("max_iter: 7", "max_iter: 8"))
    assert changed == {"meta.estimator.max_iter": (7, 8)}  # a real edit is still seen, under the name now


def test_metapt_compare_sees_no_difference_between_the_old_and_the_new_name(tmp_path):
    from metapt.report import compare
    from metapt.runs import RunFolder

    text = to_yaml(load_config("synthetic", ["meta.estimator=cg"]))
    folders = [RunFolder.create(tmp_path / "old", text.replace("\n  estimator:\n", "\n  solver:\n")),
               RunFolder.create(tmp_path / "new", text),
               RunFolder.create(tmp_path / "other", text.replace("kind: cg", "kind: identity"))]
    try:
        assert compare(folders[:2])[2] == []
        assert [key for key, _ in compare(folders)[2]] == ["meta.estimator.kind"]
    finally:
        for folder in folders:
            folder.unlock()


def test_the_python_names_before_the_rename_still_work_with_a_deprecation_warning():
    from metapt.schema import EstimatorConfig, MetaConfig

    with pytest.warns(DeprecationWarning, match=r"MetaConfig\(solver=...\) is deprecated; use estimator="):
        meta = MetaConfig(solver=EstimatorConfig(kind="cg"))
    assert meta == MetaConfig(estimator=EstimatorConfig(kind="cg"))
    with pytest.warns(DeprecationWarning, match="use .estimator"):
        assert meta.solver is meta.estimator
    with pytest.warns(DeprecationWarning, match="use EstimatorConfig"):
        from metapt.schema import SolverConfig
    assert SolverConfig is EstimatorConfig
    with pytest.raises(ValueError, match="estimator only"):
        MetaConfig(solver=EstimatorConfig(), estimator=EstimatorConfig())
