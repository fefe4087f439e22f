"""The on-disk kind: ``IVF{nlist},Flat`` whose inverted lists live in a memory-mapped ``.ivfdata`` file.

For indexes larger than memory: the codes and ids of the inverted lists sit in
``<store>.<generation>.ivfdata`` beside the store file (``faiss.OnDiskInvertedLists``),
paged in by the kernel as searches touch them; the process keeps only the
centroids, the list table and the store's id set (8 bytes per vector). Searches,
filters and calibration are the IVF kind's. A store file never changes the data
file it names (its lists are read-only, faiss refuses changes to them): the
first add or remove after a load or save copies the lists
into a new generation file (``faiss`` ``merge_from_multiple``, one sequential
pass) and changes that copy in place, removals included (no tombstones); the
next save flushes it, writes the store file naming it and deletes the older
generations, so a kill at any point leaves the last saved index intact. Until
its first save a new index holds its lists in memory. ``merge_shards`` merges
shard indexes written from the same trained empty index (as
``faiss.contrib.ondisk.merge_ondisk`` does); ``trained_empty`` gives that index.
"""
from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import sys
import uuid
from pathlib import Path
from typing import Iterator, Sequence

import faiss

from .ids import ivf_ids
from .ivf import IVFKind, new_ivf
from .planning import IndexPlan, VectorStoreSettings

log = logging.getLogger(__name__)

# faiss starts this many threads per search to read the probed lists ahead (default 32): they cost more than
# they saved, warm or cold (docs/benchmarks.md, "On-disk index").
_PREFETCH_THREADS = 0
_MADV_NORMAL, _MADV_RANDOM = 0, 1  # Linux


class OnDiskKind(IVFKind):
    gpu = False
    io_flags = faiss.IO_FLAG_SKIP_IVF_DATA  # the lists are mapped by ``opened``, from the store's folder

    def __init__(self, settings: VectorStoreSettings):
        super().__init__(settings, "ondisk")

    def new_index(self, plan: IndexPlan, dim: int) -> faiss.Index:
        return new_ivf(dim, plan.nlist, "Flat", self.settings)

    def add(self, index: faiss.Index, vectors, ids) -> None:
        with _quiet():
            _writable(index)
            index.add_with_ids(vectors, ids)

    def remove(self, index: faiss.Index, ids) -> int:
        with _quiet():
            _writable(index)
            return super().remove(index, ids)

    def persist(self, index: faiss.Index, path: Path) -> None:
        lists = on_disk_lists(index)
        if lists is None:  # first save: the lists leave memory
            _move_lists(index, _new_file(path.parent, path.stem))
            return
        if Path(lists.filename).parent != path.parent:  # saved into another folder: it gets its own copy
            _move_lists(index, _new_file(path.parent, path.stem))
        elif not lists.read_only:
            _fsync(lists.filename)

    def committed(self, index: faiss.Index, path: Path) -> None:
        lists = on_disk_lists(index)
        current = Path(lists.filename).name if lists is not None else None
        for stale in path.parent.glob(f"{path.stem}.*.ivfdata"):
            if stale.name != current:
                stale.unlink(missing_ok=True)
        if lists is not None:
            lists.read_only = True  # named by the store file now: faiss refuses changes, ``_writable`` copies

    def opened(self, index: faiss.Index, path: Path) -> None:
        lists = on_disk_lists(index)
        if lists is None:
            return
        lists.filename = str(path.parent / Path(lists.filename).name)  # the folder may have moved
        lists.read_only = True  # mapped read-only: changes go to a private copy (``_writable``)
        lists.prefetch_nthread = _PREFETCH_THREADS
        lists.do_mmap()
        _advise(lists, _MADV_RANDOM)  # the store reads every list's ids next: page them in alone
        ivf_ids(faiss.extract_index_ivf(index))
        _advise(lists, _MADV_NORMAL)  # then read lists ahead as searches scan them


def on_disk_lists(index: faiss.Index) -> faiss.OnDiskInvertedLists | None:
    """The memory-mapped inverted lists of ``index``, ``None`` while they are held in memory."""
    lists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(index).invlists)
    return lists if isinstance(lists, faiss.OnDiskInvertedLists) else None


def trained_empty(index: faiss.Index) -> faiss.Index:
    """An empty copy of the trained ``index`` (same quantizer and codec, lists in memory): shards start from it."""
    ivf = faiss.extract_index_ivf(index)
    saved, owned, ntotal = ivf.invlists, ivf.own_invlists, index.ntotal
    empty = faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size)
    ivf.own_invlists = False  # swapped out for the copy only (replace_invlists deletes owned lists)
    ivf.replace_invlists(empty, False)
    index.ntotal = ivf.ntotal = 0
    try:
        copy = faiss.clone_index(index)
    finally:
        ivf.replace_invlists(saved, owned)
        index.ntotal = ivf.ntotal = ntotal
    return copy


def merge_shards(index: faiss.Index, shard_fnames: Sequence[str | os.PathLike], directory: Path,
                 stem: str) -> faiss.Index:
    """A new index holding the lists of ``index`` and of the shard files, merged into a new generation file
    ``directory/stem.*.ivfdata``; every shard must come from ``trained_empty(index)`` and hold ids
    ``index`` does not.

    ``faiss.contrib.ondisk.merge_ondisk`` with the lists of ``index`` as one more input (faiss 1.15 crashes
    merging from an on-disk index read back from a file, so they are passed as they are mapped here).
    """
    shards = [faiss.read_index(str(f), faiss.IO_FLAG_MMAP) for f in shard_fnames]  # kept alive while merged
    merged = trained_empty(index)
    _replace_lists(merged, [faiss.extract_index_ivf(i).invlists for i in [index] + shards],
                   _new_file(directory, stem))
    return merged


def _writable(index: faiss.Index) -> None:
    """Before a change: lists named by a saved store file are copied to a new generation, changed from then on."""
    lists = on_disk_lists(index)
    if lists is None or not lists.read_only:
        return
    path = Path(lists.filename)
    _move_lists(index, _new_file(path.parent, path.name.split(".")[0]))


def _move_lists(index: faiss.Index, target: Path) -> None:
    """Copy the lists of ``index`` into a new file ``target`` (compacted) and use them from there."""
    _replace_lists(index, [faiss.extract_index_ivf(index).invlists], target)


def _replace_lists(index: faiss.Index, sources: list[faiss.InvertedLists], target: Path) -> None:
    """Give ``index`` new lists in the file ``target``: the entries of ``sources``, list by list."""
    ivf = faiss.extract_index_ivf(index)
    with _quiet():
        lists = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, str(target))
        if sum(source.compute_ntotal() for source in sources):
            inputs = faiss.InvertedListsPtrVector()
            for source in sources:
                inputs.push_back(source)
            lists.merge_from_multiple(inputs.data(), inputs.size(), False)
        else:  # faiss cannot map an empty file: one slot, left empty
            lists.resize(0, 1)
            lists.resize(0, 0)
    lists.prefetch_nthread = _PREFETCH_THREADS
    ntotal = lists.compute_ntotal()
    ivf.replace_invlists(lists, True)  # deletes the lists it owned (sources[0] when moving)
    lists.this.disown()  # owned by the index now
    index.ntotal = ivf.ntotal = ntotal


def _new_file(directory: Path, stem: str) -> Path:
    return Path(directory).resolve() / f"{stem}.{uuid.uuid4().hex[:12]}.ivfdata"


def _fsync(filename: str) -> None:
    """The mapped pages written through the mapping reach the disk (one page cache: the descriptor sees them)."""
    fd = os.open(filename, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _advise(lists: faiss.OnDiskInvertedLists, advice: int) -> None:
    """madvise the mapping: with the kernel's read-around, loading the ids maps most of the file; without it,
    searches read lists a page at a time (docs/benchmarks.md, "On-disk index")."""
    if lists.totsize:
        ctypes.CDLL(None).madvise(ctypes.c_void_p(int(lists.ptr)), ctypes.c_size_t(lists.totsize), advice)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence faiss's unconditional "resizing FILE" printf, which would mix into a command's stdout (--json)."""
    libc = ctypes.CDLL(None)
    sys.stdout.flush()
    libc.fflush(None)
    saved = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    try:
        yield
    finally:
        libc.fflush(None)
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)
