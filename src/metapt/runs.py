"""The run folder and exact resume.

A run is a sequence of named steps — pre-training phases (one per method) and
evaluation units (one per method, mode and seed) — whose results accumulate in a
:class:`Session`. Every ``checkpoint.every`` PT steps, and whenever a result is
recorded, the session writes ONE checkpoint file holding everything needed to go
on: the results so far, the live trainer's state (θ, φ, ψ, every optimiser's
state, counters), the domain's own state (batch-norm statistics), the RNG states
of torch, numpy and python, and the length of ``metrics.jsonl`` at that moment.
Resuming loads the newest checkpoint, cuts ``metrics.jsonl`` back to that length
and replays nothing twice; since data order is a pure function of the step
counter, a run killed at any moment ends bitwise identical to one that was not.

Files are written atomically (temporary file, fsync, rename, fsync of the folder),
so a crash leaves either the old or the new checkpoint, never half of one; the
newest ``checkpoint.keep`` are kept. Checkpoints hold only tensors and plain
containers and are read with ``torch.load(weights_only=True)``.

Folder layout::

    config.yaml          the resolved configuration (re-run or resume from it)
    metrics.jsonl        one JSON object per step and phase
    tensorboard/PHASE/   TensorBoard event files
    checkpoints/         ckpt-NNNNNN.pt, the newest few
    summary.json/.md     final results; PNG plots; report.html
"""

from __future__ import annotations

import os
import random
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console

from .metrics import JsonlLogger, TensorBoardLogger
from .schema import CheckpointConfig
from .trainer import MetaPretrainer

FORMAT = 1
_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read the process umask (os.umask can only be read by setting it)
_CKPT = re.compile(r"ckpt-(\d+)\.pt$")


class RunFolderError(ValueError):
    """The run folder cannot be used as asked (exists, missing, not a run)."""


# ---- atomic files ---------------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # not supported on this platform
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success fsync it and rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes it 0600; give it the mode open() would
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


# ---- RNG ------------------------------------------------------------------------------------


def capture_rng() -> dict[str, Any]:
    """torch, numpy and python RNG states as tensors and plain lists (safe for weights_only)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
    }


def restore_rng(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))


# ---- the folder -----------------------------------------------------------------------------


class RunFolder:
    """Paths of one run, and its checkpoints."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.config_file = self.path / "config.yaml"
        self.metrics_file = self.path / "metrics.jsonl"
        self.checkpoint_dir = self.path / "checkpoints"
        self.tensorboard_dir = self.path / "tensorboard"

    @classmethod
    def create(cls, path: str | Path, config_yaml: str, *, overwrite: bool = False) -> RunFolder:
        """A new run folder holding ``config_yaml``; an existing non-empty folder is refused
        unless ``overwrite`` (then it is emptied)."""
        path = Path(path)
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            if not overwrite:
                raise RunFolderError(
                    f"run folder {path} already exists; pass --overwrite to replace it, "
                    f"`metapt resume {path}` to continue it, or choose another --out"
                )
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
        path.mkdir(parents=True, exist_ok=True)
        folder = cls(path)
        write_text_atomic(folder.config_file, config_yaml)
        return folder

    @classmethod
    def open(cls, path: str | Path) -> RunFolder:
        folder = cls(path)
        if not folder.path.is_dir():
            raise RunFolderError(f"run folder {folder.path} does not exist")
        if not folder.config_file.is_file():
            raise RunFolderError(f"{folder.path} is not a metapt run folder (no config.yaml)")
        return folder

    def checkpoints(self) -> list[Path]:
        """Checkpoint files, oldest first."""
        if not self.checkpoint_dir.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.checkpoint_dir.iterdir() if (m := _CKPT.search(p.name))]
        return [p for _, p in sorted(found)]

    def save_checkpoint(self, state: Mapping[str, Any], number: int, keep: int) -> Path:
        path = self.checkpoint_dir / f"ckpt-{number:06d}.pt"
        with atomic_path(path) as tmp:
            torch.save(dict(state), tmp)
        for old in self.checkpoints()[:-keep]:
            old.unlink(missing_ok=True)
        return path

    def latest_checkpoint(self) -> dict[str, Any] | None:
        """The newest readable checkpoint, or None when the run has none yet."""
        if self.checkpoint_dir.is_dir():  # half-written files of a killed run
            for stale in self.checkpoint_dir.glob(".ckpt-*.tmp"):
                stale.unlink(missing_ok=True)
        for path in reversed(self.checkpoints()):
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as err:  # a damaged file (e.g. a disk fault): fall back to the previous one
                Console(stderr=True).print(f"[yellow]skipping unreadable checkpoint {path}: {err}[/]")
                continue
            if state.get("format") != FORMAT:
                raise RunFolderError(f"{path} was written by an incompatible metapt (format {state.get('format')})")
            return state
        return None


# ---- the session ----------------------------------------------------------------------------


class Session:
    """The resumable state of one run: recorded results and the live phase's trainer.

    Args:
        folder: the run folder.
        checkpoint: how often to checkpoint and how many to keep.
        resume: continue from the newest checkpoint instead of starting afresh.
        console: where advice about skipped meta-steps goes.
        dist: the :class:`metapt.distributed.DistributedContext` of a data-parallel run. Every
            process keeps the same results and takes every checkpoint step (its RNG state is
            gathered into the file); only rank 0 writes.
    """

    def __init__(self, folder: RunFolder, checkpoint: CheckpointConfig = CheckpointConfig(), *,
                 resume: bool = False, console: Console | None = None, dist: Any = None):
        self.folder, self.checkpoint, self.dist = folder, checkpoint, dist
        self.is_main = dist is None or dist.is_main
        self.console = console or Console(stderr=True, quiet=not self.is_main)
        self.results: dict[str, Any] = {}
        self._number = 0
        self._pending: dict[str, Any] | None = None  # the interrupted phase's state, used once
        state = folder.latest_checkpoint() if resume else None
        if state is not None:
            self.results = state["results"]
            self._number = int(state["number"])
            self._pending = state if state["phase"] is not None else None
            if self.is_main and folder.metrics_file.exists():
                with open(folder.metrics_file, "r+b") as f:  # drop rows logged after the checkpoint
                    f.truncate(int(state["metrics_offset"]))
        elif self.is_main:
            folder.metrics_file.unlink(missing_ok=True)
        if dist is not None and dist.distributed:
            dist.barrier()  # every process has read the checkpoint before rank 0 writes the next one
        self.log = JsonlLogger(folder.metrics_file) if self.is_main else None

    # ---- results -----------------------------------------------------------------------------

    def done(self, key: str) -> bool:
        return key in self.results

    def __getitem__(self, key: str) -> Any:
        return self.results[key]

    def record(self, key: str, value: Any) -> None:
        """Keep a finished step's result and checkpoint it (tensors, numbers, strings, containers)."""
        self.results[key] = value
        self._save(None, None, None)

    def forget(self, prefix: str) -> None:
        """Drop recorded results whose key starts with ``prefix`` (``metapt eval`` redoes them)."""
        self.results = {k: v for k, v in self.results.items() if not k.startswith(prefix)}

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
            trainer.load_state_dict(self._pending["trainer"])
            if problem is not None and hasattr(problem, "load_state_dict"):
                problem.load_state_dict(self._pending["problem"])
            restore_rng(self._rng_of_this_process(self._pending["rng"]))
            self._pending = None
        tb, own_loggers = None, list(trainer.loggers)
        if self.is_main:
            self.log.phase = phase
            tb = TensorBoardLogger(self.folder.tensorboard_dir / _safe(phase), purge_step=trainer.step)
            trainer.loggers = [*own_loggers, self.log, tb]
        every = self.checkpoint.every
        skipped = trainer.skipped
        try:
            while trainer.step < steps:
                trainer.run(min(steps, (trainer.step // every + 1) * every), progress)
                if trainer.skipped > skipped:
                    self.console.print(
                        f"[yellow]{phase}: {trainer.skipped - skipped} meta-step(s) skipped at step {trainer.step} "
                        "(non-finite hypergradient or diverging Neumann series); if this keeps happening, lower "
                        "meta.solver.alpha or use meta.solver.kind=cg[/]"
                    )
                    skipped = trainer.skipped
                if trainer.step < steps:
                    self._save(phase, trainer, problem)
        finally:
            trainer.loggers = own_loggers
            if tb is not None:
                tb.close()

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
        self.log.flush()
        state = {
            "format": FORMAT,
            "number": self._number,
            "results": self.results,
            "phase": phase,
            "trainer": trainer.state_dict() if trainer is not None else None,
            "problem": problem.state_dict() if problem is not None and hasattr(problem, "state_dict") else None,
            "rng": rng,  # one entry per process
            "metrics_offset": self.folder.metrics_file.stat().st_size,
        }
        self.folder.save_checkpoint(state, self._number, self.checkpoint.keep)

    def close(self) -> None:
        if self.log is not None:
            self.log.close()


def _safe(phase: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", phase)
