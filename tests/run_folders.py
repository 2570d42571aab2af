"""Helpers shared by the tests that take run folders apart (``from run_folders import ...``;
``tests/`` is on the path of every test, see ``ecg_records``)."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path
from types import ModuleType


def copy_run(run: Path, to: Path) -> Path:
    """A copy of a finished run folder without its lock, to damage or resume in a test."""
    shutil.copytree(run, to)
    (to / ".metapt-lock").unlink(missing_ok=True)
    return to


def load_file(name: str, path: Path) -> ModuleType:
    """A Python file that is not a package module (docs/hooks.py, scripts/*.py), imported by path."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
