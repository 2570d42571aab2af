"""Files written atomically: a temporary file, fsync, rename over the target, fsync of the folder.

A reader sees the old file or the new one, never half of one (a kill, a full disk, a power cut).
Run folders (:mod:`metapt.runs`), sessions' results (:mod:`metapt.session`), summaries and
reports are written through here.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from .errors import RunFolderError
from .schema import jsonable

__all__ = ["FILE_MODE", "atomic_path", "fsync_dir", "load_verified", "read_json", "save_bytes", "write_json_atomic",
           "write_text_atomic"]

_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read the process umask (os.umask can only be read by setting it)
#: the mode ``open()`` gives a new file under this process's umask
FILE_MODE = 0o666 & ~_UMASK


def fsync_dir(path: Path) -> None:
    """fsync a folder, so that a rename in it is on disk (a no-op where the platform cannot)."""
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
    os.chmod(tmp, FILE_MODE)  # mkstemp makes it 0600; give it the mode open() would
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    """``text`` (UTF-8) to ``path``, atomically."""
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


def save_bytes(path: Path, value: Any) -> str:
    """``torch.save(value)`` to ``path`` atomically; returns the SHA-256 of the file's bytes."""
    buffer = io.BytesIO()
    torch.save(value, buffer)
    data = buffer.getvalue()
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def load_verified(path: Path, sha256: str) -> Any:
    """``torch.load(weights_only=True)`` of ``path`` if its SHA-256 starts with ``sha256``."""
    data = path.read_bytes()
    if not hashlib.sha256(data).hexdigest().startswith(sha256):
        raise RunFolderError(f"{path} does not match its checksum (a damaged file)")
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
