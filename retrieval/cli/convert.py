"""`hassod convert`: a detectron2 checkpoint of the reference release as a hassod detector checkpoint."""
from __future__ import annotations

from pathlib import Path

import click

from .console import Command


@click.command("convert", cls=Command)
@click.argument("source", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the hassod detector checkpoint.")
def convert(source: Path, out: Path) -> None:
    """Convert a detectron2 checkpoint (.pkl/.pth) of the reference release into a hassod detector checkpoint."""
    from hassod.model.checkpoint import save_checkpoint
    from hassod.model.convert import convert_checkpoint

    model, settings, tensors = convert_checkpoint(source)
    save_checkpoint(out, model, settings, converted_from=str(source))
    click.echo(f"wrote {out} ({tensors} tensors from {source})")
