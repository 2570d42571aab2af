"""The ``metapt`` command line.

Every user error (:class:`metapt.errors.UserError`: bad config, missing data, an
existing or busy run folder, a run that cannot go on) is one line on stderr and
exit status 2; ``--debug`` shows its traceback instead. Anything else is a bug:
traceback and exit status 1. Ctrl-C exits with 130, SIGTERM with 143, a
non-finite pre-training loss with 3, a torchrun peer that stopped answering
(``--peer-timeout``) with 4; each says which checkpoint is left to resume from.
SIGQUIT (Ctrl-\\) prints every thread's stack and the run goes on.
"""

from __future__ import annotations

import datetime as _dt
import sys
import threading
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from .errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="Meta-learn pre-training hyperparameters by gradient (Raghu et al., NeurIPS 2021).")
console = Console()
err_console = Console(stderr=True, soft_wrap=True)

SetOption = Annotated[list[str], typer.Option(
    "--set", metavar="KEY=VALUE",
    help="Override one config key, e.g. --set meta.estimator=cg --set pretrain.steps=500 (repeatable; "
         "the value is read as YAML).")]
DebugOption = Annotated[bool, typer.Option(
    "--debug", help="Show the full traceback on errors; under torchrun, also check after every step that all "
                    "processes hold bitwise identical θ, φ and head.")]
PeerTimeoutOption = Annotated[float, typer.Option(
    "--peer-timeout", min=0.01, metavar="MINUTES",
    help="torchrun runs: how long a process waits for the others at a synchronisation point before it stops "
         "with an error (a stalled or stopped peer); must exceed the longest skew between processes.")]
ThreadsOption = Annotated[Optional[int], typer.Option(
    "--threads", min=1, help="torch CPU threads (default 1, or OMP_NUM_THREADS if set): on a shared machine "
                             "one thread is many times faster than oversubscribed cores.")]


class _UserError(UserError):
    """A failure of the command line itself whose message is the whole story."""


def _fail(message: str, code: int = 2):
    from rich.markup import escape

    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, markup=True)  # [..] is text
    raise typer.Exit(code)


def _guarded(debug: bool, action, folder_of=lambda: None):
    """Run ``action``; a :class:`metapt.errors.UserError` (and a full disk, a permission problem)
    becomes one line and exit status 2; anything else is a crash: traceback, status 1.

    ``folder_of()``: the run folder in use, if any, for advice on how to go on.
    """
    import signal

    from .errors import on_stop_signal, reset_stop

    reset_stop()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            if signal.getsignal(signum) is not signal.SIG_IGN:  # e.g. a background job's SIGINT stays ignored
                # unlike Python's own SIGINT handler, this one is remembered: where its exception is
                # swallowed (a __del__, a GC callback), the next step raises it again (errors.check_stop)
                previous[signum] = signal.signal(signum, on_stop_signal)
    try:
        return _guarded_run(debug, action, folder_of)
    finally:
        from .errors import stopped_by

        if stopped_by() is None:  # after a stop, ours stays: a second signal must not kill the exit (130/143)
            for signum, handler in previous.items():
                signal.signal(signum, handler)


def _guarded_run(debug: bool, action, folder_of):
    import errno
    import signal

    from .errors import NonFiniteLossError

    def resume_hint() -> str:
        folder = folder_of()
        if folder is None or not folder.path.is_dir():
            return "nothing was kept"
        if getattr(folder, "restored", False):
            return (f"nothing of the new run was kept, and the run it was to replace is back in {folder.path} as it was "
                    "(run with --overwrite again to replace it)")
        if not folder.checkpoints():
            return f"no checkpoint was written in {folder.path}"
        return f"the newest checkpoint is kept: `metapt resume {folder.path}` continues the run"

    try:
        return action()
    except typer.Exit:
        raise
    except NonFiniteLossError as err:
        if debug:
            raise
        folder = folder_of()
        if folder is not None and getattr(folder, "restored", False):
            kept = f"Nothing of the new run was kept; {folder.path} holds the run it was to replace, as it was"
        elif folder is not None and folder.checkpoints():
            kept = (f"The last good checkpoint is kept; after changing the config, `metapt resume {folder.path}` "
                    "continues from it")
        elif folder is not None and folder.path.is_dir():
            kept = (f"No checkpoint from before the divergence exists; after changing the config, "
                    f"`metapt resume {folder.path}` starts the run again")
        else:
            kept = "No checkpoint had been written; nothing was kept"
        _fail(f"{err}. {kept}.", 3)
    except UserError as err:
        if debug:
            raise
        _fail(_one_line(str(err)))
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENAMETOOLONG,
                             errno.ENOTDIR, errno.EISDIR, errno.EBUSY) or debug:  # a path given is wrong
            raise
        where = f" ({err.filename})" if err.filename else ""
        _fail(_one_line(f"{err.strerror}{where}; {resume_hint()}"))
    except RuntimeError as err:  # torch.distributed's DistBackendError included
        from .distributed import is_peer_timeout

        if debug or not is_peer_timeout(err):
            raise
        _fail(_one_line(f"another process of this torchrun job stopped responding (no reply within --peer-timeout): "
                        f"{str(err)[:200]}; {resume_hint()}"), 4)
    except KeyboardInterrupt as err:
        if debug:
            raise
        if getattr(err, "signum", None) == signal.SIGTERM:
            _fail(f"terminated (SIGTERM); {resume_hint()}", 143)
        _fail(f"interrupted; {resume_hint()}", 130)


def _one_line(message: str, limit: int = 2000) -> str:
    message = " ".join(message.split())
    return message if len(message) <= limit else message[: limit - 30] + f" … ({len(message):,} characters)"


def _threads(threads: int | None) -> None:
    """Set torch's CPU threads, at most the machine's CPUs (more oversubscribes, or crashes OpenMP).

    Default 1 (unless OMP_NUM_THREADS is set): on a machine shared with one other CPU-bound
    process, torch's default of a thread per core slows the molecules job several-fold, while one
    thread stays near its idle speed (benchmarks/results/threads.md).
    """
    import os

    if threads is None and not os.environ.get("OMP_NUM_THREADS"):
        threads = 1
    if threads:
        import torch

        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        if threads > cpus:
            err_console.print(f"--threads {threads}: this machine has {cpus} CPU(s) for this process; using {cpus}")
            threads = cpus
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
    peer_timeout: PeerTimeoutOption = 30.0,
    threads: ThreadsOption = None,
    debug: DebugOption = False,
) -> None:
    """Run a job end to end: pre-train, meta-learn, fine-tune, evaluate, report.

    Checkpoints are written every checkpoint.every PT steps; a run that stops for any
    reason continues with `metapt resume RUN_DIR`.
    """

    holder: dict = {}

    def action():
        from .config import load_config
        from .distributed import launch, on_main
        from .jobs import execute, start
        from .runs import RunFolder

        extra = [f"data_dir={data.expanduser().resolve()}"] if data is not None else []  # eval may run elsewhere
        resolved = load_config(config, [*overrides, *extra])
        _threads(threads)
        with launch(resolved.device, peer_timeout, debug=debug) as ctx:
            default = Path("runs") / f"{resolved.job}-{_dt.datetime.now():%Y%m%d-%H%M%S}"

            def create():
                holder["folder"] = start(resolved, out or default, overwrite=overwrite)
                return str(holder["folder"].path)

            path = on_main(ctx, create)
            folder = holder.setdefault("folder", RunFolder(path))  # every rank: where its checkpoints are
            if ctx.is_main:
                err_console.print(f"run folder: {folder.path}")
            try:
                execute(folder, resolved, console=err_console, dist=ctx)
            except BaseException:
                from .errors import deferred_stop

                with deferred_stop():  # a signal now must not cut short putting a replaced run back
                    folder.rollback()  # failed before its first checkpoint: as if it never started
                raise
            folder.commit()
            _finish(folder, ctx.is_main)
            folder.unlock()

    _guarded(debug, action, lambda: holder.get("folder"))


@app.command()
def resume(
    run_dir: Annotated[Path, typer.Argument(help="The folder of a run that was stopped or killed.")],
    allow_change: Annotated[list[str], typer.Option(
        "--allow-change", metavar="KEY",
        help="A config key (or section, e.g. evaluation) that may differ from the one the checkpoint was made "
             "with (repeatable).")] = [],  # noqa: B006
    peer_timeout: PeerTimeoutOption = 30.0,
    threads: ThreadsOption = None,
    debug: DebugOption = False,
) -> None:
    """Continue a run from its newest checkpoint; the results are those of an uninterrupted run.

    A run whose config.yaml was edited since its checkpoint is refused, naming the keys,
    unless each changed key is allowed with --allow-change.
    """
    holder: dict = {}

    def action():
        from .config import load_config
        from .distributed import launch
        from .jobs import execute
        from .runs import RunFolder

        folder = holder["folder"] = RunFolder.open(run_dir)
        folder.allow_changes = tuple(allow_change)
        resolved = load_config(folder.config_file)
        _threads(threads)
        with launch(resolved.device, peer_timeout, debug=debug) as ctx:
            execute(folder, resolved, resume=True, console=err_console, dist=ctx)
            _finish(folder, ctx.is_main)

    _guarded(debug, action, lambda: holder.get("folder"))


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

    holder: dict = {}

    def action():
        from .atomic import write_text_atomic
        from .config import load_config, to_yaml, with_overrides
        from .jobs import execute
        from .runs import RunFolder

        folder = holder["folder"] = RunFolder.open(run_dir)
        _finished_summary(folder)
        resolved = load_config(folder.config_file)
        bad = [o for o in overrides if not o.startswith("evaluation.")]
        if bad:
            raise _UserError(f"eval only changes evaluation.* keys, got {bad}; start a new run for anything else")
        resolved = with_overrides(resolved, overrides, str(folder.config_file))
        folder.config_text = to_yaml(resolved)  # config.yaml changes only once the evaluation succeeded
        folder.allow_changes = ("evaluation",)
        _threads(threads)
        execute(folder, resolved, resume=True, console=err_console, reevaluate=True)
        write_text_atomic(folder.config_file, folder.config_text)
        _finish(folder)

    _guarded(debug, action, lambda: holder.get("folder"))


def _finished_summary(folder, config=None) -> dict:
    """The run's summary.json, checked: it exists (the run finished), is JSON, is a mapping, and
    belongs to the run's job."""
    from .atomic import read_json

    path = folder.path / "summary.json"
    if not path.is_file():
        raise _UserError(f"{folder.path} has no summary.json: the run has not finished (`metapt resume {folder.path}`)")
    summary = read_json(path)
    if not isinstance(summary, dict):
        raise _UserError(f"{path} is not a metapt summary (a JSON {type(summary).__name__}, not an object)")
    job = (summary.get("config") or {}).get("job") if isinstance(summary.get("config"), dict) else None
    if config is not None and job is not None and job != config.job:
        raise _UserError(f"{path} is the summary of a {job!r} run, but {folder.config_file} is a {config.job!r} job")
    return summary


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="A run folder.")],
    debug: DebugOption = False,
) -> None:
    """Regenerate the plots, summary and a self-contained report.html of a run."""

    def action():
        from .config import load_config
        from .jobs import write_plots
        from .report import write_report
        from .runs import RunFolder

        folder = RunFolder.open(run_dir)
        config = load_config(folder.config_file)
        write_plots(folder, config, _finished_summary(folder, config))
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
            # keys are one long word (meta.estimator.adam_preconditioner): fold them, never cut them short
            longest = max(len(label) for label, _ in body)
            borders = 3 * (len(names) + 1) + 1  # a rule and two spaces of padding per column
            widest = max(len(c) for _, cells in body for c in [*cells, *names])
            run_width = max(8, min(widest, (console.width - borders - 16) // len(names)))  # keys keep 16 or more
            key_width = max(12, min(longest, console.width - borders - run_width * len(names)))
            table.add_column("", overflow="fold", width=key_width)
            for name in names:
                table.add_column(name, overflow="fold", width=run_width)
            for label, cells in body:
                table.add_row(label, *cells)
            console.print(table)
        if not diffs:
            same = all(len(set(cells)) == 1 for _, cells in rows)
            console.print("no differences: the configurations are identical"
                          + (" and so are the scores" if same else "; the scores differ (see above)"))
        if out is not None:
            if out.is_dir():
                raise _UserError(f"--out {out} is a folder; give a file name, e.g. {out / 'compare.md'}")
            from .atomic import write_text_atomic

            write_text_atomic(out, compare_markdown(folders))
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
        from ._presets import presets

        if list_presets or preset is None:
            from ._presets import preset_description

            names = presets()
            width = max(map(len, names))
            lines = [f"{name:<{width}}  {preset_description(name)}" for name in names]
            console.print("\n".join(lines), markup=False, highlight=False, soft_wrap=True)
            return
        from .config import load_config, to_yaml

        sys.stdout.write(to_yaml(load_config(preset, overrides)))

    _guarded(debug, action)


@app.command()
def diagnose(
    run_dir: Annotated[Path, typer.Argument(help="A run folder.")],
    phase: Annotated[Optional[str], typer.Option(help="The pre-training phase, SETTING/METHOD, or "
                                                      "SETTING/METHOD/seedN with several pre-training seeds "
                                                      "(default: the newest one with meta-parameters).")] = None,
    horizon: Annotated[Optional[int], typer.Option(min=1, help="Lookahead PT steps T (default: meta.interval).")] = None,
    directions: Annotated[int, typer.Option(min=0, help="Random directions in φ besides each estimator's own.")] = 8,
    output_format: Annotated[str, typer.Option(
        "--format", metavar="text|md|json",
        help="text: 80 columns, the key figures and a verdict; md: every column as a Markdown table; "
             "json: the whole result (also written to RUN_DIR/diagnostics.json).")] = "text",
    threads: ThreadsOption = None,
    debug: DebugOption = False,
) -> None:
    """Is the hypergradient right? Lookahead agreement, SNR, curvature and cost of every estimator at a
    checkpointed state; prints a table and writes RUN_DIR/diagnostics.json (shown by `metapt report`)."""
    _threads(threads)

    def action():
        from .config import load_config
        from .diagnostics import DiagnoseOptions
        from .run_diagnosis import diagnose_run, format_table, format_text
        from .runs import RunFolder

        if output_format not in ("text", "md", "json"):
            raise _UserError(f"--format must be text, md or json, got {output_format!r}")
        config = load_config(RunFolder.open(run_dir).config_file)
        options = DiagnoseOptions(horizon=horizon or config.meta.interval, directions=directions)
        result = diagnose_run(run_dir, phase=phase, options=options, console=err_console)
        if output_format == "json":
            sys.stdout.write((Path(run_dir) / "diagnostics.json").read_text(encoding="utf-8"))
            return
        text = format_table(result) if output_format == "md" else format_text(result, width=min(console.width, 100))
        console.print(text, highlight=False, markup=False, soft_wrap=output_format == "md")
        console.print(f"\nwritten: {Path(run_dir) / 'diagnostics.json'}")

    _guarded(debug, action)


@app.command()
def version() -> None:
    """Print the installed version."""
    from . import __version__

    console.print(__version__)


def _print_version(value: bool) -> None:
    if value:
        from . import __version__

        console.print(f"metapt {__version__}", markup=False, highlight=False)
        raise typer.Exit()


@app.callback()
def _options(
    show_version: Annotated[bool, typer.Option("--version", is_eager=True, callback=_print_version,
                                               help="Print the installed version and exit.")] = False,
) -> None:
    """Meta-learn pre-training hyperparameters by gradient (Raghu et al., NeurIPS 2021)."""


def main() -> None:
    """The ``metapt`` command: :data:`app`, with ``faulthandler`` on (a crash in native code, or
    SIGQUIT — Ctrl-\\ or ``kill -QUIT PID`` — prints every thread's Python stack; after SIGQUIT the
    run goes on), and a run stopped by a signal exits with 130/143 whatever signals follow."""
    import faulthandler
    import signal

    faulthandler.enable()
    if hasattr(signal, "SIGQUIT") and hasattr(faulthandler, "register"):
        faulthandler.register(signal.SIGQUIT, all_threads=True)
    try:
        app()
    finally:
        from .errors import stopped_by

        if stopped_by() is not None and threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):  # the run has stopped and said so: let it exit
                signal.signal(signum, signal.SIG_IGN)
