"""Console output shared by every `hassod` command: one-line errors and run summaries.

Every command is a :class:`Command` and every group a :class:`Commands`: a
:class:`~hassod.errors.UserError` raised anywhere below, or a write refused by the
storage, ends as one ``error: …`` line with exit status 2 instead of a traceback,
whether the command runs inside the ``hassod`` group or on its own.
"""
from __future__ import annotations

import contextlib
import errno
import json
import sqlite3
import sys
from collections.abc import Iterator

import click

from hassod.errors import UserError

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


@contextlib.contextmanager
def naming(what: str, error: type[UserError]) -> Iterator[None]:
    """An ``error`` raised inside says first what the user named: ``{what}: {message}``
    (e.g. ``--detector d.pt: …``, for the option whose file it was)."""
    try:
        yield
    except error as exc:
        raise UserError(f"{what}: {exc}") from exc


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
        if isinstance(exc, sqlite3.DatabaseError):
            from indexer.catalog import DAMAGED_MARKS, REBUILD  # on this error path only: no start-up cost

            if any(text in str(exc) for text in DAMAGED_MARKS):
                return f"the index catalog is damaged ({exc}); {REBUILD}"
        exc = getattr(exc, "orig", None) or exc.__cause__ or exc.__context__
    return None


def _reported(invoke, ctx: click.Context):
    """``invoke(ctx)``, with the errors a user can cause said in one line (exit 2) instead of a traceback."""
    try:
        return invoke(ctx)
    except UserError as exc:
        fail(str(exc))
    except Exception as exc:
        message = storage_error(exc)
        if message is None and isinstance(exc, OSError) and exc.errno in _NO_SUCH_PATH and exc.filename:
            message = f"{(exc.strerror or str(exc)).lower()}: {exc.filename}"
        if message is None:
            raise
        fail(message)


class Command(click.Command):
    """A ``hassod`` command: a :class:`~hassod.errors.UserError` (a bad file, a device that is not
    there, an output another run is writing…) or a write refused by the storage ends in a one-line
    error, not a traceback."""

    def invoke(self, ctx: click.Context):
        return _reported(super().invoke, ctx)


class Commands(click.Group):
    """A ``hassod`` command group: its commands are :class:`Command` s, and it reports errors the
    same way for whatever runs below it."""

    command_class = Command
    group_class = type

    def invoke(self, ctx: click.Context):
        return _reported(super().invoke, ctx)


def report(summary, problems: list[tuple[str, str]], verb: str, as_json: bool) -> None:
    """Print a run's summary: one JSON object, or each problem file on stderr then the one-line summary."""
    if as_json:
        click.echo(json.dumps(summary.__dict__))
        return
    for path, reason in problems:
        click.echo(f"{verb} {path}: {reason}", err=True)
    click.echo(summary.line())
