"""Region id bookkeeping of a vector store: the stored id set and search filters.

Region ids are non-negative int64 and are the FAISS ids themselves (-1 marks a
missing result). ``IdSet`` answers "is this id stored?" without asking faiss;
``IdFilter`` is a reusable FAISS selector over an allowed id set, a bitmap when
the ids are dense enough, else a hash set (``make_filter``).
"""
from __future__ import annotations

import faiss
import numpy as np


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


def make_filter(ids: np.ndarray, version: int) -> IdFilter:
    """A filter over ``ids`` (sorted, unique, stored): a bitmap when ids are dense enough that it
    costs at most a byte per allowed id (or ≤ 1 MiB), else a hash set."""
    if ids.size == 0:  # searches return nothing without consulting a selector
        return IdFilter(ids, None, (), version)
    n_bytes = int(ids[-1]) // 8 + 1
    if n_bytes <= max(1 << 20, ids.size):
        bits = np.zeros(n_bytes * 8, dtype=bool)
        bits[ids] = True
        bitmap = np.packbits(bits, bitorder="little")  # faiss reads bit (id & 7) of byte id >> 3
        return IdFilter(ids, faiss.IDSelectorBitmap(bitmap.size, faiss.swig_ptr(bitmap)), (bitmap,), version)
    return IdFilter(ids, faiss.IDSelectorBatch(ids.size, faiss.swig_ptr(ids)), (), version)


class IdSet:
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
        return sorted_member(self._base, ids) | sorted_member(self._recent, ids)

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


def sorted_member(sorted_ids: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Boolean mask: which of ``ids`` are in ``sorted_ids`` (sorted int64)."""
    if sorted_ids.size == 0:
        return np.zeros(ids.shape, dtype=bool)
    pos = np.minimum(np.searchsorted(sorted_ids, ids), sorted_ids.size - 1)
    return sorted_ids[pos] == ids


def as_ids(ids: np.ndarray, name: str) -> np.ndarray:
    """``ids`` as a contiguous 1-D int64 array (a scalar becomes one id); refuses other shapes and floats."""
    ids = np.asarray(ids)
    if ids.ndim == 0:
        ids = ids[None]
    if ids.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array, got shape {ids.shape}")
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
        raise TypeError(f"{name} must be integers (int64 region ids), got dtype {ids.dtype}")
    return np.ascontiguousarray(ids, dtype=np.int64)


def index_ids(index: faiss.Index) -> np.ndarray:
    """Ids held by a faiss index: an IVF's inverted lists (found inside any wrapper), else an IndexIDMap2's map."""
    ivf = faiss.try_extract_index_ivf(index)
    return faiss.vector_to_array(faiss.downcast_index(index).id_map) if ivf is None else ivf_ids(ivf)


def ivf_ids(ivf: faiss.IndexIVF) -> np.ndarray:
    """Ids in the inverted lists of ``ivf``, list by list."""
    invlists = ivf.invlists
    return np.concatenate([np.empty(0, dtype=np.int64)] + [
        faiss.rev_swig_ptr(invlists.get_ids(i), invlists.list_size(i)).copy()
        for i in range(invlists.nlist) if invlists.list_size(i)])
