"""The graph kind: ``IndexIDMap2(HNSW{M},Flat)``, 4·d + 8·M + 16 bytes per vector.

Usable without training; efSearch is calibrated on the first batch and after
each rebuild. An HNSW graph cannot drop nodes (``removes`` is False): the store
hides removed ids behind a selector and compacts by rebuilding. A filtered
graph walk can strand allowed nodes, so small allowed sets are searched by brute
force over their own vectors (``exact_subsets``). Never picked by ``"auto"``
(docs/benchmarks.md, "Vector store").
"""
from __future__ import annotations

import faiss
import numpy as np

from .calibration import LeaveOneOut, calibrate_width, tuning
from .flat import idmap_stored
from .kind import Chunks, InMemoryKind, Searcher, Widths, plain_searcher
from .planning import IndexPlan, VectorStoreSettings

_EF_SEARCH_VALUES = [16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048]


class HNSWKind(InMemoryKind):
    name = "hnsw"
    exact = False
    removes = False
    exact_subsets = True
    gpu = False

    def __init__(self, settings: VectorStoreSettings):
        self.settings = settings

    def new_index(self, plan: IndexPlan, dim: int) -> faiss.Index:
        graph = faiss.IndexHNSWFlat(dim, self.settings.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        graph.hnsw.efConstruction = self.settings.hnsw_ef_construction
        return faiss.IndexIDMap2(graph)

    def add(self, index: faiss.Index, vectors: np.ndarray, ids: np.ndarray) -> None:
        index.add_with_ids(vectors, ids)

    def remove(self, index: faiss.Index, ids: np.ndarray) -> int:
        raise NotImplementedError("HNSW graphs cannot drop nodes: the store hides removed ids until a rebuild")

    def reconstruct(self, index: faiss.Index, ids: np.ndarray) -> np.ndarray:
        return index.reconstruct_batch(ids)

    def stored(self, index: faiss.Index, hidden: np.ndarray, chunk: int) -> Chunks:
        return idmap_stored(index, faiss.downcast_index(index.index).storage, hidden, chunk)

    def calibrate(self, index: faiss.Index, sample: LeaveOneOut, target: float) -> dict:
        value, recall = calibrate_width(index, self.name, "ef_search", _EF_SEARCH_VALUES,
                                        _params, sample, target)
        faiss.downcast_index(index.index).hnsw.efSearch = value
        return tuning("ef_search", value, recall, sample)

    def widths(self, index: faiss.Index, tuning: dict, n: int) -> Widths:
        # widest beam: beyond it the exact fallback over the allowed set is cheaper
        calibrated = int(tuning.get("ef_search") or faiss.downcast_index(index.index).hnsw.efSearch)
        return Widths(calibrated, max(16, min(index.ntotal, 16_384)))

    def searcher(self, index: faiss.Index, queries: np.ndarray, k: int, selector: faiss.IDSelector | None,
                 widths: Widths, restricted: bool) -> Searcher:
        return plain_searcher(index, queries, k, _params, selector)

    def needs_rebuild(self, tuning: dict, n: int) -> bool:
        return False


def _params(width: int) -> faiss.SearchParametersHNSW:
    return faiss.SearchParametersHNSW(efSearch=int(width))  # faiss uses max(efSearch, k)
