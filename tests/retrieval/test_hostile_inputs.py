"""Files and states that real collections hold: each is a one-line error or a skip with its reason, nothing lost.

Every case builds its hostile input itself and runs the real commands (in process, through the
``hassod`` group, which turns user errors into ``error: …`` lines with exit status 2).
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from hassod.images import load_rgb, resize_image
from indexer.catalog import Catalog
from indexer.index import Index
from indexer.vectors import VectorStore
from retrieval.cli import app

# Two real photos; index builds use the default (search) recipe: a few seconds for both.
PHOTOS = ("000000000009.jpg", "000000000025.jpg")


def _run(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def _one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: ") and result.output.count("\n") == 1, result.output
    for fragment in fragments:
        assert fragment in result.output, (fragment, result.output)


def _build(folder: Path, index: Path):
    result = _run("index", "build", folder, "--index", index, "--device", "cpu", "--workers", "1", "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.output.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def photos(shared_data: Path, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    for name in PHOTOS:
        shutil.copy(shared_data / "coco128" / "images" / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def built(photos: Path, tmp_path_factory) -> Path:
    index = tmp_path_factory.mktemp("built") / "index"
    assert _build(photos, index)["added"] == 2
    return index


def _non_utf8_name(folder: Path) -> tuple[list[str], str]:
    target = os.path.join(os.fsencode(folder), b"caf\xe9.jpg")  # Latin-1 bytes: not UTF-8
    shutil.copy(folder / PHOTOS[0], target)
    return ["caf\ufffd.jpg"], "not valid UTF-8"


def _dangling_link(folder: Path) -> tuple[str, str]:
    (folder / "gone.jpg").symlink_to(folder / "nowhere" / "x.jpg")
    return ["gone.jpg"], "broken symbolic link"


def _link_loop(folder: Path) -> tuple[str, str]:
    (folder / "a.jpg").symlink_to(folder / "b.jpg")
    (folder / "b.jpg").symlink_to(folder / "a.jpg")
    return ["a.jpg", "b.jpg"], "symbolic link loop"


@pytest.mark.parametrize("make", [_non_utf8_name, _dangling_link, _link_loop], ids=lambda f: f.__name__[1:])
def test_a_file_the_build_cannot_take_is_skipped_and_the_rest_indexed(make, photos, tmp_path):
    folder = tmp_path / "collection"
    shutil.copytree(photos, folder)
    names, reason = make(folder)
    summary = _build(folder, tmp_path / "index")  # the first build: it must keep the good photos
    assert summary["added"] == 2
    assert sorted(Path(path).name for path, why in summary["errors"] if reason in why) == names
    assert len(summary["errors"]) == len(names)
    with Catalog(Index(tmp_path / "index").catalog_url) as catalog:
        assert sorted(Path(image.path).name for image in catalog.images()) == sorted(PHOTOS)
    again = _build(folder, tmp_path / "index")
    assert again["unchanged"] == 2 and again["added"] == 0 and len(again["errors"]) == len(summary["errors"])


@pytest.mark.parametrize("make", [_dangling_link, _link_loop], ids=lambda f: f.__name__[1:])
def test_discover_skips_broken_links_with_their_reason(make, photos, tmp_path):
    folder = tmp_path / "collection"
    shutil.copytree(photos, folder)
    make(folder)
    result = _run("discover", folder, "--out", tmp_path / "pseudo.json", "--device", "cpu", "--workers", "1",
                  "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    coco = json.loads((tmp_path / "pseudo.json").read_text())
    assert sorted(Path(im["file_name"]).name for im in coco["images"]) == sorted(PHOTOS)
    assert summary["skipped"] and all("unreadable image" in why for _, why in summary["skipped"])


@pytest.mark.parametrize("command", [
    ["index", "stats", "{file}"],
    ["search", "--index", "{file}", "--region", "1"],
    ["serve", "--index", "{file}", "--port", "0", "--device", "cpu"],
], ids=["stats", "search", "serve"])
def test_an_index_that_is_a_file_is_a_one_line_error(command, tmp_path):
    not_an_index = tmp_path / "index"
    not_an_index.write_text("hello")
    _one_line_error(_run(*[part.format(file=not_an_index) for part in command]), "is a file, not an index directory")


def test_build_into_an_index_that_is_a_file_is_refused(photos, tmp_path):
    not_an_index = tmp_path / "index"
    not_an_index.write_text("hello")
    result = _run("index", "build", photos, "--index", not_an_index)
    assert result.exit_code == 2 and "is a file" in result.output and not_an_index.read_text() == "hello"


@pytest.mark.parametrize("region", [2**64, 2**70, -(2**63) - 1])
def test_region_ids_beyond_64_bits_name_no_region(region, built):
    _one_line_error(_run("search", "--index", built, "--region", region), f"no region {region} in this index")


@pytest.mark.parametrize("command", [
    ["index", "build", "{photos}", "--index", "/proc/hassod-nowhere/index"],
    ["discover", "{photos}", "--out", "/proc/hassod-nowhere/pseudo.json", "--workers", "1", "--device", "cpu"],
], ids=["index-build", "discover"])
def test_writing_where_no_path_can_exist_is_a_one_line_error(command, photos):
    _one_line_error(_run(*[part.format(photos=photos) for part in command]), "/proc/hassod-nowhere")


def test_a_damaged_vectors_file_is_named_and_the_build_rebuilds_it(photos, built, tmp_path):
    index = tmp_path / "index"
    shutil.copytree(built, index)
    with Catalog(Index(index).catalog_url) as catalog:
        regions = len(catalog.region_ids())
    data = Index(index).vectors_path.read_bytes()
    Index(index).vectors_path.write_bytes(data[: len(data) // 2])
    for command in (["index", "stats", index], ["search", "--index", index, "--region", "1"]):
        _one_line_error(_run(*command), f"the vectors file {Index(index).vectors_path} is damaged",
                        "`hassod index build`")
    summary = _build(photos, index)
    assert summary["rebuilt_vectors"] and summary["updated"] == 2 and summary["regions"] == regions
    assert len(VectorStore.load(Index(index).vectors_path)) == regions
    assert (index / "vectors.faiss.damaged").read_bytes() == data[: len(data) // 2]  # kept, not lost


@pytest.mark.parametrize("pointer, reason", [
    ('{"catalog": ', "Expecting value"), ("[1, 2]", "no catalog URL in it"), (b"\xff\xfe", "can't decode"),
], ids=["truncated", "not-an-object", "not-utf8"])
def test_a_damaged_catalog_pointer_is_named_with_how_to_mend_it(pointer, reason, photos, tmp_path):
    index = tmp_path / "index"
    index.mkdir()
    (index / "index.json").write_bytes(pointer.encode() if isinstance(pointer, str) else pointer)
    for command in (["index", "stats", index], ["search", "--index", index, "--region", "1"],
                    ["index", "build", photos, "--index", index, "--db", f"sqlite:///{tmp_path / 'c.sqlite'}"]):
        _one_line_error(_run(*command), f"{index / 'index.json'} is damaged", reason,
                        'write {"catalog": "URL"} into it')
    with Catalog(f"sqlite:///{tmp_path / 'c.sqlite'}") as catalog:
        assert catalog.images() == []  # refused before anything was indexed


def test_a_damaged_whitening_file_is_named_and_nothing_is_written(photos, tmp_path):
    index = tmp_path / "index"
    result = _run("index", "build", photos / PHOTOS[0], "--index", index, "--device", "cpu", "--whiten-dim", "8",
                  "--json")
    assert result.exit_code == 0, result.output
    whitening = index / "whitening.npz"
    whitening.write_bytes(whitening.read_bytes()[:200])
    def contents() -> tuple:  # the catalog by its rows: SQLite moves them between its files as it likes
        with Catalog(Index(index).catalog_url) as catalog:
            rows = catalog.images(), catalog.region_ids().tolist(), catalog.get_config()
        return rows, (index / "vectors.faiss").read_bytes(), whitening.read_bytes()

    before = contents()
    for command in (["index", "stats", index], ["search", "--index", index, "--region", "1"],
                    ["index", "build", photos, "--index", index, "--device", "cpu", "--whiten-dim", "8"]):
        _one_line_error(_run(*command), f"the whitening file {whitening} is damaged",
                        "build the collection into a new --index directory")
    assert contents() == before


def _not_a_database(catalog: Path) -> None:
    catalog.write_bytes(b"garbage\n")


def _truncated(catalog: Path) -> None:
    catalog.write_bytes(catalog.read_bytes()[:5000])


def _pages_overwritten(catalog: Path) -> None:
    """The header and schema intact, every later page's start overwritten: found by the first query."""
    data = bytearray(catalog.read_bytes())
    for start in range(8192, len(data), 4096):
        data[start:start + 64] = b"\xff" * 64
    catalog.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_not_a_database, _truncated, _pages_overwritten], ids=lambda f: f.__name__[1:])
def test_a_damaged_catalog_is_a_one_line_error(damage, photos, built, tmp_path):
    index = tmp_path / "index"
    shutil.copytree(built, index)
    with contextlib.closing(sqlite3.connect(index / "catalog.sqlite")) as connection:  # every row into the file
        connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    for leftover in index.glob("catalog.sqlite-*"):
        leftover.unlink()
    assert (index / "catalog.sqlite").stat().st_size > 3 * 8192  # pages for _pages_overwritten to damage
    damage(index / "catalog.sqlite")
    for command in (["index", "stats", index], ["search", "--index", index, "--region", "1"],
                    ["index", "build", photos, "--index", index, "--device", "cpu"]):
        _one_line_error(_run(*command), "is damaged (", "build the collection into a new --index directory")


def test_a_running_server_keeps_answering_when_the_vectors_file_is_damaged(built, tmp_path):
    from retrieval.searcher import Searcher

    index = tmp_path / "index"
    shutil.copytree(built, index)
    searcher = Searcher(index, device="cpu", load_backbone=False)
    before = searcher.search_region(1, k=2)
    data = Index(index).vectors_path.read_bytes()
    Index(index).vectors_path.write_bytes(data[:100])
    assert searcher.refresh() is False
    assert searcher.search_region(1, k=2) == before
    searcher.close()


def test_stats_after_a_killed_build_counts_only_regions_with_vectors(built, tmp_path):
    """A build killed after its catalog commit and before its vectors were saved: the rows are there,
    the vectors are not, and searches cannot find those regions."""
    index = tmp_path / "index"
    shutil.copytree(built, index)
    with Catalog(Index(index).catalog_url) as catalog:
        by_image = catalog.region_ids_by_image()
        total = len(catalog.region_ids())
    lost = next(iter(by_image.values()))
    store = VectorStore.load(Index(index).vectors_path)
    store.remove(lost)
    store.save(Index(index).vectors_path)
    result = _run("index", "stats", index, "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["regions"] == total - len(lost) == sum(info["regions_by_level"].values())
    assert info["regions_without_vectors"] == len(lost)
    text = _run("index", "stats", index).output
    assert f"regions   {total - len(lost)} " in text and f"{len(lost)} more without vectors" in text


def _sixteen_bit(photo: Path, folder: Path) -> Path:
    gray = np.asarray(Image.open(photo).convert("L"), dtype=np.uint16) * 200  # up to 51000: far above 255
    path = folder / "deep.png"
    Image.fromarray(gray).save(path)  # PIL writes uint16 arrays as 16-bit PNG ("I;16")
    return path


def _transparent(photo: Path, folder: Path) -> Path:
    rgba = np.asarray(Image.open(photo).convert("RGBA")).copy()
    rgba[:, : rgba.shape[1] // 2, :3] = 0  # the hidden half is black under full transparency
    rgba[:, : rgba.shape[1] // 2, 3] = 0
    path = folder / "clear.png"
    Image.fromarray(rgba).save(path)
    return path


@pytest.mark.parametrize("make", [_sixteen_bit, _transparent], ids=["16-bit", "RGBA"])
def test_thumbnails_look_like_what_was_indexed(make, photos, tmp_path):
    from fastapi.testclient import TestClient

    from retrieval.searcher import Searcher
    from retrieval.server import create_app

    folder = tmp_path / "collection"
    folder.mkdir()
    path = make(photos / PHOTOS[0], folder)
    _build(folder, tmp_path / "index")
    searcher = Searcher(tmp_path / "index", device="cpu", load_backbone=False)
    with TestClient(create_app(searcher)) as client:
        image_id = client.get("/api/images").json()["images"][0]["id"]
        response = client.get(f"/api/images/{image_id}?side=320")
    assert response.status_code == 200
    shown = np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB"), dtype=np.float64)
    indexed = resize_image(load_rgb(path), shown.shape[:2]).astype(np.float64)
    assert np.abs(shown - indexed).mean() < 6.0  # JPEG and resampling only; clipped or black halves are ~100
