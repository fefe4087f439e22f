"""The IVF family: ``IVF{nlist},Flat`` (ivf), ``,SQ8`` (ivfsq), ``,PQ{m}`` (ivfpq), or any IVF factory string.

One kind for all: they differ only by the codec in their factory string. Ids are
native (the inverted lists keep region ids), so ids are removed in place. The
index needs training (spherical k-means, ``train_ivf``) before its first vector;
nprobe is calibrated after each build and saved inside the faiss file too. From
``hnsw_quantizer_min_lists`` lists on, vectors are assigned to lists through an
HNSW graph over the centroids (``_HNSW32`` coarse quantizer), whose beam each
search passes (``ivf_params``). Everything here goes through faiss's generic
``extract_index_ivf``, so these functions serve any index with an IVF inside
(``pqfs`` included).
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import faiss
import numpy as np

from .calibration import LeaveOneOut, calibrate_width, geometric, tuning
from .ids import ivf_ids
from .kind import Chunks, InMemoryKind, Searcher, Widths, omp_threads, plain_searcher
from .planning import IndexPlan, VectorStoreSettings, pq_bytes

log = logging.getLogger(__name__)


class IVFKind(InMemoryKind):
    exact = False
    removes = True
    exact_subsets = False
    gpu = True

    def __init__(self, settings: VectorStoreSettings, name: str = "ivf"):
        self.settings = settings
        self.name = name  # ivf | ivfsq | ivfpq | factory

    def new_index(self, plan: IndexPlan, dim: int) -> faiss.Index:
        if plan.kind == "factory":
            return faiss.index_factory(dim, plan.factory, faiss.METRIC_INNER_PRODUCT)
        codec = {"ivf": "Flat", "ivfsq": "SQ8", "ivfpq": f"PQ{pq_bytes(dim, self.settings)}"}[plan.kind]
        index = new_ivf(dim, plan.nlist, codec, self.settings)
        if plan.kind == "ivfsq":
            sq = faiss.downcast_index(faiss.extract_index_ivf(index)).sq
            sq.rangestat, sq.rangestat_arg = faiss.ScalarQuantizer.RS_minmax, self.settings.sq_range_margin
        return index

    def add(self, index: faiss.Index, vectors: np.ndarray, ids: np.ndarray) -> None:
        index.add_with_ids(vectors, ids)

    def remove(self, index: faiss.Index, ids: np.ndarray) -> int:
        return index.remove_ids(faiss.IDSelectorBatch(ids.size, faiss.swig_ptr(ids)))

    def reconstruct(self, index: faiss.Index, ids: np.ndarray) -> np.ndarray:
        """O(n): IVF indexes keep no id → position map between calls."""
        with _direct_map(index):
            return index.reconstruct_batch(ids)

    def stored(self, index: faiss.Index, hidden: np.ndarray, chunk: int) -> Chunks:
        ids = np.sort(ivf_ids(faiss.extract_index_ivf(index)))
        with _direct_map(index):
            for start in range(0, ids.size, chunk):
                part = ids[start:start + chunk]
                yield part, index.reconstruct_batch(part)

    def calibrate(self, index: faiss.Index, sample: LeaveOneOut, target: float) -> dict:
        ivf = faiss.extract_index_ivf(index)
        value, recall = calibrate_width(index, self.name, "nprobe", nprobe_values(ivf),
                                        lambda v: ivf_params(ivf, v), sample, target)
        ivf.nprobe = value  # saved inside the faiss file too
        if ivf.nlist >= 64 and 2 * value >= ivf.nlist:
            log.warning("%s index needs nprobe=%d of %d lists for recall@10 %.3f: these descriptors have "
                        "little neighbourhood structure, index_type='pqfs' scans them faster", self.name, value,
                        ivf.nlist, recall)
        return tuning("nprobe", value, recall, sample)

    def widths(self, index: faiss.Index, tuning: dict, n: int) -> Widths:
        ivf = faiss.extract_index_ivf(index)
        return Widths(int(tuning.get("nprobe") or ivf.nprobe), ivf.nlist)

    def searcher(self, index: faiss.Index, queries: np.ndarray, k: int, selector: faiss.IDSelector | None,
                 widths: Widths, restricted: bool) -> Searcher:
        ivf = faiss.extract_index_ivf(index)
        return plain_searcher(index, queries, k, lambda width: ivf_params(ivf, width), selector)

    def needs_rebuild(self, tuning: dict, n: int) -> bool:
        return False


def new_ivf(dim: int, nlist: int, codec: str, settings: VectorStoreSettings) -> faiss.Index:
    """An untrained ``IVF{nlist}[_HNSW32],{codec}`` index: spherical k-means of ``kmeans_iters`` iterations."""
    coarse = f"IVF{nlist}" + ("_HNSW32" if nlist >= settings.hnsw_quantizer_min_lists else "")
    index = faiss.index_factory(dim, f"{coarse},{codec}", faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.extract_index_ivf(index)
    if isinstance(faiss.downcast_index(ivf.quantizer), faiss.IndexHNSW):
        # beam used when assigning added vectors to lists; searches pass their own
        faiss.downcast_index(ivf.quantizer).hnsw.efSearch = 64
    ivf.cp.niter = settings.kmeans_iters
    ivf.cp.spherical = True  # unit-norm centroids, so inner-product assignment is not biased by norm
    return index


def train_ivf(index: faiss.Index, sample: np.ndarray, settings: VectorStoreSettings, use_gpu: bool) -> None:
    """Train the IVF inside ``index`` (and its codec) on ``sample``."""
    ivf = faiss.extract_index_ivf(index)
    dim = sample.shape[1]
    # k-means assignment is the dominant training cost (n_train · nlist · d per iteration):
    # on the GPU when there is one, else through an HNSW graph over the centroids
    # once nlist is large (approximate assignments barely change IVF lists).
    assigner = None
    if use_gpu:
        try:
            assigner = faiss.index_cpu_to_all_gpus(faiss.IndexFlatL2(dim))
        except (AttributeError, RuntimeError) as exc:
            log.warning("GPU k-means unavailable (%s); training on the CPU", exc)
    if assigner is None and ivf.nlist >= settings.hnsw_quantizer_min_lists:
        assigner = faiss.IndexHNSWFlat(dim, 32)
    if assigner is not None:
        ivf.clustering_index = assigner
    # pqfs trains m/2 tiny 16-centroid k-means whose OpenMP regions only add barrier waits.
    threads = omp_threads(1) if isinstance(index, faiss.IndexRefine) else contextlib.nullcontext()
    scan = faiss.downcast_index(ivf)
    if isinstance(scan, faiss.IndexIVFPQ):
        # faiss's factory turns on polysemous training (re-ordering codes for Hamming
        # filtering, which searches here never use); it took minutes. Also for factory strings.
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


def ivf_params(ivf: faiss.IndexIVF, width: int) -> faiss.SearchParametersIVF:
    """Search parameters probing ``width`` lists, with a beam for an HNSW centroid graph when there is one."""
    params = faiss.SearchParametersIVF(nprobe=int(width))
    if isinstance(faiss.downcast_index(ivf.quantizer), faiss.IndexHNSW):
        # the centroid graph must return at least nprobe lists
        quantizer_params = faiss.SearchParametersHNSW(efSearch=max(2 * int(width), 64))
        params.quantizer_params = quantizer_params
        params.keepalive = quantizer_params  # SWIG holds a raw pointer
    return params


def nprobe_values(ivf: faiss.IndexIVF) -> list[int]:
    """The nprobe values calibration tries, ascending."""
    return sorted({min(v, ivf.nlist) for v in geometric(ivf.nlist)})


@contextlib.contextmanager
def _direct_map(index: faiss.Index) -> Iterator[None]:
    """IVF lists are unordered: a temporary id → (list, offset) hash table makes ids addressable."""
    ivf = faiss.extract_index_ivf(index)
    ivf.set_direct_map_type(faiss.DirectMap.Hashtable)
    try:
        yield
    finally:
        ivf.set_direct_map_type(faiss.DirectMap.NoMap)
