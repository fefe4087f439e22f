"""Catalog tests, each run on SQLite and on a real PostgreSQL server (see conftest.py)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from indexer.catalog import Catalog, ImageRecord, NewRegion, RegionRecord

CONFIG = {
    "backbone": "efficientnet_lite0",
    "weights": "sha256:0f1e2d",
    "descriptor": "gem-roi",
    "descriptor_version": 1,
    "descriptor_dim": 320,
    "region_source": "discovery",
    "thresholds": {"merge": [0.1, 0.2, 0.4], "min_area": 64},
}


def _mask_rle(h: int, w: int, box: tuple[int, int, int, int]) -> dict:
    mask = np.zeros((h, w), dtype=np.uint8, order="F")
    x0, y0, x1, y1 = box
    mask[y0:y1, x0:x1] = 1
    return mask_utils.encode(mask)  # counts are bytes, as pycocotools gives them


def _image(path: str, seed: int = 0) -> ImageRecord:
    return ImageRecord(
        path=path, content_hash=f"{seed:064x}", size_bytes=3_000_000_000 + seed,
        mtime=1_712_345_678.123456 + seed / 3, width=64, height=48,
    )


def _regions(n: int, seed: int = 0) -> list[NewRegion]:
    """n regions: region 0 whole, then parts of region 0, every third a subpart of the previous one."""
    out = []
    for i in range(n):
        box = (i % 8, i % 5, 8 + i % 50, 6 + i % 40)
        level = 0 if i == 0 else (2 if i % 3 == 0 else 1)
        parent = None if i == 0 else (i - 1 if level == 2 else 0)
        out.append(
            NewRegion(
                box=(box[0] + 0.25, box[1] + 0.5, box[2] - 0.125, box[3] + 1 / 3),
                score=(0.1 + 0.2) * (1 + seed) / (i + 1),
                level=level, area=(box[2] - box[0]) * (box[3] - box[1]),
                mask_rle=_mask_rle(48, 64, box), parent=parent,
            )
        )
    return out


def _dump(cat: Catalog) -> tuple[list[ImageRecord], list[RegionRecord], dict]:
    return cat.images(), cat.regions(cat.region_ids()), cat.stats()


@pytest.fixture
def catalog(catalog_url: str) -> Iterator[Catalog]:
    with Catalog(catalog_url) as cat:
        yield cat


def test_config_round_trip(catalog: Catalog) -> None:
    assert catalog.get_config() is None
    catalog.set_config(CONFIG)
    stored = catalog.get_config()
    assert stored == {**CONFIG, "format_version": 1, "created_at": stored["created_at"]}
    assert stored["created_at"].endswith("+00:00")
    replacement = {"backbone": "dino_vits8", "format_version": 1, "created_at": "2026-01-01T00:00:00+00:00"}
    catalog.set_config(replacement)
    assert catalog.get_config() == replacement


def test_image_and_regions_round_trip(catalog: Catalog) -> None:
    regions = _regions(5)
    ids = catalog.replace_image(_image("a/b.jpg"), regions)
    assert ids == [1, 2, 3, 4, 5]

    got = catalog.image_by_path("a/b.jpg")
    assert got == ImageRecord(
        path="a/b.jpg", content_hash=f"{0:064x}", size_bytes=3_000_000_000, mtime=1_712_345_678.123456,
        width=64, height=48, status="ok", error=None, n_regions=5, id=1,
    )
    assert catalog.image_by_path("missing.jpg") is None
    assert catalog.images() == [got]

    stored = catalog.regions(ids)
    # Parent indexes into the list became region ids: 0 -> ids[0], i-1 -> ids[i-1].
    assert [r.parent_id for r in stored] == [None, 1, 1, 3, 1]
    for rec, new, rid in zip(stored, regions, ids):
        assert (rec.id, rec.image_id, rec.box, rec.score, rec.level, rec.area) == (
            rid, 1, new.box, new.score, new.level, new.area
        )
        assert rec.mask_rle == {"size": [48, 64], "counts": new.mask_rle["counts"].decode()}
        np.testing.assert_array_equal(mask_utils.decode(rec.mask_rle), mask_utils.decode(new.mask_rle))
    assert catalog.images_by_id([1, 99]) == {1: got}


def test_replace_never_duplicates_nor_reuses_ids(catalog_url: str) -> None:
    with Catalog(catalog_url) as cat:
        first = cat.replace_image(_image("a.jpg"), _regions(3))
        other = cat.replace_image(_image("b.jpg", 1), _regions(2))
        second = cat.replace_image(_image("a.jpg", 2), _regions(4))
        assert (first, other, second) == ([1, 2, 3], [4, 5], [6, 7, 8, 9])
        assert cat.region_ids().tolist() == [4, 5, 6, 7, 8, 9]
        assert cat.regions(first) == []
        assert [i.path for i in cat.images()] == ["a.jpg", "b.jpg"]
        assert cat.image_by_path("a.jpg").n_regions == 4
        assert cat.delete_images(["a.jpg"]) == second
        assert cat.region_ids_by_image()["b.jpg"].tolist() == other
        cat.delete_images(["b.jpg"])
        assert cat.region_ids_by_image() == {} and cat.region_ids().tolist() == []
        cat.replace_image(_image("b.jpg", 1), [])
        assert cat.region_ids_by_image()["b.jpg"].tolist() == []
    # A new catalog object on the same database continues after the largest id ever given.
    with Catalog(catalog_url) as cat:
        assert cat.replace_image(_image("a.jpg"), _regions(2)) == [10, 11]
        assert cat.image_by_path("a.jpg").id == 5
        assert cat.stats() == {
            "images_ok": 2, "images_error": 0, "regions": 2,
            "regions_by_level": {"whole": 1, "part": 1, "subpart": 0},
        }


def test_delete_cascades(catalog: Catalog) -> None:
    a = catalog.replace_image(_image("a.jpg"), _regions(3))
    b = catalog.replace_image(_image("b.jpg"), _regions(4))
    catalog.replace_image(_image("c.jpg"), _regions(2))
    assert catalog.delete_images(["b.jpg", "a.jpg", "never-indexed.jpg"]) == sorted(a + b)
    assert [i.path for i in catalog.images()] == ["c.jpg"]
    assert catalog.region_ids().tolist() == [8, 9]
    # The database itself cascades, not only delete_images.
    with catalog.engine.begin() as conn:
        conn.execute(text("DELETE FROM images"))
        assert conn.execute(text("SELECT count(*) FROM regions")).scalar_one() == 0


def test_regions_keep_order_and_skip_unknown(catalog: Catalog) -> None:
    ids = catalog.replace_image(_image("a.jpg"), _regions(4))
    got = catalog.regions([ids[3], 12345, ids[0], ids[2], ids[0]])
    assert [r.id for r in got] == [ids[3], ids[0], ids[2], ids[0]]
    assert catalog.regions([]) == []


def test_level_filter_and_ids_by_image(catalog: Catalog) -> None:
    catalog.replace_image(_image("a.jpg"), _regions(7))  # levels 0 1 1 2 1 1 2
    catalog.replace_image(_image("b.jpg"), _regions(4))  # levels 0 1 1 2
    catalog.replace_image(_image("empty.jpg"), [])
    catalog.record_error("bad.jpg", "", 1, 1.0, "broken")
    assert catalog.region_ids(0).tolist() == [1, 8]
    assert catalog.region_ids(1).tolist() == [2, 3, 5, 6, 9, 10]
    assert catalog.region_ids(2).tolist() == [4, 7, 11]
    assert catalog.region_ids().dtype == np.int64
    by_image = catalog.region_ids_by_image()
    assert {k: v.tolist() for k, v in by_image.items()} == {
        "a.jpg": [1, 2, 3, 4, 5, 6, 7], "b.jpg": [8, 9, 10, 11], "empty.jpg": [], "bad.jpg": [],
    }
    image_ids = {image.path: image.id for image in catalog.images()}
    regions, owners = catalog.region_ids_of_images([image_ids["b.jpg"], image_ids["a.jpg"], image_ids["empty.jpg"]])
    assert regions.tolist() == list(range(1, 12)) and regions.dtype == owners.dtype == np.int64
    assert owners.tolist() == [image_ids["a.jpg"]] * 7 + [image_ids["b.jpg"]] * 4
    regions, owners = catalog.region_ids_of_images([image_ids["b.jpg"], image_ids["a.jpg"]], level=1)
    assert regions.tolist() == [2, 3, 5, 6, 9, 10]
    assert [r.size for r in catalog.region_ids_of_images([image_ids["bad.jpg"]])] == [0, 0]
    assert catalog.image_ids_of_regions(np.array([9, 2, 3, 999])) == sorted([image_ids["a.jpg"], image_ids["b.jpg"]])
    assert catalog.image_ids_of_regions([]) == []
    assert catalog.stats() == {
        "images_ok": 3, "images_error": 1, "regions": 11,
        "regions_by_level": {"whole": 2, "part": 6, "subpart": 3},
    }


def test_record_error_replaces_regions(catalog: Catalog) -> None:
    ids = catalog.replace_image(_image("a.jpg"), _regions(3))
    assert catalog.record_error("a.jpg", "", 10, 5.5, "cannot identify image file") == ids
    assert catalog.record_error("b.jpg", "", 0, 6.5, "permission denied") == []
    assert catalog.image_by_path("a.jpg") == ImageRecord(
        path="a.jpg", content_hash="", size_bytes=10, mtime=5.5, width=0, height=0,
        status="error", error="cannot identify image file", n_regions=0, id=2,
    )
    assert catalog.stats()["images_error"] == 2 and catalog.stats()["regions"] == 0
    assert catalog.replace_image(_image("a.jpg"), _regions(1)) == [4]
    assert catalog.image_by_path("a.jpg").status == "ok"


def test_a_batch_of_images_is_written_as_the_same_images_one_by_one(catalog_url: str, tmp_path) -> None:
    from dataclasses import replace

    def entries(cat: Catalog) -> list[tuple[ImageRecord, list[NewRegion]]]:
        cat.replace_image(_image("a.jpg"), _regions(3))  # replaced by the batch
        error = replace(_image("bad.jpg", 2), width=0, height=0, status="error", error="truncated file")
        return [(_image("b.jpg", 1), _regions(4, 1)), (_image("a.jpg", 3), _regions(2, 3)), (error, []),
                (_image("empty.jpg", 4), [])]

    one_by_one = Catalog(f"sqlite:///{tmp_path / 'one_by_one.sqlite'}")
    for image, regions in entries(one_by_one):
        if image.status == "error":
            one_by_one.record_error(image.path, image.content_hash, image.size_bytes, image.mtime, image.error)
        else:
            one_by_one.replace_image(image, regions)
    with Catalog(catalog_url) as batched:
        ids = batched.write_images(entries(batched))
        assert ids == [[4, 5, 6, 7], [8, 9], [], []]
        assert _dump(batched) == _dump(one_by_one)
        assert batched.image_by_path("bad.jpg").error == "truncated file"
        before = _dump(batched)
        # One bad entry and nothing of the batch is written; a path twice in a batch is refused.
        with pytest.raises(ValueError, match="box and score must be finite"):
            batched.write_images([(_image("c.jpg", 5), _regions(2, 5)), (_image("a.jpg", 6), _nan_box(_regions(3)))])
        with pytest.raises(ValueError, match="appears twice"):
            batched.write_images([(_image("c.jpg"), []), (_image("c.jpg"), [])])
        assert _dump(batched) == before
    one_by_one.close()


def _bad_level(regions: list[NewRegion]) -> list[NewRegion]:
    return regions[:-1] + [NewRegion(box=(0, 0, 1, 1), score=0.5, level=7, area=1, mask_rle=regions[0].mask_rle)]


def _nan_box(regions: list[NewRegion]) -> list[NewRegion]:
    bad = NewRegion(box=(0, 0, float("nan"), 1), score=0.5, level=1, area=1, mask_rle=regions[0].mask_rle)
    return regions[:-1] + [bad]


@pytest.mark.parametrize(
    "corrupt, error", [(_bad_level, IntegrityError), (_nan_box, ValueError)], ids=["db", "python"]
)
def test_failed_replace_leaves_previous_state(catalog: Catalog, corrupt, error) -> None:
    catalog.replace_image(_image("a.jpg"), _regions(3))
    catalog.replace_image(_image("b.jpg"), _regions(2))
    before = _dump(catalog)
    # The failure comes after the old row of a.jpg was deleted and the new image inserted.
    with pytest.raises(error):
        catalog.replace_image(_image("a.jpg", 9), corrupt(_regions(4)))
    assert _dump(catalog) == before
    # The id counters rolled back with the rest.
    assert catalog.replace_image(_image("c.jpg"), _regions(1)) == [6]
    assert catalog.image_by_path("c.jpg").id == 3


def _script(cat: Catalog) -> None:
    cat.set_config({**CONFIG, "created_at": "2026-05-01T12:00:00+00:00"})
    for i in range(6):
        cat.replace_image(_image(f"img/{i}.jpg", i), _regions(3 + 4 * i, i))
    cat.record_error("img/bad.png", "", 12, 3.25, "truncated file")
    cat.replace_image(_image("img/2.jpg", 7), _regions(5, 7))
    with pytest.raises(IntegrityError):
        cat.replace_image(_image("img/3.jpg", 8), _bad_level(_regions(6)))
    cat.delete_images(["img/0.jpg", "img/4.jpg"])
    cat.replace_image(_image("img/0.jpg", 9), _regions(2, 9))
    cat.record_error("img/5.jpg", "ff" * 32, 99, 4.5, "decoder error")


def test_sqlite_and_postgresql_give_identical_catalogs(tmp_path, postgres_url: str) -> None:
    dumps = []
    for url in (f"sqlite:///{tmp_path / 'c.sqlite'}", postgres_url):
        with Catalog(url) as cat:
            _script(cat)
            by_image = {k: v.tolist() for k, v in cat.region_ids_by_image().items()}
            dumps.append((cat.get_config(), *_dump(cat), by_image))
    assert dumps[0] == dumps[1]
    config, images, regions, stats, by_image = dumps[0]
    # Left: img/0 (2 regions), img/1 (7), img/2 (5, replaced), img/3 (15, failed replace); 5.jpg became an error.
    assert stats == {
        "images_ok": 4, "images_error": 2, "regions": 29,
        "regions_by_level": {"whole": 4, "part": 18, "subpart": 7},
    }
    assert len({r.id for r in regions}) == 29
    assert by_image["img/5.jpg"] == [] and len(by_image["img/3.jpg"]) == 15


def test_bulk_insert_many_regions(catalog: Catalog) -> None:
    ids = [catalog.replace_image(_image(f"{i:03d}.jpg", i), _regions(100, i)) for i in range(30)]
    assert ids[0] == list(range(1, 101)) and ids[-1] == list(range(2901, 3001))
    assert catalog.region_ids().tolist() == list(range(1, 3001))
    last = catalog.regions(ids[-1])
    assert [r.parent_id for r in last[:4]] == [None, 2901, 2901, 2903]
    assert all(r.image_id == 30 for r in last)


def test_plain_postgresql_url_uses_psycopg(postgres_url: str) -> None:
    with Catalog(postgres_url.replace("postgresql+psycopg://", "postgresql://")) as cat:
        assert cat.engine.dialect.driver == "psycopg"
        assert cat.replace_image(_image("a.jpg"), _regions(2)) == [1, 2]


def test_indexed_images_pages_by_path_without_errors(catalog: Catalog) -> None:
    for name in ["d.jpg", "b.jpg", "e.jpg", "a.jpg"]:
        catalog.replace_image(_image(name), _regions(2))
    catalog.record_error("c.jpg", "", 0, 1.0, "not an image")
    total, first = catalog.indexed_images(0, 3)
    assert total == 4 and [i.path for i in first] == ["a.jpg", "b.jpg", "d.jpg"]
    assert first[0].n_regions == 2 and first[0].width == 64
    assert [i.path for i in catalog.indexed_images(3, 3)[1]] == ["e.jpg"]
    assert catalog.indexed_images(10, 3) == (4, [])


def test_region_places_match_the_full_rows(catalog: Catalog) -> None:
    catalog.replace_image(_image("a.jpg"), _regions(5))
    catalog.replace_image(_image("b.jpg", seed=1), _regions(3, seed=1))
    ids = catalog.region_ids().tolist()
    places = catalog.region_places([ids[6], ids[1], 999_999])
    assert sorted(places) == sorted([ids[1], ids[6]])
    for record in catalog.regions([ids[1], ids[6]]):
        place = places[record.id]
        assert (place.image_id, place.box, place.level) == (record.image_id, record.box, record.level)


def test_hierarchy_of_an_image(catalog: Catalog) -> None:
    # _regions(7): 0 whole; 1, 2, 4, 5 parts of 0; 3 subpart of 2, 6 subpart of 5.
    ids = catalog.replace_image(_image("/a.jpg"), _regions(7))
    other = catalog.replace_image(_image("/b.jpg", seed=1), _regions(2, seed=1))
    image_id = catalog.image_by_path("/a.jpg").id
    assert [r.id for r in catalog.regions_of_image(image_id)] == ids
    assert [r.id for r in catalog.regions_of_image(image_id, level=2)] == [ids[3], ids[6]]
    assert catalog.regions_of_image(image_id, level=2) == catalog.regions([ids[3], ids[6]])
    assert catalog.regions_of_image(10_000) == []

    assert [r.id for r in catalog.ancestors(ids[6])] == [ids[5], ids[0]]
    assert catalog.ancestors(ids[3]) == catalog.regions([ids[2], ids[0]])
    assert catalog.ancestors(ids[0]) == [] and catalog.ancestors(10_000) == []
    assert [r.id for r in catalog.children(ids[0])] == [ids[1], ids[2], ids[4], ids[5]]
    assert [r.id for r in catalog.children(ids[5])] == [ids[6]]
    assert catalog.children(ids[6]) == [] and catalog.children(other[1]) == []


def test_indexed_images_filtered_by_level(catalog: Catalog) -> None:
    catalog.replace_image(_image("/c.jpg"), _regions(3))   # whole, parts
    catalog.replace_image(_image("/a.jpg", seed=1), _regions(4, seed=1))  # whole, parts, a subpart
    catalog.replace_image(_image("/b.jpg", seed=2), [])
    catalog.record_error("/d.jpg", "", 0, 0.0, "unreadable")
    assert [i.path for i in catalog.indexed_images()[1]] == ["/a.jpg", "/b.jpg", "/c.jpg"]
    total, page = catalog.indexed_images(level=1)
    assert total == 2 and [i.path for i in page] == ["/a.jpg", "/c.jpg"]
    total, page = catalog.indexed_images(offset=0, limit=5, level=2)
    assert total == 1 and [i.path for i in page] == ["/a.jpg"]
    total, page = catalog.indexed_images(offset=1, limit=5, level=0)
    assert total == 2 and [i.path for i in page] == ["/c.jpg"]
