"""The run configuration: presets, YAML, overrides, and errors that name the key."""

from __future__ import annotations

import pytest

from metapt.config import ConfigError, load_config, presets, to_yaml
from metapt.domains.ecg.job import ECGJobConfig
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
    assert isinstance(load_config("ecg-quick"), ECGJobConfig)
    assert isinstance(load_config("synthetic"), SyntheticJob)


def test_paper_preset_has_hu_et_al_encoder():
    paper = load_config("molecules-paper")
    assert (paper.model.num_layers, paper.model.emb_dim, paper.model.norm) == (5, 300, "batch")
    assert paper.data.settings == ("b3db", "heldout")


def test_overrides_are_read_as_yaml_values():
    config = load_config("molecules", ["meta.solver=cg", "meta.solver.steps=7", "pretrain.lr=3e-4",
                                       "data.settings=[heldout]", "data.max_pretrain=null"])
    assert config.meta.solver.kind == "cg" and config.meta.solver.steps == 7
    assert isinstance(config.meta.solver.build(config.pretrain.lr), ConjugateGradient)
    assert config.pretrain.lr == 3e-4 and config.data.settings == ("heldout",)
    solver = load_config("molecules").meta.solver.build(1e-3)
    assert isinstance(solver, Neumann) and solver.alpha == 1e-3 and solver.steps == 1  # paper: α = PT lr, M = 1


@pytest.mark.parametrize("override, expected", [
    ("meta.lrr=0.1", "unknown key 'meta.lrr'; did you mean 'meta.lr'?"),
    ("modle.emb_dim=8", "unknown key 'modle'; did you mean 'model'?"),
    ("meta.solver.kindd=cg", "did you mean 'meta.solver.kind'?"),
    ("meta.lr=-1", "meta.lr: Input should be greater than or equal to 0 (got -1)"),
    ("meta.solver=newton", "meta.solver.kind: Input should be 'neumann', 'cg' or 'identity' (got 'newton')"),
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
    with pytest.raises(ConfigError, match="unknown key 'meta.schedule.meta_intervall'; did you mean 'meta.schedule.meta_interval'"):
        load_config("ecg-quick", ["meta.schedule.meta_intervall=3"])
    with pytest.raises(ConfigError, match=r"evaluation: EvalConfig: label fractions must be in \(0, 1\]"):
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
