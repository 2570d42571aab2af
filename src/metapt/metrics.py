"""Where per-step metrics go: JSON lines on disk, a progress bar on the terminal."""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import IO

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from .errors import UserError


class JsonlLogger:
    """Appends one JSON object per step: ``{"step": n, "phase": ..., **metrics}``.

    Non-finite numbers are written as null, so every line is valid JSON.
    """

    def __init__(self, path: str | Path, phase: str = "meta"):
        self.path = Path(path)
        self.phase = phase
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file: IO[str] = self.path.open("a", encoding="utf-8")

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        row = {"step": step, "phase": self.phase}
        row.update({k: (float(v) if math.isfinite(float(v)) else None) for k, v in metrics.items()})
        self._file.write(json.dumps(row) + "\n")

    def flush(self) -> None:
        """Push rows to the disk (flush and fsync), so the file's size counts every row logged so far
        and a checkpoint that records that size never outlives the rows it counts."""
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.flush()
        self._file.close()

    def __enter__(self) -> "JsonlLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class TensorBoardLogger:
    """Scalars to TensorBoard event files (``tensorboard --logdir RUN_DIR/tensorboard``).

    ``purge_step`` tells TensorBoard to drop events at or after that step left by an
    interrupted run, so a resumed run's curves have no doubled segments.
    """

    def __init__(self, logdir: str | Path, purge_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        try:
            self._writer = SummaryWriter(str(logdir), purge_step=purge_step or None)
        except (FileExistsError, NotADirectoryError) as err:  # a file where a folder of the run must be
            raise UserError(f"cannot write TensorBoard events to {logdir} ({err.strerror}: {err.filename}); "
                            "a file stands where the run keeps a folder: move it away and resume") from None

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        for key, value in metrics.items():
            self._writer.add_scalar(key, float(value), step)

    def close(self) -> None:
        self._writer.close()


class MetricsFileError(UserError, ValueError):
    """A step log that is not JSON lines; the message names the file and the line."""


def read_jsonl(path: str | Path) -> list[dict]:
    """The rows of a JSON-lines file; a damaged line is an error naming the file and line."""
    rows = []
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line.decode("utf-8")))
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                raise MetricsFileError(f"{path}, line {number}: not valid JSON ({err}); the file is damaged") from None
    return rows


def progress_bar(console: Console | None = None) -> Progress:
    """A rich progress bar with ETA; silent when stderr is not a terminal."""
    console = console or Console(stderr=True)
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=console,
        disable=not sys.stderr.isatty(),
        transient=False,
    )
