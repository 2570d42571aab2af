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


JOBS = ("molecules", "ecg", "synthetic")


@app.command()
def run(
    job: str = typer.Argument(..., help="What to run: 'molecules' (the main job: ChEMBL → B3DB), 'ecg', or "
                              "'synthetic' (a small demo with a known answer)."),
    preset: str = typer.Option("default", help="Preset of the job. molecules: 'default' (about 10 min on 2 CPU "
                               "cores), 'paper' (Hu et al. sizes), 'test'; ecg: 'default', 'benchmark', 'quick'."),
    data: Path = typer.Option(None, help="Data folder (ecg: WFDB records in the MIT-BIH beat layout or PTB-XL)."),
    out: Path = typer.Option(None, help="Run folder (default runs/JOB-TIMESTAMP)."),
    steps: int = typer.Option(None, min=1, help="Pre-training steps per method (default: the preset's)."),
    seed: int = typer.Option(0, help="Seed for data order and initialisation."),
    overwrite: bool = typer.Option(False, help="Replace an existing run folder."),
    threads: int = typer.Option(None, min=1, help="CPU threads for PyTorch (default: PyTorch's choice). On a "
                                "shared machine 1 can be many times faster than oversubscribed cores."),
) -> None:
    """Run a job end to end: pre-train, meta-learn, fine-tune, evaluate, and print the comparison table."""
    if job not in JOBS:
        _fail(f"unknown job {job!r}; available: {', '.join(JOBS)}")
    if job == "ecg" and data is None:
        _fail("the ecg job needs --data DIR (a folder of WFDB records, e.g. ../shared/data/mitbih)")
    if threads:
        import torch

        torch.set_num_threads(threads)
    if data is not None and not data.is_dir():
        _fail(f"data folder {data} does not exist or is not a folder")
    folder = _run_dir(out, job, overwrite)
    try:
        if job == "synthetic":
            _run_synthetic(folder, steps or 1000, seed)
        elif job == "molecules":
            _run_molecules(folder, preset, steps, seed)
        else:
            _run_ecg(folder, data, preset, steps, seed)
    except ValueError as err:  # bad data or options: the message names the file or the field
        _fail(str(err))
    console.print(f"run folder: {folder}")


def _run_synthetic(folder: Path, steps: int, seed: int) -> None:
    from .domains.synthetic.job import run_synthetic

    results = run_synthetic(folder, steps=steps, seed=seed)
    table = Table(title="Synthetic task weighting: transfer after pre-training")
    for col in ("method", "test MSE (lower is better)", "mean weight, helpful tasks", "mean weight, noise tasks"):
        table.add_column(col)
    for method, r in results.items():
        table.add_row(method, f"{r['test_mse']:.4f}", f"{r['helpful_weight']:.3f}", f"{r['noise_weight']:.3f}")
    console.print(table)


def _run_molecules(folder: Path, preset: str, steps: int | None, seed: int) -> None:
    from .domains.molecules.job import PRESETS, job_from_preset, run_molecules

    if preset not in PRESETS:
        _fail(f"unknown molecules preset {preset!r}; choose from {', '.join(sorted(PRESETS))}")
    overrides = {"seed": seed} | ({"pt_steps": steps} if steps else {})
    summary = run_molecules(folder, job_from_preset(preset, **overrides), console=err_console)
    for setting, res in summary["settings"].items():
        table = Table(title=f"Molecules, {setting}: downstream test AUROC (mean ± 95 % CI over seeds)")
        modes = list(next(iter(res["scores"].values())))
        for col in ("method", *modes):
            table.add_column(col)
        for method, by_mode in res["scores"].items():
            table.add_row(method, *(f"{v['test_auroc_mean']:.4f} ± {v['test_auroc_ci95']:.4f}" for v in by_mode.values()))
        console.print(table)
    console.print(f"wall time: {summary['wall_seconds']} s")


def _run_ecg(folder: Path, data: Path, preset: str, steps: int | None, seed: int) -> None:
    try:
        from .domains.ecg.job import run_ecg
    except ImportError:
        _fail("the ecg job is not available in this version")
    summary = run_ecg(folder, data, preset=preset, pretrain_steps=steps)
    console.print((folder / "summary.md").read_text() if (folder / "summary.md").exists() else summary)


@app.command()
def version() -> None:
    """Print the installed version."""
    from . import __version__

    console.print(__version__)


def main() -> None:
    app()
