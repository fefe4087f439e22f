"""The scan-everything kind: ``IVF{nlist},PQ{m}x4fs`` fast scan + fp16 re-rank, 2·d + m/2 + 56 bytes per vector.

For collections whose true neighbours are barely nearer than everything else,
where every vector must be looked at: it makes looking cheap. An IVF with few
lists (``pqfs_lists_per_sqrt_n`` · √n) holds 4-bit product-quantizer codes of
the vectors themselves (not residuals; ``pqfs_m`` sub-quantizers, default d/2);
the scan proposes k · k_factor candidates, and an fp16 copy of every vector
(``IndexIDMap2(IndexScalarQuantizer fp16)``, addressed by region id) re-ranks
them by inner product: scores are these fp16 products. Both live in one
``IndexRefine`` container (one faiss file), whose own add / search are never
used. Calibration picks (nprobe, k_factor) reaching the target at the least
modelled cost (``_cost``); between retrainings k_factor grows in proportion to
the collection, and a store calibrated on fewer than ``calibration_queries``
vectors is rebuilt each time it doubles. Restricted searches widen nprobe and
k_factor together, re-ranking longer prefixes of one deep scan. Never picked
by ``"auto"``; measurements in docs/benchmarks.md, "Vector store".
"""
from __future__ import annotations

import logging
import math
import weakref

import faiss
import numpy as np

from .calibration import CALIBRATION_K, LeaveOneOut, geometric, leave_one_out_recall
from .ids import sorted_member
from .ivf import ivf_params, new_ivf, nprobe_values
from .kind import (FAISS_BLAS_THRESHOLD, MAX_THREADS, Chunks, InMemoryKind, Searcher, Widths, omp_threads,
                   with_selector)
from .planning import IndexPlan, VectorStoreSettings, pqfs_m

log = logging.getLogger(__name__)

# Cost model ranking (nprobe, k_factor) pairs (_cost), measured as docs/benchmarks.md says.
_SCAN_NS_PER_VECTOR = 4.0
_SCAN_NS_PER_BYTE = 0.1
_NS_PER_LIST = 600.0
_NS_PER_CANDIDATE = 700.0
# A single query probing at least this many lists is split over all cores by faiss's
# fast-scan implementation 14 (parallel over a query's lists); below it the split
# costs more in thread wake-ups than it saves.
_SPLIT_MIN_LISTS = 64
_SPLIT_IMPLEM = 14


class PQFastScanKind(InMemoryKind):
    name = "pqfs"
    exact = False
    removes = True
    exact_subsets = False
    gpu = False

    def __init__(self, settings: VectorStoreSettings):
        self.settings = settings
        self._view: tuple[weakref.ref, _Rerank] | None = None  # of the index last read; reset by add / remove

    def new_index(self, plan: IndexPlan, dim: int) -> faiss.Index:
        scan = new_ivf(dim, plan.nlist, f"PQ{pqfs_m(dim, self.settings)}x4fs", self.settings)
        # Codes of the vectors themselves, not of their residuals to the list centroid: one
        # lookup table per query instead of one per probed list, and more true neighbours
        # among the best codes.
        faiss.extract_index_ivf(scan).by_residual = False
        refine = faiss.IndexIDMap2(faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_fp16,
                                                              faiss.METRIC_INNER_PRODUCT))
        # IndexRefine is only the container (one faiss file, extract_index_ivf finds the scan):
        # its re-rank index is addressed by region id, not by position.
        return faiss.IndexRefine(scan, refine)

    def add(self, index: faiss.IndexRefine, vectors: np.ndarray, ids: np.ndarray) -> None:
        self._view = None
        scan, refine = _parts(index)
        scan.add_with_ids(vectors, ids)
        refine.add_with_ids(vectors, ids)
        index.ntotal = scan.ntotal

    def remove(self, index: faiss.IndexRefine, ids: np.ndarray) -> int:
        # faiss 1.15.1 fast-scan lists take removals, but a vector added later to a list
        # that lost entries gets a corrupted code (docs/benchmarks.md, "Vector store"): so
        # every list that loses an id is emptied and its remaining vectors are re-encoded
        # from the fp16 copy (O(list size) per touched list).
        scan, refine = _parts(index)
        ivf = faiss.extract_index_ivf(scan)
        touched = []
        for list_no in range(ivf.nlist):
            size = ivf.invlists.list_size(list_no)
            if size:
                list_ids = faiss.rev_swig_ptr(ivf.invlists.get_ids(list_no), size)
                if sorted_member(ids, list_ids).any():
                    touched.append(list_ids.copy())
        emptied = np.sort(np.concatenate(touched)) if touched else np.empty(0, dtype=np.int64)
        keep = emptied[~sorted_member(ids, emptied)]
        kept_vectors = self._view_of(index).decode(keep)
        self._view = None
        if scan.remove_ids(faiss.IDSelectorBatch(emptied.size, faiss.swig_ptr(emptied))) != emptied.size:
            raise RuntimeError("pqfs scan lists changed while being emptied")
        if keep.size:
            scan.add_with_ids(kept_vectors, keep)
        removed = refine.remove_ids(faiss.IDSelectorBatch(ids.size, faiss.swig_ptr(ids)))
        if removed != emptied.size - keep.size or scan.ntotal != refine.ntotal:
            raise RuntimeError("pqfs scan and re-rank copies disagree on the stored ids")
        index.ntotal = scan.ntotal
        return removed

    def reconstruct(self, index: faiss.IndexRefine, ids: np.ndarray) -> np.ndarray:
        """The fp16 copies, decoded."""
        return self._view_of(index).decode(ids)

    def stored(self, index: faiss.IndexRefine, hidden: np.ndarray, chunk: int) -> Chunks:
        rerank = self._view_of(index)
        ids = rerank.sorted_ids.copy()
        for start in range(0, ids.size, chunk):
            yield ids[start:start + chunk], rerank.decode(ids[start:start + chunk])

    def calibrate(self, index: faiss.IndexRefine, sample: LeaveOneOut, target: float) -> dict:
        """Cheapest (nprobe, k_factor) reaching ``target`` leave-one-out recall@10.

        One scan per nprobe returns the top 10·max_k_factor + 1 candidates; the
        candidates of a smaller k_factor are a prefix of them, and an exact re-rank
        keeps every true neighbour among its candidates, so recall at (nprobe, k_factor)
        is the share of the true top 10 in that prefix. Among pairs reaching the
        target the cheapest by ``_cost`` wins; the winner is then searched
        for real (fp16 re-rank) and that recall is reported. Out of reach: the
        cheapest pair within 1% of the best recall seen.
        """
        scan, _ = _parts(index)
        ivf = faiss.extract_index_ivf(scan)
        k = CALIBRATION_K
        n, code_bytes = scan.ntotal, ivf.code_size
        max_factor = max(1, min(self.settings.pqfs_max_k_factor, n // k))  # more candidates than vectors is pointless
        factors = geometric(max_factor)
        # true top k without the query itself, padded with -2 (matches nothing, not even a missing -1)
        truth_k = np.full((len(sample.ids), k), -2, dtype=np.int64)
        for row, (t, own) in enumerate(zip(sample.truth, sample.ids)):
            t = t[(t != own) & (t >= 0)][:k]
            truth_k[row, :t.size] = t
        n_true = np.maximum((truth_k >= 0).sum(axis=1), 1)
        seen: list[tuple[float, int, int, float]] = []  # (cost, nprobe, k_factor, candidate recall)
        best_cost = math.inf
        for nprobe in nprobe_values(ivf):
            if _cost(n, code_bytes, nprobe, ivf.nlist, k, 1) >= best_cost:
                break  # scanning alone already costs more than a pair that reaches the target
            _, found = scan.search(sample.queries, k * factors[-1] + 1, params=ivf_params(ivf, nprobe))
            # rank of each true neighbour among the candidates (found.shape[1] when absent)
            rank = np.full(truth_k.shape, found.shape[1], dtype=np.int64)
            for j in range(k):
                match = found == truth_k[:, j:j + 1]
                present = match.any(axis=1)
                rank[present, j] = match[present].argmax(axis=1)
            for f in factors:
                recall = float(np.mean((rank < k * f + 1).sum(axis=1) / n_true))
                cost = _cost(n, code_bytes, nprobe, ivf.nlist, k, f)
                seen.append((cost, nprobe, f, recall))
                if recall >= target:
                    best_cost = min(best_cost, cost)
                    break
        best = max(r for *_, r in seen)
        floor = target if best >= target else 0.99 * best
        _, nprobe, k_factor, _ = min(s for s in seen if s[3] >= floor)
        ivf.nprobe = nprobe  # saved inside the faiss file too
        index.k_factor = k_factor
        _, found = self._search(index, sample.queries, k + 1, k_factor, ivf_params(ivf, nprobe))
        recall = leave_one_out_recall(found, sample.truth, sample.ids, k)
        if recall < target:
            log.warning("pqfs index reaches recall@10 %.3f (target %.2f) with nprobe=%d of %d, k_factor=%d; "
                        "raise pqfs_m or pqfs_max_k_factor", recall, target, nprobe, ivf.nlist, k_factor)
        return {"nprobe": int(nprobe), "k_factor": int(k_factor), "calibrated_recall": round(float(recall), 4),
                "calibration_queries": len(sample.ids), "calibrated_size": int(n)}

    def widths(self, index: faiss.IndexRefine, tuning: dict, n: int) -> Widths:
        ivf = faiss.extract_index_ivf(index)
        k_factor = self._k_factor(index, tuning, n)
        return Widths(int(tuning.get("nprobe") or ivf.nprobe), ivf.nlist, k_factor,
                      max(1, self.settings.pqfs_max_k_factor // k_factor))

    def searcher(self, index: faiss.IndexRefine, queries: np.ndarray, k: int, selector: faiss.IDSelector | None,
                 widths: Widths, restricted: bool) -> Searcher:
        """Scan proposes ``_depth(k, k_factor · boost)`` candidates, the fp16 copies re-rank them.

        Restricted searches scan once per width, deep enough for the largest
        boost, and widen the k_factor by re-ranking longer prefixes of that scan
        (rescanning for each boost cost twice the time).
        """
        ivf = faiss.extract_index_ivf(index)

        def params(width: int) -> faiss.SearchParameters:
            return with_selector(ivf_params(ivf, width), selector)

        deepest = _depth(k, widths.k_factor * widths.max_boost)
        if not restricted or len(queries) * deepest > 1 << 22:  # ≤ 32 MiB of candidates
            return lambda rows, width, boost: self._search(index, queries[rows], k, boost * widths.k_factor,
                                                           params(width))
        scans: dict[int, np.ndarray] = {}

        def search(rows: np.ndarray, width: int, boost: int) -> tuple[np.ndarray, np.ndarray]:
            if width not in scans:  # rows only shrink between calls: scan the current ones
                scans.clear()
                candidates = np.full((len(queries), deepest), -1, dtype=np.int64)
                candidates[rows] = _scan(index, queries[rows], deepest, params(width))
                scans[width] = candidates
            candidates = scans[width][rows, :_depth(k, widths.k_factor * boost)]
            return _rerank(self._view_of(index), queries[rows], k, candidates)
        return search

    def needs_rebuild(self, tuning: dict, n: int) -> bool:
        # Built on fewer vectors than the calibration sample: its PQ codebooks and
        # k_factor fit a handful of vectors (nlist stays 1 up to 78), so retrain each
        # time the collection doubles until it is calibrated on a full sample.
        calibrated_on = int(tuning.get("calibration_queries") or 0)
        return calibrated_on < self.settings.calibration_queries and n >= 2 * max(calibrated_on, 1)

    def _search(self, index: faiss.IndexRefine, queries: np.ndarray, k: int, k_factor: int,
                params: faiss.SearchParameters) -> tuple[np.ndarray, np.ndarray]:
        """The 4-bit scan proposes ``_depth(k, k_factor)`` candidates (selector and nprobe from ``params``),
        their fp16 copies re-rank them by inner product."""
        return _rerank(self._view_of(index), queries, k, _scan(index, queries, _depth(k, k_factor), params))

    def _k_factor(self, index: faiss.IndexRefine, tuning: dict, n: int) -> int:
        """Calibrated k_factor, scaled up with the growth since calibration: the number of codes
        that outscore a true neighbour grows with the collection (on random data in proportion),
        so a fixed candidate count would lose recall as vectors are added."""
        calibrated = int(tuning.get("k_factor") or index.k_factor)
        size = int(tuning.get("calibrated_size") or 0)
        if not size or n <= size:
            return calibrated
        return min(math.ceil(calibrated * n / size), max(calibrated, self.settings.pqfs_max_k_factor))

    def _view_of(self, index: faiss.IndexRefine) -> _Rerank:
        """The re-rank view of ``index``, built once per state of the index."""
        if self._view is None or self._view[0]() is not index:
            self._view = (weakref.ref(index), _Rerank(index))
        return self._view[1]


def _parts(index: faiss.IndexRefine) -> tuple[faiss.IndexIVF, faiss.IndexIDMap2]:
    """The fast-scan IVF and the id-addressed fp16 copy of a ``pqfs`` container."""
    return faiss.downcast_index(index.base_index), faiss.downcast_index(index.refine_index)


class _Rerank:
    """Id-addressed fp16 codes of a ``pqfs`` index, read straight from faiss memory.

    faiss would decode one vector per virtual call through the IndexIDMap2 hash,
    and numpy converts fp16 slowly. So the codes are viewed as a numpy (n, 2·d)
    uint8 array, ids are found by binary search in a sorted copy of the id map,
    and a query's candidates are scored by a scratch IndexScalarQuantizer over
    copies of their codes (SIMD fp16 inner products). The view is valid only
    until the index changes: the kind drops it on every add / remove.
    """

    def __init__(self, index: faiss.IndexRefine):
        _, refine = _parts(index)
        self.storage = faiss.downcast_index(refine.index)
        n, self.dim = self.storage.ntotal, self.storage.d
        size = self.storage.code_size
        self.codes = (faiss.rev_swig_ptr(self.storage.codes.data(), n * size).reshape(n, size)
                      if n else np.empty((0, size), dtype=np.uint8))
        position_ids = faiss.vector_to_array(refine.id_map)
        self.order = np.argsort(position_ids, kind="stable")
        self.sorted_ids = position_ids[self.order]

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """Positions of stored ``ids`` (all must be stored)."""
        return self.order[np.searchsorted(self.sorted_ids, ids)]

    def decode(self, ids: np.ndarray) -> np.ndarray:
        return self.storage.sa_decode(self.codes[self.rows(ids)])

    def top_k(self, query: np.ndarray, candidates: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` best of ``candidates`` (stored ids) by fp16 inner product with ``query`` (d,)."""
        scratch = faiss.IndexScalarQuantizer(self.dim, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
        scratch.add_sa_codes(self.codes[self.rows(candidates)])
        scores, rows = scratch.search(query[None], min(k, candidates.size))
        return scores[0], candidates[rows[0]]


def _depth(k: int, k_factor: int) -> int:
    """Candidates scanned for k results: at least 10·k_factor (the calibrated count) even for k < 10,
    since a 4-bit code's score is so rough that a query's own vector can rank 50th."""
    return max(k, CALIBRATION_K) * k_factor


def _scan(index: faiss.IndexRefine, queries: np.ndarray, depth: int,
          params: faiss.SearchParameters | None) -> np.ndarray:
    """Ids (q, depth) of the best ``depth`` 4-bit codes per query, -1 padded.

    A few queries probing many lists split each query's lists over all cores
    (fast-scan implementation 14) instead of parallelising over queries.
    """
    scan = _parts(index)[0]
    nprobe = params.nprobe if isinstance(params, faiss.SearchParametersIVF) else scan.nprobe
    split = len(queries) < FAISS_BLAS_THRESHOLD and nprobe >= _SPLIT_MIN_LISTS and MAX_THREADS > 1
    scan.implem = _SPLIT_IMPLEM if split else 0
    previous = faiss.omp_get_max_threads()  # omp_threads(len(queries)) of the caller
    if split:
        faiss.omp_set_num_threads(MAX_THREADS)
    try:
        return scan.search(queries, depth, params=params)[1]
    finally:
        faiss.omp_set_num_threads(previous)


def _rerank(rerank: _Rerank, queries: np.ndarray, k: int, candidates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Top k of each query's ``candidates`` row (ids, -1 = none) by fp16 inner product."""
    scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
    ids = np.full((len(queries), k), -1, dtype=np.int64)
    with omp_threads(1):  # one tiny search per query: OpenMP only adds barrier waits
        for row, (query, found) in enumerate(zip(queries, candidates)):
            found = found[found >= 0]
            if found.size:
                top_scores, top_ids = rerank.top_k(query, found, k)
                scores[row, :top_ids.size], ids[row, :top_ids.size] = top_scores, top_ids
    return scores, ids


def _cost(n: int, code_bytes: int, nprobe: int, nlist: int, k: int, k_factor: int) -> float:
    """Model of one query's time (ns): codes scanned plus candidates re-ranked."""
    scanned = n * nprobe / nlist
    return ((_SCAN_NS_PER_VECTOR + _SCAN_NS_PER_BYTE * code_bytes) * scanned
            + _NS_PER_LIST * nprobe + _NS_PER_CANDIDATE * k * k_factor)
