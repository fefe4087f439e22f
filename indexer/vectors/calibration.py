"""Measuring an approximate index's recall and tuning its search width to a target.

Recall is measured leave-one-out: stored vectors serve as queries (``LeaveOneOut``)
against their exact top 10 (``ExactTopK``, streamed over the stored vectors), each
query's own id dropped from both sides. ``calibrate_width`` takes the smallest
width (nprobe, efSearch) reaching the target recall@10, or, when the target is out
of reach (PQ codes, structureless data), the smallest within 1% of the best recall
seen instead of an exhaustive scan. The target is ``target_recall`` plus
``calibration_margin``, capped at 0.999.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import faiss
import numpy as np

from .planning import VectorStoreSettings

log = logging.getLogger(__name__)

CALIBRATION_K = 10


@dataclass(frozen=True)
class LeaveOneOut:
    """Stored vectors used as queries: their ``ids``, the ``queries`` themselves and ``truth``, the ids (q, k + 1)
    of each query's exact top k + 1 (the query itself included)."""

    ids: np.ndarray
    queries: np.ndarray
    truth: np.ndarray


class ExactTopK:
    """Running exact top-k by inner product of fixed queries over streamed (ids, vectors) chunks."""

    def __init__(self, queries: np.ndarray, k: int):
        self.queries = queries
        self.k = k
        self.scores = np.full((queries.shape[0], k), -np.inf, dtype=np.float32)
        self.ids = np.full((queries.shape[0], k), -1, dtype=np.int64)

    def update(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        if ids.size == 0:
            return
        # faiss rather than numpy: its OpenMP threads follow omp_threads, while OpenBLAS
        # threads waste time in barrier waits on a busy machine (docs/benchmarks.md, "Vector store").
        chunk_scores, top = faiss.knn(self.queries, vectors, min(self.k, ids.size), metric=faiss.METRIC_INNER_PRODUCT)
        # merge the chunk's own top-k with the running top-k: (q, 2k) instead of (q, k + chunk)
        scores = np.concatenate([self.scores, chunk_scores], axis=1)
        all_ids = np.concatenate([self.ids, ids[top]], axis=1)
        order = np.argsort(-scores, axis=1, kind="stable")[:, :self.k]
        self.scores = np.take_along_axis(scores, order, axis=1)
        self.ids = np.take_along_axis(all_ids, order, axis=1)


def calibration_target(settings: VectorStoreSettings) -> float:
    return min(0.999, settings.target_recall + settings.calibration_margin)


def calibrate_width(index: faiss.Index, kind: str, name: str, values: list[int],
                    make: Callable[[int], faiss.SearchParameters], sample: LeaveOneOut,
                    target: float) -> tuple[int, float]:
    """Smallest of ``values`` (ascending) whose search parameters ``make(value)`` reach ``target``
    leave-one-out recall@10 on ``sample``: (value, its recall). ``kind`` and ``name`` (the parameter)
    name them in the warning logged when the target is out of reach."""
    seen: list[tuple[int, float]] = []
    for v in values:
        _, found = index.search(sample.queries, CALIBRATION_K + 1, params=make(v))
        recall = leave_one_out_recall(found, sample.truth, sample.ids, CALIBRATION_K)
        seen.append((v, recall))
        if recall >= target:
            break
    best = max(r for _, r in seen)
    value, recall = next((v, r) for v, r in seen if r >= (target if best >= target else 0.99 * best))
    if recall < target:
        log.warning("%s index reaches recall@10 %.3f at best (target %.2f); using %s=%d",
                    kind, best, target, name, value)
    return value, recall


def tuning(name: str, value: int, recall: float, sample: LeaveOneOut) -> dict:
    """The tuning saved with an index calibrated to ``name`` = ``value``."""
    return {name: int(value), "calibrated_recall": round(float(recall), 4), "calibration_queries": int(len(sample.ids))}


def leave_one_out_recall(found: np.ndarray, truth: np.ndarray, self_ids: np.ndarray, k: int) -> float:
    """Mean recall@k of ``found`` against ``truth`` after dropping each query's own id from both."""
    hits = 0
    for row_found, row_truth, own in zip(found, truth, self_ids):
        f = row_found[(row_found != own) & (row_found >= 0)][:k]
        t = row_truth[(row_truth != own) & (row_truth >= 0)][:k]
        hits += np.intersect1d(f, t).size / max(t.size, 1)
    return hits / max(len(found), 1)


def geometric(limit: int) -> list[int]:
    """1, 2, 3, 4, 6, 8, 12, ... up to and including ``limit``."""
    values, v = [], 1
    while v < limit:
        values += [v, v + v // 2] if v >= 2 else [v]
        v *= 2
    return [x for x in values if x < limit] + [limit]
