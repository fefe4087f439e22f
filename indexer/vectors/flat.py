"""The exact kind: ``IndexIDMap2(IndexFlatIP)``, 4·d + 16 bytes per vector.

Every search scans every vector, so one pass is final: nothing to train,
calibrate or widen, and a restricted search (selector inside the scan) is exact.
The id map addresses vectors by region id; ``idmap_stored`` reads the raw
vectors of any IndexIDMap2 over a flat storage (this kind and ``hnsw``).
"""
from __future__ import annotations

import faiss
import numpy as np

from .calibration import LeaveOneOut
from .kind import Chunks, InMemoryKind, Searcher, Widths, plain_searcher
from .planning import IndexPlan, VectorStoreSettings


class FlatKind(InMemoryKind):
    name = "flat"
    exact = True
    removes = True
    exact_subsets = False
    gpu = True

    def __init__(self, settings: VectorStoreSettings):
        self.settings = settings

    def new_index(self, plan: IndexPlan, dim: int) -> faiss.Index:
        return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))

    def add(self, index: faiss.Index, vectors: np.ndarray, ids: np.ndarray) -> None:
        index.add_with_ids(vectors, ids)

    def remove(self, index: faiss.Index, ids: np.ndarray) -> int:
        return index.remove_ids(faiss.IDSelectorBatch(ids.size, faiss.swig_ptr(ids)))

    def reconstruct(self, index: faiss.Index, ids: np.ndarray) -> np.ndarray:
        return index.reconstruct_batch(ids)

    def stored(self, index: faiss.Index, hidden: np.ndarray, chunk: int) -> Chunks:
        return idmap_stored(index, index.index, hidden, chunk)

    def calibrate(self, index: faiss.Index, sample: LeaveOneOut, target: float) -> dict:
        return {}

    def widths(self, index: faiss.Index, tuning: dict, n: int) -> Widths:
        return Widths(1, 1)

    def searcher(self, index: faiss.Index, queries: np.ndarray, k: int, selector: faiss.IDSelector | None,
                 widths: Widths, restricted: bool) -> Searcher:
        return plain_searcher(index, queries, k, lambda width: faiss.SearchParameters(), selector)

    def needs_rebuild(self, tuning: dict, n: int) -> bool:
        return False


def idmap_stored(index: faiss.IndexIDMap2, storage: faiss.Index, hidden: np.ndarray, chunk: int) -> Chunks:
    """Stored (ids, vectors) of an IndexIDMap2 whose vectors sit in the flat ``storage``, in position order,
    ``hidden`` ids left out."""
    n, dim = index.ntotal, index.d
    flat = faiss.rev_swig_ptr(faiss.downcast_index(storage).get_xb(), n * dim).reshape(n, dim)
    positions_ids = faiss.vector_to_array(index.id_map)
    keep = ~np.isin(positions_ids, hidden) if hidden.size else slice(None)
    positions_ids, positions = positions_ids[keep], np.arange(n)[keep]
    for start in range(0, positions.size, chunk):
        sel = positions[start:start + chunk]
        yield positions_ids[start:start + chunk], np.array(flat[sel], dtype=np.float32)
