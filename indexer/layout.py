"""An index is a directory: the vectors, the catalog (or a pointer to it), and nothing else.

``DIR/vectors.faiss``   FAISS vectors keyed by region id (indexer.vectors)
``DIR/vectors.*.ivfdata``  memory-mapped inverted lists of an ``ondisk`` index
``DIR/shards/``         shard indexes of a Ray build, not merged yet (indexer.distributed)
``DIR/catalog.sqlite``  the catalog, unless ``--db URL`` put it elsewhere
``DIR/index.json``      ``{"catalog": URL, "index_id": ID}`` when the catalog lives elsewhere
``DIR/whitening.npz``   the PCA-whitening of the vectors, when built with one (indexer.whitening)
``DIR/build.lock``      locked (flock) while a build writes the index
"""
from __future__ import annotations

import contextlib
import json
import uuid
from pathlib import Path

from hassod.errors import UserError
from hassod.locks import exclusive
from hassod.runs import atomic_write

from .catalog import Catalog, IncompatibleIndexError, masked_url
from .vectors import VectorStore

VECTORS_FILE = "vectors.faiss"
CATALOG_FILE = "catalog.sqlite"
POINTER_FILE = "index.json"
WHITENING_FILE = "whitening.npz"
LOCK_FILE = "build.lock"


class IndexNotFoundError(UserError, FileNotFoundError):
    """No index at the given directory."""


def catalog_url(index_dir: Path, db_url: str | None = None) -> str:
    """The catalog URL of the index at ``index_dir``; ``db_url`` (at build time) overrides it.

    The index remembers a ``db_url`` only once a build has opened it
    (:func:`claim_catalog`), so a mistyped URL does not stick to the directory.
    """
    if db_url:
        return db_url
    pointer = Path(index_dir) / POINTER_FILE
    if pointer.exists():
        return json.loads(pointer.read_text())["catalog"]
    return f"sqlite:///{(Path(index_dir) / CATALOG_FILE).resolve()}"


def claim_catalog(index_dir: Path, catalog: Catalog, db_url: str | None) -> str | None:
    """Tie the index at ``index_dir`` to its opened ``catalog`` when that lives elsewhere (``--db``).

    One database holds one index: a second directory building into it would
    count the first's images as its own, without their vectors. So the
    catalog's config and ``index.json`` share an id, the directory
    remembers ``db_url`` only once it opened, and another directory's catalog
    raises :class:`IncompatibleIndexError`. Returns the id to store in the
    catalog's config, or None for the SQLite catalog inside the directory.
    """
    pointer = Path(index_dir) / POINTER_FILE
    if db_url is None and not pointer.exists():
        return None
    remembered = json.loads(pointer.read_text()) if pointer.exists() else {}
    saved = catalog.get_config() or {}
    claimed = saved.get("index_id")
    if claimed is not None and claimed != remembered.get("index_id"):
        raise IncompatibleIndexError(
            f"the catalog at {masked_url(db_url or remembered['catalog'])} holds the index of another directory; "
            "give every index its own database"
        )
    index_id = claimed or remembered.get("index_id") or uuid.uuid4().hex
    if saved and claimed is None:  # built before catalogs carried the id: its first directory claims it
        catalog.set_config({**saved, "index_id": index_id})
    with atomic_write(pointer) as handle:
        handle.write(json.dumps({"catalog": db_url or remembered["catalog"], "index_id": index_id}))
    return index_id


def exclusive_build(index_dir: Path) -> contextlib.AbstractContextManager[None]:
    """The index's build lock, for the ``with`` block, or :class:`hassod.locks.BusyError`.

    Two builds at once would each save their own vector file over the other's
    while both write catalog rows, leaving regions without vectors.
    """
    return exclusive(Path(index_dir) / LOCK_FILE,
                     f"another `hassod index build` (pid {{pid}}) is writing {index_dir}; run this one when it has finished")


def vectors_path(index_dir: Path) -> Path:
    return Path(index_dir) / VECTORS_FILE


def whitening_path(index_dir: Path) -> Path:
    return Path(index_dir) / WHITENING_FILE


def open_existing(index_dir: Path) -> tuple[Catalog, VectorStore]:
    """Catalog and vectors of a built index, or :class:`IndexNotFoundError` saying what is missing."""
    index_dir = Path(index_dir)
    if index_dir.exists() and not index_dir.is_dir():
        raise IndexNotFoundError(f"{index_dir} is a file, not an index directory")
    has_catalog = (index_dir / CATALOG_FILE).exists() or (index_dir / POINTER_FILE).exists()
    if not index_dir.is_dir() or not has_catalog:
        raise IndexNotFoundError(f"no index at {index_dir} (build one with `hassod index build IMAGES --index {index_dir}`)")
    catalog = Catalog(catalog_url(index_dir))
    if catalog.get_config() is None or not vectors_path(index_dir).exists():
        raise IndexNotFoundError(f"the index at {index_dir} is empty: its first build has not finished")
    return catalog, VectorStore.load(vectors_path(index_dir))
