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
import math
import typing
import warnings
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import yaml
from pydantic import TypeAdapter, ValidationError

from . import domains
from ._presets import preset_text as _preset_text
from ._presets import presets
from .errors import ConfigError
from .schema import RENAMED_KEYS, jsonable

RunConfig = Any  # an instance of one domain's job-config class (``metapt.domains.config_class``)


class _Jobs(Mapping):
    """Job name -> config class, imported on first use (``metapt config --list`` imports no domain)."""

    def __getitem__(self, job: str) -> type:
        if job not in domains.REGISTRY:
            raise KeyError(job)
        return domains.config_class(job)

    def __iter__(self):
        return iter(domains.REGISTRY)

    def __len__(self) -> int:
        return len(domains.REGISTRY)


JOBS: Mapping[str, type] = _Jobs()


# ConfigError lives in metapt.errors (every user error derives from UserError); re-exported here.


# ---- presets --------------------------------------------------------------------------------


# ---- loading --------------------------------------------------------------------------------

#: Bounds on what a config may cost to read: its size, its nodes after YAML alias expansion,
#: its nesting, and the length of one error message.
MAX_CONFIG_BYTES = 1 << 20
MAX_CONFIG_NODES = 100_000
MAX_CONFIG_DEPTH = 64
MAX_MESSAGE_CHARS = 2_000
_FLOAT32_MAX = 3.4028234663852886e38


def load_config(source: str | Path, overrides: typing.Sequence[str] = ()) -> RunConfig:
    """A validated run configuration from a YAML file or a preset name, with ``key.path=value`` overrides.

    The file or preset is laid over the job's fully resolved default configuration (so a
    section it names only in part keeps the job's defaults for the rest), then each override
    changes exactly the key it names. A key's deprecated name (:data:`metapt.schema.RENAMED_KEYS`:
    ``meta.solver`` for ``meta.estimator``) is read as the key, with a FutureWarning.
    """
    path = Path(source)
    if path.suffix in (".yaml", ".yml") or path.exists():
        text, where = _read_config_file(path), str(path)
    elif str(source) in presets():
        text, where = _preset_text(str(source)), f"preset {source}"
    else:
        near = difflib.get_close_matches(str(source), presets(), n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise ConfigError(_bounded(f"no config file or preset named {str(source)!r}{hint} "
                                   f"(presets: {', '.join(presets())})"))
    raw = parse_yaml(text, where)
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a mapping of keys to values, got {type(raw).__name__}")
    raw = _extend(renamed(raw, where), where)
    cls = _job_class(raw.get("job"), where)
    raw = _merge(cls, jsonable(asdict(cls())), raw)
    for item in _one_spelling(overrides):
        apply_override(raw, item, cls)
    return validate(raw, where)


def _read_config_file(path: Path) -> str:
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    if not path.is_file():  # a folder, a FIFO, a device: reading it could block or mean nothing
        raise ConfigError(f"config file {path} is not a regular file")
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ConfigError(f"config file {path} is {size:,} bytes; a config is at most {MAX_CONFIG_BYTES:,}")
        data = path.read_bytes()
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror}") from err
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {err.start}: {data[err.start:err.start + 1]!r})") from None


def parse_yaml(text: str, where: str = "config") -> Any:
    """``yaml.safe_load`` with bounds: size, nodes after alias expansion, nesting; duplicate keys are errors."""
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{where} is {len(text):,} characters; a config is at most {MAX_CONFIG_BYTES:,}")
    loader = None
    try:
        loader = _BoundedLoader(text)  # reads the first characters already: a control character raises here
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expanded_size(node, where)
        return loader.construct_document(node)
    except yaml.YAMLError as err:
        raise ConfigError(_bounded(f"{where} is not valid YAML: {err}")) from None
    except RecursionError:
        raise ConfigError(f"{where} is nested too deeply to be a config") from None
    finally:
        if loader is not None:
            loader.dispose()


class _BoundedLoader(yaml.SafeLoader):
    """The safe loader, refusing duplicate keys (YAML says they are an error; PyYAML lets the last win)."""


def _construct_mapping(loader: _BoundedLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=True)
        try:
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark,
                    f"found duplicate key {key!r} (first at line {seen[key].line + 1})", key_node.start_mark)
            seen[key] = key_node.start_mark
        except TypeError:  # an unhashable key: the base constructor explains it
            break
    return yaml.constructor.SafeConstructor.construct_mapping(loader, node, deep=deep)


_BoundedLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _check_expanded_size(root: yaml.Node, where: str) -> None:
    """Refuse a document whose nodes, with every alias expanded, exceed the bounds (a "billion
    laughs" alias bomb is a few hundred bytes). Counted without expanding: shared nodes are memoised."""
    size: dict[int, int] = {}
    active: set[int] = set()

    def count(node: yaml.Node, depth: int) -> int:
        key = id(node)
        if key in size:
            return size[key]
        if key in active:
            raise ConfigError(f"{where}: a YAML alias refers to a node that contains it")
        if depth > MAX_CONFIG_DEPTH:
            raise ConfigError(f"{where} is nested more than {MAX_CONFIG_DEPTH} levels deep")
        active.add(key)
        total = 1
        if isinstance(node, yaml.SequenceNode):
            total += sum(count(child, depth + 1) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            total += sum(count(k, depth + 1) + count(v, depth + 1) for k, v in node.value)
        active.discard(key)
        if total > MAX_CONFIG_NODES:
            raise ConfigError(f"{where} expands to more than {MAX_CONFIG_NODES:,} YAML nodes "
                              "(YAML aliases repeat what they refer to)")
        size[key] = total
        return total

    count(root, 0)


def _job_class(job: Any, where: str) -> type:
    if not isinstance(job, str) or job not in JOBS:
        near = difflib.get_close_matches(str(job), JOBS, n=1) if job is not None else []
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise ConfigError(_bounded(f"{where}: 'job' must be one of {', '.join(JOBS)}, got {job!r}{hint}"))
    return JOBS[job]


def _extend(raw: dict, where: str, seen: tuple[str, ...] = ()) -> dict:
    """``extends: PRESET`` lays a config over a shipped preset (which may extend another in turn)."""
    if "extends" not in raw:
        return raw
    raw = dict(raw)
    name = raw.pop("extends")
    if not isinstance(name, str) or name not in presets():
        raise ConfigError(_bounded(f"{where}: 'extends' must name a preset ({', '.join(presets())}), got {name!r}"))
    if name in seen:
        raise ConfigError(f"{where}: presets extend each other in a loop ({' -> '.join((*seen, name))})")
    base = renamed(parse_yaml(_preset_text(name), f"preset {name}"), f"preset {name}", stacklevel=3)
    base = _extend(base, f"preset {name}", (*seen, name))
    if raw.get("job", base.get("job")) != base.get("job"):
        raise ConfigError(f"{where}: extends preset {name!r} of job {base.get('job')!r} but sets job {raw['job']!r}")
    return _merge(_job_class(base.get("job"), f"preset {name}"), base, raw)


def _merge(cls: Any, base: Any, update: Any) -> Any:
    """``update`` laid over ``base``: sections (config classes) merge key by key, anything else is replaced.

    A section with a ``kind`` (``meta.estimator``) that is given another kind starts afresh: the old
    kind's own keys (Neumann's ``terms``) would not apply to the new one."""
    if not (dataclasses.is_dataclass(cls) and isinstance(update, dict)):
        return update
    if not isinstance(base, dict):
        base = {}
    names = {f.name for f in dataclasses.fields(cls)}
    if "kind" in names and "kind" in update and update["kind"] != base.get("kind"):
        base = {}
    out = dict(base)
    for key, value in update.items():
        section = _section_type(cls, key) if key in names else None
        value = _shorthand(section, value)
        out[key] = _merge(section, base.get(key), value) if dataclasses.is_dataclass(section) else value
    return out


def _shorthand(section: Any, value: Any) -> Any:
    """``estimator: cg`` is short for ``estimator: {kind: cg}`` (a section with a ``kind`` key, given by name)."""
    if isinstance(value, str) and dataclasses.is_dataclass(section) and \
            "kind" in {f.name for f in dataclasses.fields(section)}:
        return {"kind": value}
    return value


def renamed(raw: Any, where: str = "config", *, quiet: bool = False, stacklevel: int = 2) -> Any:
    """``raw`` (a config mapping as read from YAML) with every key given by its deprecated name
    (:data:`metapt.schema.RENAMED_KEYS`: ``meta.solver``) under its name now (``meta.estimator``),
    with a FutureWarning; both names in one mapping are a :class:`ConfigError`. ``quiet``: for
    comparing configs, no warning, and both names are left as they are. ``raw`` itself is not changed;
    ``stacklevel``: the warning's, as :func:`warnings.warn` counts it from the caller of :func:`renamed`."""
    if not isinstance(raw, dict):
        return raw
    for old, new in RENAMED_KEYS.items():
        *parents, old_key = old.split(".")
        new_key = new.split(".")[-1]
        path, node = [], raw
        for part in parents:
            path.append((node, part))
            node = node.get(part)
            if not isinstance(node, dict):
                break
        if not (isinstance(node, dict) and old_key in node):
            continue
        if new_key in node:
            if quiet:
                continue
            raise ConfigError(f"{where}: {old} and {new} are the same section ({old} is its deprecated name); "
                              f"give {new} only")
        if not quiet:
            warnings.warn(f"{where}: {old} is deprecated; use {new} (the same keys)", FutureWarning,
                          stacklevel=stacklevel + 1)
        node = {(new_key if k == old_key else k): v for k, v in node.items()}  # in place: the order is kept
        for parent, part in reversed(path):  # copies along the path: the caller's mapping stays as it was
            node = {**parent, part: node}
        raw = node
    return raw


def _renamed_path(parts: list[str], item: str) -> list[str]:
    """The dotted key ``parts`` of the override ``item`` with a deprecated name (``meta.solver.max_iter``)
    under its name now, with a FutureWarning."""
    for old, new in RENAMED_KEYS.items():
        old_parts = old.split(".")
        if parts[:len(old_parts)] == old_parts:
            parts = [*new.split("."), *parts[len(old_parts):]]
            value = item.partition("=")[2]
            warnings.warn(f"override {item!r}: {old} is deprecated; use {new} (--set {'.'.join(parts)}={value})",
                          FutureWarning, stacklevel=4)
            return parts
    return parts


def _one_spelling(overrides: typing.Sequence[str]) -> typing.Sequence[str]:
    """``overrides``, refused if they name one key by both its deprecated name and its name now."""
    keys = [[p.strip() for p in item.partition("=")[0].strip().split(".")] for item in overrides]
    for old, new in RENAMED_KEYS.items():
        olds, news = old.split("."), new.split(".")
        if any(k[:len(olds)] == olds for k in keys) and any(k[:len(news)] == news for k in keys):
            raise ConfigError(f"overrides name both {old} and {new}, the same section ({old} is its deprecated "
                              f"name); use {new} only")
    return overrides


def apply_override(raw: dict, item: str, cls: type | None = None) -> None:
    """Set ``a.b.c=value`` in the raw config, changing that key only; the value is read as YAML
    (``3``, ``1e-3``, ``[a, b]``, ``null``). ``cls``: the job's config class (default: from ``raw['job']``)."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(_bounded(f"override {item!r} must look like key.path=value (e.g. meta.estimator=cg)"))
    parts = [p.strip() for p in key.strip().split(".")]
    if not all(parts):
        raise ConfigError(_bounded(f"override {item!r}: {key.strip()!r} has an empty key between dots"))
    parts = _renamed_path(parts, item)
    if cls is None:
        cls = JOBS.get(raw.get("job")) if isinstance(raw.get("job"), str) else None
    parsed = parse_yaml(value, f"override {item!r}")
    wrapped = parsed  # a mapping given as the value (--set 'meta={solver: cg}') may use a deprecated name too
    for part in reversed(parts):
        wrapped = {part: wrapped}
    wrapped = renamed(wrapped, f"override {item!r}", stacklevel=3)
    for part in parts:
        wrapped = wrapped[part]
    parsed = wrapped
    node: dict = raw
    section: Any = cls
    for depth, part in enumerate(parts):
        names = {f.name for f in dataclasses.fields(section)} if dataclasses.is_dataclass(section) else set()
        child_type = _section_type(section, part) if part in names else None
        if depth == len(parts) - 1:  # a section given as a mapping (or by name) merges into the one there
            if part == "kind" and "kind" in names and parsed != node.get("kind"):
                node.clear()  # another kind: the old kind's own keys go with it (see _merge)
            node[part] = _merge(child_type, node.get(part), _shorthand(child_type, parsed))
            return
        child = _shorthand(child_type, node.get(part))
        if child is None:
            child = {}
        if not isinstance(child, dict):
            raise ConfigError(_bounded(f"override {item!r}: {'.'.join(parts[:depth + 1])!r} is a value, not a section"))
        node[part] = child
        node, section = child, child_type


def with_overrides(config: RunConfig, overrides: typing.Sequence[str], where: str = "config") -> RunConfig:
    """``config`` with ``key.path=value`` overrides laid over it (as :func:`load_config` lays them
    over a file), validated anew."""
    raw = yaml.safe_load(to_yaml(config))
    for item in _one_spelling(overrides):
        apply_override(raw, item)
    return validate(raw, where)


def validate(raw: dict, where: str = "config") -> RunConfig:
    """The run configuration ``raw`` describes (a dict as read from YAML), or a :class:`ConfigError`."""
    cls = _job_class(raw.get("job"), where)
    raw = renamed(raw, where)
    problems = _scalar_problems(cls, raw, [])
    if problems:
        raise ConfigError(_bounded(f"{where}: " + "; ".join(problems)))
    try:
        return TypeAdapter(cls).validate_python(raw)
    except ValidationError as err:
        raise ConfigError(_bounded(f"{where}: " + "; ".join(_explain(e, cls) for e in err.errors()))) from None


def _scalar_problems(cls: Any, raw: Any, path: list[str]) -> list[str]:
    """What pydantic lets through: a non-finite or float32-overflowing number anywhere, and
    ``true``/``false`` for a key that is not a switch (pydantic reads them as 1 and 0)."""
    problems = []
    if isinstance(raw, dict):
        names = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
        for key, value in raw.items():
            hint = typing.get_type_hints(cls).get(key) if key in names else None
            child = _section_type(cls, key) if key in names else None
            dotted = [*path, str(key)]
            if isinstance(value, bool) and hint is not None and _numeric(hint) and not _admits_bool(hint):
                problems.append(f"{'.'.join(dotted)}: expected {_kind(hint)}, got {str(value).lower()}")
            elif isinstance(value, str) and hint is not None and _numeric(hint):
                try:  # YAML 1.1 reads 1e39 (no dot) as a string, which pydantic then reads as a number
                    number = float(value)
                except ValueError:
                    continue
                problems += _scalar_problems(None, number, dotted)
            else:
                problems += _scalar_problems(child, value, dotted)
    elif isinstance(raw, list):
        for value in raw:
            problems += _scalar_problems(None, value, path)
    elif isinstance(raw, float) and not (math.isfinite(raw) and abs(raw) <= _FLOAT32_MAX):
        problems.append(f"{'.'.join(path) or 'config'}: must be a finite number that fits in float32 "
                        f"(|x| <= 3.4e38), got {raw!r}")
    return problems


def _admits_bool(hint: Any) -> bool:
    if hint is bool or hint is Any:
        return True
    if typing.get_origin(hint) is typing.Literal:
        return any(isinstance(a, bool) for a in typing.get_args(hint))
    return any(_admits_bool(a) for a in typing.get_args(hint))


def _numeric(hint: Any) -> bool:
    return hint in (int, float) or any(_numeric(a) for a in typing.get_args(hint))


def _kind(hint: Any) -> str:
    return "a number" if _numeric(float) and float in (hint, *typing.get_args(hint)) else "an integer"


def to_yaml(config: RunConfig) -> str:
    """The fully resolved configuration as YAML (what ``config.yaml`` in a run folder holds)."""
    return yaml.safe_dump(jsonable(asdict(config)), sort_keys=False, allow_unicode=True)


# ---- comparing configurations -------------------------------------------------------------


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """A nested mapping as dotted keys: ``{"meta": {"lr": 1}}`` -> ``{"meta.lr": 1}``."""
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


def config_changes(old_yaml: str, new_yaml: str) -> dict[str, tuple[Any, Any]]:
    """Dotted keys whose values differ between two config YAML texts: key -> (old, new). A key
    under its deprecated name (a run folder written before ``meta.solver`` became ``meta.estimator``)
    is compared as the key."""
    old, new = (flatten(renamed(yaml.safe_load(text) or {}, quiet=True)) for text in (old_yaml, new_yaml))
    missing = object()
    return {k: (old.get(k), new.get(k)) for k in sorted(old.keys() | new.keys())
            if old.get(k, missing) != new.get(k, missing)}


# ---- error messages -------------------------------------------------------------------------


def _bounded(message: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """One line of at most ``limit`` characters (what a user can read; a 300 MB line is not)."""
    message = " ".join(message.split())
    return message if len(message) <= limit else message[: limit - 30] + f" … ({len(message):,} characters)"


def _short_repr(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


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
        return f"unknown key {_short_repr(dotted)}{hint} (valid keys{' under ' + prefix if prefix else ''}: {', '.join(valid)})"
    got = error.get("input")
    shown = "" if isinstance(got, dict) else f" (got {_short_repr(got)})"
    message = error["msg"].removeprefix("Value error, ")
    return f"{dotted or 'config'}: {_bounded(message, 300)}{shown}"


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
