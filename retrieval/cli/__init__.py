"""The ``hassod`` command line (click): the root group and one module per command group.

The top layer: it may import every package, and no package imports it. Each
command parses its options, calls the library and reports; errors a user can
cause are :class:`~hassod.errors.UserError` s, said in one line by the group
(:mod:`.console`). Heavy libraries (torch, faiss…) are imported inside the
commands, so that ``hassod --help`` starts at once.

``python -m retrieval.cli …`` runs the same group, which is how multi-GPU
training is launched: ``torchrun --nproc_per_node N -m retrieval.cli train …``.
"""
from __future__ import annotations

import click

from .console import Commands
from .convert import convert
from .detect import detect, evaluate_command
from .discover import discover
from .index import index
from .search import search, serve
from .train import train


@click.group(cls=Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="hassod-search", message="%(package)s %(version)s")
def main() -> None:
    """Unsupervised hierarchical object discovery (HASSOD) and region search for image collections."""


for _command in (discover, train, detect, evaluate_command, convert, index, search, serve):
    main.add_command(_command)

app = main  # the name the `hassod` console script and the tests have long used
