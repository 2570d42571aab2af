"""The presets that ship with metapt (YAML files in ``metapt/presets``); imports nothing heavy."""

from __future__ import annotations

from importlib import resources


def presets() -> list[str]:
    """Names of the presets that ship with metapt."""
    folder = resources.files("metapt") / "presets"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def preset_text(name: str) -> str:
    return (resources.files("metapt") / "presets" / f"{name}.yaml").read_text(encoding="utf-8")


def preset_description(name: str) -> str:
    """The preset's one-line description: the first comment line of its YAML file."""
    for line in preset_text(name).splitlines():
        line = line.strip()
        if line.startswith("#"):
            return line.lstrip("#").strip()
        if line:
            break
    return ""
