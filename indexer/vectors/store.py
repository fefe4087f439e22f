"""FAISS vector store of region descriptors, keyed by region id (docs/design.md §8).

Descriptors are L2-normalised float32 vectors searched by inner product, so a
score is a cosine similarity in [-1, 1]. The FAISS id of a vector *is* its
region id (any non-negative int64), so results join the catalog without a
translation table. ``VectorStore`` owns the ids, add / remove, restricted
search with widening, rebuilds as the collection grows (``planning``),
calibration of the search width, and atomic save / load; what differs per index
kind is delegated to an ``IndexKind`` (``kind.py``; ``flat``, ``ivf``,
``hnsw``, ``pqfs``). Restricted search (``allowed_ids``) puts a FAISS selector
inside the search and widens it (4x at a time) until the top k stop changing,
so k allowed results come back whenever k exist. Files are written atomically.
When faiss sees a GPU, unrestricted searches of the kinds that allow it run on
a GPU replica; the CPU index stays the source of truth.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import faiss
import numpy as np

from hassod.errors import UserError
from hassod.runs import atomic_write

from .calibration import CALIBRATION_K, ExactTopK, LeaveOneOut, calibration_target
from .flat import FlatKind
from .hnsw import HNSWKind
from .ids import IdFilter, IdSet, as_ids, index_ids, make_filter
from .ivf import IVFKind, train_ivf
from .kind import IndexKind, Widths, omp_threads
from .ondisk import OnDiskKind, merge_shards, trained_empty
from .planning import (IndexPlan, VectorStoreSettings, estimated_bytes, estimated_disk_bytes, outgrown,
                       plan_index, validate_index_type)
from .pqfs import PQFastScanKind

log = logging.getLogger(__name__)

# Every kind a plan (and so a saved file) can name.
KINDS: dict[str, Callable[[VectorStoreSettings], IndexKind]] = {
    "flat": FlatKind,
    "ivf": IVFKind,
    "ivfsq": lambda settings: IVFKind(settings, "ivfsq"),
    "ivfpq": lambda settings: IVFKind(settings, "ivfpq"),
    "factory": lambda settings: IVFKind(settings, "factory"),
    "hnsw": HNSWKind,
    "pqfs": PQFastScanKind,
    "ondisk": OnDiskKind,
}
_MAGIC = b"HASSODVS"
_FORMAT_VERSION = 1
# Restricted searches widen the search by this factor until the top k stop changing
# (docs/benchmarks.md, "Vector store").
_WIDEN_FACTOR = 4
_HIDDEN_MAX_SHARE = 0.25  # removed ids still in the index (hnsw) beyond this share trigger a rebuild

ChunkSource = Callable[[], Iterator[tuple[np.ndarray, np.ndarray]]]  # a fresh pass over (ids, vectors) per call


class VectorFileError(UserError, ValueError):
    """A vectors file that is not one, or is truncated or damaged; ``str()`` says how to rebuild it."""


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
        self._kind: IndexKind | None = None  # of self._plan
        self._ids = IdSet()
        self._tombstones = np.empty(0, dtype=np.int64)  # removed, still in an index that cannot remove (hnsw)
        self._tuning: dict[str, float | int | None] = {}
        self._version = 0
        self._gpu_index: faiss.Index | None = None
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
        store._install_empty()
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
        return self._ids.contains(as_ids(ids, "ids"))

    def info(self) -> dict:
        """Kind, size, nlist, search parameters and their calibrated recall@10."""
        ivf = faiss.try_extract_index_ivf(self._index) if self._index is not None else None
        return {"kind": self.kind, "index_type": self.index_type, "size": len(self), "dim": self.dim,
                "nlist": ivf.nlist if ivf is not None else 0,
                "factory": self._plan.factory if self._plan else None,
                "bytes_estimate": estimated_bytes(self.kind, len(self), self.dim, self.settings),
                "disk_bytes_estimate": estimated_disk_bytes(self.kind, len(self), self.dim, self.settings),
                "gpu": self._use_gpu, **self._tuning}

    # ------------------------------------------------------------------ writing
    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Add ``vectors`` (n, dim) float32, unit norm, under region ``ids`` (n,) int64.

        Ids must be non-negative, unique, and not already stored. May train or
        retrain the index (see ``needs_rebuild``).
        """
        ids = as_ids(ids, "ids")
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
            self.rebuild()  # compact first: a removed id still sits in the index under the same id
        if len(self) == 0:
            plan = self._plan_for(ids.size, ids.size)
            # train and calibrate on this first batch directly (an index that needs no training
            # but was never calibrated, hnsw, is built anew to calibrate it)
            if self._index is None or plan != self._plan or (not self._kind.exact and not self._tuning):
                self._build(plan, lambda: iter([(ids, vectors)]), ids.size)
                return
        self._kind.add(self._index, vectors, ids)
        self._ids.add(ids)
        self._changed()
        if self.needs_rebuild():
            self.rebuild()

    def remove(self, ids: np.ndarray) -> int:
        """Remove the vectors of ``ids``; unknown ids are ignored. Returns how many were removed."""
        ids = as_ids(ids, "ids")
        ids = np.unique(ids[self._ids.contains(ids)])
        if ids.size == 0:
            return 0
        if self._kind.removes:
            removed = self._kind.remove(self._index, ids)
            if removed != ids.size:
                raise RuntimeError(f"faiss removed {removed} of {ids.size} vectors")
        else:  # hide them from search, compact when they pile up
            self._tombstones = np.union1d(self._tombstones, ids)
        self._ids.remove(ids)
        self._changed()
        if self._too_many_hidden():
            self.rebuild()
        return int(ids.size)

    def _changed(self) -> None:
        self._version += 1
        self._gpu_index = None

    def _too_many_hidden(self) -> bool:
        return self._tombstones.size > _HIDDEN_MAX_SHARE * self._index.ntotal

    # ------------------------------------------------------------------ planning
    def _plan_for(self, n: int, n_available: int) -> IndexPlan:
        """The index this store should have at ``n`` vectors, ``n_available`` of them usable for training."""
        return plan_index(self.index_type, n, n_available, self.expected_size, self.dim, self.settings)

    def needs_rebuild(self) -> bool:
        """Whether the collection outgrew its index (another auto kind, nlist due to double), its kind
        asks for one, or removed vectors pile up in an index that cannot remove them."""
        if self._plan is None:
            return False
        if self._too_many_hidden() or self._kind.needs_rebuild(self._tuning, len(self)):
            return True
        return outgrown(self._plan, self._plan_for(len(self), len(self)))

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
        if self._index is None or n == 0:
            self._index, self._plan, self._kind, self._tuning = None, None, None, {}
            self._install_empty()
            return
        self._build(self._plan_for(n, n), self._stored_chunks, n)

    # ------------------------------------------------------------------ building
    def _install_empty(self) -> None:
        """Install the empty index of the plan for no vectors, when it needs no training."""
        plan = self._plan_for(0, 0)
        kind = KINDS[plan.kind](self.settings)
        index = kind.new_index(plan, self.dim)
        if index.is_trained:  # usable right away
            self._install(index, plan, kind)

    def _install(self, index: faiss.Index, plan: IndexPlan, kind: IndexKind, tuning: dict | None = None) -> None:
        self._index, self._plan, self._kind, self._tuning = index, plan, kind, dict(tuning or {})
        self._tombstones = np.empty(0, dtype=np.int64)
        self._changed()

    def _build(self, plan: IndexPlan, chunks: ChunkSource, n: int) -> None:
        """Train (if needed) and fill a new ``plan`` index from ``chunks`` (two passes), calibrate, install."""
        rng = np.random.default_rng(self.settings.seed)
        kind = KINDS[plan.kind](self.settings)
        index = kind.new_index(plan, self.dim)
        ivf = faiss.try_extract_index_ivf(index)
        n_train = 0 if index.is_trained else min(n, ivf.nlist * self.settings.train_per_list)
        n_cal = 0 if kind.exact else min(n, self.settings.calibration_queries)
        # Calibration queries are kept out of the training sample when there is data to
        # spare: k-means fits its training vectors, which made them easier queries.
        order = rng.permutation(n)
        train_rows = order[:n_train]
        cal_rows = order[n_train:n_train + n_cal] if n >= n_train + n_cal else order[:n_cal]
        sample_ids, sample = (_gather_rows(chunks, n, np.concatenate([train_rows, cal_rows])) if n_train + n_cal
                              else (np.empty(0, dtype=np.int64), np.empty((0, self.dim), dtype=np.float32)))
        if not index.is_trained:
            train_ivf(index, sample[:n_train], self.settings, self._use_gpu)
        cal_ids, cal_queries = sample_ids[n_train:], sample[n_train:]
        del sample, sample_ids, order
        truth = ExactTopK(cal_queries, CALIBRATION_K + 1)  # +1: the query itself is stored
        all_ids = []
        for chunk_ids, chunk in chunks():
            kind.add(index, chunk, chunk_ids)
            if not kind.exact:
                truth.update(chunk_ids, chunk)
            all_ids.append(chunk_ids)
        tuning = kind.calibrate(index, LeaveOneOut(cal_ids, cal_queries, truth.ids), calibration_target(self.settings))
        self._install(index, plan, kind, tuning)
        self._ids = IdSet(np.concatenate(all_ids))

    def calibrate(self) -> dict:
        """Re-tune the search width on the current contents (e.g. after much growth). Returns ``info()``."""
        if self._kind is None or self._kind.exact or len(self) == 0:
            return self.info()
        rng = np.random.default_rng(self.settings.seed)
        ids = self._ids.array()
        cal_ids = np.sort(rng.choice(ids, min(self.settings.calibration_queries, ids.size), replace=False))
        cal_queries = self.reconstruct(cal_ids)
        truth = ExactTopK(cal_queries, CALIBRATION_K + 1)
        for chunk_ids, chunk in self._stored_chunks():
            truth.update(chunk_ids, chunk)
        self._tuning = self._kind.calibrate(self._index, LeaveOneOut(cal_ids, cal_queries, truth.ids),
                                            calibration_target(self.settings))
        self._changed()
        return self.info()

    # ------------------------------------------------------------------ shards (on-disk kind)
    def trained_empty(self) -> faiss.Index:
        """An empty faiss index with this store's trained quantizer: write shards from it (``merge_shards``).
        Only for the ``ondisk`` kind."""
        self._require_ondisk()
        return trained_empty(self._index)

    def merge_shards(self, shard_fnames: list[str | os.PathLike], directory: Path) -> int:
        """Merge faiss shard files written from ``trained_empty()`` into this store's on-disk lists, in a new
        ``.ivfdata`` generation in ``directory`` (the store file's folder). Shard ids must be new. Returns how
        many vectors were added; ``save`` makes it durable."""
        self._require_ondisk()
        shard_ids = [index_ids(faiss.read_index(str(f), faiss.IO_FLAG_MMAP)) for f in shard_fnames]
        new = np.concatenate([np.empty(0, dtype=np.int64)] + shard_ids)
        if np.unique(new).size != new.size or self._ids.contains(new).any():
            raise ValueError("shard ids must be unique and not stored yet")
        merged = merge_shards(self._index, shard_fnames, Path(directory), "vectors")
        self._index = merged
        self._ids.add(new)
        self._changed()
        return int(new.size)

    def _require_ondisk(self) -> None:
        if self.kind != "ondisk":
            raise ValueError(f"shards are for the ondisk kind, this store is {self.kind}")

    # ------------------------------------------------------------------ reading vectors back
    def reconstruct(self, ids: np.ndarray) -> np.ndarray:
        """Stored vectors (m, dim) float32 of ``ids`` (decoded, hence approximate, for ivfsq/ivfpq).

        O(n) for the IVF kinds, which keep no id → position map between calls.
        """
        ids = as_ids(ids, "ids")
        missing = ~self._ids.contains(ids)
        if missing.any():
            raise KeyError(f"ids not in the store: {ids[missing][:5].tolist()}")
        if ids.size == 0:
            return np.empty((0, self.dim), dtype=np.float32)
        return self._kind.reconstruct(self._index, ids)

    def _stored_chunks(self, chunk: int = 65_536) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Stored (ids, vectors) in chunks, tombstoned vectors excluded."""
        return self._kind.stored(self._index, self._tombstones, chunk)

    # ------------------------------------------------------------------ searching
    def make_filter(self, allowed_ids: np.ndarray) -> IdFilter:
        """A selector allowing only ``allowed_ids`` (int64, any order); reuse it across searches.

        A bitmap when ids are dense enough that it costs at most a byte per allowed
        id (or ≤ 1 MiB), else a hash set. A filter made before the store changed is
        re-checked against the current ids when used; ids added since are not in it.
        """
        ids = np.unique(as_ids(allowed_ids, "allowed_ids"))
        return make_filter(ids[self._ids.contains(ids)], self._version)

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
        with omp_threads(nq):
            if filt is not None and filt.count <= self.settings.exact_filter_max and self._kind.exact_subsets:
                got_s, got_i = self._search_subset(queries, k, filt.ids)
            else:
                got_s, got_i = self._search_index(queries, k, filt)
        width = min(k, got_i.shape[1])
        scores[:, :width], ids[:, :width] = got_s[:, :width], got_i[:, :width]
        scores[ids < 0] = -np.inf
        return scores, ids

    def _search_subset(self, queries: np.ndarray, k: int, subset: np.ndarray,
                       chunk: int = 65_536) -> tuple[np.ndarray, np.ndarray]:
        """Exact search over the vectors of ``subset`` only."""
        best = ExactTopK(queries, k)
        for start in range(0, subset.size, chunk):
            part = subset[start:start + chunk]
            best.update(part, self._kind.reconstruct(self._index, part))
        return best.scores, best.ids

    def _search_index(self, queries: np.ndarray, k: int, filt: IdFilter | None) -> tuple[np.ndarray, np.ndarray]:
        """Search at the calibrated width (scaled up by the allowed fraction), then widen: rows short of
        results, and every restricted row until a wider search leaves its top k unchanged."""
        need = min(k, filt.count if filt is not None else len(self))
        widths = self._widths()
        limit = widths.max_width
        width = min(limit, math.ceil(widths.width * len(self) / (filt.count if filt else len(self))))
        gpu = self._gpu_replica(k) if filt is None and not self._tombstones.size else None
        approx = self._kind.searcher(self._index, queries, k, self._selector(filt), widths, filt is not None)
        if gpu is not None:
            scores, ids = gpu.search(queries, k)
        else:
            scores, ids = approx(np.arange(len(queries)), width, 1)
        # Neighbours of an allowed set correlated with the descriptor (a level) can sit
        # far from the query, and no fixed widening finds them; re-ranking kinds widen
        # their candidate count (boost) too.
        full = (ids >= 0).sum(axis=1) >= need
        active = np.arange(len(queries)) if filt is not None else np.flatnonzero(~full)
        boost, max_boost = 1, widths.max_boost
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
        if active.size and self._kind.exact_subsets and filt is not None:
            # the widest filtered search still missed some: finish those rows exactly
            scores[active], ids[active] = self._search_subset(queries[active], k, filt.ids)
        return scores, ids

    def _widths(self) -> Widths:
        return self._kind.widths(self._index, self._tuning, len(self))

    def _k_factor(self) -> int:
        """Candidates re-ranked per result at the current size (pqfs; 1 for the other kinds)."""
        return self._widths().k_factor

    def _selector(self, filt: IdFilter | None) -> faiss.IDSelector | None:
        """The filter's selector, else one hiding tombstones, else none."""
        if filt is not None:
            return filt.selector
        if not self._tombstones.size:
            return None
        hidden = faiss.IDSelectorBatch(self._tombstones.size, faiss.swig_ptr(self._tombstones))
        selector = faiss.IDSelectorNot(hidden)
        selector.hidden = hidden  # the Not selector only points at it
        return selector

    def _gpu_replica(self, k: int) -> faiss.Index | None:
        if not self._use_gpu or not self._kind.gpu or k > 2048:  # 2048: faiss GPU k / nprobe limit
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
        if self._index is not None:
            self._kind.persist(self._index, path)  # files the store file will name are on disk first
        with atomic_write(path, binary=True) as f:
            f.write(_MAGIC + struct.pack("<Q", len(header)) + header)
            f.write(self._tombstones.astype("<i8").tobytes())
            if self._index is not None:
                faiss.write_index(self._index, faiss.PyCallbackIOWriter(f.write))
        _fsync_dir(path.parent)
        if self._index is not None:
            self._kind.committed(self._index, path)

    @classmethod
    def load(cls, path: str | os.PathLike, settings: VectorStoreSettings | None = None) -> VectorStore:
        """Read a store written by ``save``; ``settings`` overrides the saved ones.

        Raises :class:`VectorFileError` for a file that is not one, or is truncated or damaged.
        """
        path = Path(path)
        try:
            return cls._read(path, settings)
        except VectorFileError:
            raise
        except (ValueError, KeyError, TypeError, RuntimeError, struct.error, UnicodeDecodeError) as exc:
            # faiss's message ends "failed: read error in PyCallbackIOReader: 346801 != 691200 (Success)".
            reason = str(exc).strip().splitlines()[0].split("failed: ")[-1].replace(" (Success)", "")[-120:]
            raise VectorFileError(f"the vectors file {path} is damaged ({reason}); `hassod index build` "
                                  "of the same images rebuilds it from the catalog") from None

    @classmethod
    def _read(cls, path: Path, settings: VectorStoreSettings | None) -> VectorStore:
        with open(path, "rb") as f:
            if f.read(len(_MAGIC)) != _MAGIC:
                raise VectorFileError(f"{path} is not a hassod vector store file")
            (header_len,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_len))
            if header["format"] != _FORMAT_VERSION:
                raise ValueError(f"{path}: unsupported vector store format {header['format']}")
            tombstones = np.frombuffer(f.read(8 * header["tombstones"]), dtype="<i8").astype(np.int64)
            store = cls(header["dim"], header["index_type"],
                        settings or VectorStoreSettings(**header["settings"]), header["expected_size"])
            plan = IndexPlan(**header["plan"]) if header["plan"] else None
            kind = KINDS[plan.kind](store.settings) if plan else None
            index = faiss.read_index(faiss.PyCallbackIOReader(f.read), kind.io_flags) if plan else None
        if index is not None:
            kind.opened(index, path)
            store._install(index, plan, kind, header["tuning"])
            store._tombstones = tombstones
            ids = index_ids(index)
            store._ids = IdSet(ids[~np.isin(ids, tombstones)] if tombstones.size else ids)
        if len(store) != header["size"]:
            raise ValueError(f"{path}: header says {header['size']} vectors, index holds {len(store)}")
        return store

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


def _gather_rows(chunks: ChunkSource, n: int, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
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
