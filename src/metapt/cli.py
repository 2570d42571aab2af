"""The ``metapt`` command line.

Every user error (bad config, missing data, existing run folder, a run that
cannot go on) is one line on stderr and a non-zero exit status; ``--debug``
shows the traceback instead.
"""

from __future__ import annotations

import datetime as _dt
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="Meta-learn pre-training hyperparameters by gradient (Raghu et al., NeurIPS 2021).")
console = Console()
err_console = Console(stderr=True, soft_wrap=True)

SetOption = Annotated[list[str], typer.Option(
    "--set", metavar="KEY=VALUE",
    help="Override one config key, e.g. --set meta.solver=cg --set pretrain.steps=500 (repeatable; "
         "the value is read as YAML).")]
DebugOption = Annotated[bool, typer.Option(
    "--debug", help="Show the full traceback on errors; under torchrun, also check after every step that all "
                    "processes hold bitwise identical θ, φ and head.")]
ThreadsOption = Annotated[Optional[int], typer.Option(
    "--threads", min=1, help="torch CPU threads; on a shared machine 1 can be many times faster than "
                             "oversubscribed cores.")]


class _UserError(Exception):
    """A failure whose message is the whole story (no traceback needed)."""


def _fail(message: str, code: int = 2):
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, markup=True)
    raise typer.Exit(code)


def _guarded(debug: bool, action):
    """Run ``action``; turn the errors a user can fix into one line and an exit status."""
    from .distributed import DistributedSetupError
    from .runs import RunFolderError
    from .trainer import NonFiniteLossError

    try:
        return action()
    except typer.Exit:
        raise
    except NonFiniteLossError as err:
        if debug:
            raise
        _fail(f"{err}. The last good checkpoint is kept; after changing the config, `metapt resume RUN_DIR`.", 3)
    except (ValueError, RunFolderError, FileNotFoundError, PermissionError, DistributedSetupError, _UserError) as err:
        if debug:
            raise
        _fail(str(err).replace("\n", " "))
    except KeyboardInterrupt:
        _fail("interrupted; the newest checkpoint is kept: `metapt resume RUN_DIR` continues the run", 130)


def _distributed(debug: bool):
    """The torchrun process group when launched by torchrun, else a one-process context."""
    import datetime

    from .distributed import init_distributed

    # The shipped jobs compute on CPU, so they talk over gloo even where CUDA exists; every process
    # evaluates after pre-training, and the timeout must cover the longest gap between collectives.
    return init_distributed("gloo", debug=debug, timeout=datetime.timedelta(hours=12))


def _on_main(ctx, fn):
    """``fn()`` on rank 0 only; every process gets its result, or raises its error."""
    if not ctx.distributed:
        return fn()
    import torch.distributed as torch_dist

    box: list = [None, None]
    if ctx.is_main:
        try:
            box = [fn(), None]
        except Exception as err:  # noqa: BLE001 (re-raised on every process below)
            box = [None, str(err)]
    torch_dist.broadcast_object_list(box, src=0)
    if box[1] is not None:
        raise _UserError(box[1])
    return box[0]


def _threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def _finish(folder, is_main: bool = True) -> None:
    """Print the summary and write report.html (rank 0 only under torchrun)."""
    from .report import write_report

    if not is_main:
        return
    md = folder.path / "summary.md"
    if md.is_file():
        console.print(md.read_text(encoding="utf-8"), markup=False, highlight=False)
    report = write_report(folder)
    console.print(f"report: {report}")


@app.command()
def run(
    config: Annotated[str, typer.Argument(help="A preset name (`metapt config --list`) or a YAML config file.")],
    overrides: SetOption = [],  # noqa: B006 (typer reads the default)
    out: Annotated[Optional[Path], typer.Option(help="Run folder (default: runs/JOB-TIMESTAMP).")] = None,
    data: Annotated[Optional[Path], typer.Option(help="Data folder for jobs that read one (ecg: WFDB records).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing run folder.")] = False,
    threads: ThreadsOption = None,
    debug: DebugOption = False,
) -> None:
    """Run a job end to end: pre-train, meta-learn, fine-tune, evaluate, report.

    Checkpoints are written every checkpoint.every PT steps; a run that stops for any
    reason continues with `metapt resume RUN_DIR`.
    """

    def action():
        from .config import load_config
        from .jobs import execute, start
        from .runs import RunFolder

        extra = [f"data_dir={data}"] if data is not None else []
        resolved = load_config(config, [*overrides, *extra])
        _threads(threads)
        with _distributed(debug) as ctx:
            default = Path("runs") / f"{resolved.job}-{_dt.datetime.now():%Y%m%d-%H%M%S}"
            folder = RunFolder(_on_main(ctx, lambda: str(start(resolved, out or default, overwrite=overwrite).path)))
            if ctx.is_main:
                err_console.print(f"run folder: {folder.path}")
            execute(folder, resolved, console=err_console, dist=ctx)
            _finish(folder, ctx.is_main)

    _guarded(debug, action)


@app.command()
def resume(
    run_dir: Annotated[Path, typer.Argument(help="The folder of a run that was stopped or killed.")],
    threads: ThreadsOption = None,
    debug: DebugOption = False,
) -> None:
    """Continue a run from its newest checkpoint; the results are those of an uninterrupted run."""

    def action():
        from .config import load_config
        from .jobs import execute
        from .runs import RunFolder

        folder = RunFolder.open(run_dir)
        resolved = load_config(folder.config_file)
        _threads(threads)
        with _distributed(debug) as ctx:
            execute(folder, resolved, resume=True, console=err_console, dist=ctx)
            _finish(folder, ctx.is_main)

    _guarded(debug, action)


@app.command("eval")
def evaluate(
    run_dir: Annotated[Path, typer.Argument(help="A finished run.")],
    overrides: SetOption = [],  # noqa: B006
    threads: ThreadsOption = None,
    debug: DebugOption = False,
) -> None:
    """Redo the downstream evaluation of a finished run from its pre-trained encoders.

    Only evaluation.* keys may be overridden (e.g. --set evaluation.seeds=10); the
    updated config is saved in the run folder.
    """

    def action():
        from .config import apply_override, load_config, to_yaml, validate
        from .jobs import execute, load_summary
        from .runs import RunFolder, write_text_atomic

        folder = RunFolder.open(run_dir)
        load_summary(folder)  # the run must have finished
        resolved = load_config(folder.config_file)
        if resolved.job == "synthetic":
            raise _UserError("the synthetic job has no separate evaluation step")
        bad = [o for o in overrides if not o.startswith("evaluation.")]
        if bad:
            raise _UserError(f"eval only changes evaluation.* keys, got {bad}; start a new run for anything else")
        import yaml

        raw = yaml.safe_load(to_yaml(resolved))
        for item in overrides:
            apply_override(raw, item)
        resolved = validate(raw, str(folder.config_file))
        write_text_atomic(folder.config_file, to_yaml(resolved))
        _threads(threads)
        execute(folder, resolved, resume=True, console=err_console, reevaluate=True)
        _finish(folder)

    _guarded(debug, action)


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="A run folder.")],
    debug: DebugOption = False,
) -> None:
    """Regenerate the plots, summary and a self-contained report.html of a run."""

    def action():
        from .config import load_config
        from .jobs import load_summary, write_plots
        from .report import write_report
        from .runs import RunFolder

        folder = RunFolder.open(run_dir)
        write_plots(folder, load_config(folder.config_file), load_summary(folder))
        console.print(f"report: {write_report(folder)}")

    _guarded(debug, action)


@app.command()
def compare(
    run_dirs: Annotated[list[Path], typer.Argument(help="Two or more run folders.")],
    out: Annotated[Optional[Path], typer.Option(help="Also write the comparison as Markdown to this file.")] = None,
    debug: DebugOption = False,
) -> None:
    """Put several runs side by side: their scores, and the config keys where they differ."""

    def action():
        from .report import compare as compare_runs
        from .report import compare_markdown
        from .runs import RunFolder

        folders = [RunFolder.open(d) for d in run_dirs]
        names, rows, diffs = compare_runs(folders)
        for title, body in (("Scores (mean ± 95 % CI)", rows), ("Configuration differences", diffs)):
            if not body:
                continue
            table = Table(title=title)
            table.add_column("")
            for name in names:
                table.add_column(name)
            for label, cells in body:
                table.add_row(label, *cells)
            console.print(table)
        if out is not None:
            out.write_text(compare_markdown(folders), encoding="utf-8")
            console.print(f"written: {out}")

    _guarded(debug, action)


@app.command("config")
def show_config(
    preset: Annotated[Optional[str], typer.Argument(help="A preset name or a YAML file.")] = None,
    overrides: SetOption = [],  # noqa: B006
    list_presets: Annotated[bool, typer.Option("--list", help="List the presets that ship with metapt.")] = False,
    debug: DebugOption = False,
) -> None:
    """Print a fully resolved config (YAML) to start from: `metapt config molecules > my.yaml`."""

    def action():
        from .config import load_config, presets, to_yaml

        if list_presets or preset is None:
            console.print("\n".join(presets()), markup=False, highlight=False)
            return
        sys.stdout.write(to_yaml(load_config(preset, overrides)))

    _guarded(debug, action)


@app.command()
def version() -> None:
    """Print the installed version."""
    from . import __version__

    console.print(__version__)


def main() -> None:
    app()
