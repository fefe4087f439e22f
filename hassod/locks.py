"""One writer at a time: advisory locks (flock) on the files a long command writes.

The kernel holds an flock for the open file and drops it with the process,
even one killed with SIGKILL, so an interrupted run never leaves a stale lock
behind, and its rerun simply continues.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from .errors import UserError


class BusyError(UserError, RuntimeError):
    """Another process is writing the same output."""


def lock_or_refuse(handle: IO, busy: str) -> None:
    """Lock the open file ``handle`` for this process, or raise :class:`BusyError` with the message ``busy``."""
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise BusyError(busy) from None


@contextlib.contextmanager
def exclusive(path: Path, busy: str) -> Iterator[None]:
    """Hold the lock file ``path`` (which records this process's id) for the ``with`` block.

    ``busy`` is the message of the :class:`BusyError` raised when another
    process holds it; ``{pid}`` in it is replaced by that process's id.
    """
    with open(path, "a+") as handle:
        handle.seek(0)
        holder = handle.read().strip() or "?"
        lock_or_refuse(handle, busy.replace("{pid}", holder))
        handle.truncate(0)
        handle.write(str(os.getpid()))
        handle.flush()
        yield
