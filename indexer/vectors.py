"""FAISS vector store of region descriptors, keyed by region id (DESIGN.md §7).

Descriptors are L2-normalised float32 vectors searched by inner product, so a
score is a cosine similarity in [-1, 1]. The FAISS id of a vector *is* its
region id (any non-negative int64), so search results join the catalog without
a translation table.

Index kinds (``index_type``):

========== ================================================ ==================
kind       FAISS index                                      bytes / vector
========== ================================================ ==================
``flat``   ``IndexIDMap2(IndexFlatIP)``, exact              4·d + 16
``ivf``    ``IVF{nlist},Flat`` with native ids              4·d + 8
``ivfsq``  ``IVF{nlist},SQ8``                               d + 8
``ivfpq``  ``IVF{nlist},PQ{m}`` (m = d/4 bytes by default)  m + 8
``hnsw``   ``IndexIDMap2(HNSW{M},Flat)``                    4·d + 8·M + 16
``pqfs``   ``IVF{nlist},PQ{m}x4fs`` + fp16 re-rank          2·d + m/2 + 56
           (m = d/2 sub-quantizers by default)
(string)   any factory string describing an ``IndexIVF``,
           e.g. ``"IVF4096,PQ64x4fs"``, used as given
========== ================================================ ==================

``"auto"`` (the default) picks ``flat`` below ``flat_threshold`` vectors, then
the most accurate IVF variant whose memory fits ``memory_budget_bytes``
(``ivf``, else ``ivfsq``, else ``ivfpq``). ``nlist`` ≈ 4·√n; the index is
retrained (``rebuild``) when the collection has grown enough that nlist should
at least double, so retraining costs O(n) amortised. An ``ivfsq`` or ``ivfpq``
index asked for by name stays exact (flat) until ``lossy_min_train`` vectors
exist, then trains its codec on them. HNSW is never picked
automatically: on the 2-core reference machine it took 146 s to build 200k
vectors (IVF: 30 s), and on random data efSearch 512 gave recall@10 0.50 at
9.3 ms where IVF-Flat gave 0.46 at 1.9 ms.

``nprobe`` (IVF) and ``efSearch`` (HNSW) are not guessed: after training the
store *calibrates* them on ``calibration_queries`` stored vectors used as
leave-one-out queries (kept out of the k-means training sample) against exact
ground truth, taking the smallest value with recall@10 ≥ ``target_recall`` +
``calibration_margin``; the values and the measured recall are saved with the
index (``info()``). On data without neighbourhood structure (uniform random
vectors) no approximate index can reach the target cheaply and calibration
ends near an exhaustive scan — correct, but slow (1M random vectors: IVF-Flat
~1.3 s p50); such a calibration logs a hint to use ``pqfs``.

``pqfs`` is the kind for such collections: when the true neighbours are barely
nearer than everything else, every vector must be looked at, so it makes
looking cheap. An IVF with few lists (``pqfs_lists_per_sqrt_n`` · √n) holds
4-bit product-quantizer codes of the vectors (``pqfs_m`` sub-quantizers,
default d/2, i.e. d/4 bytes, fast-scan SIMD layout); the scan proposes
k · ``k_factor`` candidates, and an fp16 copy of every vector (an
``IndexIDMap2(IndexScalarQuantizer fp16)`` addressed by region id) re-ranks
them by inner product (error ≤ ~1e-3, scores are these fp16 products).
Calibration picks the pair (nprobe, k_factor) reaching the recall target at
the least modelled cost (``_pqfs_cost``: codes scanned, lists probed,
candidates re-ranked). Between retrainings the k_factor in use grows in
proportion to the collection (it is calibrated as a share of it), and a
store first built on fewer than ``calibration_queries`` vectors is retrained
each time it doubles. Both faiss indexes live in one ``IndexRefine``
container (one faiss file); its own add/search are never used. Restricted
searches put the selector in the scan and widen nprobe and k_factor together
(re-ranking longer prefixes of one deep scan); ``reconstruct`` returns the
fp16 copies; removal deletes from both (and re-encodes the lists it touched,
see ``_index_remove`` for the faiss fast-scan bug this avoids).

Measured with ``benchmarks/bench_search_scaling.py --index-type pqfs`` (432-d,
2-core machine): 1M random vectors, PQ216x4fs, nlist 1000 all probed,
k_factor 24: p50 8.5 ms, p95 9.9 ms, recall@10 0.969 with a single query's
lists split over both cores (one core: 14.8-17.8 ms over four runs at load
1.4-2.8); restricted to a random third 22 ms / 0.999; RSS 0.99 GB; 100k
random: 1.1 ms / 0.976 (ivf, all 1265 lists probed: 13.3 ms). PQ108x4fs
needed k_factor 1024 (one core: p50 20.7 ms, recall 0.982), PQ144x4fs
k_factor 192 (14.4 ms, 0.970, restricted 30 ms). 1M hierarchical vectors:
nprobe 6, k_factor 4, p50 0.64 ms, recall 0.964. 10M random vectors are out
of reach of any scan on two cores: the codes alone are 1.08 GB, ~130 ms of
memory reads at the 8.3 GB/s one core streams here, and shorter codes need a
k_factor (hence re-rank work) growing with n.

``"auto"`` never picks ``pqfs``; choose it explicitly (``--index-type pqfs``).
On data with neighbourhood structure the kinds "auto" picks are as fast with
more recall (1M hierarchical, ivf: 0.60 ms, recall 0.983) and, from ~7M
vectors on, with less than half the memory (ivfsq d + 8 bytes against
pqfs's 2·d + d/4 + 56: 4.4 GB against 10.3 GB at 10M); and telling that a
collection has no structure takes a built and calibrated IVF index, whose
calibration then logs the hint.

Restricted search (``allowed_ids``, e.g. one hierarchy level) goes through a
FAISS ``IDSelector`` inside the search rather than filtering k results
afterwards, so k results of the allowed set come back whenever k exist. Flat
search with a selector is exact. For IVF / HNSW the probe count / beam starts
at the calibrated value divided by the allowed fraction and is widened 4x at a
time until the top k stop changing (or the search is exhaustive): allowed sets
correlated with the descriptor — as hierarchy levels are — put the allowed
neighbours far from the query (recall@10 0.70 with the 1/fraction widening
alone on 20k clustered vectors; 0.996 with the convergence rule on 100k).
Separate per-level IVF indexes were measured too: out-of-level queries reached
recall 0.95 probing 14% of a per-level index's lists versus 19% of the shared
index's lists with a selector — about the same number of distances, since the
selector skips other levels' vectors before computing them — so they would not
pay for three trained indexes, and arbitrary id sets still need a selector. HNSW
with a selector can strand allowed nodes, so allowed sets of at most
``exact_filter_max`` ids are answered there by brute force over their own
vectors, and rows the widest walk leaves short are finished the same way. A
selector is a hash set (``IDSelectorBatch``) or, when ids are dense enough
(catalog autoincrement ids), a bitmap (``IDSelectorBitmap``); build it once
with ``make_filter`` and reuse it across queries.

Files are written atomically (temp file in the same directory, fsync,
``os.replace``): a crash while saving leaves the previous file intact.
When faiss sees a GPU (``faiss.get_num_gpus() > 0``, GPU build of faiss),
unrestricted searches of flat/IVF kinds run on a GPU replica and k-means
training uses the GPU; everything else stays on the CPU index, which is the
source of truth.

Single queries run on one OpenMP thread: faiss parallelises over queries below
20 of them, and a second thread only added barrier waits (exact search of 1M
vectors: 105 ms with one thread, 500 ms with two, on the shared 2-core machine).
The exception is a ``pqfs`` scan probing many lists, which faiss can split per
query (``_pqfs_scan``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

log = logging.getLogger(__name__)

NAMED_KINDS = ("flat", "ivf", "ivfsq", "ivfpq", "hnsw", "pqfs")
_IVF_KINDS = ("ivf", "ivfsq", "ivfpq", "pqfs", "factory")
_GROWTH_ORDER = ("flat", "ivf", "ivfsq", "ivfpq")  # the order "auto" moves through as n grows
_MAGIC = b"HASSODVS"
_FORMAT_VERSION = 1
_CALIBRATION_K = 10
# Restricted searches widen nprobe / efSearch by this factor until the top k stop
# changing. Level-like filter at 100k clustered vectors: factor 2 stopped too early
# (recall@10 0.93, p50 1.1 ms), 4 gave 0.996 at p50 3.6 ms, 8 gave 1.0 at 9 ms.
_WIDEN_FACTOR = 4
# Below this many queries faiss parallelises over queries, so extra OpenMP
# threads only add barrier cost: with 2 threads a single exact query at 1M
# vectors took 500 ms instead of 105 ms on the (shared) 2-core machine.
_FAISS_BLAS_THRESHOLD = 20
# Cost model ranking pqfs (nprobe, k_factor) pairs (_pqfs_cost), one thread on the loaded
# 2-core machine, 432 dims: an exhaustive scan of 1M random vectors took 9.5 ms with
# 54-byte codes and 15 ms with 108-byte codes; each probed list ~0.6 µs of setup; each
# candidate ~0.7 µs (scan heap, id lookup, code copy, fp16 inner product).
_PQFS_SCAN_NS_PER_VECTOR = 4.0
_PQFS_SCAN_NS_PER_BYTE = 0.1
_PQFS_NS_PER_LIST = 600.0
_PQFS_NS_PER_CANDIDATE = 700.0
# A single pqfs query probing at least this many lists is split over all cores by
# faiss's fast-scan implementation 14 (parallel over a query's lists); below it the
# split costs more in thread wake-ups than it saves.
_PQFS_SPLIT_MIN_LISTS = 64
_PQFS_SPLIT_IMPLEM = 14
_MAX_THREADS = faiss.omp_get_max_threads()  # before any _omp_threads lowers it

Chunks = Callable[[], Iterator[tuple[np.ndarray, np.ndarray]]]


@dataclass(frozen=True)
class VectorStoreSettings:
    """How the store chooses and tunes its index; saved with the index.

    Attributes:
        flat_threshold: collections smaller than this (vectors) use exact search.
        memory_budget_bytes: RAM the index may use; ``None`` = half the physical memory.
        target_recall: recall@10 against exact search that calibration aims for.
        lists_per_sqrt_n: IVF nlist = round(lists_per_sqrt_n · √n).
        min_train_per_list: fewest training vectors per IVF list (faiss warns below 39).
        train_per_list: training vectors per IVF list when that many exist.
        kmeans_iters: k-means iterations when training IVF (time is linear in it).
        hnsw_quantizer_min_lists: from this nlist on, lists are assigned through an
            HNSW graph over the centroids instead of a flat scan (adding 10M vectors
            to 12k lists by flat scan is ~65 TFLOP, ~20 min on two cores).
        lossy_min_train: an ``ivfsq`` or ``ivfpq`` index asked for by name stays
            exact (flat) until this many vectors exist to train its codec on
            (PQ's 256-centroid k-means wants ~10k). Trained on a first image's
            few dozen vectors, a codec fits the later ones badly, and each
            retraining as the collection grows can only re-encode decoded
            vectors: on the 464 demo regions an ``ivfsq`` index built image by
            image scored a region's own query 0.930 instead of 0.993.
        sq_range_margin: SQ8 per-dimension ranges are the training min / max
            widened by this fraction of their width on each side, so that
            vectors added after training are not clipped (clipping cost some
            vectors 0.04 of their self-similarity, retrained or not).
        pq_bytes: bytes per vector of the ``ivfpq`` kind; ``None`` = dim // 4.
        pqfs_m: 4-bit sub-quantizers of the ``pqfs`` scan (m/2 code bytes per
            vector); ``None`` = dim // 2. Rounded down to a divisor of dim.
        pqfs_max_k_factor: largest ``pqfs`` k_factor (k·k_factor candidates are
            re-ranked) that calibration may choose and restricted searches widen to.
        pqfs_lists_per_sqrt_n: ``lists_per_sqrt_n`` of the ``pqfs`` kind. Fewer lists
            than IVF's: each probed list costs ~0.6 µs of fast-scan setup, and on
            the data pqfs is for nearly all lists are probed (100k random vectors,
            exhaustive scan: 1.1 ms with 1265 lists, 0.48 ms with 256).
        hnsw_m: graph degree of the ``hnsw`` kind.
        hnsw_ef_construction: beam width while building the ``hnsw`` kind.
        calibration_queries: stored vectors used as leave-one-out queries to tune
            nprobe / efSearch.
        calibration_margin: calibrate to ``target_recall`` plus this: 200 queries
            estimate recall to about ±0.01 (at 100k clustered vectors the calibrated
            0.95 came out as 0.94 on fresh queries without a margin).
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


class IdFilter:
    """A reusable FAISS selector over a set of allowed region ids.

    Build with ``VectorStore.make_filter``; ids not in the store are dropped, so
    ``count`` is the number of vectors a restricted search can return.
    """

    def __init__(self, ids: np.ndarray, selector: faiss.IDSelector | None, keepalive: tuple, version: int):
        self.ids = ids
        self.selector = selector
        self._keepalive = keepalive  # the selector points into these arrays
        self.version = version

    @property
    def count(self) -> int:
        return int(self.ids.size)


class _IdSet:
    """Sorted set of int64 ids kept as a large run plus a small recent run.

    Inserting merges into the recent run (O(recent)); the runs are merged when the
    recent one reaches 1/8 of the large one, so each id is copied O(1) times on
    average while membership tests stay binary searches.
    """

    def __init__(self, ids: np.ndarray | None = None):
        self._base = np.unique(np.asarray(ids if ids is not None else [], dtype=np.int64))
        self._recent = np.empty(0, dtype=np.int64)

    def __len__(self) -> int:
        return self._base.size + self._recent.size

    def contains(self, ids: np.ndarray) -> np.ndarray:
        return _sorted_member(self._base, ids) | _sorted_member(self._recent, ids)

    def add(self, ids: np.ndarray) -> None:
        """Insert ids known to be new and unique."""
        ids = np.sort(ids)
        self._recent = np.insert(self._recent, np.searchsorted(self._recent, ids), ids)
        if self._recent.size > max(65_536, self._base.size // 8):
            self._base = np.union1d(self._base, self._recent)
            self._recent = np.empty(0, dtype=np.int64)

    def remove(self, ids: np.ndarray) -> None:
        self._base = self._base[~np.isin(self._base, ids)]
        self._recent = self._recent[~np.isin(self._recent, ids)]

    def array(self) -> np.ndarray:
        if self._recent.size:
            self._base = np.union1d(self._base, self._recent)
            self._recent = np.empty(0, dtype=np.int64)
        return self._base


def _sorted_member(sorted_ids: np.ndarray, ids: np.ndarray) -> np.ndarray:
    if sorted_ids.size == 0:
        return np.zeros(ids.shape, dtype=bool)
    pos = np.minimum(np.searchsorted(sorted_ids, ids), sorted_ids.size - 1)
    return sorted_ids[pos] == ids


def physical_memory_bytes() -> int:
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def bytes_per_vector(kind: str, dim: int, settings: VectorStoreSettings) -> int:
    """Approximate resident bytes per stored vector of an index kind (ids included)."""
    if kind == "flat":
        return 4 * dim + 16  # vector + id map + reverse map entry
    if kind == "ivf":
        return 4 * dim + 8
    if kind == "ivfsq":
        return dim + 8
    if kind == "ivfpq":
        return _pq_bytes(dim, settings) + 8
    if kind == "hnsw":
        return 4 * dim + 8 * settings.hnsw_m + 16
    if kind == "pqfs":
        # 4-bit codes + id in an IVF list; fp16 copy + IndexIDMap2 id map and reverse hash entry
        return _pqfs_m(dim, settings) // 2 + 8 + 2 * dim + 48
    raise ValueError(f"no memory model for index kind {kind!r}")


def _pq_bytes(dim: int, settings: VectorStoreSettings) -> int:
    return _largest_divisor(dim, settings.pq_bytes or max(1, dim // 4))


def _pqfs_m(dim: int, settings: VectorStoreSettings) -> int:
    # d/2 rather than d/4: at 1M random 432-d vectors PQ108x4fs needed k_factor 1024
    # (p50 20.7 ms), PQ216x4fs k_factor 24 (14.8 ms); the codes are small next to the fp16 copy.
    return _largest_divisor(dim, settings.pqfs_m or max(1, dim // 2))


def _largest_divisor(dim: int, target: int) -> int:
    # PQ needs m | dim: take the largest divisor not above the target.
    return max(m for m in range(1, min(target, dim) + 1) if dim % m == 0)


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


class IndexTypeError(ValueError):
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


@contextlib.contextmanager
def _omp_threads(n_queries: int) -> Iterator[None]:
    """Never run more OpenMP threads than queries on small batches (see _FAISS_BLAS_THRESHOLD)."""
    previous = faiss.omp_get_max_threads()
    if n_queries < _FAISS_BLAS_THRESHOLD:
        faiss.omp_set_num_threads(max(1, min(previous, n_queries)))
    try:
        yield
    finally:
        faiss.omp_set_num_threads(previous)


class VectorStore:
    """Region descriptors in a FAISS index whose ids are region ids.

    Create with ``VectorStore.create`` or ``VectorStore.load``. Not thread-safe
    for concurrent writes; concurrent searches of an unchanging store are fine.
    """

    def __init__(self, dim: int, index_type: str, settings: VectorStoreSettings,
                 expected_size: int | None = None):
        if not isinstance(dim, (int, np.integer)) or dim < 1:
            raise ValueError(f"dim must be a positive integer, got {dim!r}")
        validate_index_type(index_type, int(dim))
        self.dim = int(dim)
        self.index_type = index_type
        self.settings = settings
        self.expected_size = expected_size
        self._index: faiss.Index | None = None  # None until an index kind that needs training gets data
        self._plan: IndexPlan | None = None
        self._ids = _IdSet()
        self._tombstones = np.empty(0, dtype=np.int64)  # removed from an hnsw graph, not yet compacted
        self._tuning: dict[str, float | int | None] = {}
        self._version = 0
        self._gpu_index: faiss.Index | None = None
        self._rerank: _Rerank | None = None  # pqfs only, rebuilt after each change
        self._use_gpu = settings.use_gpu if settings.use_gpu is not None else faiss.get_num_gpus() > 0

    # ------------------------------------------------------------------ creation
    @classmethod
    def create(cls, dim: int, index_type: str = "auto", expected_size: int | None = None,
               settings: VectorStoreSettings | None = None) -> VectorStore:
        """An empty store for ``dim``-dimensional vectors.

        ``index_type``: ``"auto"``, one of ``flat|ivf|ivfsq|ivfpq|hnsw|pqfs`` or an IVF
        factory string. ``expected_size`` (vectors) lets ``"auto"`` pick the kind
        and nlist for the final size up front instead of growing into them.
        """
        store = cls(dim, index_type, settings or VectorStoreSettings(), expected_size)
        plan = store._plan_for(0, 0)
        if plan.kind in ("flat", "hnsw"):  # no training: usable right away
            store._install(store._new_index(plan), plan)
        return store

    # ------------------------------------------------------------------ properties
    def __len__(self) -> int:
        return len(self._ids)

    @property
    def kind(self) -> str | None:
        """The kind of the current index, ``None`` while an untrained kind awaits data."""
        return self._plan.kind if self._plan else None

    def ids(self) -> np.ndarray:
        """All stored region ids, sorted, int64 (n,)."""
        return self._ids.array().copy()

    def contains(self, ids: np.ndarray) -> np.ndarray:
        """Boolean mask (m,) telling which of ``ids`` are stored."""
        return self._ids.contains(_as_ids(ids, "ids"))

    def info(self) -> dict:
        """Kind, size, nlist, search parameters and their calibrated recall@10."""
        ivf = faiss.try_extract_index_ivf(self._index) if self.kind in _IVF_KINDS else None
        return {"kind": self.kind, "index_type": self.index_type, "size": len(self), "dim": self.dim,
                "nlist": ivf.nlist if ivf is not None else 0,
                "factory": self._plan.factory if self._plan else None,
                "bytes_estimate": (len(self) * bytes_per_vector(self.kind, self.dim, self.settings)
                                   if self.kind in NAMED_KINDS else None),
                "gpu": self._use_gpu, **self._tuning}

    # ------------------------------------------------------------------ writing
    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Add ``vectors`` (n, dim) float32, unit norm, under region ``ids`` (n,) int64.

        Ids must be non-negative, unique, and not already stored. May train or
        retrain the index (see ``needs_rebuild``).
        """
        ids = _as_ids(ids, "ids")
        vectors = self._check_vectors(vectors, "vectors")
        if ids.shape[0] != vectors.shape[0]:
            raise ValueError(f"{ids.shape[0]} ids for {vectors.shape[0]} vectors")
        if ids.size == 0:
            return
        if (ids < 0).any():
            raise ValueError("region ids must be non-negative (-1 marks a missing result)")
        if np.unique(ids).size != ids.size:
            raise ValueError("duplicate ids within one add() call")
        present = self._ids.contains(ids)
        if present.any():
            raise ValueError(f"{int(present.sum())} ids already stored, e.g. {ids[present][:5].tolist()}; "
                             "remove() them first to replace their vectors")
        if self._tombstones.size and np.isin(ids, self._tombstones).any():
            self.rebuild()  # compact first: a removed id still sits in the graph under the same id
        if len(self) == 0:
            plan = self._plan_for(ids.size, ids.size)
            # train (IVF) or calibrate (HNSW) on this first batch directly
            if self._index is None or plan != self._plan or plan.kind == "hnsw":
                self._build(plan, lambda: iter([(ids, vectors)]), ids.size)
                return
        _index_add(self._index, self.kind, vectors, ids)
        self._ids.add(ids)
        self._changed()
        if self.needs_rebuild():
            self.rebuild()

    def remove(self, ids: np.ndarray) -> int:
        """Remove the vectors of ``ids``; unknown ids are ignored. Returns how many were removed."""
        ids = _as_ids(ids, "ids")
        ids = np.unique(ids[self._ids.contains(ids)])
        if ids.size == 0:
            return 0
        if self.kind == "hnsw":
            # HNSW graphs cannot drop nodes: hide them from search, compact when they pile up.
            self._tombstones = np.union1d(self._tombstones, ids)
        else:
            removed = _index_remove(self._index, self.kind, ids)
            if removed != ids.size:
                raise RuntimeError(f"faiss removed {removed} of {ids.size} vectors")
        self._ids.remove(ids)
        self._changed()
        if self.kind == "hnsw" and self._tombstones.size > 0.25 * self._index.ntotal:
            self.rebuild()
        return int(ids.size)

    def _changed(self) -> None:
        self._version += 1
        self._gpu_index = None
        self._rerank = None  # views faiss memory that an add / remove may reallocate

    # ------------------------------------------------------------------ planning
    def _plan_for(self, n: int, n_available: int) -> IndexPlan:
        """The index this store should have at ``n`` vectors, ``n_available`` of them usable for training."""
        n_target = max(n, self.expected_size or 0)
        if self.index_type == "auto":
            kind = "flat" if n < self.settings.flat_threshold else choose_kind(n_target, self.dim, self.settings)
        elif self.index_type in NAMED_KINDS:
            kind = self.index_type
            if kind in ("ivfsq", "ivfpq") and n_available < self.settings.lossy_min_train:
                kind = "flat"
        else:
            return IndexPlan("factory", 0, self.index_type)
        settings = self.settings
        if kind == "pqfs":
            settings = dataclasses.replace(settings, lists_per_sqrt_n=settings.pqfs_lists_per_sqrt_n)
        nlist = choose_nlist(n_target, n_available, settings) if kind in _IVF_KINDS else 0
        return IndexPlan(kind, nlist)

    def needs_rebuild(self) -> bool:
        """Whether the collection outgrew its index: another auto kind, or nlist due to double."""
        if self._plan is None or self._plan.kind == "factory":
            return False
        if self._plan.kind == "hnsw":
            return self._tombstones.size > 0.25 * self._index.ntotal
        if self._plan.kind == "pqfs":
            # Built on fewer vectors than the calibration sample: its PQ codebooks and
            # k_factor fit a handful of vectors (nlist stays 1 up to 78), so retrain each
            # time the collection doubles until it is calibrated on a full sample.
            calibrated_on = int(self._tuning.get("calibration_queries") or 0)
            if calibrated_on < self.settings.calibration_queries and len(self) >= 2 * max(calibrated_on, 1):
                return True
        wanted = self._plan_for(len(self), len(self))
        # Only ever grow: a collection shrinking back under a threshold keeps its
        # index, so add/remove churn around a threshold cannot trigger rebuild after rebuild.
        if wanted.kind != self._plan.kind:
            return _GROWTH_ORDER.index(wanted.kind) > _GROWTH_ORDER.index(self._plan.kind)
        return wanted.kind in _IVF_KINDS and wanted.nlist >= 2 * self._plan.nlist

    def rebuild(self, index_type: str | None = None, expected_size: int | None = None) -> None:
        """Re-create the index from the stored vectors: new kind, retrained lists, recalibrated search.

        Vectors of lossy kinds (ivfsq, ivfpq) are re-added as decoded, not as
        originally given. Holds the old and the new index in memory together.
        """
        if index_type is not None:
            validate_index_type(index_type, self.dim)
            self.index_type = index_type
        if expected_size is not None:
            self.expected_size = expected_size
        n = len(self)
        plan = self._plan_for(n, n)
        if self._index is None or n == 0:
            self._index, self._plan, self._tuning = None, None, {}
            if plan.kind in ("flat", "hnsw"):
                self._install(self._new_index(plan), plan)
            return
        self._build(plan, self._stored_chunks, n)

    # ------------------------------------------------------------------ building
    def _new_index(self, plan: IndexPlan) -> faiss.Index:
        d, metric = self.dim, faiss.METRIC_INNER_PRODUCT
        if plan.kind == "flat":
            return faiss.IndexIDMap2(faiss.IndexFlatIP(d))
        if plan.kind == "hnsw":
            graph = faiss.IndexHNSWFlat(d, self.settings.hnsw_m, metric)
            graph.hnsw.efConstruction = self.settings.hnsw_ef_construction
            return faiss.IndexIDMap2(graph)
        if plan.kind == "factory":
            return faiss.index_factory(d, plan.factory, metric)
        coarse = f"IVF{plan.nlist}" + ("_HNSW32" if plan.nlist >= self.settings.hnsw_quantizer_min_lists else "")
        codec = {"ivf": "Flat", "ivfsq": "SQ8", "ivfpq": f"PQ{_pq_bytes(d, self.settings)}",
                 "pqfs": f"PQ{_pqfs_m(d, self.settings)}x4fs"}[plan.kind]
        index = faiss.index_factory(d, f"{coarse},{codec}", metric)
        ivf = faiss.extract_index_ivf(index)
        if isinstance(faiss.downcast_index(ivf.quantizer), faiss.IndexHNSW):
            # beam used when assigning added vectors to lists; searches pass their own
            faiss.downcast_index(ivf.quantizer).hnsw.efSearch = 64
        ivf.cp.niter = self.settings.kmeans_iters
        ivf.cp.spherical = True  # unit-norm centroids, so inner-product assignment is not biased by norm
        if plan.kind == "ivfsq":
            sq = faiss.downcast_index(ivf).sq
            sq.rangestat, sq.rangestat_arg = faiss.ScalarQuantizer.RS_minmax, self.settings.sq_range_margin
        if plan.kind == "pqfs":
            # Codes of the vectors themselves, not of their residuals to the list centroid: one
            # lookup table per query instead of one per probed list, and on 1M random vectors
            # (PQ216x4fs) the true top 10 were 90% among the top 100 codes against 76% by residual.
            ivf.by_residual = False
            # IndexRefine is only the container (one faiss file, try_extract_index_ivf finds
            # the scan): its re-rank index is addressed by region id, not by position, so
            # adds, removals and searches go through _index_add / _index_remove / _refined_search.
            refine = faiss.IndexIDMap2(faiss.IndexScalarQuantizer(d, faiss.ScalarQuantizer.QT_fp16, metric))
            index = faiss.IndexRefine(index, refine)
        return index

    def _install(self, index: faiss.Index, plan: IndexPlan, tuning: dict | None = None) -> None:
        self._index, self._plan, self._tuning = index, plan, dict(tuning or {})
        self._tombstones = np.empty(0, dtype=np.int64)
        self._changed()

    def _build(self, plan: IndexPlan, chunks: Chunks, n: int) -> None:
        """Train (if needed) and fill a new ``plan`` index from ``chunks`` (two passes), calibrate, install."""
        rng = np.random.default_rng(self.settings.seed)
        index = self._new_index(plan)
        ivf = faiss.try_extract_index_ivf(index)
        n_train = 0 if ivf is None else min(n, ivf.nlist * self.settings.train_per_list)
        n_cal = 0 if plan.kind == "flat" else min(n, self.settings.calibration_queries)
        # Calibration queries are kept out of the training sample when there is data to
        # spare: k-means fits its training vectors, which made them easier queries
        # (calibrated recall 0.95, fresh queries 0.93 at 1M clustered vectors).
        order = rng.permutation(n)
        train_rows = order[:n_train]
        cal_rows = order[n_train:n_train + n_cal] if n >= n_train + n_cal else order[:n_cal]
        sample_ids, sample = (_gather_rows(chunks, n, np.concatenate([train_rows, cal_rows])) if n_train + n_cal
                              else (np.empty(0, dtype=np.int64), np.empty((0, self.dim), dtype=np.float32)))
        if ivf is not None:
            self._train_ivf(index, ivf, sample[:n_train])
        cal_ids, cal_queries = sample_ids[n_train:], sample[n_train:]
        del sample, sample_ids, order
        truth = ExactTopK(cal_queries, _CALIBRATION_K + 1)  # +1: the query itself is stored
        all_ids = []
        for chunk_ids, chunk in chunks():
            _index_add(index, plan.kind, chunk, chunk_ids)
            if plan.kind != "flat":
                truth.update(chunk_ids, chunk)
            all_ids.append(chunk_ids)
        tuning = _calibrate(index, plan.kind, cal_ids, cal_queries, truth.ids, self._calibration_target(),
                            self.settings) if plan.kind != "flat" else {}
        self._install(index, plan, tuning)
        self._ids = _IdSet(np.concatenate(all_ids))

    def _train_ivf(self, index: faiss.Index, ivf: faiss.IndexIVF, sample: np.ndarray) -> None:
        # k-means assignment is the dominant training cost (n_train · nlist · d per iteration):
        # on the GPU when there is one, else through an HNSW graph over the centroids
        # once nlist is large (approximate assignments barely change IVF lists).
        assigner = None
        if self._use_gpu:
            try:
                assigner = faiss.index_cpu_to_all_gpus(faiss.IndexFlatL2(self.dim))
            except (AttributeError, RuntimeError) as exc:
                log.warning("GPU k-means unavailable (%s); training on the CPU", exc)
        if assigner is None and ivf.nlist >= self.settings.hnsw_quantizer_min_lists:
            assigner = faiss.IndexHNSWFlat(self.dim, 32)
        if assigner is not None:
            ivf.clustering_index = assigner
        # pqfs trains m/2 tiny 16-centroid k-means whose OpenMP regions only add barrier
        # waits: PQ216x4fs on 15.8k vectors trained in 2.1 s on one thread, 57 s on two.
        threads = _omp_threads(1) if isinstance(index, faiss.IndexRefine) else contextlib.nullcontext()
        scan = faiss.downcast_index(ivf)
        if isinstance(scan, faiss.IndexIVFPQ):
            # faiss's factory turns on polysemous training (re-ordering codes for Hamming
            # filtering, which searches here never use): 266 s of a 267 s training of
            # IVF18,PQ108 on 722 vectors, one thread. Also for factory strings.
            scan.do_polysemous_training = False
        pq = getattr(scan, "pq", None)
        if pq is not None and 0 < sample.shape[0] < pq.ksub:
            # faiss k-means wants at least ksub points: a first batch that small is repeated
            # (the codebooks are retrained when the collection grows, see needs_rebuild)
            sample = np.resize(sample, (pq.ksub, sample.shape[1]))
        try:
            with threads:
                index.train(sample)
        finally:
            ivf.clustering_index = None

    def _calibration_target(self) -> float:
        return min(0.999, self.settings.target_recall + self.settings.calibration_margin)

    def calibrate(self) -> dict:
        """Re-tune nprobe / efSearch on the current contents (e.g. after much growth). Returns ``info()``."""
        if self.kind in (None, "flat") or len(self) == 0:
            return self.info()
        rng = np.random.default_rng(self.settings.seed)
        ids = self._ids.array()
        cal_ids = np.sort(rng.choice(ids, min(self.settings.calibration_queries, ids.size), replace=False))
        cal_queries = self.reconstruct(cal_ids)
        truth = ExactTopK(cal_queries, _CALIBRATION_K + 1)
        for chunk_ids, chunk in self._stored_chunks():
            truth.update(chunk_ids, chunk)
        self._tuning = _calibrate(self._index, self.kind, cal_ids, cal_queries, truth.ids,
                                  self._calibration_target(), self.settings)
        self._changed()
        return self.info()

    # ------------------------------------------------------------------ reading vectors back
    def reconstruct(self, ids: np.ndarray) -> np.ndarray:
        """Stored vectors (m, dim) float32 of ``ids`` (decoded, hence approximate, for ivfsq/ivfpq).

        O(n) for the IVF kinds, which keep no id → position map between calls.
        """
        ids = _as_ids(ids, "ids")
        missing = ~self._ids.contains(ids)
        if missing.any():
            raise KeyError(f"ids not in the store: {ids[missing][:5].tolist()}")
        if ids.size == 0:
            return np.empty((0, self.dim), dtype=np.float32)
        if self.kind == "pqfs":
            return self._rerank_view().decode(ids)
        with self._direct_map():
            return self._index.reconstruct_batch(ids)

    @contextlib.contextmanager
    def _direct_map(self) -> Iterator[None]:
        """IVF lists are unordered: a temporary id → (list, offset) hash table makes ids addressable.

        Not for ``pqfs``: it reconstructs from its fp16 copy, which is addressed by id.
        """
        ivf = faiss.try_extract_index_ivf(self._index) if self.kind in _IVF_KINDS and self.kind != "pqfs" else None
        if ivf is None:
            yield
            return
        ivf.set_direct_map_type(faiss.DirectMap.Hashtable)
        try:
            yield
        finally:
            ivf.set_direct_map_type(faiss.DirectMap.NoMap)

    def _stored_chunks(self, chunk: int = 65_536) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Stored (ids, vectors) in chunks, tombstoned vectors excluded."""
        if self.kind in ("flat", "hnsw"):
            storage = self._index.index if self.kind == "flat" else faiss.downcast_index(self._index.index).storage
            n = self._index.ntotal
            flat = faiss.rev_swig_ptr(faiss.downcast_index(storage).get_xb(), n * self.dim).reshape(n, self.dim)
            positions_ids = faiss.vector_to_array(self._index.id_map)
            keep = ~np.isin(positions_ids, self._tombstones) if self._tombstones.size else slice(None)
            positions_ids, positions = positions_ids[keep], np.arange(n)[keep]
            for start in range(0, positions.size, chunk):
                sel = positions[start:start + chunk]
                yield positions_ids[start:start + chunk], np.array(flat[sel], dtype=np.float32)
            return
        ids = self._ids.array().copy()
        if self.kind == "pqfs":
            rerank = self._rerank_view()
            for start in range(0, ids.size, chunk):
                yield ids[start:start + chunk], rerank.decode(ids[start:start + chunk])
            return
        with self._direct_map():
            for start in range(0, ids.size, chunk):
                part = ids[start:start + chunk]
                yield part, self._index.reconstruct_batch(part)

    # ------------------------------------------------------------------ searching
    def make_filter(self, allowed_ids: np.ndarray) -> IdFilter:
        """A selector allowing only ``allowed_ids`` (int64, any order); reuse it across searches.

        A bitmap when ids are dense enough that it costs at most a byte per allowed
        id (or ≤ 1 MiB), else a hash set. A filter made before the store changed is
        re-checked against the current ids when used; ids added since are not in it.
        """
        ids = np.unique(_as_ids(allowed_ids, "allowed_ids"))
        ids = ids[self._ids.contains(ids)]
        if ids.size == 0:  # searches return nothing without consulting a selector
            return IdFilter(ids, None, (), self._version)
        n_bytes = int(ids[-1]) // 8 + 1
        if n_bytes <= max(1 << 20, ids.size):
            bits = np.zeros(n_bytes * 8, dtype=bool)
            bits[ids] = True
            bitmap = np.packbits(bits, bitorder="little")  # faiss reads bit (id & 7) of byte id >> 3
            return IdFilter(ids, faiss.IDSelectorBitmap(bitmap.size, faiss.swig_ptr(bitmap)), (bitmap,),
                            self._version)
        return IdFilter(ids, faiss.IDSelectorBatch(ids.size, faiss.swig_ptr(ids)), (), self._version)

    def search(self, queries: np.ndarray, k: int,
               allowed_ids: np.ndarray | IdFilter | None = None) -> tuple[np.ndarray, np.ndarray]:
        """k nearest stored vectors by inner product.

        Args:
            queries: (q, dim) float32 unit vectors (a single (dim,) vector is taken as q = 1).
            k: results per query; rows are padded with id -1 and score -inf when
                fewer than k vectors (or allowed vectors) exist.
            allowed_ids: restrict results to these region ids (ndarray or a filter
                from ``make_filter``); k results come back whenever k allowed exist.
        Returns:
            scores (q, k) float32, descending; ids (q, k) int64 region ids.
        """
        if not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        queries = self._check_vectors(queries, "queries")
        nq = queries.shape[0]
        scores = np.full((nq, k), -np.inf, dtype=np.float32)
        ids = np.full((nq, k), -1, dtype=np.int64)
        if nq == 0 or len(self) == 0:
            return scores, ids
        filt = None
        if allowed_ids is not None:
            filt = allowed_ids if isinstance(allowed_ids, IdFilter) else self.make_filter(allowed_ids)
            if filt.version != self._version:
                filt = self.make_filter(filt.ids)
            if filt.count == 0:
                return scores, ids
        with _omp_threads(nq):
            if filt is not None and filt.count <= self.settings.exact_filter_max and self.kind == "hnsw":
                got_s, got_i = self._search_subset(queries, k, filt.ids)
            else:
                got_s, got_i = self._search_index(queries, k, filt)
        width = min(k, got_i.shape[1])
        scores[:, :width], ids[:, :width] = got_s[:, :width], got_i[:, :width]
        scores[ids < 0] = -np.inf
        return scores, ids

    def _search_subset(self, queries: np.ndarray, k: int, subset: np.ndarray,
                       chunk: int = 65_536) -> tuple[np.ndarray, np.ndarray]:
        """Exact search over the vectors of ``subset`` only (flat / hnsw kinds store them exactly)."""
        best = ExactTopK(queries, k)
        for start in range(0, subset.size, chunk):
            part = subset[start:start + chunk]
            best.update(part, self._index.reconstruct_batch(part))
        return best.scores, best.ids

    def _search_index(self, queries: np.ndarray, k: int, filt: IdFilter | None) -> tuple[np.ndarray, np.ndarray]:
        if self.kind == "flat":  # exact: one pass is final
            gpu = self._gpu_replica(k) if filt is None else None
            if gpu is not None:
                return gpu.search(queries, k)
            params = faiss.SearchParameters(sel=filt.selector) if filt is not None else None
            return self._index.search(queries, k, params=params)
        need = min(k, filt.count if filt is not None else len(self))
        limit = self._max_width()
        width = min(limit, math.ceil(self._base_width() * len(self) / (filt.count if filt else len(self))))
        gpu = self._gpu_replica(k) if filt is None and not self._tombstones.size else None
        approx = self._widening_search(queries, k, filt)
        if gpu is not None:
            scores, ids = gpu.search(queries, k)
        else:
            scores, ids = approx(np.arange(len(queries)), width, 1)
        # Unrestricted rows only need widening when short of results. Restricted rows
        # widen until a wider search leaves their top k unchanged: neighbours of an
        # allowed set correlated with the descriptor (a level) can sit far from the
        # query, and no fixed widening finds them (measured on 20k clustered vectors,
        # filter = a third of the clusters: recall@10 0.70 at the calibrated nprobe
        # / fraction, 0.97 only at 32x the calibrated nprobe). pqfs widens its k_factor
        # too: far neighbours differ by less than a 4-bit code's error (same filter,
        # pqfs: recall@10 0.78 widening nprobe alone).
        full = (ids >= 0).sum(axis=1) >= need
        active = np.arange(len(queries)) if filt is not None else np.flatnonzero(~full)
        boost, max_boost = 1, self._max_boost()
        while active.size and (width < limit or boost < max_boost):
            width = min(limit, _WIDEN_FACTOR * width)
            boost = min(max_boost, _WIDEN_FACTOR * boost)
            new_scores, new_ids = approx(active, width, boost)
            done = (new_ids >= 0).sum(axis=1) >= need
            if filt is not None:
                old = ids[active]
                kept = ((new_ids[:, :, None] == old[:, None, :]) & (new_ids[:, :, None] >= 0)).any(axis=2).sum(axis=1)
                done &= kept >= self.settings.target_recall * need
            scores[active], ids[active] = new_scores, new_ids
            active = active[~done]
        if active.size and self.kind == "hnsw" and filt is not None:
            # the widest filtered graph walk still missed some: finish those rows exactly
            scores[active], ids[active] = self._search_subset(queries[active], k, filt.ids)
        return scores, ids

    def _widening_search(self, queries: np.ndarray, k: int,
                         filt: IdFilter | None) -> Callable[[np.ndarray, int, int], tuple[np.ndarray, np.ndarray]]:
        """``search(rows, width, boost)``: top k of ``queries[rows]`` probing ``width`` lists / beam,
        pqfs re-ranking ``boost`` times its calibrated k_factor.

        Restricted pqfs searches scan once per width, deep enough for the largest
        boost, and widen the k_factor by re-ranking longer prefixes of that scan:
        on random data the first width is already every list, and rescanning for
        each boost took 33 ms p50 at 1M vectors against 15 ms unrestricted.
        """
        kf = self._k_factor() if self.kind == "pqfs" else 1
        deepest = _pqfs_depth(k, kf * self._max_boost())
        if self.kind != "pqfs" or filt is None or len(queries) * deepest > 1 << 22:  # ≤ 32 MiB of candidates
            return lambda rows, width, boost: self._approx_search(queries[rows], k, self._approx_params(filt, width),
                                                                  boost)
        scans: dict[int, np.ndarray] = {}

        def search(rows: np.ndarray, width: int, boost: int) -> tuple[np.ndarray, np.ndarray]:
            if width not in scans:  # rows only shrink between calls: scan the current ones
                scans.clear()
                candidates = np.full((len(queries), deepest), -1, dtype=np.int64)
                candidates[rows] = _pqfs_scan(self._index, queries[rows], deepest, self._approx_params(filt, width))
                scans[width] = candidates
            return _rerank(self._rerank_view(), queries[rows], k, scans[width][rows, :_pqfs_depth(k, kf * boost)])
        return search

    def _approx_search(self, queries: np.ndarray, k: int, params: faiss.SearchParameters,
                       boost: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Search with ``params``; pqfs re-ranks ``boost`` times its calibrated k_factor."""
        if self.kind == "pqfs":
            return _refined_search(self._index, self._rerank_view(), queries, k, boost * self._k_factor(), params)
        return self._index.search(queries, k, params=params)

    def _rerank_view(self) -> _Rerank:
        if self._rerank is None:
            self._rerank = _Rerank(self._index)
        return self._rerank

    def _k_factor(self) -> int:
        """Calibrated pqfs k_factor, scaled up with the growth since calibration: the number of
        codes that outscore a true neighbour grows with the collection (on random data in
        proportion), so a fixed candidate count would lose recall as vectors are added."""
        calibrated = int(self._tuning.get("k_factor") or self._index.k_factor)
        size = int(self._tuning.get("calibrated_size") or 0)
        if not size or len(self) <= size:
            return calibrated
        return min(math.ceil(calibrated * len(self) / size), max(calibrated, self.settings.pqfs_max_k_factor))

    def _max_boost(self) -> int:
        """How far a widening search may multiply the k_factor (pqfs; 1 for the other kinds)."""
        if self.kind != "pqfs":
            return 1
        return max(1, self.settings.pqfs_max_k_factor // self._k_factor())

    def _base_width(self) -> int:
        """Calibrated nprobe (IVF) or efSearch (HNSW)."""
        if self.kind == "hnsw":
            return int(self._tuning.get("ef_search") or faiss.downcast_index(self._index.index).hnsw.efSearch)
        return int(self._tuning.get("nprobe") or faiss.extract_index_ivf(self._index).nprobe)

    def _max_width(self) -> int:
        """Widest useful search: every list (IVF); for HNSW a beam beyond which the exact fallback is cheaper."""
        if self.kind == "hnsw":
            return max(16, min(self._index.ntotal, 16_384))
        return faiss.extract_index_ivf(self._index).nlist

    def _approx_params(self, filt: IdFilter | None, width: int) -> faiss.SearchParameters:
        """IVF / HNSW search parameters probing ``width`` lists / beam, with the filter's or tombstones' selector."""
        selector = filt.selector if filt is not None else None
        keep = []
        if self._tombstones.size and selector is None:
            hidden = faiss.IDSelectorBatch(self._tombstones.size, faiss.swig_ptr(self._tombstones))
            selector = faiss.IDSelectorNot(hidden)
            keep.append(hidden)  # the Not selector only points at it
        if self.kind == "hnsw":
            params = faiss.SearchParametersHNSW(efSearch=int(width))  # faiss uses max(efSearch, k)
        else:
            params = faiss.SearchParametersIVF(nprobe=int(width))
            ivf = faiss.extract_index_ivf(self._index)
            if isinstance(faiss.downcast_index(ivf.quantizer), faiss.IndexHNSW):
                # the centroid graph must return at least nprobe lists
                quantizer_params = faiss.SearchParametersHNSW(efSearch=max(2 * int(width), 64))
                params.quantizer_params = quantizer_params
                keep.append(quantizer_params)
        if selector is not None:
            params.sel = selector
            keep.append(selector)
        params.keepalive = keep  # SWIG holds raw pointers to these
        return params

    def _gpu_replica(self, k: int) -> faiss.Index | None:
        if not self._use_gpu or self.kind in ("hnsw", "pqfs") or k > 2048:  # 2048: faiss GPU k / nprobe limit
            return None
        if self._gpu_index is None:
            try:
                self._gpu_index = faiss.index_cpu_to_all_gpus(self._index)
            except (AttributeError, RuntimeError) as exc:
                log.warning("GPU search unavailable (%s); searching on the CPU", exc)
                self._use_gpu = False
                return None
        return self._gpu_index

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> None:
        """Write the store to ``path`` atomically: the old file survives any failure mid-write."""
        path = Path(path)
        header = json.dumps({
            "format": _FORMAT_VERSION, "dim": self.dim, "index_type": self.index_type,
            "expected_size": self.expected_size, "plan": dataclasses.asdict(self._plan) if self._plan else None,
            "tuning": self._tuning, "settings": dataclasses.asdict(self.settings),
            "size": len(self), "tombstones": int(self._tombstones.size),
        }).encode()
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(_MAGIC + struct.pack("<Q", len(header)) + header)
                f.write(self._tombstones.astype("<i8").tobytes())
                if self._index is not None:
                    faiss.write_index(self._index, faiss.PyCallbackIOWriter(f.write))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(path.parent)

    @classmethod
    def load(cls, path: str | os.PathLike, settings: VectorStoreSettings | None = None) -> VectorStore:
        """Read a store written by ``save``; ``settings`` overrides the saved ones."""
        path = Path(path)
        with open(path, "rb") as f:
            if f.read(len(_MAGIC)) != _MAGIC:
                raise ValueError(f"{path} is not a hassod vector store file")
            (header_len,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_len))
            if header["format"] != _FORMAT_VERSION:
                raise ValueError(f"{path}: unsupported vector store format {header['format']}")
            tombstones = np.frombuffer(f.read(8 * header["tombstones"]), dtype="<i8").astype(np.int64)
            index = faiss.read_index(faiss.PyCallbackIOReader(f.read)) if header["plan"] else None
        store = cls(header["dim"], header["index_type"],
                    settings or VectorStoreSettings(**header["settings"]), header["expected_size"])
        if index is not None:
            store._install(index, IndexPlan(**header["plan"]), header["tuning"])
            store._tombstones = tombstones
            store._ids = _IdSet(store._index_ids())
        if len(store) != header["size"]:
            raise ValueError(f"{path}: header says {header['size']} vectors, index holds {len(store)}")
        return store

    def _index_ids(self) -> np.ndarray:
        """Ids held by the faiss index, tombstones excluded."""
        if self.kind in ("flat", "hnsw"):
            ids = faiss.vector_to_array(self._index.id_map)
        elif self.kind == "pqfs":
            ids = faiss.vector_to_array(_refine_parts(self._index)[1].id_map)
        else:
            invlists = faiss.extract_index_ivf(self._index).invlists
            ids = np.concatenate([np.empty(0, dtype=np.int64)] + [
                faiss.rev_swig_ptr(invlists.get_ids(i), invlists.list_size(i)).copy()
                for i in range(invlists.nlist) if invlists.list_size(i)])
        return ids[~np.isin(ids, self._tombstones)] if self._tombstones.size else ids

    # ------------------------------------------------------------------ validation
    def _check_vectors(self, x: np.ndarray, name: str) -> np.ndarray:
        x = np.asarray(x)
        if not np.issubdtype(x.dtype, np.floating):
            raise TypeError(f"{name} must be floating point (float32), got dtype {x.dtype}")
        if x.ndim == 1 and name == "queries":
            x = x[None]
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"{name} must have shape (n, {self.dim}), got {x.shape}")
        x = np.ascontiguousarray(x, dtype=np.float32)
        if not np.isfinite(x).all():
            raise ValueError(f"{name} contain NaN or infinite values")
        norms = np.linalg.norm(x, axis=1)
        bad = np.abs(norms - 1.0) > self.settings.norm_tolerance
        if bad.any():
            raise ValueError(f"{name} must be L2-normalised (inner product = cosine); "
                             f"{int(bad.sum())} rows have norms like {norms[bad][:3].tolist()}")
        return x


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
        # faiss rather than numpy: its OpenMP threads follow _omp_threads, while OpenBLAS
        # threads cost ~15 ms per call in barrier waits on a busy 2-core machine.
        chunk_scores, top = faiss.knn(self.queries, vectors, min(self.k, ids.size), metric=faiss.METRIC_INNER_PRODUCT)
        # merge the chunk's own top-k with the running top-k: (q, 2k) instead of (q, k + chunk)
        scores = np.concatenate([self.scores, chunk_scores], axis=1)
        all_ids = np.concatenate([self.ids, ids[top]], axis=1)
        order = np.argsort(-scores, axis=1, kind="stable")[:, :self.k]
        self.scores = np.take_along_axis(scores, order, axis=1)
        self.ids = np.take_along_axis(all_ids, order, axis=1)


def _gather_rows(chunks: Chunks, n: int, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ids, vectors) of stream positions ``rows`` (in that order, repeats allowed) of the ``n`` rows of ``chunks``."""
    order = np.argsort(rows, kind="stable")
    sorted_rows = rows[order]
    ids = np.empty(rows.size, dtype=np.int64)
    vectors = np.empty((rows.size, 0), dtype=np.float32)
    start = 0
    for chunk_ids, chunk in chunks():
        lo, hi = np.searchsorted(sorted_rows, [start, start + chunk_ids.size])
        if vectors.shape[1] == 0:
            vectors = np.empty((rows.size, chunk.shape[1]), dtype=np.float32)
        local = sorted_rows[lo:hi] - start
        ids[order[lo:hi]] = chunk_ids[local]
        vectors[order[lo:hi]] = chunk[local]
        start += chunk_ids.size
    if start != n:
        raise RuntimeError(f"expected {n} stored vectors, streamed {start}")
    return ids, vectors


def _leave_one_out_recall(found: np.ndarray, truth: np.ndarray, self_ids: np.ndarray, k: int) -> float:
    """Mean recall@k of ``found`` against ``truth`` after dropping each query's own id from both."""
    hits = 0
    for row_found, row_truth, own in zip(found, truth, self_ids):
        f = row_found[(row_found != own) & (row_found >= 0)][:k]
        t = row_truth[(row_truth != own) & (row_truth >= 0)][:k]
        hits += np.intersect1d(f, t).size / max(t.size, 1)
    return hits / max(len(found), 1)


def _refine_parts(index: faiss.IndexRefine) -> tuple[faiss.IndexIVF, faiss.IndexIDMap2]:
    """The fast-scan IVF and the id-addressed fp16 copy of a ``pqfs`` container."""
    return faiss.downcast_index(index.base_index), faiss.downcast_index(index.refine_index)


def _index_add(index: faiss.Index, kind: str, vectors: np.ndarray, ids: np.ndarray) -> None:
    if kind != "pqfs":
        index.add_with_ids(vectors, ids)
        return
    scan, refine = _refine_parts(index)
    scan.add_with_ids(vectors, ids)
    refine.add_with_ids(vectors, ids)
    index.ntotal = scan.ntotal


def _index_remove(index: faiss.Index, kind: str, ids: np.ndarray) -> int:
    """Remove stored ``ids`` (unique, sorted) from ``index``; returns how many went."""
    if kind != "pqfs":
        return index.remove_ids(faiss.IDSelectorBatch(ids.size, faiss.swig_ptr(ids)))
    # faiss 1.15.1 fast-scan lists take removals, but a vector added later to a list
    # that lost entries gets a corrupted code (its own vector then ranked 1468th of
    # 4901 by the scan): so every list that loses an id is emptied and its remaining
    # vectors are re-encoded from the fp16 copy (O(list size) per touched list).
    scan, refine = _refine_parts(index)
    ivf = faiss.extract_index_ivf(scan)
    touched = []
    for list_no in range(ivf.nlist):
        size = ivf.invlists.list_size(list_no)
        if size:
            list_ids = faiss.rev_swig_ptr(ivf.invlists.get_ids(list_no), size)
            if _sorted_member(ids, list_ids).any():
                touched.append(list_ids.copy())
    emptied = np.sort(np.concatenate(touched)) if touched else np.empty(0, dtype=np.int64)
    keep = emptied[~_sorted_member(ids, emptied)]
    kept_vectors = _Rerank(index).decode(keep)
    if scan.remove_ids(faiss.IDSelectorBatch(emptied.size, faiss.swig_ptr(emptied))) != emptied.size:
        raise RuntimeError("pqfs scan lists changed while being emptied")
    if keep.size:
        scan.add_with_ids(kept_vectors, keep)
    removed = refine.remove_ids(faiss.IDSelectorBatch(ids.size, faiss.swig_ptr(ids)))
    if removed != emptied.size - keep.size or scan.ntotal != refine.ntotal:
        raise RuntimeError("pqfs scan and re-rank copies disagree on the stored ids")
    index.ntotal = scan.ntotal
    return removed


class _Rerank:
    """Id-addressed fp16 codes of a ``pqfs`` index, read straight from faiss memory.

    faiss would decode one vector per virtual call through the IndexIDMap2 hash
    (8 µs per candidate on the loaded 2-core machine), and numpy converts fp16 to
    float32 at ~1 ns per component (2.8 ms for 2560 candidates of 432 dims). So the
    codes are viewed as a numpy (n, 2·d) uint8 array, ids are found by binary
    search in a sorted copy of the id map, and a query's candidates are scored by
    a scratch IndexScalarQuantizer over copies of their codes (SIMD fp16 inner
    products: 0.37 ms for 2560 candidates, copy included). The view is valid only
    until the index changes: the store rebuilds this object after every add / remove.
    """

    def __init__(self, index: faiss.IndexRefine):
        _, refine = _refine_parts(index)
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


def _refined_search(index: faiss.IndexRefine, rerank: _Rerank, queries: np.ndarray, k: int, k_factor: int,
                    params: faiss.SearchParameters | None) -> tuple[np.ndarray, np.ndarray]:
    """``pqfs`` search: the 4-bit fast scan proposes k·k_factor candidates (selector and
    nprobe from ``params``), their fp16 copies re-rank them by inner product.

    At least 10·k_factor candidates (the calibrated count) even for k < 10: a
    4-bit code's score is so rough that a query's own vector can rank 50th.
    """
    return _rerank(rerank, queries, k, _pqfs_scan(index, queries, _pqfs_depth(k, k_factor), params))


def _pqfs_depth(k: int, k_factor: int) -> int:
    return max(k, _CALIBRATION_K) * k_factor


def _pqfs_scan(index: faiss.IndexRefine, queries: np.ndarray, depth: int,
               params: faiss.SearchParameters | None) -> np.ndarray:
    """Ids (q, depth) of the best ``depth`` 4-bit codes per query, -1 padded.

    A few queries probing many lists split each query's lists over all cores
    (fast-scan implementation 14): 1M random vectors, every list probed, 2 cores:
    p50 7.4 ms against 14.2 ms for the default, which parallelises over queries.
    """
    scan = _refine_parts(index)[0]
    nprobe = params.nprobe if isinstance(params, faiss.SearchParametersIVF) else scan.nprobe
    split = len(queries) < _FAISS_BLAS_THRESHOLD and nprobe >= _PQFS_SPLIT_MIN_LISTS and _MAX_THREADS > 1
    scan.implem = _PQFS_SPLIT_IMPLEM if split else 0
    previous = faiss.omp_get_max_threads()  # _omp_threads(len(queries)) of the caller
    if split:
        faiss.omp_set_num_threads(_MAX_THREADS)
    try:
        return scan.search(queries, depth, params=params)[1]
    finally:
        faiss.omp_set_num_threads(previous)


def _rerank(rerank: _Rerank, queries: np.ndarray, k: int, candidates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Top k of each query's ``candidates`` row (ids, -1 = none) by fp16 inner product."""
    scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
    ids = np.full((len(queries), k), -1, dtype=np.int64)
    with _omp_threads(1):  # one tiny search per query: OpenMP only adds barrier waits (4 ms each when busy)
        for row, (query, found) in enumerate(zip(queries, candidates)):
            found = found[found >= 0]
            if found.size:
                top_scores, top_ids = rerank.top_k(query, found, k)
                scores[row, :top_ids.size], ids[row, :top_ids.size] = top_scores, top_ids
    return scores, ids


def _ivf_params(ivf: faiss.IndexIVF) -> Callable[[int], faiss.SearchParameters]:
    """``nprobe`` → search parameters, with a beam for an HNSW centroid graph when there is one."""
    hnsw_quantizer = isinstance(faiss.downcast_index(ivf.quantizer), faiss.IndexHNSW)

    def make(v: int) -> faiss.SearchParameters:
        params = faiss.SearchParametersIVF(nprobe=v)
        if hnsw_quantizer:
            quantizer_params = faiss.SearchParametersHNSW(efSearch=max(2 * v, 64))
            params.quantizer_params = quantizer_params
            params.keepalive = quantizer_params  # SWIG holds a raw pointer
        return params
    return make


def _calibrate(index: faiss.Index, kind: str, cal_ids: np.ndarray, cal_queries: np.ndarray,
               truth: np.ndarray, target: float, settings: VectorStoreSettings) -> dict:
    """Smallest nprobe (IVF) / efSearch (HNSW) reaching ``target`` leave-one-out recall@10.

    When the target is out of reach (PQ codes, structureless data) the smallest
    value within 1% of the best recall seen is taken instead of an exhaustive scan.
    ``pqfs`` tunes nprobe and k_factor together (``_calibrate_pqfs``).
    """
    if kind == "pqfs":
        return _calibrate_pqfs(index, cal_ids, cal_queries, truth, target, settings)
    k = _CALIBRATION_K + 1
    if kind == "hnsw":
        values = [v for v in (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048)]
        name, make = "ef_search", lambda v: faiss.SearchParametersHNSW(efSearch=v)
    else:
        ivf = faiss.extract_index_ivf(index)
        values = sorted({min(v, ivf.nlist) for v in _geometric(ivf.nlist)})
        name, make = "nprobe", _ivf_params(ivf)
    seen: list[tuple[int, float]] = []
    for v in values:
        _, found = index.search(cal_queries, k, params=make(v))
        recall = _leave_one_out_recall(found, truth, cal_ids, _CALIBRATION_K)
        seen.append((v, recall))
        if recall >= target:
            break
    best = max(r for _, r in seen)
    value, recall = next((v, r) for v, r in seen if r >= (target if best >= target else 0.99 * best))
    if recall < target:
        log.warning("%s index reaches recall@10 %.3f at best (target %.2f); using %s=%d",
                    kind, best, target, name, value)
    if kind != "hnsw":
        ivf.nprobe = value  # saved inside the faiss file too
        if ivf.nlist >= 64 and 2 * value >= ivf.nlist:
            log.warning("%s index needs nprobe=%d of %d lists for recall@10 %.3f: these descriptors have "
                        "little neighbourhood structure, index_type='pqfs' scans them faster", kind, value,
                        ivf.nlist, recall)
    else:
        faiss.downcast_index(index.index).hnsw.efSearch = value
    return {name: int(value), "calibrated_recall": round(float(recall), 4), "calibration_queries": int(len(cal_ids))}


def _calibrate_pqfs(index: faiss.IndexRefine, cal_ids: np.ndarray, cal_queries: np.ndarray,
                    truth: np.ndarray, target: float, settings: VectorStoreSettings) -> dict:
    """Cheapest (nprobe, k_factor) of a ``pqfs`` index reaching ``target`` leave-one-out recall@10.

    One scan per nprobe returns the top 10·max_k_factor + 1 candidates; the
    candidates of a smaller k_factor are a prefix of them, and an exact re-rank
    keeps every true neighbour among its candidates, so recall at (nprobe, k_factor)
    is the share of the true top 10 in that prefix. Among pairs reaching the
    target the cheapest by ``_pqfs_cost`` wins; the winner is then searched
    for real (fp16 re-rank) and that recall is reported. Out of reach: the
    cheapest pair within 1% of the best recall seen.
    """
    scan, _ = _refine_parts(index)
    ivf = faiss.extract_index_ivf(scan)
    make = _ivf_params(ivf)
    k = _CALIBRATION_K
    n, code_bytes = scan.ntotal, ivf.code_size
    max_factor = max(1, min(settings.pqfs_max_k_factor, n // k))  # more candidates than vectors is pointless
    factors = _geometric(max_factor)
    # true top k without the query itself, padded with -2 (matches nothing, not even a missing -1)
    truth_k = np.full((len(cal_ids), k), -2, dtype=np.int64)
    for row, (t, own) in enumerate(zip(truth, cal_ids)):
        t = t[(t != own) & (t >= 0)][:k]
        truth_k[row, :t.size] = t
    n_true = np.maximum((truth_k >= 0).sum(axis=1), 1)
    seen: list[tuple[float, int, int, float]] = []  # (cost, nprobe, k_factor, candidate recall)
    best_cost = math.inf
    for nprobe in sorted({min(v, ivf.nlist) for v in _geometric(ivf.nlist)}):
        if _pqfs_cost(n, code_bytes, nprobe, ivf.nlist, k, 1) >= best_cost:
            break  # scanning alone already costs more than a pair that reaches the target
        _, found = scan.search(cal_queries, k * factors[-1] + 1, params=make(nprobe))
        # rank of each true neighbour among the candidates (found.shape[1] when absent)
        rank = np.full(truth_k.shape, found.shape[1], dtype=np.int64)
        for j in range(k):
            match = found == truth_k[:, j:j + 1]
            present = match.any(axis=1)
            rank[present, j] = match[present].argmax(axis=1)
        for f in factors:
            recall = float(np.mean((rank < k * f + 1).sum(axis=1) / n_true))
            cost = _pqfs_cost(n, code_bytes, nprobe, ivf.nlist, k, f)
            seen.append((cost, nprobe, f, recall))
            if recall >= target:
                best_cost = min(best_cost, cost)
                break
    best = max(r for *_, r in seen)
    floor = target if best >= target else 0.99 * best
    _, nprobe, k_factor, _ = min(s for s in seen if s[3] >= floor)
    ivf.nprobe = nprobe  # saved inside the faiss file too
    index.k_factor = k_factor
    _, found = _refined_search(index, _Rerank(index), cal_queries, k + 1, k_factor, make(nprobe))
    recall = _leave_one_out_recall(found, truth, cal_ids, k)
    if recall < target:
        log.warning("pqfs index reaches recall@10 %.3f (target %.2f) with nprobe=%d of %d, k_factor=%d; "
                    "raise pqfs_m or pqfs_max_k_factor", recall, target, nprobe, ivf.nlist, k_factor)
    return {"nprobe": int(nprobe), "k_factor": int(k_factor), "calibrated_recall": round(float(recall), 4),
            "calibration_queries": len(cal_ids), "calibrated_size": int(n)}


def _pqfs_cost(n: int, code_bytes: int, nprobe: int, nlist: int, k: int, k_factor: int) -> float:
    """Model of one ``pqfs`` query's time (ns): codes scanned plus candidates re-ranked."""
    scanned = n * nprobe / nlist
    return ((_PQFS_SCAN_NS_PER_VECTOR + _PQFS_SCAN_NS_PER_BYTE * code_bytes) * scanned
            + _PQFS_NS_PER_LIST * nprobe + _PQFS_NS_PER_CANDIDATE * k * k_factor)


def _geometric(limit: int) -> list[int]:
    """1, 2, 3, 4, 6, 8, 12, ... up to and including ``limit``."""
    values, v = [], 1
    while v < limit:
        values += [v, v + v // 2] if v >= 2 else [v]
        v *= 2
    return [x for x in values if x < limit] + [limit]


def _as_ids(ids: np.ndarray, name: str) -> np.ndarray:
    ids = np.asarray(ids)
    if ids.ndim == 0:
        ids = ids[None]
    if ids.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array, got shape {ids.shape}")
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
        raise TypeError(f"{name} must be integers (int64 region ids), got dtype {ids.dtype}")
    return np.ascontiguousarray(ids, dtype=np.int64)


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable (POSIX: the directory entry lives in the directory)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
