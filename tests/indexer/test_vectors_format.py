"""The vector store's file format, written here with faiss calls alone (no store code).

A file is b"HASSODVS", the header length (little-endian u64), a JSON header,
the tombstoned ids (little-endian int64) and the faiss index. Files of every
kind in that layout — as every earlier version of the store wrote them — must
load, answer searches from their faiss index, and be written back byte for byte.
"""
from __future__ import annotations

import dataclasses
import json
import struct

import faiss
import numpy as np
import pytest

from indexer.vectors import VectorStore, VectorStoreSettings

DIM, N = 16, 600
IP = faiss.METRIC_INNER_PRODUCT


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(2)
    vectors = rng.standard_normal((N, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = rng.choice(2**40, N, replace=False).astype(np.int64)
    return ids, vectors


def _ivf(factory: str, vectors: np.ndarray, ids: np.ndarray) -> faiss.Index:
    index = faiss.index_factory(DIM, factory, IP)
    index.train(vectors)
    index.add_with_ids(vectors, ids)
    faiss.extract_index_ivf(index).nprobe = faiss.extract_index_ivf(index).nlist  # exhaustive: exact ranks
    return index


def _pqfs(vectors: np.ndarray, ids: np.ndarray) -> faiss.Index:
    scan = faiss.index_factory(DIM, "IVF4,PQ8x4fs", IP)
    faiss.extract_index_ivf(scan).by_residual = False
    refine = faiss.IndexIDMap2(faiss.IndexScalarQuantizer(DIM, faiss.ScalarQuantizer.QT_fp16, IP))
    index = faiss.IndexRefine(scan, refine)
    index.train(vectors)
    scan.add_with_ids(vectors, ids)
    refine.add_with_ids(vectors, ids)
    index.ntotal = scan.ntotal
    faiss.extract_index_ivf(scan).nprobe = 4
    index.k_factor = 8
    return index


def _idmap(inner: faiss.Index, vectors: np.ndarray, ids: np.ndarray) -> faiss.Index:
    index = faiss.IndexIDMap2(inner)
    index.add_with_ids(vectors, ids)
    return index


# kind, index_type, nlist, tuning, faiss index maker, tombstones (positions)
CASES = {
    "flat": ("flat", 0, {}, lambda v, i: _idmap(faiss.IndexFlatIP(DIM), v, i), 0),
    "ivf": ("ivf", 4, {"nprobe": 4, "calibrated_recall": 1.0, "calibration_queries": 200},
            lambda v, i: _ivf("IVF4,Flat", v, i), 0),
    "ivfsq": ("ivfsq", 4, {"nprobe": 4, "calibrated_recall": 0.99, "calibration_queries": 200},
              lambda v, i: _ivf("IVF4,SQ8", v, i), 0),
    "ivfpq": ("ivfpq", 4, {"nprobe": 4, "calibrated_recall": 0.8, "calibration_queries": 200},
              lambda v, i: _ivf("IVF4,PQ4", v, i), 0),
    "hnsw": ("hnsw", 0, {"ef_search": 64, "calibrated_recall": 1.0, "calibration_queries": 200},
             lambda v, i: _idmap(faiss.IndexHNSWFlat(DIM, 32, IP), v, i), 7),
    "pqfs": ("pqfs", 4, {"nprobe": 4, "k_factor": 8, "calibrated_recall": 0.99, "calibration_queries": 200,
                         "calibrated_size": N}, _pqfs, 0),
    "factory": ("IVF4,SQ8", 0, {"nprobe": 4, "calibrated_recall": 0.99, "calibration_queries": 200},
                lambda v, i: _ivf("IVF4,SQ8", v, i), 0),
}


def _write(path, kind, index_type, nlist, tuning, index, tombstones, size):
    header = json.dumps({
        "format": 1, "dim": DIM, "index_type": index_type, "expected_size": None,
        "plan": None if index is None else {"kind": kind, "nlist": nlist,
                                            "factory": index_type if kind == "factory" else None},
        "tuning": tuning, "settings": dataclasses.asdict(VectorStoreSettings()),
        "size": size, "tombstones": int(tombstones.size),
    }).encode()
    with open(path, "wb") as f:
        f.write(b"HASSODVS" + struct.pack("<Q", len(header)) + header)
        f.write(tombstones.astype("<i8").tobytes())
        if index is not None:
            faiss.write_index(index, faiss.PyCallbackIOWriter(f.write))


@pytest.mark.parametrize("kind", list(CASES))
def test_files_of_every_kind_load_search_and_save_unchanged(tmp_path, data, kind):
    ids, vectors = data
    index_type, nlist, tuning, make, n_hidden = CASES[kind]
    index = make(vectors, ids)
    hidden = np.sort(ids[:n_hidden])
    path = tmp_path / "vectors.faiss"
    _write(path, kind, index_type, nlist, tuning, index, hidden, N - n_hidden)

    store = VectorStore.load(path)
    assert store.kind == kind and store.index_type == index_type and len(store) == N - n_hidden
    np.testing.assert_array_equal(store.ids(), np.sort(ids[n_hidden:]))
    info = store.info()
    assert info["nlist"] == (nlist or (4 if kind == "factory" else 0))
    assert {key: info[key] for key in tuning} == tuning
    # answers come from the faiss index as written: an exact kind (or an exhaustive probe) finds each
    # stored vector first; removed (tombstoned) ids never come back
    queries = vectors[n_hidden:n_hidden + 50]
    _, found = store.search(queries, 5)
    own = ids[n_hidden:n_hidden + 50]
    if kind != "ivfpq":  # 4-byte PQ codes are too rough for that
        assert (found[:, 0] == own).mean() >= 0.98
    assert not np.isin(found, hidden).any() and (found >= 0).all()
    _, restricted = store.search(queries, 5, allowed_ids=ids[n_hidden::2])
    assert np.isin(restricted, ids[n_hidden::2]).all() and (restricted >= 0).all()
    if kind in ("flat", "ivf", "hnsw"):
        np.testing.assert_array_equal(store.reconstruct(own), vectors[n_hidden:n_hidden + 50])

    resaved = tmp_path / "again.faiss"
    store.save(resaved)
    assert resaved.read_bytes() == path.read_bytes()


def test_a_file_without_an_index_loads_empty(tmp_path):
    path = tmp_path / "vectors.faiss"
    _write(path, None, "ivf", 0, {}, None, np.empty(0, dtype=np.int64), 0)
    store = VectorStore.load(path)
    assert store.kind is None and len(store) == 0 and store.index_type == "ivf"
    store.save(tmp_path / "again.faiss")
    assert (tmp_path / "again.faiss").read_bytes() == path.read_bytes()
