"""One configuration schema for every run, loaded from YAML or a shipped preset.

A run configuration is one of the domains' job configs, told apart by its
``job`` key (``molecules``, ``ecg``, ``synthetic``). Presets are YAML files in
``metapt/presets``; ``metapt config PRESET`` prints one fully resolved. YAML is
read with ``yaml.safe_load`` and validated by pydantic: configs execute no code.
Errors name the key: an unknown key suggests the nearest valid one, a wrong
type or range says what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import asdict
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Union

import yaml
from pydantic import Field, TypeAdapter, ValidationError

from .domains.ecg.job import ECGJobConfig
from .domains.molecules.job import MoleculesJob
from .domains.synthetic.job import SyntheticJob
from .schema import jsonable

RunConfig = Union[MoleculesJob, ECGJobConfig, SyntheticJob]
JOBS: dict[str, type] = {"molecules": MoleculesJob, "ecg": ECGJobConfig, "synthetic": SyntheticJob}
_ADAPTER = TypeAdapter(Annotated[RunConfig, Field(discriminator="job")])


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the key and what is allowed."""


# ---- presets --------------------------------------------------------------------------------


def presets() -> list[str]:
    """Names of the presets that ship with metapt."""
    folder = resources.files("metapt") / "presets"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _preset_text(name: str) -> str:
    return (resources.files("metapt") / "presets" / f"{name}.yaml").read_text(encoding="utf-8")


# ---- loading --------------------------------------------------------------------------------


def load_config(source: str | Path, overrides: typing.Sequence[str] = ()) -> RunConfig:
    """A validated run configuration from a YAML file or a preset name, with ``key.path=value`` overrides."""
    path = Path(source)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as err:
            raise ConfigError(f"cannot read config file {path}: {err.strerror}") from err
        where = str(path)
    elif str(source) in presets():
        text, where = _preset_text(str(source)), f"preset {source}"
    else:
        near = difflib.get_close_matches(str(source), presets(), n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise ConfigError(f"no config file or preset named {str(source)!r}{hint} (presets: {', '.join(presets())})")
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{where} is not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a mapping of keys to values, got {type(raw).__name__}")
    for item in overrides:
        apply_override(raw, item)
    return validate(raw, where)


def apply_override(raw: dict, item: str) -> None:
    """Set ``a.b.c=value`` in the raw config; the value is read as YAML (``3``, ``1e-3``, ``[a, b]``, ``null``)."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} must look like key.path=value (e.g. meta.solver=cg)")
    parts = key.strip().split(".")
    node = raw
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif isinstance(child, str) and part == "solver":  # `solver: cg` is short for `solver: {kind: cg}`
            child = node[part] = {"kind": child}
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: {part!r} is a value, not a section")
        node = child
    try:
        node[parts[-1]] = yaml.safe_load(value)
    except yaml.YAMLError as err:
        raise ConfigError(f"override {item!r}: the value is not valid YAML ({err})") from err


def validate(raw: dict, where: str = "config") -> RunConfig:
    job = raw.get("job")
    if job not in JOBS:
        near = difflib.get_close_matches(str(job), JOBS, n=1) if job is not None else []
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise ConfigError(f"{where}: 'job' must be one of {', '.join(JOBS)}, got {job!r}{hint}")
    try:
        return _ADAPTER.validate_python(raw)
    except ValidationError as err:
        raise ConfigError(f"{where}: " + "; ".join(_explain(e, JOBS[job]) for e in err.errors())) from None


def to_yaml(config: RunConfig) -> str:
    """The fully resolved configuration as YAML (what ``config.yaml`` in a run folder holds)."""
    return yaml.safe_dump(jsonable(asdict(config)), sort_keys=False, allow_unicode=True)


# ---- error messages -------------------------------------------------------------------------


def _explain(error: dict, root: type) -> str:
    loc = [p for p in error["loc"] if not isinstance(p, int)]
    if loc and loc[0] in JOBS and loc[0] != "job":  # the discriminator's tag
        loc = loc[1:]
    dotted = ".".join(str(p) for p in loc)
    if error["type"] in ("unexpected_keyword_argument", "extra_forbidden"):
        valid = _field_names(root, loc[:-1])
        near = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
        prefix = ".".join(str(p) for p in loc[:-1])
        full = lambda name: f"{prefix}.{name}" if prefix else name  # noqa: E731
        hint = f"; did you mean {full(near[0])!r}?" if near else ""
        return f"unknown key {dotted!r}{hint} (valid keys{' under ' + prefix if prefix else ''}: {', '.join(valid)})"
    got = error.get("input")
    shown = "" if isinstance(got, dict) else f" (got {got!r})"
    message = error["msg"].removeprefix("Value error, ")
    return f"{dotted or 'config'}: {message}{shown}"


def _field_names(cls: Any, path: list) -> list[str]:
    """Valid keys of the section at ``path`` under the config class ``cls``."""
    for part in path:
        fields = {f.name: f for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else {}
        if part not in fields:
            return []
        cls = _section_type(cls, part)
    return [f.name for f in dataclasses.fields(cls)] if dataclasses.is_dataclass(cls) else []


def _section_type(cls: type, name: str) -> Any:
    hint = typing.get_type_hints(cls)[name]
    for arg in typing.get_args(hint) or (hint,):  # Optional[Section] -> Section
        if dataclasses.is_dataclass(arg):
            return arg
    return hint
