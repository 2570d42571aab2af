"""The run folder and exact resume.

A run is a sequence of named steps — pre-training phases (one per method) and
evaluation units (one per method, mode and seed) — whose results accumulate in a
:class:`Session`. Two kinds of file keep them:

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
import fnmatch
import hashlib
import io
import json
import math
import os
import random
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from rich.console import Console

from .errors import NonFiniteLossError, RunFolderError, check_stop, deferred_stop
from .metrics import JsonlLogger, TensorBoardLogger
from .schema import CheckpointConfig, jsonable

if TYPE_CHECKING:
    from .trainer import MetaPretrainer

__all__ = ["FORMAT", "RunFolder", "RunFolderError", "Session", "atomic_path", "capture_rng", "config_changes",
           "read_json", "restore_rng", "write_json_atomic", "write_text_atomic"]

FORMAT = 2
MARKER = ".metapt-run"
LOCK = ".metapt-lock"
_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read the process umask (os.umask can only be read by setting it)
_CKPT = re.compile(r"^ckpt-(\d+)(?:-([0-9a-f]{16}))?\.pt$")

try:
    import fcntl
except ImportError:  # not POSIX: no folder lock
    fcntl = None


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


def write_json_atomic(path: Path, value: Any) -> None:
    """``value`` as strict JSON (non-finite numbers become null, never a bare ``NaN``), atomically."""
    write_text_atomic(path, json.dumps(jsonable(value), indent=2, allow_nan=False) + "\n")


def read_json(path: Path) -> Any:
    """A JSON file, or a :class:`RunFolderError` that names it."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunFolderError(f"{path} does not exist") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RunFolderError(f"{path} is not valid JSON ({err}); it was damaged or edited by hand") from None


def _save_bytes(path: Path, value: Any) -> str:
    """``torch.save(value)`` to ``path`` atomically; returns the SHA-256 of the file's bytes."""
    buffer = io.BytesIO()
    torch.save(value, buffer)
    data = buffer.getvalue()
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def _load_verified(path: Path, sha256: str) -> Any:
    """``torch.load(weights_only=True)`` of ``path`` if its SHA-256 starts with ``sha256``."""
    data = path.read_bytes()
    if not hashlib.sha256(data).hexdigest().startswith(sha256):
        raise RunFolderError(f"{path} does not match its checksum (a damaged file)")
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


# ---- RNG ------------------------------------------------------------------------------------


def capture_rng() -> dict[str, Any]:
    """torch, numpy and python RNG states as tensors and plain lists (safe for weights_only)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
    }


def restore_rng(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))


# ---- configuration changes ------------------------------------------------------------------


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


def config_changes(old_yaml: str, new_yaml: str) -> dict[str, tuple[Any, Any]]:
    """Dotted keys whose values differ between two config YAML texts: key -> (old, new)."""
    import yaml

    old, new = _flatten(yaml.safe_load(old_yaml) or {}), _flatten(yaml.safe_load(new_yaml) or {})
    missing = object()
    return {k: (old.get(k), new.get(k)) for k in sorted(old.keys() | new.keys())
            if old.get(k, missing) != new.get(k, missing)}


def _allowed(key: str, patterns: tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(p + ".") or fnmatch.fnmatchcase(key, p) for p in patterns)


# ---- the folder lock ------------------------------------------------------------------------

_HELD: dict[tuple[int, int], list] = {}  # (st_dev, st_ino) of a lock file -> [fd, count]: one lock per process


def _lock_file(path: Path) -> tuple[int, int]:
    """Take the OS lock of ``path`` (a run folder) for this process; re-entrant."""
    lock = path / LOCK
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666 & ~_UMASK)
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


def _unlock_file(key: tuple[int, int] | None) -> None:
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
            folder._aside_lock = _lock_file(path)  # refused if a live run owns it
            aside = path.with_name(f".{path.name}.replaced-{os.getpid()}-{time.time_ns()}")
            try:
                os.rename(path, aside)
            except OSError as err:
                _unlock_file(folder._aside_lock)
                raise RunFolderError(f"--overwrite cannot move {path} aside to replace it ({err.strerror}"
                                     f"{'; a mount point?' if err.errno == errno.EBUSY else ''}); nothing was changed: "
                                     "empty it yourself or choose another --out") from err
            folder._aside = aside
        folder._committed = False
        try:
            folder._existed = path.is_dir()
            path.mkdir(parents=True, exist_ok=True)
            folder._lock_key = _lock_file(path)
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
            self._lock_key = _lock_file(self.path)
        return self

    def unlock(self) -> None:
        _unlock_file(self._lock_key)
        self._lock_key = None

    def commit(self) -> None:
        """The new run is under way: delete the run it replaces (if any)."""
        if self._committed:
            return
        self._committed = True
        if self._aside is not None:
            _unlock_file(self._aside_lock)
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
            _unlock_file(self._aside_lock)
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
        return _load_verified(Path(path), match.group(2))

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
                    state = _load_verified(path, digest)
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
                stored = _load_verified(self.results_dir / name, digest)
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
        return _lock_file(path)
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
        _fsync_dir(path.parent)
        (console or Console(stderr=True)).print(
            f"[yellow]restored {path} from {aside.name}: an `--overwrite` run that was to replace it was killed "
            "before its first checkpoint[/]", highlight=False)
    finally:
        _unlock_file(own)
        for _, key in held:
            _unlock_file(key)


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
            self._lock_key = _lock_file(folder.path)  # re-entrant: the CLI may hold it already
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
            self._index[key] = (name, _save_bytes(self.folder.results_dir / name, {"key": key, "value": value}))
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
        _unlock_file(self._lock_key)
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
