"""Run a configuration in a run folder: the CLI's entry into the runner."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console

from .config import to_yaml
from .domains import domain
from .errors import UserError
from .runner import run_experiment
from .runner import write_plots as _write_plots
from .runs import RunFolder


def start(config: Any, out: str | Path, *, overwrite: bool = False) -> RunFolder:
    """A fresh run folder holding the resolved ``config`` (refused if it exists, unless ``overwrite``)."""
    if config.job == "ecg" and not config.data_dir:
        raise UserError("the ecg job needs a data folder: --data DIR or data_dir in the config "
                        "(a folder of WFDB records, e.g. ../shared/data/mitbih)")
    if config.job == "ecg" and not Path(config.data_dir).is_dir():
        raise UserError(f"data folder {config.data_dir} does not exist or is not a folder")
    return RunFolder.create(out, to_yaml(config), overwrite=overwrite)


def execute(folder: RunFolder, config: Any, *, resume: bool = False, console: Console | None = None,
            reevaluate: bool = False, dist=None) -> dict:
    """Run (or, with ``resume``, continue) ``config`` in ``folder``; returns the summary."""
    return run_experiment(domain(config.job), folder, config, resume=resume, console=console,
                          reevaluate=reevaluate, dist=dist)


def write_plots(folder: RunFolder, config: Any, summary: dict[str, Any]) -> None:
    """(Re)draw the run's PNG plots from its summary and metrics."""
    _write_plots(domain(config.job), folder, summary)


def load_summary(folder: RunFolder) -> dict[str, Any]:
    path = folder.path / "summary.json"
    if not path.is_file():
        raise UserError(f"{folder.path} has no summary.json: the run has not finished (`metapt resume {folder.path}`)")
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is not valid JSON ({err})") from None
    if not isinstance(summary, dict) or "settings" not in summary:
        raise UserError(f"{path} is not the summary of a metapt run of this version")
    return summary
