"""Tests of the ``pqfs`` kind of the vector store: 4-bit PQ fast scan + fp16 re-rank."""
from __future__ import annotations

import numpy as np
import pytest

from indexer.vectors import VectorStore, VectorStoreSettings, bytes_per_vector
from tests.indexer.test_vectors import filled_store


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([np.intersect1d(f[f >= 0], t[t >= 0]).size / max((t >= 0).sum(), 1)
                          for f, t in zip(found, truth)]))


DIM = 128


@pytest.fixture(scope="module")
def random_data():
    """20k uniform random unit vectors (no neighbourhood structure), sparse 40-bit ids, 100 fresh queries."""
    rng = np.random.default_rng(11)
    n = 20_000
    vectors = _unit(rng.standard_normal((n, DIM)))
    ids = rng.choice(2**40, n, replace=False).astype(np.int64)
    queries = _unit(rng.standard_normal((100, DIM)))
    return ids, vectors, queries


@pytest.fixture(scope="module")
def exact(random_data):
    ids, vectors, _ = random_data
    return filled_store("flat", ids, vectors)


@pytest.fixture(scope="module")
def pqfs(random_data):
    ids, vectors, _ = random_data
    return filled_store("pqfs", ids, vectors)


def test_pqfs_recall_on_random_vectors(random_data, exact, pqfs):
    _, _, queries = random_data
    info = pqfs.info()
    assert info["kind"] == "pqfs" and info["nlist"] == round(20_000 ** 0.5)  # pqfs_lists_per_sqrt_n = 1
    assert info["k_factor"] >= 2 and 1 <= info["nprobe"] <= info["nlist"]
    assert info["calibrated_recall"] >= 0.95
    _, truth = exact.search(queries, 10)
    scores, found = pqfs.search(queries, 10)
    assert _recall(found, truth) >= 0.95
    # scores are the re-ranked (fp16) inner products, not PQ estimates
    np.testing.assert_allclose(scores, np.einsum("qkd,qd->qk", pqfs.reconstruct(found.ravel()).reshape(
        *found.shape, DIM), queries), atol=1e-5)
    assert (np.diff(scores, axis=1) <= 0).all()
    # the re-rank is what gets there: the calibrated scan alone (k_factor 1) falls well short
    pqfs._tuning["k_factor"] = 1
    try:
        assert _recall(pqfs.search(queries, 10)[1], truth) < 0.8
    finally:
        pqfs._tuning["k_factor"] = info["k_factor"]


def test_pqfs_reconstruct_and_memory_model(random_data, pqfs):
    ids, vectors, _ = random_data
    np.testing.assert_allclose(pqfs.reconstruct(ids[[5, 17, 19_999]]), vectors[[5, 17, 19_999]], atol=1e-3)
    with pytest.raises(KeyError):
        pqfs.reconstruct(np.array([12345], dtype=np.int64))
    # 4-bit codes (m = d/2 → d/4 bytes) + IVF id + fp16 copy + id map
    assert bytes_per_vector("pqfs", 432, VectorStoreSettings()) == 108 + 8 + 864 + 48
    assert bytes_per_vector("pqfs", 432, VectorStoreSettings(pqfs_m=108)) == 54 + 8 + 864 + 48
    assert pqfs.info()["bytes_estimate"] == 20_000 * (32 + 8 + 256 + 48)
    assert pqfs.info()["nlist"] == 141


@pytest.mark.parametrize("fraction", [0.2, 0.01])
def test_pqfs_allowed_ids(random_data, exact, pqfs, fraction):
    ids, _, queries = random_data
    allowed = ids[np.random.default_rng(5).random(ids.size) < fraction]
    scores, found = pqfs.search(queries, 10, allowed_ids=allowed)
    assert (found >= 0).all() and np.isin(found, allowed).all()
    assert (np.diff(scores, axis=1) <= 0).all()
    _, truth = exact.search(queries, 10, allowed_ids=allowed)
    assert _recall(found, truth) >= 0.95
    np.testing.assert_array_equal(pqfs.search(queries, 10, allowed_ids=pqfs.make_filter(allowed))[1], found)
    few = np.concatenate([ids[[3, 4000]], [123]])  # 123 is not stored
    scores, found = pqfs.search(queries[:4], 5, allowed_ids=few)
    assert (np.sort(found[:, :2], axis=1) == np.sort(ids[[3, 4000]])).all()
    assert (found[:, 2:] == -1).all() and np.isneginf(scores[:, 2:]).all()


def test_pqfs_remove_and_readd(random_data):
    ids, vectors, queries = random_data
    ids, vectors = ids[:5000], vectors[:5000]
    store = VectorStore.create(DIM, "pqfs")
    store.add(ids, vectors)
    _, before = store.search(queries, 5)
    gone = np.unique(before[:, 0])
    assert store.remove(np.concatenate([gone, [1, 2]])) == gone.size  # unknown ids ignored
    assert len(store) == 5000 - gone.size and store.info()["size"] == 5000 - gone.size
    assert not np.isin(store.ids(), gone).any()
    _, after = store.search(queries, 5)
    assert not np.isin(after, gone).any() and (after >= 0).all()
    with pytest.raises(KeyError):
        store.reconstruct(gone[:1])
    kept = ids[~np.isin(ids, gone)]
    np.testing.assert_allclose(store.reconstruct(kept[:3]), vectors[np.isin(ids, kept[:3])], atol=1e-3)
    # every stored vector is still its own nearest neighbour (lists that lost entries were re-encoded) ...
    sample = kept[::10]
    assert (store.search(store.reconstruct(sample), 1)[1][:, 0] == sample).all()
    # ... and so are vectors added back afterwards: faiss 1.15.1 corrupts codes added to a
    # fast-scan list after a removal from it, which pqfs avoids by re-encoding such lists
    back = np.flatnonzero(np.isin(ids, gone))
    store.add(ids[back], vectors[back])  # an id can come back after removal
    assert (store.search(vectors[back], 1)[1][:, 0] == ids[back]).all()
    assert (store.search(vectors[back], 10)[1][:, 0] == ids[back]).all()


def test_pqfs_save_load_round_trip(tmp_path, random_data):
    ids, vectors, queries = random_data
    store = VectorStore.create(DIM, "pqfs")
    store.add(ids[:6000], vectors[:6000])
    store.remove(ids[:50])
    path = tmp_path / "vectors.faiss"
    store.save(path)
    loaded = VectorStore.load(path)
    assert loaded.kind == "pqfs" and len(loaded) == len(store) == 5950
    np.testing.assert_array_equal(loaded.ids(), store.ids())
    assert loaded.info() == store.info()
    for allowed in (None, ids[100:6000:3]):
        expected = store.search(queries, 10, allowed_ids=allowed)
        got = loaded.search(queries, 10, allowed_ids=allowed)
        np.testing.assert_array_equal(got[1], expected[1])
        np.testing.assert_array_equal(got[0], expected[0])
    np.testing.assert_array_equal(loaded.reconstruct(ids[60:70]), store.reconstruct(ids[60:70]))
    loaded.add(ids[6000:6100], vectors[6000:6100])  # a loaded index stays writable
    assert loaded.search(vectors[6050], 1)[1][0, 0] == ids[6050]
    assert list(tmp_path.iterdir()) == [path]


def test_pqfs_rebuild_and_growth(random_data, exact):
    ids, vectors, queries = random_data
    store = VectorStore.create(DIM, "pqfs")
    store.add(ids[:4000], vectors[:4000])
    assert store.info()["nlist"] == round(4000 ** 0.5)
    store.add(ids[4000:20_000], vectors[4000:20_000])  # 5x growth: nlist more than doubles, retrained
    assert store.kind == "pqfs" and store.info()["nlist"] == round(20_000 ** 0.5) and len(store) == 20_000
    assert _recall(store.search(queries, 10)[1], exact.search(queries, 10)[1]) >= 0.95
    store.rebuild(index_type="flat")  # the fp16 copies carry over
    assert store.kind == "flat" and len(store) == 20_000
    np.testing.assert_allclose(store.reconstruct(ids[:50]), vectors[:50], atol=1e-3)


def test_pqfs_grows_from_tiny_batches(random_data, exact):
    """Region batches of a few images: the first trains on 5 vectors (fewer than a 4-bit
    codebook's 16 centroids), and the store must retrain as it grows."""
    ids, vectors, queries = random_data
    store = VectorStore.create(DIM, "pqfs")
    small = VectorStore.create(DIM, "flat")
    for start in range(0, 400, 5):
        store.add(ids[start:start + 5], vectors[start:start + 5])
        if start + 5 in (75, 400):
            small.add(ids[len(small):start + 5], vectors[len(small):start + 5])
            assert _recall(store.search(queries, 10)[1], small.search(queries, 10)[1]) >= 0.95
    assert len(store) == 400 and store.info()["calibration_queries"] == 200


def test_pqfs_k_factor_follows_growth(random_data):
    """Between retrainings the candidate count grows with the collection (k_factor is
    calibrated as a share of it): 5000 → 19,000 vectors without a rebuild."""
    ids, vectors, queries = random_data
    store = VectorStore.create(DIM, "pqfs", settings=VectorStoreSettings(pqfs_lists_per_sqrt_n=0.5))
    store.add(ids[:5000], vectors[:5000])
    info = store.info()
    assert info["calibrated_size"] == 5000
    store.add(ids[5000:19_000], vectors[5000:19_000])
    assert store.info()["nlist"] == info["nlist"] and store.info()["k_factor"] == info["k_factor"]  # no rebuild
    assert store._k_factor() == -(-info["k_factor"] * 19_000 // 5000)
    truth = ids[np.argsort(-(queries @ vectors[:19_000].T), axis=1)[:, :10]]
    assert _recall(store.search(queries, 10)[1], truth) >= 0.95
