"""Options that several `hassod` commands share, declared once: ``@device_option`` and so on.

Each is a click decorator; a command lists the ones it takes, so the same option
has the same name, default and help wherever it appears.
"""
from __future__ import annotations

from pathlib import Path

import click

from hassod.images import DEFAULT_MAX_PIXELS

LEVEL_CHOICES = ("whole", "part", "subpart")

images_argument = click.argument("images", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
"""IMAGES: image files or folders, one or more."""


def device_option(help: str | None = "auto, cpu, cuda or cuda:N."):
    """``--device``: where torch runs (``auto``: CUDA when present)."""
    return click.option("--device", default="auto", show_default=True, help=help)


def json_option(help: str | None = "Print the summary as JSON."):
    """``--json``: machine-readable output instead of the human summary."""
    return click.option("--json", "as_json", is_flag=True, help=help)


def max_pixels_option(help: str | None = "Refuse images larger than this."):
    """``--max-pixels``: images with more pixels are refused (a decompression bomb, or a mistake)."""
    return click.option("--max-pixels", default=DEFAULT_MAX_PIXELS, show_default=True, type=click.IntRange(min=1),
                        help=help)


def batch_size_option(default: int):
    """``--batch-size``: images per forward pass."""
    return click.option("--batch-size", default=default, show_default=True, type=click.IntRange(min=1))


def workers_option(help: str):
    """``--workers``: processes for the CPU-side work [CPU count]."""
    return click.option("--workers", default=None, type=click.IntRange(min=1), help=help)


def use_option(help: str = "The checkpoint's weights: the student, or Mean Teacher's teacher."):
    """``--use``: which weights of a detector checkpoint to run."""
    return click.option("--use", default="student", show_default=True, type=click.Choice(["student", "teacher"]),
                        help=help)


def weights_option(help: str | None = "Backbone weight file."):
    """``--weights``: the backbone's weight file."""
    return click.option("--weights", type=click.Path(exists=True, dir_okay=False), help=help)


def viz_option():
    """``--viz``: a folder of overlay PNGs."""
    return click.option("--viz", "viz_dir", type=click.Path(file_okay=False, path_type=Path),
                        help="Write overlay PNGs here.")


def index_option(help: str = "Index directory."):
    """``--index``: the index directory a command reads."""
    return click.option("--index", "index_dir", required=True, type=click.Path(path_type=Path), help=help)


def options(*decorators):
    """One decorator applying ``decorators`` in the order listed (the first is the first in ``--help``)."""
    def apply(command):
        for decorator in reversed(decorators):
            command = decorator(command)
        return command
    return apply
