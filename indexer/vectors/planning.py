"""Which index a vector store builds: settings, memory model and kind choice.

Everything here is decided before an index exists, from the collection's size
and dimension alone. ``plan_index`` turns an ``index_type`` (``"auto"``, a
named kind or an IVF factory string) into an ``IndexPlan`` (kind, nlist,
factory string); ``outgrown`` tells when the collection has grown into another
plan. ``"auto"`` picks ``flat`` below ``flat_threshold`` vectors, then the most
accurate of ``ivf``, ``ivfsq``, ``ivfpq`` whose memory (``bytes_per_vector``)
fits the budget; it never picks ``hnsw`` or ``pqfs``. nlist ≈ 4·√n, capped by
the training vectors available. ``ondisk`` is ``ivf`` with its lists in a
memory-mapped file (resident vs disk bytes: ``bytes_per_vector`` vs
``estimated_disk_bytes``). How the defaults were chosen:
docs/benchmarks.md, "Vector store".
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass

import faiss

from hassod.errors import UserError

NAMED_KINDS = ("flat", "ivf", "ivfsq", "ivfpq", "hnsw", "pqfs", "ondisk")
_IVF_KINDS = ("ivf", "ivfsq", "ivfpq", "pqfs", "ondisk")  # planned with an nlist
_LOSSY_KINDS = ("ivfsq", "ivfpq")  # exact (flat) until ``lossy_min_train`` vectors exist
_GROWTH_ORDER = ("flat", "ivf", "ivfsq", "ivfpq")  # the order "auto" moves through as n grows


@dataclass(frozen=True)
class VectorStoreSettings:
    """How the store chooses and tunes its index; saved with the index. How the
    defaults were chosen: docs/benchmarks.md, "Vector store" ("Kind choice", "Calibration").

    Attributes:
        flat_threshold: collections smaller than this (vectors) use exact search.
        memory_budget_bytes: RAM the index may use; ``None`` = half the physical memory.
        target_recall: recall@10 against exact search that calibration aims for.
        lists_per_sqrt_n: IVF nlist = round(lists_per_sqrt_n · √n).
        min_train_per_list: fewest training vectors per IVF list (faiss warns below 39).
        train_per_list: training vectors per IVF list when that many exist.
        kmeans_iters: k-means iterations when training IVF (time is linear in it).
        hnsw_quantizer_min_lists: from this nlist on, lists are assigned through an
            HNSW graph over the centroids instead of a flat scan.
        lossy_min_train: an ``ivfsq`` or ``ivfpq`` index asked for by name stays
            exact (flat) until this many vectors exist to train its codec on.
        sq_range_margin: SQ8 per-dimension ranges are the training min / max
            widened by this fraction of their width on each side, so that
            vectors added after training are not clipped.
        pq_bytes: bytes per vector of the ``ivfpq`` kind; ``None`` = dim // 4.
        pqfs_m: 4-bit sub-quantizers of the ``pqfs`` scan (m/2 code bytes per
            vector); ``None`` = dim // 2. Rounded down to a divisor of dim.
        pqfs_max_k_factor: largest ``pqfs`` k_factor (k·k_factor candidates are
            re-ranked) that calibration may choose and restricted searches widen to.
        pqfs_lists_per_sqrt_n: ``lists_per_sqrt_n`` of the ``pqfs`` kind (fewer
            lists than IVF's: on the data pqfs is for nearly all are probed).
        hnsw_m, hnsw_ef_construction: graph degree and build-time beam width of the ``hnsw`` kind.
        calibration_queries: stored vectors used as leave-one-out queries to tune
            nprobe / efSearch.
        calibration_margin: calibrate to ``target_recall`` plus this, a margin for the
            sampling error of a recall estimated on ``calibration_queries`` queries.
        exact_filter_max: allowed sets up to this size are searched by brute force
            over their own vectors (hnsw kind; a filtered graph walk can miss them).
        norm_tolerance: largest accepted | ‖v‖ − 1 | of an input vector.
        use_gpu: ``None`` = when faiss reports a GPU.
        seed: seed of training-sample and calibration-query draws.
    """

    flat_threshold: int = 100_000
    memory_budget_bytes: int | None = None
    target_recall: float = 0.95
    lists_per_sqrt_n: float = 4.0
    min_train_per_list: int = 39
    train_per_list: int = 50
    kmeans_iters: int = 10
    hnsw_quantizer_min_lists: int = 8192
    lossy_min_train: int = 10_000
    sq_range_margin: float = 0.2
    pq_bytes: int | None = None
    pqfs_m: int | None = None
    pqfs_max_k_factor: int = 1024
    pqfs_lists_per_sqrt_n: float = 1.0
    hnsw_m: int = 32
    hnsw_ef_construction: int = 64
    calibration_queries: int = 200
    calibration_margin: float = 0.02
    exact_filter_max: int = 20_000
    norm_tolerance: float = 1e-3
    use_gpu: bool | None = None
    seed: int = 0


@dataclass(frozen=True)
class IndexPlan:
    """The index a store builds: ``kind`` (a NAMED_KINDS entry or ``"factory"``),
    ``nlist`` for the IVF kinds (0 otherwise) and the factory string for ``"factory"``."""

    kind: str
    nlist: int = 0
    factory: str | None = None


class IndexTypeError(UserError, ValueError):
    """An ``--index-type`` that is neither a named kind nor a usable faiss factory string."""


def validate_index_type(index_type: str, dim: int) -> None:
    """Raise :class:`IndexTypeError` unless ``index_type`` can hold ``dim``-d region vectors."""
    if not isinstance(index_type, str):
        raise TypeError(f"index_type must be a string, got {type(index_type).__name__}")
    if index_type == "auto" or index_type in NAMED_KINDS:
        return
    try:
        probe = faiss.index_factory(dim, index_type, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        # faiss prefixes its reason with the C++ function and source line.
        reason = str(exc).strip().splitlines()[0].rsplit(": ", 1)[-1]
        raise IndexTypeError(f"index type {index_type!r} is neither one of auto, {', '.join(NAMED_KINDS)} "
                             f"nor a faiss factory string ({reason})") from None
    if not isinstance(faiss.downcast_index(probe), faiss.IndexIVF):
        raise IndexTypeError(f"factory string {index_type!r} must describe an IVF index (e.g. 'IVF1024,SQ8'): "
                             "only IVF indexes keep region ids natively and support removal")


def physical_memory_bytes() -> int:
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def pq_bytes(dim: int, settings: VectorStoreSettings) -> int:
    """Code bytes (= 8-bit sub-quantizers) per vector of the ``ivfpq`` kind."""
    return _largest_divisor(dim, settings.pq_bytes or max(1, dim // 4))


def pqfs_m(dim: int, settings: VectorStoreSettings) -> int:
    """4-bit sub-quantizers of the ``pqfs`` kind."""
    return _largest_divisor(dim, settings.pqfs_m or max(1, dim // 2))


def _largest_divisor(dim: int, target: int) -> int:
    # PQ needs m | dim: take the largest divisor not above the target.
    return max(m for m in range(1, min(target, dim) + 1) if dim % m == 0)


# Resident bytes per stored vector of each named kind, ids included.
_MEMORY = {
    "flat": lambda d, s: 4 * d + 16,  # vector + id map + reverse map entry
    "ivf": lambda d, s: 4 * d + 8,
    "ivfsq": lambda d, s: d + 8,
    "ivfpq": lambda d, s: pq_bytes(d, s) + 8,
    "hnsw": lambda d, s: 4 * d + 8 * s.hnsw_m + 16,
    # 4-bit codes + id in an IVF list; fp16 copy + IndexIDMap2 id map and reverse hash entry
    "pqfs": lambda d, s: pqfs_m(d, s) // 2 + 8 + 2 * d + 48,
    # the lists are memory-mapped: only the store's id set stays resident (pages the kernel caches aside)
    "ondisk": lambda d, s: 8,
}
# Bytes per stored vector in files beside the store file.
_DISK = {"ondisk": lambda d, s: 4 * d + 8}


def bytes_per_vector(kind: str, dim: int, settings: VectorStoreSettings) -> int:
    """Approximate resident bytes per stored vector of an index kind (ids included)."""
    if kind not in _MEMORY:
        raise ValueError(f"no memory model for index kind {kind!r}")
    return _MEMORY[kind](dim, settings)


def estimated_bytes(kind: str | None, n: int, dim: int, settings: VectorStoreSettings) -> int | None:
    """Resident bytes of ``n`` vectors of ``kind``; ``None`` for kinds without a memory model (factory strings)."""
    return n * bytes_per_vector(kind, dim, settings) if kind in _MEMORY else None


def estimated_disk_bytes(kind: str | None, n: int, dim: int, settings: VectorStoreSettings) -> int:
    """Bytes of ``n`` vectors of ``kind`` kept in files beside the store file (memory-mapped), 0 for kinds held
    in memory."""
    return n * _DISK[kind](dim, settings) if kind in _DISK else 0


def choose_kind(n: int, dim: int, settings: VectorStoreSettings) -> str:
    """The ``"auto"`` kind for a collection of ``n`` vectors of dimension ``dim``."""
    if n < settings.flat_threshold:
        return "flat"
    budget = settings.memory_budget_bytes or physical_memory_bytes() // 2
    for kind in ("ivf", "ivfsq"):
        if n * bytes_per_vector(kind, dim, settings) <= budget:
            return kind
    return "ivfpq"


def choose_nlist(n_target: int, n_available: int, settings: VectorStoreSettings) -> int:
    """IVF list count for ``n_target`` vectors, capped by what ``n_available`` can train."""
    wanted = max(1, round(settings.lists_per_sqrt_n * math.sqrt(max(n_target, 1))))
    return max(1, min(wanted, n_available // settings.min_train_per_list))


def plan_index(index_type: str, n: int, n_available: int, expected_size: int | None, dim: int,
               settings: VectorStoreSettings) -> IndexPlan:
    """The index a store of ``index_type`` should have at ``n`` vectors, ``n_available`` of them usable
    for training, growing to ``expected_size``."""
    n_target = max(n, expected_size or 0)
    if index_type == "auto":
        kind = "flat" if n < settings.flat_threshold else choose_kind(n_target, dim, settings)
    elif index_type in NAMED_KINDS:
        kind = index_type
        if kind in _LOSSY_KINDS and n_available < settings.lossy_min_train:
            kind = "flat"
    else:
        return IndexPlan("factory", 0, index_type)
    if kind == "pqfs":
        settings = dataclasses.replace(settings, lists_per_sqrt_n=settings.pqfs_lists_per_sqrt_n)
    nlist = choose_nlist(n_target, n_available, settings) if kind in _IVF_KINDS else 0
    return IndexPlan(kind, nlist)


def outgrown(current: IndexPlan, wanted: IndexPlan) -> bool:
    """Whether an index built to ``current`` should be rebuilt to ``wanted``: a later auto kind,
    or an nlist due to double. Only ever grow: a collection shrinking back under a threshold
    keeps its index, so add/remove churn around it cannot trigger rebuild after rebuild."""
    if wanted.kind != current.kind:
        return _GROWTH_ORDER.index(wanted.kind) > _GROWTH_ORDER.index(current.kind)
    return wanted.nlist > 0 and wanted.nlist >= 2 * current.nlist
