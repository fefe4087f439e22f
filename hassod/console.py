"""Console output shared by every `hassod` command: one-line errors and run summaries."""
from __future__ import annotations

import errno
import json
import sqlite3
import sys

import click

from .device import DeviceError
from .errors import UserError
from .locks import BusyError

# A full disk (or quota, or file-size limit) while writing: every long job
# saves its finished work as it goes, so the same command continues.
_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_NOT_ALLOWED = {errno.EACCES, errno.EPERM, errno.EROFS}
_RETRY = "finished work is saved: make room and run the same command again to continue"
# A path the user named that cannot be (a folder under a file, or under /proc): said as it is.
_NO_SUCH_PATH = {errno.ENOENT, errno.ENOTDIR, errno.EISDIR}


def fail(message: str) -> None:
    """Print a one-line error and exit with status 2 (bad input, not a crash)."""
    click.echo(f"error: {message}", err=True)
    sys.exit(2)


def storage_error(exc: BaseException) -> str | None:
    """A one-line message for a write refused by the storage (full disk, no permission), else None.

    Looks through the chain of causes, because torch, SQLAlchemy and process
    pools re-raise such errors wrapped in their own exception types.
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _FULL | _NOT_ALLOWED:
            where = f": {exc.filename}" if exc.filename else ""
            reason = f"{(exc.strerror or str(exc)).lower()}{where}"
            return f"{reason}; {_RETRY}" if exc.errno in _FULL else reason
        if isinstance(exc, sqlite3.OperationalError) and any(
            text in str(exc) for text in ("disk is full", "disk I/O error", "readonly database")
        ):
            return f"the index catalog cannot be written ({exc}); {_RETRY}"
        exc = getattr(exc, "orig", None) or exc.__cause__ or exc.__context__
    return None


class Commands(click.Group):
    """The ``hassod`` command group: a :class:`~hassod.errors.UserError`, a device that is not
    there, an output another run is writing, or a write refused by the storage ends in a one-line
    error, not a traceback, whichever command met it."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (DeviceError, BusyError, UserError) as exc:
            fail(str(exc))
        except Exception as exc:
            message = storage_error(exc)
            if message is None and isinstance(exc, OSError) and exc.errno in _NO_SUCH_PATH and exc.filename:
                message = f"{(exc.strerror or str(exc)).lower()}: {exc.filename}"
            if message is None:
                raise
            fail(message)


def report(summary, problems: list[tuple[str, str]], verb: str, as_json: bool) -> None:
    """Print a run's summary: one JSON object, or each problem file on stderr then the one-line summary."""
    if as_json:
        click.echo(json.dumps(summary.__dict__))
        return
    for path, reason in problems:
        click.echo(f"{verb} {path}: {reason}", err=True)
    click.echo(summary.line())
