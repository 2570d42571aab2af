"""A run's resumable state: recorded results, the live phase's trainer, checkpoints, exact resume.

A run is a sequence of named steps (pre-training phases and evaluation units) whose results
accumulate in a :class:`Session` kept in a :class:`metapt.runs.RunFolder` (the folder's layout
and its safety rules are described there). The session checkpoints the live phase every
``checkpoint.every`` PT steps and after every recorded result; resuming loads the newest
checkpoint, cuts ``metrics.jsonl`` back to its recorded length and replays nothing twice, so a
run killed at any moment ends bitwise identical to one that was not.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import math
import re
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from rich.console import Console

from .atomic import save_bytes
from .config import config_changes
from .errors import NonFiniteLossError, RunFolderError, check_stop, deferred_stop
from .metrics import JsonlLogger, TensorBoardLogger
from .rng import capture_rng, restore_rng
from .runs import FORMAT, RunFolder, lock_folder, unlock_folder
from .schema import CheckpointConfig

if TYPE_CHECKING:
    from .trainer import MetaPretrainer

__all__ = ["Session"]


class Session:
    """The resumable state of one run: recorded results and the live phase's trainer.

    Args:
        folder: the run folder.
        checkpoint: how often to checkpoint and how many to keep.
        resume: continue from the newest checkpoint instead of starting afresh.
        console: where advice about skipped meta-steps goes.
        dist: the :class:`metapt.distributed.DistributedContext` of a data-parallel run. Every
            process keeps the same results and takes every checkpoint step (its RNG state is
            gathered into the file); only rank 0 writes and holds the folder's lock.

    Raises:
        RunFolderError: a fresh session in a folder that has checkpoints; a resumed one whose
            checkpoints are all unreadable, whose config changed (beyond ``folder.allow_changes``),
            whose process count differs or whose ``metrics.jsonl`` is shorter than recorded.
    """

    def __init__(self, folder: RunFolder, checkpoint: CheckpointConfig = CheckpointConfig(), *,
                 resume: bool = False, console: Console | None = None, dist: Any = None):
        self.folder, self.checkpoint, self.dist = folder, checkpoint, dist
        self.is_main = dist is None or dist.is_main
        self.console = console or Console(stderr=True, quiet=not self.is_main)
        self.results: dict[str, Any] = {}
        self._index: dict[str, tuple[str, str]] = {}  # result key -> (file name, sha256)
        self._config = folder.running_config()
        self._number = folder.checkpoint_number()
        self._pending: dict[str, Any] | None = None  # the interrupted phase's state, used once
        self._wall_before, self._started = 0.0, time.monotonic()
        self._lock_key = None
        self._newest: tuple[str | None, int, Path] | None = None  # (phase, step, file) of this session's newest
        self.log = None
        if self.is_main:
            self._lock_key = lock_folder(folder.path)  # re-entrant: the CLI may hold it already
        try:
            self._open(resume)
        except BaseException:
            self.close()
            raise
        if dist is not None and dist.distributed:
            dist.barrier()  # every process has read the checkpoint before rank 0 writes the next one
        self.log = JsonlLogger(folder.metrics_file) if self.is_main else None

    def _open(self, resume: bool) -> None:
        folder = self.folder
        if self.is_main and folder.checkpoint_dir.is_dir():  # half-written files of a killed run (we hold the lock)
            for stale in folder.checkpoint_dir.glob(".ckpt-*.tmp"):
                stale.unlink(missing_ok=True)
        existing = folder.checkpoints()
        if not resume:
            if existing:
                raise RunFolderError(f"{folder.path} already has checkpoints; continue it with `metapt resume "
                                     f"{folder.path}` or start in a new folder")
            if self.is_main:
                folder.metrics_file.unlink(missing_ok=True)
            return
        state = folder.latest_checkpoint(self.console)
        if state is None:
            if existing:
                raise RunFolderError(
                    f"none of the {len(existing)} checkpoint(s) in {folder.checkpoint_dir} can be read (see above); "
                    "refusing to restart the run from step 0 over them: restore a checkpoint, or start a new run")
            if (folder.path / "summary.json").exists() or (folder.results_dir.is_dir() and any(folder.results_dir.iterdir())):
                raise RunFolderError(f"{folder.path} has results but no checkpoint; refusing to restart it from step 0")
            self.console.print("no checkpoint yet: the run starts from the beginning")
            if self.is_main:
                folder.metrics_file.unlink(missing_ok=True)
            return
        changes = {k: v for k, v in config_changes(state.get("config", ""), self._config).items()
                   if not _allowed(k, folder.allow_changes)}
        if changes:
            shown = ", ".join(f"{k} ({_short(a)} → {_short(b)})" for k, (a, b) in list(changes.items())[:8])
            more = f" and {len(changes) - 8} more" if len(changes) > 8 else ""
            first = next(iter(changes))
            raise RunFolderError(
                f"the configuration differs from the one this run's checkpoint was made with: {shown}{more}. "
                f"Undo the edit in {folder.config_file}, or allow it with `metapt resume {folder.path} "
                f"--allow-change {first}` (what was computed before the change is kept)")
        self._rng_of_this_process(state["rng"])  # a different process count is refused at any point
        self._index = {k: tuple(v) for k, v in state["results"].items()}
        self.results = folder.load_results(self._index, self.console)
        self._index = {k: v for k, v in self._index.items() if k in self.results}
        self._wall_before = float(state.get("wall_seconds", 0.0))
        self._pending = state if state["phase"] is not None else None
        if self.is_main:
            offset = int(state["metrics_offset"])
            size = folder.metrics_file.stat().st_size if folder.metrics_file.exists() else 0
            if size < offset:
                raise RunFolderError(
                    f"{folder.metrics_file} is {size} bytes but was {offset} when the newest checkpoint was written: "
                    "it was cut short or replaced, so the run's step log cannot be continued")
            with open(folder.metrics_file, "r+b") as f:  # drop rows logged after the checkpoint
                f.truncate(offset)

    # ---- results -----------------------------------------------------------------------------

    def done(self, key: str) -> bool:
        return key in self.results

    def __getitem__(self, key: str) -> Any:
        return self.results[key]

    def record(self, key: str, value: Any) -> None:
        """Keep a finished step's result (tensors, numbers, strings, containers): written once, to
        its own file, then a checkpoint that indexes it."""
        self.results[key] = value
        if self.is_main:
            name = _result_name(key)
            self._index[key] = (name, save_bytes(self.folder.results_dir / name, {"key": key, "value": value}))
        self._save(None, None, None)
        check_stop()  # between evaluation units too

    def forget(self, prefix: str) -> None:
        """Drop recorded results whose key starts with ``prefix`` (``metapt eval`` redoes them)."""
        self.results = {k: v for k, v in self.results.items() if not k.startswith(prefix)}
        self._index = {k: v for k, v in self._index.items() if not k.startswith(prefix)}

    @property
    def wall_seconds(self) -> float:
        """Wall time of this run so far, over every session that worked on it."""
        return self._wall_before + (time.monotonic() - self._started)

    # ---- a pre-training phase ----------------------------------------------------------------

    def train(self, phase: str, trainer: MetaPretrainer, steps: int, problem: Any = None,
              progress: Callable[[int], None] | None = None) -> None:
        """Run ``trainer`` to ``steps`` PT steps, checkpointing on the way; picks up where a
        killed run of the same phase left off."""
        if self._pending is not None:
            if self._pending["phase"] != phase:
                raise RunFolderError(
                    f"the checkpoint is in phase {self._pending['phase']!r} but the run reached {phase!r}: "
                    "the configuration changed since the checkpoint was written"
                )
            try:
                trainer.load_state_dict(self._pending["trainer"])
                if problem is not None and hasattr(problem, "load_state_dict"):
                    problem.load_state_dict(self._pending["problem"])
            except (KeyError, RuntimeError, ValueError) as err:
                raise RunFolderError(f"the checkpoint of phase {phase!r} does not fit this run's model "
                                     f"({type(err).__name__}: {str(err)[:300]})") from err
            restore_rng(self._rng_of_this_process(self._pending["rng"]))
            self._pending = None
        tb, own_loggers = None, list(trainer.loggers)
        if self.is_main:
            self.log.phase = phase
            tb = TensorBoardLogger(self.folder.tensorboard_dir / _safe(phase), purge_step=trainer.step)
            logged = self._logged_steps(phase)  # a phase computed again (its result was lost) has its rows already
            trainer.loggers = [*own_loggers, _SkipLogged(self.log, logged) if logged else self.log, tb]
        every = self.checkpoint.every
        skipped, capped = trainer.skipped, trainer.inner_lr_capped

        def tick(step: int) -> None:
            check_stop()  # a stop signal (recorded by the handler, errors.deferred_stop) stops the run here
            if progress is not None:
                progress(step)

        with deferred_stop():  # a stop signal stops the phase at a step boundary, not inside a write
            try:
                while trainer.step < steps:
                    trainer.run_until(min(steps, (trainer.step // every + 1) * every), tick)
                    if trainer.skipped > skipped:
                        self.console.print(
                            f"[yellow]{phase}: {trainer.skipped - skipped} meta-step(s) skipped at step {trainer.step} "
                            f"(last: {trainer.last_skip_reason}); if this keeps happening, {trainer.skip_advice()}[/]"
                        )
                        skipped = trainer.skipped
                    if trainer.inner_lr_capped and not capped:  # once a phase: it usually binds all along
                        self.console.print(f"[yellow]{phase}: {trainer.inner_lr_capped} fine-tuning step(s) by step "
                                           f"{trainer.step} ran below meta.inner_lr: {trainer.last_cap}[/]")
                        capped = trainer.inner_lr_capped
                    if trainer.step < steps:
                        self._save(phase, trainer, problem)
            except NonFiniteLossError:
                self._set_aside_diverged(phase, trainer.step)
                raise
            finally:
                trainer.loggers = own_loggers
                if tb is not None:
                    tb.close()

    def _logged_steps(self, phase: str) -> dict[int, int]:
        """How many rows of ``phase`` ``metrics.jsonl`` holds at each step: rows a phase that is
        computed again (its results file was deleted or damaged) must not log a second time."""
        self.log.flush()
        counts: dict[int, int] = {}
        tag = json.dumps(phase)
        with open(self.folder.metrics_file, "rb") as f:
            for line in f:
                if tag.encode() not in line:
                    continue
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                if isinstance(row, dict) and row.get("phase") == phase and isinstance(row.get("step"), int):
                    counts[row["step"]] = counts.get(row["step"], 0) + 1
        return counts

    # ---- checkpoint --------------------------------------------------------------------------

    def _rng_of_this_process(self, states: list) -> dict[str, Any]:
        rank, world = (self.dist.rank, self.dist.world_size) if self.dist is not None else (0, 1)
        if len(states) != world:
            raise RunFolderError(f"the checkpoint was written by {len(states)} process(es); resume with the same "
                                 f"number (this run has {world}), since the data order depends on it")
        return states[rank]

    def _save(self, phase: str | None, trainer: MetaPretrainer | None, problem: Any) -> None:
        self._number += 1
        rng = [capture_rng()]
        if self.dist is not None and self.dist.distributed:
            import torch.distributed as torch_dist

            rng = [None] * self.dist.world_size
            torch_dist.all_gather_object(rng, capture_rng())
        if not self.is_main:
            return
        live = {
            "trainer": trainer.state_dict() if trainer is not None else None,
            "problem": problem.state_dict() if problem is not None and hasattr(problem, "state_dict") else None,
        }
        if not _finite(live):  # never make a diverged state the one to resume from
            self.console.print(f"[yellow]{phase}: step {trainer.step if trainer else '?'} holds non-finite values; "
                               "no checkpoint written (the previous one stays the newest)[/]")
            return
        self.log.flush()  # fsynced: the length recorded below is on disk before the checkpoint is
        state = {
            "format": FORMAT,
            "number": self._number,
            "config": self._config,
            "results": {k: list(v) for k, v in self._index.items()},
            "phase": phase,
            **live,
            "rng": rng,  # one entry per process
            "metrics_offset": self.folder.metrics_file.stat().st_size,
            "wall_seconds": self.wall_seconds,
        }
        path = self.folder.save_checkpoint(state, self._number, self.checkpoint.keep)
        self._newest = (phase, trainer.step if trainer is not None else -1, path)
        self.folder.commit()  # the run is under way: a run folder it replaces can go

    def _set_aside_diverged(self, phase: str, step: int) -> None:
        """The PT loss at ``step`` was not finite: a checkpoint taken at that very step holds the θ
        that produced it, so resuming from it would fail again. Rename it (``.diverged``, kept for
        inspection, never loaded) so that the previous checkpoint is the newest."""
        if not self.is_main or self._newest is None or self._newest[:2] != (phase, step):
            return
        path = self._newest[2]
        if path.exists():
            path.rename(path.with_name(path.name + ".diverged"))
            self.console.print(f"[yellow]{phase}: the checkpoint at step {step} holds the diverged model; "
                               f"set aside as {path.name}.diverged[/]", highlight=False)
        self._newest = None

    def close(self) -> None:
        if self.log is not None:
            self.log.close()
            self.log = None
        unlock_folder(self._lock_key)
        self._lock_key = None


class _SkipLogged:
    """A step log that passes on only the rows not already in the file (``counts``: rows per step)."""

    def __init__(self, log: JsonlLogger, counts: dict[int, int]):
        self.log_to, self.counts = log, dict(counts)

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        if self.counts.get(step, 0) > 0:
            self.counts[step] -= 1
            return
        self.log_to.log(step, metrics)


def _short(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _safe(phase: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", phase)



def _allowed(key: str, patterns: tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(p + ".") or fnmatch.fnmatchcase(key, p) for p in patterns)


def _finite(value: Any) -> bool:
    """Every floating-point tensor and number in a nested state is finite."""
    if isinstance(value, torch.Tensor):
        return not value.is_floating_point() or bool(torch.isfinite(value).all())
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, Mapping):
        return all(_finite(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return all(_finite(v) for v in value)
    return True


def _result_name(key: str) -> str:
    return f"{_safe(key)[:80]}-{hashlib.sha256(key.encode()).hexdigest()[:10]}.pt"
