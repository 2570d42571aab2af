"""The run folder: its layout, its lock, its checkpoint and result files, and safe replacement.

A run is a sequence of named steps — pre-training phases (one per method) and
evaluation units (one per method, mode and seed) — whose results accumulate in a
:class:`metapt.session.Session`, which writes them here. Two kinds of file keep them:

- **results** (``results/*.pt``): each finished step's result, written once, atomically,
  when it is recorded;
- **the live checkpoint** (``checkpoints/ckpt-NUMBER-DIGEST.pt``), written every
  ``checkpoint.every`` PT steps and after every recorded result: the index of the results
  so far (file and SHA-256 of each), the live trainer's state (θ, φ, ψ, every optimiser's
  state, counters), the domain's own state (batch-norm statistics), the RNG states of
  torch, numpy and python of every process, the length of ``metrics.jsonl`` at that
  moment (fsynced first), the configuration it was made with and the wall time so far.

Resuming loads the newest checkpoint whose SHA-256 matches its name, cuts
``metrics.jsonl`` back to the recorded length and replays nothing twice; since data
order is a pure function of the step counter, a run killed at any moment ends bitwise
identical to one that was not. A checkpoint is only written when every tensor in it is
finite, so the newest one is always a state the run can go on from.

Safety: one process owns a run folder at a time (an OS lock on ``.metapt-lock``); a run
folder holds a marker (``.metapt-run``), and ``--overwrite`` replaces only folders that
hold one — the old folder is moved aside and deleted only once the new run has written
its first checkpoint (restored if the new run fails before; if it was killed outright, the
next command on the folder restores it, or names it when the new run had got under way).
Resume refuses a changed configuration, a different process count, a damaged
``metrics.jsonl`` and a folder whose checkpoints are all unreadable; it never deletes what
this run did not write. A phase computed again (its results file was lost) logs no row twice.

Files are written atomically (temporary file, fsync, rename, fsync of the folder).
Checkpoints hold only tensors and plain containers and are read with
``torch.load(weights_only=True)``.

Folder layout::

    .metapt-run          marker: this is a metapt run folder
    config.yaml          the resolved configuration (re-run or resume from it)
    metrics.jsonl        one JSON object per step and phase
    tensorboard/PHASE/   TensorBoard event files
    results/             one file per finished step
    checkpoints/         ckpt-NNNNNN-DIGEST.pt, the newest few
    summary.json/.md     final results; PNG plots; report.html
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import re
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from .atomic import FILE_MODE, atomic_path, fsync_dir, load_verified, write_text_atomic
from .errors import RunFolderError

__all__ = ["FORMAT", "LOCK", "MARKER", "RunFolder", "RunFolderError", "is_run_folder", "lock_folder",
           "recover_set_aside", "unlock_folder"]

FORMAT = 2
MARKER = ".metapt-run"
LOCK = ".metapt-lock"
_CKPT = re.compile(r"^ckpt-(\d+)(?:-([0-9a-f]{16}))?\.pt$")

try:
    import fcntl
except ImportError:  # not POSIX: no folder lock
    fcntl = None


# ---- the folder lock ------------------------------------------------------------------------

_HELD: dict[tuple[int, int], list] = {}  # (st_dev, st_ino) of a lock file -> [fd, count]: one lock per process


def lock_folder(path: Path) -> tuple[int, int]:
    """Take the OS lock of ``path`` (a run folder) for this process; re-entrant."""
    lock = path / LOCK
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, FILE_MODE)
    except (IsADirectoryError, NotADirectoryError, FileExistsError, OSError) as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS):
            raise  # the command line says what to do about a full disk or a permission
        raise RunFolderError(f"cannot open the lock file {lock} ({err.strerror}): it must be a plain file; "
                             f"if it is not metapt's, move it away") from err
    key = (os.fstat(fd).st_dev, os.fstat(fd).st_ino)
    if key in _HELD:
        os.close(fd)
        _HELD[key][1] += 1
        return key
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                os.close(fd)
                raise
            try:
                owner = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            finally:
                os.close(fd)
            raise RunFolderError(f"run folder {path} is in use by another metapt process (pid {owner}); "
                                 "wait for it to finish or stop it first") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _HELD[key] = [fd, 1]
    return key


def unlock_folder(key: tuple[int, int] | None) -> None:
    if key is None or key not in _HELD:
        return
    _HELD[key][1] -= 1
    if _HELD[key][1] == 0:
        fd, _ = _HELD.pop(key)
        os.close(fd)  # closing releases the flock


# ---- the folder -----------------------------------------------------------------------------


class RunFolder:
    """Paths of one run, its results and checkpoints.

    Attributes:
        config_text: the configuration (YAML) the run executes; None: ``config.yaml``. ``metapt
            eval`` sets it to the updated config, which is written to ``config.yaml`` only once
            the evaluation has succeeded.
        allow_changes: dotted keys (or prefixes, or fnmatch patterns) that may differ from the
            configuration the newest checkpoint was made with when the run is resumed.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.config_file = self.path / "config.yaml"
        self.metrics_file = self.path / "metrics.jsonl"
        self.checkpoint_dir = self.path / "checkpoints"
        self.results_dir = self.path / "results"
        self.tensorboard_dir = self.path / "tensorboard"
        self.config_text: str | None = None
        self.allow_changes: tuple[str, ...] = ()
        self._lock_key: tuple[int, int] | None = None
        self._aside: Path | None = None  # the run --overwrite replaces, until the new one is committed
        self._aside_lock: tuple[int, int] | None = None
        self._created = self._existed = False
        self._committed = True
        self.restored = False  # rollback() put back the run that --overwrite was to replace

    # ---- create, open, replace -------------------------------------------------------------

    @classmethod
    def create(cls, path: str | Path, config_yaml: str, *, overwrite: bool = False) -> RunFolder:
        """A new run folder holding ``config_yaml``, locked by this process.

        An existing folder is refused unless it is empty, or ``overwrite`` and it is a metapt
        run folder not in use: then it is moved aside, and deleted by :meth:`commit` once the
        new run has written a checkpoint, or put back by :meth:`rollback`. A path that cannot be
        a folder (a name too long, under a plain file, in /proc) is a :class:`RunFolderError`.
        """
        try:
            return cls._create(Path(path), config_yaml, overwrite=overwrite)
        except OSError as err:
            where = f" ({err.filename})" if err.filename and str(err.filename) != str(path) else ""
            raise RunFolderError(f"cannot make run folder {path}: {err.strerror or err}{where}; "
                                 "choose another --out") from err

    @classmethod
    def _create(cls, path: Path, config_yaml: str, *, overwrite: bool) -> RunFolder:
        if path.is_symlink():
            raise RunFolderError(f"{path} is a symbolic link; give the folder it points to, or another --out")
        recover_set_aside(path)
        folder = cls(path)
        if path.exists() and not path.is_dir():
            raise RunFolderError(f"{path} exists and is not a folder; choose another --out")
        if path.is_dir() and any(p.name != LOCK for p in path.iterdir()):  # a bare lock file is no run
            if not overwrite:
                raise RunFolderError(
                    f"run folder {path} already exists; pass --overwrite to replace it, "
                    f"`metapt resume {path}` to continue it, or choose another --out")
            cwd = Path.cwd().resolve()
            if path.resolve() == cwd or path.resolve() in cwd.parents:
                raise RunFolderError(f"--out {path} holds the working directory; --overwrite will not replace it")
            if not is_run_folder(path):
                raise RunFolderError(
                    f"{path} is not a metapt run folder (no {MARKER} marker); --overwrite only replaces run folders: "
                    f"move its files away yourself or choose another --out (if it is a run of an older metapt, "
                    f"`touch {path / MARKER}` marks it as one)")
            folder._aside_lock = lock_folder(path)  # refused if a live run owns it
            aside = path.with_name(f".{path.name}.replaced-{os.getpid()}-{time.time_ns()}")
            try:
                os.rename(path, aside)
            except OSError as err:
                unlock_folder(folder._aside_lock)
                raise RunFolderError(f"--overwrite cannot move {path} aside to replace it ({err.strerror}"
                                     f"{'; a mount point?' if err.errno == errno.EBUSY else ''}); nothing was changed: "
                                     "empty it yourself or choose another --out") from err
            folder._aside = aside
        folder._committed = False
        try:
            folder._existed = path.is_dir()
            path.mkdir(parents=True, exist_ok=True)
            folder._lock_key = lock_folder(path)
            if any(p.name != LOCK for p in path.iterdir()):  # another process got here first
                folder._created = False
                raise RunFolderError(f"run folder {path} was created by another process just now; choose another --out")
            folder._created = True  # from here on, everything in it is this run's
            (path / MARKER).write_text(f"metapt run folder, format {FORMAT}\n", encoding="utf-8")
            write_text_atomic(folder.config_file, config_yaml)
        except BaseException:
            folder.rollback()
            raise
        return folder  # uncommitted until the run's first checkpoint (Session) or commit()

    @classmethod
    def open(cls, path: str | Path) -> RunFolder:
        recover_set_aside(path)
        folder = cls(path)
        if not folder.path.exists():
            raise RunFolderError(f"run folder {folder.path} does not exist")
        if not folder.path.is_dir():
            raise RunFolderError(f"{folder.path} is not a folder (give the run folder)")
        if not folder.config_file.is_file():
            raise RunFolderError(f"{folder.path} is not a metapt run folder (no config.yaml)")
        return folder

    def lock(self) -> RunFolder:
        """Take this folder's OS lock for this process (re-entrant); a second process is refused."""
        if self._lock_key is None:
            self._lock_key = lock_folder(self.path)
        return self

    def unlock(self) -> None:
        unlock_folder(self._lock_key)
        self._lock_key = None

    def commit(self) -> None:
        """The new run is under way: delete the run it replaces (if any)."""
        if self._committed:
            return
        self._committed = True
        if self._aside is not None:
            unlock_folder(self._aside_lock)
            shutil.rmtree(self._aside, ignore_errors=True)
            self._aside = self._aside_lock = None

    def rollback(self) -> None:
        """The new run failed before its first checkpoint: remove what it created, put back what it replaced."""
        if self._committed:
            return
        if self.checkpoints():  # a checkpoint landed (a signal can arrive just before commit()): keep the run
            self.commit()
            return
        self._committed = True
        self.unlock()
        if self._created:
            shutil.rmtree(self.path, ignore_errors=True)
            if self._existed:  # an empty folder the user made: leave it as it was
                self.path.mkdir(exist_ok=True)
        if self._aside is not None:
            if not self.path.exists():
                os.rename(self._aside, self.path)
                self.restored = True
            unlock_folder(self._aside_lock)
            self._aside = self._aside_lock = None

    @property
    def committed(self) -> bool:
        return self._committed

    def running_config(self) -> str:
        if self.config_text is not None:
            return self.config_text
        return self.config_file.read_text(encoding="utf-8") if self.config_file.is_file() else ""

    # ---- checkpoints -------------------------------------------------------------------------

    def checkpoints(self) -> list[Path]:
        """Checkpoint files, oldest first."""
        if not self.checkpoint_dir.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.checkpoint_dir.iterdir() if (m := _CKPT.match(p.name))]
        return [p for _, p in sorted(found)]

    def checkpoint_number(self) -> int:
        """The highest checkpoint number present, readable or not (0 if none)."""
        return max((int(_CKPT.match(p.name).group(1)) for p in self.checkpoints()), default=0)

    def save_checkpoint(self, state: Mapping[str, Any], number: int, keep: int) -> Path:
        """Write ``state`` as checkpoint ``number``, named with its SHA-256; keep the newest ``keep``."""
        buffer = io.BytesIO()
        torch.save(dict(state), buffer)
        data = buffer.getvalue()
        path = self.checkpoint_dir / f"ckpt-{number:06d}-{hashlib.sha256(data).hexdigest()[:16]}.pt"
        with atomic_path(path) as tmp:
            tmp.write_bytes(data)
        for old in self.checkpoints()[:-keep]:
            old.unlink(missing_ok=True)
        return path

    def load_checkpoint(self, path: Path) -> Any:
        """One checkpoint file of :meth:`checkpoints`, read with ``weights_only=True``.

        Raises:
            RunFolderError: its bytes do not match the checksum in its name, or it has none.
        """
        match = _CKPT.match(Path(path).name)
        if match is None or match.group(2) is None:
            raise RunFolderError(f"{path} has no checksum in its name (not a checkpoint of this version of metapt)")
        return load_verified(Path(path), match.group(2))

    def latest_checkpoint(self, console: Console | None = None) -> dict[str, Any] | None:
        """The newest checkpoint that matches its checksum and is a metapt checkpoint, or None."""
        console = console or Console(stderr=True)
        for path in reversed(self.checkpoints()):
            digest = _CKPT.match(path.name).group(2)
            why = None
            if digest is None:
                why = "it has no checksum in its name (not written by this version of metapt)"
            else:
                try:
                    state = load_verified(path, digest)
                except RunFolderError:
                    why = "it does not match its checksum (a damaged file)"
                except Exception as err:  # noqa: BLE001 (any unreadable file: fall back to the previous one)
                    why = f"{type(err).__name__}: {str(err)[:200]}"
                else:
                    if not isinstance(state, dict) or "format" not in state:
                        why = "it is not a metapt checkpoint"
                    elif state["format"] != FORMAT:
                        raise RunFolderError(f"{path} was written by an incompatible metapt (format "
                                             f"{state['format']}, this one reads {FORMAT}); rerun with that version")
                    else:
                        return state
            console.print(f"[yellow]skipping checkpoint {path}: {why}[/]", highlight=False)
        return None

    def load_results(self, index: Mapping[str, Any], console: Console | None = None) -> dict[str, Any]:
        """The results a checkpoint's index names; a missing or damaged one is left out (and said)."""
        out = {}
        for key, (name, digest) in index.items():
            try:
                stored = load_verified(self.results_dir / name, digest)
                if stored.get("key") != key:
                    raise RunFolderError("it holds another result")
                out[key] = stored["value"]
            except Exception as err:  # noqa: BLE001
                (console or Console(stderr=True)).print(
                    f"[yellow]result {key!r} ({self.results_dir / name}) cannot be used ({err}); it is computed again[/]",
                    highlight=False)
        return out


def is_run_folder(path: str | Path) -> bool:
    """Whether ``path`` is a metapt run folder: it holds the marker ``.metapt-run``. Nothing else
    counts (a ``config.yaml`` and a ``checkpoints/`` folder can be anyone's); a run written before
    markers existed is adopted by creating the marker by hand."""
    return (Path(path) / MARKER).is_file()


_ASIDE = re.compile(r"^\.(?P<name>.+)\.replaced-\d+-\d+$")


def _set_aside_of(path: Path) -> list[Path]:
    """The folders ``--overwrite`` set aside for ``path`` (``.NAME.replaced-PID-NS``), oldest first."""
    try:
        entries = list(path.parent.iterdir()) if path.name else []
    except OSError:
        return []
    found = [p for p in entries if (m := _ASIDE.match(p.name)) and m.group("name") == path.name
             and p.is_dir() and not p.is_symlink()]
    return sorted(found, key=lambda p: int(p.name.rsplit("-", 1)[1]))


def _lock_if_free(path: Path) -> tuple[int, int] | None:
    """This process's lock of ``path``, or None when another process (or this one, already) holds it."""
    try:
        st = (path / LOCK).stat()
    except FileNotFoundError:
        st = None
    except OSError:
        return None
    if st is not None and (st.st_dev, st.st_ino) in _HELD:
        return None
    try:
        return lock_folder(path)
    except (RunFolderError, OSError):  # in use, or a lock that cannot be made (a folder, no permission)
        return None


def recover_set_aside(path: str | Path, console: Console | None = None) -> None:
    """Find a run that an ``--overwrite`` killed without a chance to clean up (SIGKILL, power cut)
    left set aside as ``.NAME.replaced-PID-NS`` next to ``path``, and deal with it.

    If the new run in ``path`` never wrote a checkpoint (or ``path`` is gone), the set-aside run is
    moved back to ``path`` (what the new run had written is removed, as its own rollback would
    have). If the new run got under way, the old one should have been deleted: refused with a
    :class:`RunFolderError` that says where it is, rather than decide for the user. A set-aside
    folder whose ``--overwrite`` process is alive (it holds the folder's lock) is left alone.
    """
    path = Path(path)
    if os.environ.get("RANK", "0") != "0":
        return  # under torchrun, rank 0 alone deals with the folder
    asides = _set_aside_of(path)
    if not asides:
        return
    held = [(p, key) for p in asides if (key := _lock_if_free(p)) is not None]
    own = None
    try:
        if not held:
            return  # a live --overwrite owns them
        if path.exists() or path.is_symlink():
            if not path.is_dir() or path.is_symlink() or (own := _lock_if_free(path)) is None:
                return  # in use, or not ours to judge: the command itself refuses what it cannot use
        stuck = ", ".join(str(p) for p, _ in held)
        new = RunFolder(path)
        if len(held) > 1:
            raise RunFolderError(f"several runs were set aside by interrupted --overwrite runs of {path}: {stuck}; "
                                 f"keep one (`mv` it to {path}) and delete the others")
        aside = held[0][0]
        foreign = path.is_dir() and any(p.name not in (LOCK, MARKER) for p in path.iterdir()) and not is_run_folder(path)
        if new.checkpoints() or foreign:
            raise RunFolderError(
                f"{aside} holds the run that an interrupted `--overwrite` replaced with {path}; it was never deleted. "
                f"Delete it (`rm -r {aside}`) to keep {path}, or move it back in place of {path} to keep it")
        if path.is_dir():
            shutil.rmtree(path)  # the killed overwrite's new run, which never wrote a checkpoint
        os.rename(aside, path)
        fsync_dir(path.parent)
        (console or Console(stderr=True)).print(
            f"[yellow]restored {path} from {aside.name}: an `--overwrite` run that was to replace it was killed "
            "before its first checkpoint[/]", highlight=False)
    finally:
        unlock_folder(own)
        for _, key in held:
            unlock_folder(key)
