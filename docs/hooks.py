"""MkDocs hooks: pages that cannot go stale, because they are filled in at build time.

* ``<!-- example: PATH -->`` becomes a code block holding the file PATH (relative to the
  repository root), so the examples page shows exactly the scripts the tests run.
* ``<!-- metapt-cli -->`` becomes the ``--help`` text of ``metapt`` and of every one of its
  commands, taken from the installed CLI itself.
* ``<!-- metapt-config-reference -->`` becomes one table per job of every configuration key, its
  default and its meaning, read from the config classes (pydantic dataclasses) and their
  ``Attributes:`` docstrings.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = re.compile(r"<!-- example: (?P<path>[\w./-]+) -->")


def _example(match: re.Match) -> str:
    path = ROOT / match["path"]
    if not path.is_file():
        raise FileNotFoundError(f"docs: the page includes {match['path']}, which does not exist")
    return f"```python\n{path.read_text().rstrip()}\n```"


def cli_help() -> dict[str, str]:
    """``--help`` of ``metapt`` (key ``""``) and of each command (key: its name), as printed."""
    import click
    import typer

    from metapt.cli import app

    group = typer.main.get_command(app)
    out = {}
    with click.Context(group, info_name="metapt", terminal_width=100, max_content_width=100) as ctx:
        out[""] = group.get_help(ctx)
        for name in group.list_commands(ctx):
            command = group.get_command(ctx, name)
            with click.Context(command, parent=ctx, info_name=name, terminal_width=100,
                               max_content_width=100) as sub:
                out[name] = command.get_help(sub)
    return out


def _cli_page() -> str:
    parts = []
    for name, text in cli_help().items():
        title = "metapt" if not name else f"metapt {name}"
        parts.append(f"### `{title}`\n\n```text\n{text.rstrip()}\n```\n")
    return "\n".join(parts)


#: A link from a docs page to a file of the repository outside docs/ (a results file): it works
#: where the Markdown is read in the repository; the built site names the file instead.
REPO_LINK = re.compile(r"\[([^\]]+)\]\(\.\./((?:benchmarks|examples|src|tests)/[^)\s]+)\)")


def on_page_markdown(markdown: str, page, config, files) -> str:
    markdown = EXAMPLE.sub(_example, markdown)
    markdown = REPO_LINK.sub(lambda m: m.group(1) if m.group(1).strip("`") == m.group(2).rsplit("/", 1)[-1]
                             else f"{m.group(1)} (`{m.group(2)}`)", markdown)
    if "<!-- metapt-cli -->" in markdown:
        markdown = markdown.replace("<!-- metapt-cli -->", _cli_page())
    if "<!-- metapt-config-reference -->" in markdown:
        markdown = markdown.replace("<!-- metapt-config-reference -->", config_reference())
    return markdown


# ---- the configuration reference, generated from the schema ------------------------------------

#: Meanings of the top-level keys, which the job classes share and do not document one by one.
TOP_LEVEL = {
    "job": "which job runs (the domain); fixed by the preset",
    "device": "`auto` (CUDA when available), `cpu`, `cuda` or `cuda:INDEX`",
    "methods": "the methods run, compared and reported (see the job's table in the README)",
    "data_dir": "the data folder (`--data DIR` sets it)",
    "problem": "the job's model and problem",
    "model": "the encoder",
    "data": "which data, and how it is split",
    "pretrain": "plain pre-training",
    "meta": "meta-learning (Algorithm 1)",
    "evaluation": "the downstream evaluation protocol",
    "checkpoint": "checkpoints",
}


def _attribute_docs(cls) -> dict[str, str]:
    """``name -> text`` from the ``Attributes:`` section of a Google-style class docstring."""
    import inspect

    doc = inspect.getdoc(cls) or ""
    if "Attributes:" not in doc:
        return {}
    out: dict[str, str] = {}
    names: list[str] = []
    for line in doc.split("Attributes:", 1)[1].splitlines():
        if not line.strip():
            continue
        entry = re.match(r"^    (\w+(?:, \w+)*)(?: \([^)]*\))?: (.*)$", line)
        if entry:
            names = entry[1].split(", ")
            for name in names:
                out[name] = entry[2].strip()
        elif line.startswith("        ") and names:
            for name in names:
                out[name] += " " + line.strip()
        else:
            break
    return out


def _is_section(value) -> bool:
    return hasattr(type(value), "__pydantic_fields__") and not isinstance(value, type)


def _section_class(annotation):
    """The config class inside ``annotation`` (``X``, ``X | None``), if any."""
    import typing

    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and hasattr(candidate, "__pydantic_fields__"):
            return candidate
    return None


def _default_text(value) -> str:
    import enum
    import json

    from metapt.schema import jsonable

    if value is None:
        return "null"
    if isinstance(value, enum.Enum):
        value = value.value
    return json.dumps(jsonable(value), ensure_ascii=False)


def config_rows(cls, instance=None, prefix: str = ""):
    """``(key, default, meaning)`` for every key of config class ``cls``, nested sections flattened;
    defaults are ``instance``'s values (a job's own defaults for its sections) or the class's."""
    import dataclasses

    docs = _attribute_docs(cls)
    for field in dataclasses.fields(cls):
        key = f"{prefix}{field.name}"
        if instance is not None:
            value = getattr(instance, field.name)
        elif field.default is not dataclasses.MISSING:
            value = field.default
        elif field.default_factory is not dataclasses.MISSING:
            value = field.default_factory()
        else:
            value = dataclasses.MISSING
        if type(value).__name__ == "FieldInfo":  # pydantic's Field(default=...)
            from pydantic_core import PydanticUndefined

            if value.default is not PydanticUndefined:
                value = value.default
            elif value.default_factory is not None:
                value = value.default_factory()
            else:
                value = dataclasses.MISSING
        meaning = docs.get(field.name) or (TOP_LEVEL.get(field.name, "") if not prefix else "")
        if _is_section(value):
            yield key, "", meaning or (inspect_first_line(type(value)))
            yield from config_rows(type(value), value, key + ".")
            continue
        default = "required" if value is dataclasses.MISSING else _default_text(value)
        yield key, default, meaning
        section = _section_class(cls.__pydantic_fields__[field.name].annotation)
        if section is not None and value is None:  # an optional section, off by default
            yield from config_rows(section, None, key + ".")


def inspect_first_line(cls) -> str:
    import inspect

    return (inspect.getdoc(cls) or "").strip().splitlines()[0] if inspect.getdoc(cls) else ""


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("``", "`").replace("|", "\\|")


def config_reference() -> str:
    """Markdown: one table per job, every key with its default and meaning."""
    from metapt.config import JOBS

    parts = []
    for job in sorted(JOBS):
        cls = JOBS[job]
        parts.append(f"## `{job}`\n\n{_cell(inspect_first_line(cls))}\n\n| key | default | meaning |\n|---|---|---|")
        for key, default, meaning in config_rows(cls):
            shown = f"`{_cell(default)}`" if default else ""
            parts.append(f"| `{key}` | {shown} | {_cell(meaning)} |")
        parts.append("")
    return "\n".join(parts)
