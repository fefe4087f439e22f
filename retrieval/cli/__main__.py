"""``python -m retrieval.cli …`` (and ``torchrun … -m retrieval.cli train …``): the ``hassod`` command."""
from retrieval.cli import main

main()
