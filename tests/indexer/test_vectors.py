"""Tests of the FAISS vector store (indexer/vectors.py)."""
from __future__ import annotations

import faiss
import numpy as np
import pytest

from indexer.vectors import IdFilter, VectorStore, VectorStoreSettings, choose_kind, choose_nlist


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([np.intersect1d(f[f >= 0], t[t >= 0]).size / max((t >= 0).sum(), 1)
                          for f, t in zip(found, truth)]))


@pytest.fixture(scope="module")
def clustered():
    """20k unit vectors in 200 clusters, sparse 40-bit region ids, 100 held-out queries."""
    rng = np.random.default_rng(7)
    dim, n = 64, 20_000
    centres = _unit(rng.standard_normal((200, dim)))
    labels = rng.integers(0, 200, n)
    vectors = _unit(centres[labels] + 0.12 * rng.standard_normal((n, dim)))
    ids = rng.choice(2**40, n, replace=False).astype(np.int64)
    queries = _unit(centres[rng.integers(0, 200, 100)] + 0.12 * rng.standard_normal((100, dim)))
    return ids, vectors, labels, queries


def filled_store(kind: str, ids: np.ndarray, vectors: np.ndarray) -> VectorStore:
    """A new store of ``kind`` holding ``vectors`` under ``ids`` (also used by test_vectors_pqfs)."""
    store = VectorStore.create(vectors.shape[1], kind)
    store.add(ids, vectors)
    return store


@pytest.fixture(scope="module")
def flat_store(clustered):
    return filled_store("flat", *clustered[:2])


@pytest.fixture(scope="module")
def ivf_store(clustered):
    return filled_store("ivf", *clustered[:2])


@pytest.fixture(scope="module")
def pqfs_store(clustered):
    return filled_store("pqfs", *clustered[:2])


def test_exact_search_hand_made_vectors():
    # Region ids are large and non-contiguous: they must come back verbatim.
    ids = np.array([9_000_000_000_123, 5, 77_777_777_777, 2**62], dtype=np.int64)
    vectors = np.array([[1, 0, 0], [0, 1, 0], [0.6, 0.8, 0], [0, 0, 1]], dtype=np.float32)
    store = VectorStore.create(3, "flat")
    store.add(ids, vectors)
    query = np.array([[0.8, 0.6, 0.0]], dtype=np.float32)
    scores, found = store.search(query, 3)
    np.testing.assert_array_equal(found[0], [77_777_777_777, 9_000_000_000_123, 5])  # 0.96, 0.8, 0.6
    np.testing.assert_allclose(scores[0], [0.96, 0.8, 0.6], atol=1e-6)
    assert store.search(query, 10)[1][0, 4:].tolist() == [-1] * 6  # k > n: padded
    assert np.isneginf(store.search(query, 10)[0][0, 4:]).all()
    assert len(store) == 4 and store.ids().tolist() == sorted(ids.tolist())


def test_exact_search_matches_brute_force(clustered, flat_store):
    ids, vectors, _, queries = clustered
    scores, found = flat_store.search(queries, 10)
    brute = queries @ vectors.T
    order = np.argsort(-brute, axis=1)[:, :10]
    np.testing.assert_array_equal(found, ids[order])
    np.testing.assert_allclose(scores, np.take_along_axis(brute, order, axis=1), atol=1e-5)


def test_pqfs_recall_against_flat_on_clustered_data(clustered, flat_store, pqfs_store):
    _, _, _, queries = clustered
    info = pqfs_store.info()
    assert info["kind"] == "pqfs" and info["calibrated_recall"] >= 0.95
    _, truth = flat_store.search(queries, 10)
    assert _recall(pqfs_store.search(queries, 10)[1], truth) >= 0.95


def test_ivf_recall_against_flat(clustered, flat_store, ivf_store):
    _, _, _, queries = clustered
    assert ivf_store.kind == "ivf"
    info = ivf_store.info()
    assert info["nlist"] == 20_000 // 39  # 4·√n capped by 39 training vectors per list
    assert info["calibrated_recall"] >= 0.95
    _, truth = flat_store.search(queries, 10)
    _, found = ivf_store.search(queries, 10)
    assert _recall(found, truth) >= 0.95


@pytest.mark.parametrize("store_name", ["flat_store", "ivf_store", "pqfs_store"])
@pytest.mark.parametrize("filter_name", ["cluster", "random"])
def test_allowed_ids_returns_k_allowed_results(request, clustered, flat_store, store_name, filter_name):
    ids, _, labels, queries = clustered
    store = request.getfixturevalue(store_name)
    rng = np.random.default_rng(3)
    # "cluster": a level-like filter correlated with the descriptor; "random": uncorrelated.
    mask = labels % 3 == 0 if filter_name == "cluster" else rng.random(ids.size) < 0.2
    allowed = ids[mask]
    scores, found = store.search(queries, 10, allowed_ids=allowed)
    assert (found >= 0).all()  # k results, not k results filtered down to fewer
    assert np.isin(found, allowed).all()
    assert (np.diff(scores, axis=1) <= 1e-6).all()
    _, truth = flat_store.search(queries, 10, allowed_ids=allowed)
    assert _recall(found, truth) >= (1.0 if store_name == "flat_store" else 0.9)
    # a prepared filter gives the same answer
    assert np.array_equal(store.search(queries, 10, allowed_ids=store.make_filter(allowed))[1], found)


@pytest.mark.parametrize("store_name", ["flat_store", "ivf_store", "pqfs_store"])
def test_allowed_ids_fewer_than_k(request, clustered, store_name):
    ids, _, _, queries = clustered
    store = request.getfixturevalue(store_name)
    allowed = np.concatenate([ids[[10, 2000, 15000]], [123]])  # 123 is not stored
    scores, found = store.search(queries[:5], 6, allowed_ids=allowed)
    assert (np.sort(found[:, :3], axis=1) == np.sort(ids[[10, 2000, 15000]])).all()
    assert (found[:, 3:] == -1).all() and np.isneginf(scores[:, 3:]).all()
    empty_scores, empty = store.search(queries[:2], 4, allowed_ids=np.array([123, 456]))
    assert (empty == -1).all()


def test_dense_ids_bitmap_filter_equals_hash_filter(clustered):
    _, vectors, labels, queries = clustered
    dense = np.arange(vectors.shape[0], dtype=np.int64)  # catalog autoincrement ids
    store = VectorStore.create(vectors.shape[1], "ivf")
    store.add(dense, vectors)
    allowed = dense[labels % 4 == 1]
    bitmap = store.make_filter(allowed)
    assert isinstance(bitmap.selector, faiss.IDSelectorBitmap)
    hashed = IdFilter(bitmap.ids, faiss.IDSelectorBatch(bitmap.ids.size, faiss.swig_ptr(bitmap.ids)), (),
                      bitmap.version)
    np.testing.assert_array_equal(store.search(queries, 10, allowed_ids=bitmap)[1],
                                  store.search(queries, 10, allowed_ids=hashed)[1])
    assert np.isin(store.search(queries, 10, allowed_ids=bitmap)[1], allowed).all()


@pytest.mark.parametrize("index_type", ["flat", "ivf", "hnsw", "pqfs", "ondisk"])
def test_remove(clustered, index_type):
    ids, vectors, _, queries = clustered
    ids, vectors = ids[:5000], vectors[:5000]
    store = VectorStore.create(vectors.shape[1], index_type)
    store.add(ids, vectors)
    _, before = store.search(queries, 5)
    gone = np.unique(before[:, 0])
    assert store.remove(np.concatenate([gone, [1, 2]])) == gone.size  # unknown ids ignored
    assert len(store) == 5000 - gone.size
    assert not np.isin(store.ids(), gone).any()
    _, after = store.search(queries, 5)
    assert not np.isin(after, gone).any() and (after >= 0).all()
    store.add(gone[:1], vectors[np.flatnonzero(ids == gone[0])])  # an id can come back after removal
    assert store.contains(gone[:1]).all()


@pytest.mark.parametrize("index_type", ["flat", "ivf", "hnsw", "pqfs"])
def test_save_load_round_trip(tmp_path, clustered, index_type):
    ids, vectors, labels, queries = clustered
    store = VectorStore.create(vectors.shape[1], index_type)
    store.add(ids[:6000], vectors[:6000])
    store.remove(ids[:50])
    path = tmp_path / "vectors.faiss"
    store.save(path)
    loaded = VectorStore.load(path)
    assert loaded.kind == index_type and len(loaded) == len(store) == 5950
    np.testing.assert_array_equal(loaded.ids(), store.ids())
    assert loaded.info() == store.info()
    for allowed in (None, ids[:6000][labels[:6000] % 2 == 0]):
        expected = store.search(queries, 10, allowed_ids=allowed)
        got = loaded.search(queries, 10, allowed_ids=allowed)
        np.testing.assert_array_equal(got[1], expected[1])
        np.testing.assert_array_equal(got[0], expected[0])
    assert list(tmp_path.iterdir()) == [path]


def test_atomic_save_keeps_previous_file(tmp_path, clustered, monkeypatch):
    ids, vectors, _, queries = clustered
    path = tmp_path / "vectors.faiss"
    store = VectorStore.create(vectors.shape[1], "flat")
    store.add(ids[:100], vectors[:100])
    store.save(path)
    expected = store.search(queries, 5)
    store.add(ids[100:200], vectors[100:200])

    real_write = faiss.write_index

    def crash_midway(index, writer):
        real_write(index, writer)  # the new index reaches the temp file, then the disk fills up
        raise OSError("disk full")

    monkeypatch.setattr(faiss, "write_index", crash_midway)
    with pytest.raises(OSError, match="disk full"):
        store.save(path)
    assert list(tmp_path.iterdir()) == [path]  # temp file cleaned up
    previous = VectorStore.load(path)
    assert len(previous) == 100
    np.testing.assert_array_equal(previous.search(queries, 5)[1], expected[1])
    monkeypatch.undo()
    store.save(path)
    assert len(VectorStore.load(path)) == 200


def test_auto_selection_and_growth(clustered):
    ids, vectors, _, queries = clustered
    assert choose_kind(10_000, 256, VectorStoreSettings()) == "flat"
    assert choose_kind(1_000_000, 256, VectorStoreSettings(memory_budget_bytes=8 << 30)) == "ivf"
    assert choose_kind(10_000_000, 256, VectorStoreSettings(memory_budget_bytes=8 << 30)) == "ivfsq"
    assert choose_kind(100_000_000, 256, VectorStoreSettings(memory_budget_bytes=8 << 30)) == "ivfpq"

    settings = VectorStoreSettings(flat_threshold=4000)
    store = VectorStore.create(vectors.shape[1], settings=settings)
    store.add(ids[:3000], vectors[:3000])
    assert store.kind == "flat"
    store.add(ids[3000:5000], vectors[3000:5000])  # crosses the threshold: retrained as IVF
    assert store.kind == "ivf" and store.info()["nlist"] == 5000 // 39
    store.add(ids[5000:20000], vectors[5000:20000])  # 4x growth: nlist (at least) doubles, retrained again
    assert store.info()["nlist"] == 20_000 // 39
    assert choose_nlist(1_000_000, 1_000_000, settings) == 4000
    np.testing.assert_array_equal(store.ids(), np.sort(ids))
    exact = VectorStore.create(vectors.shape[1], "flat")
    exact.add(ids, vectors)
    assert _recall(store.search(queries, 10)[1], exact.search(queries, 10)[1]) >= 0.95

    big = VectorStore.create(vectors.shape[1], expected_size=20_000, settings=settings)
    big.add(ids, vectors)  # one large first batch trains directly
    assert big.kind == "ivf"


def test_factory_string_and_errors(clustered):
    ids, vectors, _, queries = clustered
    store = VectorStore.create(vectors.shape[1], "IVF32,SQ8")
    store.add(ids[:4000], vectors[:4000])
    assert store.kind == "factory" and store.info()["nlist"] == 32
    with pytest.raises(ValueError, match="IVF index"):
        VectorStore.create(64, "HNSW32")
    with pytest.raises(ValueError, match="neither"):
        VectorStore.create(64, "nonsense")

    empty = VectorStore.create(64)
    scores, found = empty.search(queries[:2], 3)
    assert found.shape == (2, 3) and (found == -1).all() and np.isneginf(scores).all()
    with pytest.raises(ValueError, match=r"shape \(n, 64\)"):
        store.search(queries[:, :32], 3)
    with pytest.raises(ValueError, match=r"shape \(n, 64\)"):
        empty.add(ids[:2], vectors[:2, :10])
    with pytest.raises(TypeError, match="floating"):
        store.search((queries * 100).astype(np.int32), 3)
    with pytest.raises(TypeError, match="integers"):
        empty.add(ids[:2].astype(np.float64), vectors[:2])
    with pytest.raises(ValueError, match="L2-normalised"):
        empty.add(ids[:2], vectors[:2] * 2)
    with pytest.raises(ValueError, match="already stored"):
        store.add(ids[:2], vectors[:2])
    with pytest.raises(ValueError, match="duplicate"):
        empty.add(np.array([5, 5]), vectors[:2])
    with pytest.raises(ValueError, match="k must be"):
        store.search(queries, 0)
    with pytest.raises(ValueError, match="not a hassod vector store"):
        VectorStore.load(__file__)
    # float64 input is accepted and converted; a single vector is one query
    np.testing.assert_array_equal(store.search(queries[0].astype(np.float64), 3)[1], store.search(queries[:1], 3)[1])


def test_no_rebuild_when_shrinking_under_threshold(clustered):
    ids, vectors, _, _ = clustered
    store = VectorStore.create(vectors.shape[1], settings=VectorStoreSettings(flat_threshold=4000))
    store.add(ids[:5000], vectors[:5000])
    assert store.kind == "ivf"
    store.remove(ids[:2000])
    store.add(ids[5000:5010], vectors[5000:5010])
    assert store.kind == "ivf" and not store.needs_rebuild() and len(store) == 3010
    store.rebuild(index_type="flat")  # an explicit switch still works
    assert store.kind == "flat" and len(store) == 3010
    np.testing.assert_array_equal(store.ids(), np.sort(np.concatenate([ids[2000:5000], ids[5000:5010]])))


@pytest.mark.parametrize("exact_filter_max", [20_000, 0])
def test_hnsw_allowed_ids(clustered, exact_filter_max):
    ids, vectors, labels, queries = clustered
    ids, vectors, labels = ids[:5000], vectors[:5000], labels[:5000]
    store = VectorStore.create(vectors.shape[1], "hnsw", settings=VectorStoreSettings(exact_filter_max=exact_filter_max))
    store.add(ids, vectors)
    exact = VectorStore.create(vectors.shape[1], "flat")
    exact.add(ids, vectors)
    allowed = ids[labels % 5 == 0]  # ~1000 ids of a fifth of the clusters
    _, found = store.search(queries, 10, allowed_ids=allowed)
    _, truth = exact.search(queries, 10, allowed_ids=allowed)
    assert (found >= 0).all() and np.isin(found, allowed).all()
    if exact_filter_max:  # small allowed sets: brute force over them, exact
        np.testing.assert_array_equal(found, truth)
    else:  # filtered graph walk, widened until stable
        assert _recall(found, truth) >= 0.9


def test_a_lossy_index_grown_image_by_image_keeps_its_vectors_close(clustered):
    # Trained on the first image's few dozen vectors, SQ8 ranges clipped later vectors, and each retraining
    # re-encoded decoded ones: an indexed vector no longer found itself near 1.0 (0.930 on the demo).
    ids, vectors, _, _ = clustered
    store = VectorStore.create(vectors.shape[1], "ivfsq")
    for start in range(0, 9600, 400):
        store.add(ids[start:start + 400], vectors[start:start + 400])
    assert store.kind == "flat"  # exact until there are enough vectors to train the codec on
    np.testing.assert_allclose(store.search(vectors[:9600], 1)[0][:, 0], 1.0, atol=1e-5)
    for start in range(9600, 20_000, 400):
        store.add(ids[start:start + 400], vectors[start:start + 400])
    assert store.kind == "ivfsq"
    own = np.sum(store.reconstruct(ids) * vectors, axis=1)
    assert own.min() > 0.99 and own.mean() > 0.9999


@pytest.mark.parametrize("index_type", ["ivfpq", "IVF16,PQ16"])
def test_ivfpq_trains_only_what_its_search_uses(clustered, index_type):
    ids, vectors, _, queries = clustered
    store = VectorStore.create(vectors.shape[1], index_type, settings=VectorStoreSettings(lossy_min_train=0))
    store.add(ids[:2000], vectors[:2000])
    ivf = faiss.downcast_index(faiss.extract_index_ivf(store._index))
    # Polysemous training (the factory's default) took minutes even for a few hundred vectors.
    assert store.kind == ("ivfpq" if index_type == "ivfpq" else "factory")
    assert isinstance(ivf, faiss.IndexIVFPQ) and not ivf.do_polysemous_training
    truth = ids[:2000][np.argsort(-(queries @ vectors[:2000].T), axis=1)[:, :10]]
    assert _recall(store.search(queries, 10)[1], truth) >= 0.8
