"""Run a configuration in a run folder: the CLI's entry into the runner."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console

from .config import to_yaml
from .domains import domain
from .runner import run_experiment
from .runs import RunFolder
from .summary import write_plots as _write_plots


def start(config: Any, out: str | Path, *, overwrite: bool = False) -> RunFolder:
    """A fresh run folder holding the resolved ``config`` (refused if it exists, unless ``overwrite``),
    once the job's domain has accepted ``config`` (its optional ``check``, e.g. that a data folder exists)."""
    check = getattr(domain(config.job), "check", None)
    if check is not None:
        check(config)
    return RunFolder.create(out, to_yaml(config), overwrite=overwrite)


def execute(folder: RunFolder, config: Any, *, resume: bool = False, console: Console | None = None,
            reevaluate: bool = False, dist=None) -> dict:
    """Run (or, with ``resume``, continue) ``config`` in ``folder``; returns the summary."""
    return run_experiment(domain(config.job), folder, config, resume=resume, console=console,
                          reevaluate=reevaluate, dist=dist)


def write_plots(folder: RunFolder, config: Any, summary: dict[str, Any]) -> None:
    """(Re)draw the run's PNG plots from its summary and metrics."""
    _write_plots(domain(config.job), folder, summary)
