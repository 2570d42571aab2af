"""Run a configuration in a run folder: the one place that knows which domain runs which job."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console

from .config import RunConfig, to_yaml
from .errors import DataError, LaunchError
from .runs import RunFolder


def start(config: RunConfig, out: str | Path, *, overwrite: bool = False) -> RunFolder:
    """A fresh run folder holding the resolved ``config`` (refused if it exists, unless ``overwrite``)."""
    if config.job == "ecg" and not config.data_dir:
        raise DataError("the ecg job needs a data folder: --data DIR or data_dir in the config "
                         "(a folder of WFDB records, e.g. ../shared/data/mitbih)")
    if config.job == "ecg" and not Path(config.data_dir).is_dir():
        raise DataError(f"data folder {config.data_dir} does not exist or is not a folder")
    return RunFolder.create(out, to_yaml(config), overwrite=overwrite)


def execute(folder: RunFolder, config: RunConfig, *, resume: bool = False, console: Console | None = None,
            reevaluate: bool = False, dist=None) -> dict:
    """Run (or, with ``resume``, continue) ``config`` in ``folder``; returns the summary.

    ``reevaluate`` (with ``resume``) keeps the pre-trained encoders and redoes the evaluation.
    ``dist``: the :class:`metapt.distributed.DistributedContext` of a torchrun launch.
    """
    console = console or Console(stderr=True)
    if dist is not None and dist.distributed and config.job != "molecules":
        raise LaunchError(f"the {config.job} job runs in one process; launch it without torchrun "
                         "(data-parallel runs are implemented for the molecules job)")
    if config.job == "molecules":
        from .domains.molecules.job import run_molecules

        return run_molecules(folder, config, resume=resume, console=console, reevaluate=reevaluate, dist=dist)
    if config.job == "synthetic":
        from .domains.synthetic.job import run_synthetic

        return run_synthetic(folder, config, resume=resume, console=console)
    from .domains.ecg.job import run_ecg

    return run_ecg(folder, Path(config.data_dir), preset=config, resume=resume, reevaluate=reevaluate)


def write_plots(folder: RunFolder, config: RunConfig, summary: dict[str, Any]) -> None:
    """(Re)draw the run's PNG plots from its summary and metrics."""
    if config.job == "molecules":
        from .domains.molecules.job import write_plots as plots
    elif config.job == "synthetic":
        from .domains.synthetic.job import write_plots as plots
    else:
        from .domains.ecg.job import write_plots as plots
    plots(folder.path, summary)


def load_summary(folder: RunFolder) -> dict[str, Any]:
    path = folder.path / "summary.json"
    if not path.is_file():
        raise ValueError(f"{folder.path} has no summary.json: the run has not finished (`metapt resume {folder.path}`)")
    return json.loads(path.read_text(encoding="utf-8"))
