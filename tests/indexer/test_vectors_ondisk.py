"""The on-disk kind (indexer/vectors/ondisk.py): memory-mapped inverted lists beside the store file."""
from __future__ import annotations

import shutil

import faiss
import numpy as np
import pytest

from indexer.vectors import VectorStore
from tests.indexer.test_vectors import _recall, clustered, filled_store  # noqa: F401 (fixture)


def _ivfdata(folder):
    return sorted(p.name for p in folder.glob("*.ivfdata"))


@pytest.fixture(scope="module")
def flat(clustered):  # noqa: F811
    return filled_store("flat", *clustered[:2])


@pytest.fixture
def saved(tmp_path, clustered):  # noqa: F811
    """An on-disk store of the 20k clustered vectors, saved: (store, path)."""
    ids, vectors, _, _ = clustered
    store = filled_store("ondisk", ids, vectors)
    path = tmp_path / "vectors.faiss"
    store.save(path)
    return store, path


def test_full_nprobe_agrees_with_flat_and_calibrated_recall(saved, clustered, flat):  # noqa: F811
    store, path = saved
    ids, _, labels, queries = clustered
    ivf = faiss.extract_index_ivf(store._index)
    assert isinstance(faiss.downcast_InvertedLists(ivf.invlists), faiss.OnDiskInvertedLists)
    assert len(_ivfdata(path.parent)) == 1
    assert store.info()["calibrated_recall"] >= 0.95
    _, truth = flat.search(queries, 10)
    assert _recall(store.search(queries, 10)[1], truth) >= 0.95
    ivf.nprobe = ivf.nlist  # every list: exact
    exact = store._index.search(queries, 10)
    np.testing.assert_array_equal(exact[1], truth)
    allowed = ids[labels % 3 == 0]
    found = store.search(queries, 10, allowed_ids=allowed)[1]
    assert np.isin(found, allowed).all() and (found >= 0).all()
    assert _recall(found, flat.search(queries, 10, allowed_ids=allowed)[1]) >= 0.9


def test_memory_model_reports_resident_and_disk_bytes(saved):
    store, path = saved
    info = store.info()
    assert info["bytes_estimate"] == 20_000 * 8
    assert info["disk_bytes_estimate"] == 20_000 * (4 * 64 + 8)
    assert (path.parent / _ivfdata(path.parent)[0]).stat().st_size >= info["disk_bytes_estimate"]


def test_reload_from_a_moved_folder_removals_and_copy_on_write(saved, clustered, tmp_path):  # noqa: F811
    store, path = saved
    ids, vectors, _, queries = clustered
    moved = tmp_path / "moved"
    shutil.copytree(path.parent, moved, ignore=shutil.ignore_patterns("moved"))
    loaded = VectorStore.load(moved / "vectors.faiss")
    np.testing.assert_array_equal(loaded.ids(), store.ids())
    np.testing.assert_array_equal(loaded.search(queries, 10)[1], store.search(queries, 10)[1])
    first = _ivfdata(moved)

    _, before = loaded.search(queries, 5)
    gone = np.unique(before[:, 0])
    assert loaded.remove(gone) == gone.size  # in place, on a private copy of the lists
    assert _ivfdata(moved) != first and len(_ivfdata(moved)) == 2
    # the saved store file still names the untouched lists
    np.testing.assert_array_equal(VectorStore.load(moved / "vectors.faiss").search(queries, 5)[1], before)
    _, after = loaded.search(queries, 5)
    assert not np.isin(after, gone).any() and (after >= 0).all()
    loaded.add(gone[:1], vectors[np.flatnonzero(ids == gone[0])])
    loaded.save(moved / "vectors.faiss")
    assert len(_ivfdata(moved)) == 1 and _ivfdata(moved) != first  # older generation deleted
    again = VectorStore.load(moved / "vectors.faiss")
    assert len(again) == 20_000 - gone.size + 1 and again.contains(gone[:1]).all()
    np.testing.assert_array_equal(again.search(queries, 5)[1], loaded.search(queries, 5)[1])


def test_shards_merge_into_the_on_disk_lists(tmp_path, clustered, flat):  # noqa: F811
    ids, vectors, _, queries = clustered
    store = filled_store("ondisk", ids[:4000], vectors[:4000])  # trains the quantizer on a sample
    path = tmp_path / "vectors.faiss"
    store.save(path)
    shards = []
    for n, start in enumerate(range(4000, 20_000, 8000)):
        shard = store.trained_empty()
        assert shard.ntotal == 0
        shard.add_with_ids(vectors[start:start + 8000], ids[start:start + 8000])
        shards.append(tmp_path / f"shard{n}.index")
        faiss.write_index(shard, str(shards[-1]))
    assert store.merge_shards(shards, tmp_path) == 16_000
    with pytest.raises(ValueError, match="not stored yet"):
        store.merge_shards(shards[:1], tmp_path)
    store.calibrate()
    store.save(path)
    assert len(_ivfdata(tmp_path)) == 1
    loaded = VectorStore.load(path)
    _, truth = flat.search(queries, 10)
    assert _recall(loaded.search(queries, 10)[1], truth) >= 0.95  # the IVF merge at its calibrated nprobe
    np.testing.assert_array_equal(loaded.ids(), np.sort(ids))
    ivf = faiss.extract_index_ivf(loaded._index)
    ivf.nprobe = ivf.nlist
    np.testing.assert_array_equal(loaded._index.search(queries, 10)[1], truth)


def test_an_emptied_store_saves_loads_and_fills_again(tmp_path, clustered):  # noqa: F811
    ids, vectors, _, queries = clustered
    store = filled_store("ondisk", ids[:3000], vectors[:3000])
    store.remove(ids[:3000])  # before its first save: the lists leave memory empty
    path = tmp_path / "vectors.faiss"
    store.save(path)
    loaded = VectorStore.load(path)
    assert len(loaded) == 0 and (loaded.search(queries[:2], 3)[1] == -1).all()
    loaded.add(ids[:3000], vectors[:3000])
    loaded.remove(ids[:3000])  # emptied on disk this time
    loaded.save(path)
    assert len(VectorStore.load(path)) == 0 and len(_ivfdata(tmp_path)) == 1
