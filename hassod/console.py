"""Console output shared by every `hassod` command: one-line errors and run summaries."""
from __future__ import annotations

import json
import sys

import click


def fail(message: str) -> None:
    """Print a one-line error and exit with status 2 (bad input, not a crash)."""
    click.echo(f"error: {message}", err=True)
    sys.exit(2)


def report(summary, problems: list[tuple[str, str]], verb: str, as_json: bool) -> None:
    """Print a run's summary: one JSON object, or each problem file on stderr then the one-line summary."""
    if as_json:
        click.echo(json.dumps(summary.__dict__))
        return
    for path, reason in problems:
        click.echo(f"{verb} {path}: {reason}", err=True)
    click.echo(summary.line())
