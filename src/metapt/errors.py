"""The errors a user can fix, told apart from bugs.

Every exception metapt raises because of what it was given — a config, a run folder, a
data folder, a launch — derives from :class:`UserError`. The ``metapt`` command prints
such an error as one line on stderr and exits with status 2; anything else (a bug, an
internal ``ValueError`` included) is a crash: traceback and exit status 1. ``--debug``
shows the traceback of user errors too.

The subclasses also derive from ``ValueError``, so library code that caught the
``ValueError`` these used to be keeps working.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["ConfigError", "DataError", "Interrupted", "LaunchError", "NonFiniteLossError", "RunFolderError",
           "UserError", "check_stop", "deferred_stop", "immediate_stop", "on_stop_signal", "reset_stop",
           "stopped_by"]


class UserError(Exception):
    """A failure whose message is the whole story: what was wrong and how to fix it."""


class ConfigError(UserError, ValueError):
    """A configuration that cannot run; the message names the key and what is allowed."""


class RunFolderError(UserError, ValueError):
    """The run folder cannot be used as asked (exists, missing, not a run, in use, damaged)."""


class DataError(UserError, ValueError):
    """A data folder or file that cannot be read as the job needs it."""


class LaunchError(UserError, ValueError):
    """The process cannot run as launched (thread count, process count, torchrun setup)."""


class NonFiniteLossError(FloatingPointError):
    """The pre-training loss stopped being finite; the run cannot continue.

    Raised by :meth:`metapt.MetaPretrainer.pretrain_step` before θ is updated, so the trainer's
    state is that of the last good step (``state_dict()`` still gives it). Usual causes: a PT
    learning rate too high, or a meta learning rate that lets φ grow without bound. Defined
    here (and re-exported by :mod:`metapt.trainer`) so the command line can catch it without
    importing torch.
    """


# ---- stop signals -----------------------------------------------------------------------------


class Interrupted(KeyboardInterrupt):
    """SIGINT (Ctrl-C) or SIGTERM: the run stops; the newest checkpoint is where it goes on from."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


_STOP: list[int] = []  # signals received by this process since reset_stop()
_DEFERRED = [0]  # > 0: inside deferred_stop(), the handler only records the signal
_RAISED: list[int] = []  # Interrupted was raised: the run is stopping, and a further signal must not cut its cleanup


def on_stop_signal(signum: int, frame: object = None) -> None:  # noqa: ARG001 (signal handler signature)
    """Signal handler for SIGINT and SIGTERM: remember the signal; raise :class:`Interrupted` at
    once, unless inside :func:`deferred_stop`, where :func:`check_stop` raises it at the next step.

    Python runs a handler wherever the main thread is. Raised in the middle of a library call (a
    TensorBoard writer's queue, a file being written), the exception can leave a lock held that
    the cleanup then waits on for ever; raised in a ``__del__`` or a garbage-collector callback, it
    is printed and swallowed. The run's loops therefore only record it and stop at a step boundary.
    Once the stop has been raised, a further signal is only recorded: it must not cut short the
    cleanup (a rolled-back ``--overwrite`` putting the old run back) that the first one started.
    """
    first = not _STOP
    _STOP.append(signum)
    if not _DEFERRED[0] and (first or not _RAISED):
        _RAISED.append(signum)
        raise Interrupted(signum)


def check_stop() -> None:
    """Raise :class:`Interrupted` if a stop signal arrived (called at every step of a run)."""
    if _STOP:
        _RAISED.append(_STOP[0])
        raise Interrupted(_STOP[0])


@contextmanager
def deferred_stop() -> Iterator[None]:
    """Inside, a stop signal is only recorded; the loops in it call :func:`check_stop` at each
    step (PT step, fine-tuning batch, evaluation unit), so the run stops between two steps."""
    _DEFERRED[0] += 1
    try:
        yield
    finally:
        _DEFERRED[0] -= 1


@contextmanager
def immediate_stop() -> Iterator[None]:
    """Inside (e.g. loading data, which holds no state a cleanup needs), a stop signal raises at once."""
    saved, _DEFERRED[0] = _DEFERRED[0], 0
    try:
        check_stop()
        yield
    finally:
        _DEFERRED[0] = saved


def reset_stop() -> None:
    _STOP.clear()
    _RAISED.clear()


def stopped_by() -> int | None:
    """The first stop signal received since :func:`reset_stop`, or None."""
    return _STOP[0] if _STOP else None
