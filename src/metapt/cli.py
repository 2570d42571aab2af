"""The ``metapt`` command line."""

from __future__ import annotations

import datetime as _dt
import shutil
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Meta-learn pre-training hyperparameters by gradient.")
console = Console()
err_console = Console(stderr=True, soft_wrap=True)


def _fail(message: str) -> None:
    """A user error: one clear line on stderr, exit status 2, no traceback."""
    err_console.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(2)


def _run_dir(out: Path | None, name: str, overwrite: bool) -> Path:
    out = out or Path("runs") / f"{name}-{_dt.datetime.now():%Y%m%d-%H%M%S}"
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            _fail(f"run folder {out} already exists; pass --overwrite or choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


@app.command()
def run(
    job: str = typer.Argument(..., help="What to run: 'synthetic' (a small demo with a known answer)."),
    out: Path = typer.Option(None, help="Run folder (default runs/JOB-TIMESTAMP)."),
    steps: int = typer.Option(1000, min=1, help="Pre-training steps per method."),
    seed: int = typer.Option(0, help="Seed for data and initialisation."),
    overwrite: bool = typer.Option(False, help="Replace an existing run folder."),
) -> None:
    """Run a job end to end and print its comparison table."""
    if job != "synthetic":
        _fail(f"unknown job {job!r}; available: synthetic")
    from .domains.synthetic.job import run_synthetic

    folder = _run_dir(out, job, overwrite)
    results = run_synthetic(folder, steps=steps, seed=seed)
    table = Table(title="Synthetic task weighting: transfer after pre-training")
    for col in ("method", "test MSE (lower is better)", "mean weight, helpful tasks", "mean weight, noise tasks"):
        table.add_column(col)
    for method, r in results.items():
        table.add_row(method, f"{r['test_mse']:.4f}", f"{r['helpful_weight']:.3f}", f"{r['noise_weight']:.3f}")
    console.print(table)
    console.print(f"run folder: {folder}")


@app.command()
def version() -> None:
    """Print the installed version."""
    from . import __version__

    console.print(__version__)


def main() -> None:
    app()
