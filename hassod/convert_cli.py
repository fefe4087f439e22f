"""`hassod convert`: the click command over :mod:`hassod.model.convert` (imported when run,
so that the command line starts without torch)."""
from __future__ import annotations

from pathlib import Path

import click


@click.command("convert")
@click.argument("source", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the hassod detector checkpoint.")
def convert(source: Path, out: Path) -> None:
    """Convert a detectron2 checkpoint (.pkl/.pth) of the reference release into a hassod detector checkpoint."""
    from .features.weights import WeightsFormatError
    from .model.checkpoint import save_checkpoint
    from .model.convert import convert_detectron2, read_detectron2_file, settings_for
    from .model.detector import build_detector

    try:
        state = convert_detectron2(read_detectron2_file(source))
        settings = settings_for(state)
        model = build_detector(settings, random_init=True)
        model.load_state_dict(state, strict=True)
    except (WeightsFormatError, RuntimeError) as exc:
        raise click.ClickException(str(exc)) from exc
    save_checkpoint(out, model, settings, converted_from=str(source))
    click.echo(f"wrote {out} ({len(state)} tensors from {source})")
