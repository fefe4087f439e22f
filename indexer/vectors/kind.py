"""What an index kind must provide to the vector store, behind one protocol.

The store (``store.py``) owns ids, filters, widening, persistence and the
choice of kind; a kind (``flat.py``, ``ivf.py``, ``hnsw.py``, ``pqfs.py``)
owns a faiss index: building it, changing it, reading vectors back,
calibrating its search width and searching it at a given width. Kinds hold
their settings, not their index: the faiss object, passed to every call, is
the state. A kind needing training shows it through faiss itself
(``index.is_trained``). A kind whose data lives in files beside the store file
(``ondisk``) says so through ``io_flags``, ``persist``, ``committed`` and
``opened``; ``InMemoryKind`` gives the others those as no-ops.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import faiss
import numpy as np

if TYPE_CHECKING:
    from .calibration import LeaveOneOut
    from .planning import IndexPlan

# Below this many queries faiss parallelises over queries, so extra OpenMP
# threads only add barrier cost (docs/benchmarks.md, "Vector store").
FAISS_BLAS_THRESHOLD = 20
MAX_THREADS = faiss.omp_get_max_threads()  # before any omp_threads lowers it

Chunks = Iterator[tuple[np.ndarray, np.ndarray]]
# search(rows, width, boost): top k of queries[rows] searched ``width`` wide, re-ranking ``boost`` times deeper
Searcher = Callable[[np.ndarray, int, int], tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class Widths:
    """How wide a kind searches: the calibrated width (nprobe / efSearch) and the widest useful one;
    for re-ranking kinds the calibrated candidates per result (k_factor) and how far a widening
    search may multiply them (max_boost)."""

    width: int
    max_width: int
    k_factor: int = 1
    max_boost: int = 1


class IndexKind(Protocol):
    name: str
    exact: bool  # one search pass is exact: nothing to calibrate or widen
    removes: bool  # faiss removes ids; otherwise the store hides removed ids until a rebuild
    exact_subsets: bool  # small allowed sets are searched by brute force (a filtered search may strand them)
    gpu: bool  # unrestricted searches may run on a GPU replica of the index

    def new_index(self, plan: IndexPlan, dim: int) -> faiss.Index:
        """An empty index for ``plan``; untrained (``is_trained`` False) when it needs data first."""
        ...

    def add(self, index: faiss.Index, vectors: np.ndarray, ids: np.ndarray) -> None: ...

    def remove(self, index: faiss.Index, ids: np.ndarray) -> int:
        """Remove stored ``ids`` (unique, sorted); returns how many went. Only called when ``removes``."""
        ...

    def reconstruct(self, index: faiss.Index, ids: np.ndarray) -> np.ndarray:
        """Stored vectors (m, dim) of stored ``ids``, as the index holds them (decoded for lossy codecs)."""
        ...

    def stored(self, index: faiss.Index, hidden: np.ndarray, chunk: int) -> Chunks:
        """All stored (ids, vectors) in chunks of ``chunk``, ``hidden`` ids left out."""
        ...

    def calibrate(self, index: faiss.Index, sample: LeaveOneOut, target: float) -> dict:
        """Tune the search width on ``sample`` to reach ``target`` recall@10; returns the tuning saved with the
        index (``{}`` for exact kinds)."""
        ...

    def widths(self, index: faiss.Index, tuning: dict, n: int) -> Widths:
        """Search widths of ``index`` holding ``n`` vectors, calibrated as ``tuning`` says."""
        ...

    def searcher(self, index: faiss.Index, queries: np.ndarray, k: int, selector: faiss.IDSelector | None,
                 widths: Widths, restricted: bool) -> Searcher:
        """The search of ``queries`` that the store's widening loop calls, ids limited by ``selector``
        (``restricted``: an allowed set, not just the hidden ids)."""
        ...

    def needs_rebuild(self, tuning: dict, n: int) -> bool:
        """Whether the kind itself wants a rebuild at ``n`` vectors (growth is the store's concern)."""
        ...

    # files beside the store file (all no-ops for an index held whole in the store file)
    io_flags: int  # faiss read flags of the store file's index

    def persist(self, index: faiss.Index, path: Path) -> None:
        """Make the data ``index`` keeps outside the store file ``path`` durable, before that file is written."""
        ...

    def committed(self, index: faiss.Index, path: Path) -> None:
        """The store file ``path`` naming ``index``'s files was written: drop files it no longer names."""
        ...

    def opened(self, index: faiss.Index, path: Path) -> None:
        """Attach the data files beside ``path`` to ``index``, read from that file with ``io_flags``."""
        ...


class InMemoryKind:
    """The file hooks of a kind whose index is held whole in the store file."""

    io_flags = 0

    def persist(self, index: faiss.Index, path: Path) -> None:
        pass

    def committed(self, index: faiss.Index, path: Path) -> None:
        pass

    def opened(self, index: faiss.Index, path: Path) -> None:
        pass


def plain_searcher(index: faiss.Index, queries: np.ndarray, k: int, params: Callable[[int], faiss.SearchParameters],
                   selector: faiss.IDSelector | None) -> Searcher:
    """A searcher for kinds that rank by their own scores: faiss's search with ``params(width)`` (boost unused)."""
    return lambda rows, width, boost: index.search(queries[rows], k, params=with_selector(params(width), selector))


def with_selector(params: faiss.SearchParameters, selector: faiss.IDSelector | None) -> faiss.SearchParameters:
    """``params`` searching only the ids ``selector`` allows (all when ``None``)."""
    if selector is not None:
        params.sel = selector
        params.selector = selector  # SWIG holds a raw pointer
    return params


@contextlib.contextmanager
def omp_threads(n_queries: int) -> Iterator[None]:
    """Never run more OpenMP threads than queries on small batches (see FAISS_BLAS_THRESHOLD)."""
    previous = faiss.omp_get_max_threads()
    if n_queries < FAISS_BLAS_THRESHOLD:
        faiss.omp_set_num_threads(max(1, min(previous, n_queries)))
    try:
        yield
    finally:
        faiss.omp_set_num_threads(previous)
