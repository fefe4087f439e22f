"""`index build` → search round trips on synthetic instance scenes (real catalog, FAISS, backbone)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from indexer.build import WhiteningError, build_index
from indexer.catalog import Catalog
from indexer.descriptors import RegionDescriber
from indexer.index import IncompatibleIndexError, Index
from indexer.regions import CocoRegions, DiscoveryRegions
from indexer.whitening import PCAWhitening, WhiteningSettings
from retrieval.searcher import Searcher
from tests.conftest import limit_file_size


def box_iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def _build(folder: Path, truth: Path, index_dir: Path, backbone, db_url: str | None = None):
    paths = sorted(folder.glob("*.png"))
    return build_index(paths, Index(index_dir, db_url), CocoRegions(truth), RegionDescriber(backbone),
                       show_progress=False)


def _catalog_dump(url: str) -> list[tuple]:
    with Catalog(url) as catalog:
        paths = {image.id: Path(image.path).name for image in catalog.images()}
        ids = catalog.region_ids()
        return sorted((paths[r.image_id], r.level, tuple(round(v, 2) for v in r.box), r.area)
                      for r in catalog.regions(ids.tolist()))


def _check_instance_queries(searcher: Searcher, scenes, folder: Path, level=None) -> None:
    """Every object cropped from every image holding it: the query image first, then another
    holder; mean average precision over the queries >= 0.9; >= 90% of holders returned with
    their instance's box (IoU >= 0.5): an image can also rank by another, similar object in it."""
    average_precisions, box_hits = [], []
    for obj in sorted({o for s in scenes for o in s.objects}):
        holders = [i for i, s in enumerate(scenes) if obj in s.objects]
        for query_index in holders:
            query_box = scenes[query_index].boxes[scenes[query_index].objects.index(obj)]
            matches = searcher.search(folder / f"scene_{query_index:02d}.png", box=query_box, level=level,
                                      k=len(scenes))
            found = [int(Path(m.path).stem.split("_")[1]) for m in matches]
            assert found[0] == query_index, (obj, found)
            if len(holders) > 1:
                assert set(found[1:3]) & set(holders), (obj, query_index, found, holders)
            relevant = np.cumsum([index in holders for index in found])
            average_precisions.append(np.mean([relevant[r] / (r + 1) for r, index in enumerate(found)
                                               if index in holders]))
            for match, index in zip(matches, found):
                if index in holders:
                    truth = scenes[index].boxes[scenes[index].objects.index(obj)]
                    box_hits.append(box_iou(match.box, truth) >= 0.5)
            assert box_hits[-len(holders)], (obj, query_index)  # the query's own box always comes back
    assert np.mean(average_precisions) >= 0.9
    assert np.mean(box_hits) >= 0.9


def test_round_trip_finds_instances_at_other_scales(tmp_path, instance_folder, instance_scenes, offline_backbone):
    folder, truth = instance_folder
    summary = _build(folder, truth, tmp_path / "index", offline_backbone)
    assert summary.added == 8 and summary.regions == sum(len(s.masks) for s in instance_scenes)
    searcher = Searcher(tmp_path / "index", backbone=offline_backbone)
    _check_instance_queries(searcher, instance_scenes, folder)
    # A crop of an indexed region finds that very region first.
    first = searcher.search(folder / "scene_00.png", box=instance_scenes[0].boxes[0], k=1)[0]
    assert first.path.endswith("scene_00.png") and first.score == pytest.approx(1.0, abs=1e-5)
    assert first.region_id == searcher.search_region(first.region_id, k=1)[0].region_id


def test_level_restriction_returns_k_results_of_that_level(tmp_path, instance_folder, offline_backbone):
    folder, truth = instance_folder
    _build(folder, truth, tmp_path / "index", offline_backbone)
    searcher = Searcher(tmp_path / "index", backbone=offline_backbone)
    query = folder / "scene_03.png"
    for level, name in enumerate(["whole", "part", "subpart"]):
        matches = searcher.search(query, box=(20, 20, 200, 200), level=name, k=7)
        assert len(matches) == 7 and {m.level for m in matches} == {level}
    unrestricted = searcher.search(query, box=(20, 20, 200, 200), k=8)
    assert len(unrestricted) == 8


def test_incremental_build_matches_a_fresh_build(tmp_path, instance_folder, instance_scenes, offline_backbone):
    folder, truth = instance_folder
    staging = tmp_path / "staging"
    shutil.move(str(folder / "scene_07.png"), staging.mkdir() or staging / "scene_07.png")
    first = _build(folder, truth, tmp_path / "index", offline_backbone)
    assert first.added == 7
    # Add one file, change one (other pixels, same name), delete one.
    shutil.move(str(staging / "scene_07.png"), folder / "scene_07.png")
    Image.fromarray(instance_scenes[2].image[:, ::-1].copy()).save(folder / "scene_01.png")
    os.remove(folder / "scene_05.png")
    second = _build(folder, truth, tmp_path / "index", offline_backbone)
    assert (second.added, second.updated, second.removed, second.unchanged) == (1, 1, 1, 5)
    third = _build(folder, truth, tmp_path / "index", offline_backbone)
    assert (third.added, third.updated, third.removed, third.unchanged) == (0, 0, 0, 7)

    _build(folder, truth, tmp_path / "fresh", offline_backbone)
    assert _catalog_dump(Index(tmp_path / "index").catalog_url) == _catalog_dump(Index(tmp_path / "fresh").catalog_url)
    incremental = Searcher(tmp_path / "index", backbone=offline_backbone)
    fresh = Searcher(tmp_path / "fresh", backbone=offline_backbone)
    assert len(incremental.store) == len(fresh.store) == len(incremental.catalog.region_ids())
    query = dict(image=folder / "scene_03.png", box=instance_scenes[3].boxes[1], k=5)
    assert [(Path(m.path).name, round(m.score, 4), m.box) for m in incremental.search(**query)] == \
        [(Path(m.path).name, round(m.score, 4), m.box) for m in fresh.search(**query)]


def test_a_build_removes_only_what_vanished_from_the_paths_it_was_given(tmp_path, instance_folder, offline_backbone):
    # `hassod index build NEW_FOLDER --index I` adds a folder: the images indexed from elsewhere stay.
    folder, truth = instance_folder
    paths = sorted(folder.glob("*.png"))

    def build(chosen, roots):
        return build_index(chosen, tmp_path / "index", CocoRegions(truth), RegionDescriber(offline_backbone),
                           show_progress=False, roots=roots)

    first, second = build(paths[:4], paths[:4]), build(paths[4:], paths[4:])
    assert (first.added, second.added, second.removed) == (4, 4, 0)
    assert _images_in_catalog(tmp_path / "index") == 8
    # A deleted file goes when its folder is built again.
    os.remove(paths[1])
    third = build(sorted(folder.glob("*.png")), [folder])
    assert (third.removed, third.unchanged) == (1, 7) and _images_in_catalog(tmp_path / "index") == 7
    # Without roots the paths are the whole collection.
    fourth = build(paths[:1], None)
    assert (fourth.removed, fourth.unchanged) == (6, 1) and _images_in_catalog(tmp_path / "index") == 1


def test_one_database_holds_one_index(tmp_path, instance_folder, offline_backbone):
    # A second index directory building into the same --db would take the first's images for its own.
    folder, truth = instance_folder
    paths = sorted(folder.glob("*.png"))
    url = f"sqlite:///{tmp_path / 'shared.db'}"

    def build(index_dir: Path, chosen, db_url: str | None = url):
        return build_index(chosen, Index(index_dir, db_url), CocoRegions(truth), RegionDescriber(offline_backbone),
                           show_progress=False)

    assert build(tmp_path / "first", paths[:4]).added == 4
    with pytest.raises(IncompatibleIndexError, match="holds the index of another directory"):
        build(tmp_path / "second", paths[4:])
    assert not (tmp_path / "second" / "index.json").exists()
    # Its own directory goes on building into it, with or without --db.
    assert build(tmp_path / "first", paths, db_url=None).added == 4
    with Catalog(url) as catalog:
        assert len(catalog.images()) == 8
        # A catalog from before catalogs carried the id goes to the first directory that builds into it.
        catalog.set_config({k: v for k, v in catalog.get_config().items() if k != "index_id"})
    (tmp_path / "first" / "index.json").write_text(json.dumps({"catalog": url}))
    assert build(tmp_path / "first", paths, db_url=None).unchanged == 8
    with pytest.raises(IncompatibleIndexError, match="holds the index of another directory"):
        build(tmp_path / "second", paths[4:])


def _images_in_catalog(index_dir: Path) -> int:
    path = index_dir / "catalog.sqlite"
    if not path.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1) as db:
            return db.execute("select count(*) from images").fetchone()[0]
    except sqlite3.OperationalError:
        return 0


def test_batched_catalog_transactions_give_the_same_index(tmp_path, instance_folder, offline_backbone):
    folder, truth = instance_folder
    paths = sorted(folder.glob("*.png"))
    (folder / "broken.png").write_bytes(b"not an image")  # an error entry inside a batch
    built = {}
    for batch in (1, 3):
        summary = build_index(paths + [folder / "broken.png"], tmp_path / f"batch{batch}", CocoRegions(truth),
                              RegionDescriber(offline_backbone), show_progress=False, commit_images=batch)
        with Index.open(tmp_path / f"batch{batch}") as index:
            names = {image.id: Path(image.path).name for image in index.catalog.images()}
            rows = [(names[r.image_id], r.id, r.parent_id, r.box)
                    for r in index.catalog.regions(index.catalog.region_ids().tolist())]
            built[batch] = (summary.added, summary.regions, len(summary.errors), rows, index.vectors.ids(),
                            index.vectors.reconstruct(index.vectors.ids()))
    one, batched = built[1], built[3]
    assert one[:4] == batched[:4]
    assert one[0] == 9 and one[1] == len(one[3]) > 0 and one[2] == 1  # 8 scenes and the broken file
    np.testing.assert_array_equal(one[4], batched[4])
    np.testing.assert_allclose(one[5], batched[5], atol=1e-6)


def test_a_refused_write_is_one_line_and_the_build_continues(tmp_path, instance_folder, offline_backbone):
    folder, truth = instance_folder
    index_dir = tmp_path / "index"
    command = [sys.executable, "-m", "retrieval.cli", "index", "build", str(folder), "--index", str(index_dir),
               "--regions", str(truth), "--device", "cpu"]
    # The catalog (with its write-ahead log) outgrows 150 KB after a few images, as if the disk filled up.
    refused = subprocess.run(command, capture_output=True, text=True, timeout=300,
                             preexec_fn=lambda: limit_file_size(150_000))
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
    assert refused.stderr.strip().splitlines()[-1] == (
        "error: the index catalog cannot be written (disk I/O error); "
        "finished work is saved: make room and run the same command again to continue")
    assert 0 < _images_in_catalog(index_dir) < len(list(folder.glob("*.png")))

    summary = _build(folder, truth, index_dir, offline_backbone)
    assert summary.removed == 0
    assert _catalog_dump(Index(index_dir).catalog_url) == _catalog_dump(Index(_fresh(folder, truth, tmp_path, offline_backbone)).catalog_url)


def _fresh(folder: Path, truth: Path, tmp_path: Path, backbone) -> Path:
    index_dir = tmp_path / "fresh"
    _build(folder, truth, index_dir, backbone)
    return index_dir


def test_killed_build_leaves_a_usable_index_and_resumes_without_duplicates(
    tmp_path, instance_folder, instance_scenes, offline_backbone
):
    folder, truth = instance_folder
    later = tmp_path / "later"
    later.mkdir()
    for name in ["scene_04.png", "scene_05.png", "scene_06.png", "scene_07.png"]:
        shutil.move(str(folder / name), later / name)
    index_dir = tmp_path / "index"
    _build(folder, truth, index_dir, offline_backbone)  # the previous, complete state: 4 images
    for path in later.iterdir():
        if path.name != "scene_07.png":
            shutil.move(str(path), folder / path.name)
    # The last new image is a FIFO nobody writes to: the build blocks reading it, after committing
    # scenes 04-06, and is killed there. (Polling a running build for "mid-way" raced on fast machines.)
    os.mkfifo(folder / "scene_07.png")

    command = [sys.executable, "-m", "retrieval.cli", "index", "build", str(folder), "--index", str(index_dir),
               "--regions", str(truth), "--device", "cpu", "--json"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None and _images_in_catalog(index_dir) < 7:
        time.sleep(0.2)
    assert process.poll() is None, process.communicate()[1].decode()[-2000:]  # still running: kill it mid-way
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert _images_in_catalog(index_dir) == 7
    os.remove(folder / "scene_07.png")
    shutil.move(str(later / "scene_07.png"), folder / "scene_07.png")

    searcher = Searcher(index_dir, backbone=offline_backbone)  # the index stays usable
    assert searcher.search(folder / "scene_00.png", box=instance_scenes[0].boxes[0], k=1)[0].score > 0.99
    searcher.close()

    summary = _build(folder, truth, index_dir, offline_backbone)
    assert summary.added + summary.updated >= 2 and summary.removed == 0
    with Catalog(Index(index_dir).catalog_url) as catalog:
        names = [Path(image.path).name for image in catalog.images()]
        assert sorted(names) == [f"scene_{i:02d}.png" for i in range(8)]
        region_ids = catalog.region_ids()
    assert len(region_ids) == sum(len(s.masks) for s in instance_scenes)
    searcher = Searcher(index_dir, backbone=offline_backbone)
    assert np.array_equal(np.sort(searcher.store.ids()), region_ids)
    for index in (5, 7):  # images indexed by the resumed build are found
        top = searcher.search(folder / f"scene_{index:02d}.png", box=instance_scenes[index].boxes[0], k=1)[0]
        assert top.path.endswith(f"scene_{index:02d}.png") and top.score > 0.99


def test_sqlite_and_postgresql_give_identical_results(tmp_path, instance_folder, instance_scenes, offline_backbone,
                                                       postgres_url):
    folder, truth = instance_folder
    _build(folder, truth, tmp_path / "lite", offline_backbone)
    _build(folder, truth, tmp_path / "pg", offline_backbone, db_url=postgres_url)
    assert (tmp_path / "pg" / "index.json").exists() and not (tmp_path / "pg" / "catalog.sqlite").exists()
    assert _catalog_dump(Index(tmp_path / "lite").catalog_url) == _catalog_dump(postgres_url)
    lite = Searcher(tmp_path / "lite", backbone=offline_backbone)
    pg = Searcher(tmp_path / "pg", backbone=offline_backbone)
    for index, scene in enumerate(instance_scenes[:4]):
        query = dict(image=folder / f"scene_{index:02d}.png", box=scene.boxes[0], k=6, level="whole")
        assert [(Path(m.path).name, m.region_id, round(m.score, 5)) for m in lite.search(**query)] == \
            [(Path(m.path).name, m.region_id, round(m.score, 5)) for m in pg.search(**query)]
    pg.close()


@pytest.mark.parametrize("recipe", ["search", "paper"])
def test_discovery_regions_round_trip(tmp_path, instance_folder, instance_scenes, offline_backbone, recipe):
    """The training-free region source, by either recipe (search is the default): discovery finds the
    pasted objects well enough that a box query returns them with box IoU >= 0.5."""
    from hassod.discover.recipes import recipe_settings

    folder, _ = instance_folder
    paths = sorted(folder.glob("*.png"))[:6]
    source = DiscoveryRegions(offline_backbone, recipe_settings(recipe), workers=2)
    summary = build_index(paths, tmp_path / "index", source, RegionDescriber(offline_backbone), show_progress=False)
    assert summary.added == 6 and summary.regions >= 6 * 2
    searcher = Searcher(tmp_path / "index", backbone=offline_backbone)
    scenes = instance_scenes[:6]
    hits = 0
    for index, scene in enumerate(scenes):
        for obj, box in zip(scene.objects, scene.boxes):
            holders = {i for i, s in enumerate(scenes) if obj in s.objects}
            top = searcher.search(folder / f"scene_{index:02d}.png", box=box, k=1)[0]
            top_index = int(Path(top.path).stem.split("_")[1])
            truth = scenes[top_index].boxes[scenes[top_index].objects.index(obj)] if top_index in holders else None
            hits += truth is not None and box_iou(top.box, truth) >= 0.5
    assert hits >= 0.75 * sum(len(s.objects) for s in scenes)


def test_whole_image_query_finds_its_regions_as_the_build_did(tmp_path, instance_folder, offline_backbone):
    from hassod.discover.pipeline import DiscoverySettings
    from hassod.images import load_rgb

    folder, _ = instance_folder
    paths = sorted(folder.glob("*.png"))[:3]
    source = DiscoveryRegions(offline_backbone, DiscoverySettings(thresholds=(0.7, 0.5)))
    assert source.settings.thresholds != offline_backbone.default_thresholds
    build_index(paths, tmp_path / "index", source, RegionDescriber(offline_backbone), show_progress=False)
    searcher = Searcher(tmp_path / "index", backbone=offline_backbone)
    try:
        matches = searcher.search(paths[0], k=3)
        query_source = searcher._query_source
        rows = searcher._image_regions(load_rgb(paths[0]))
        own, _ = searcher.catalog.region_ids_of_images([matches[0].image_id], None)
        similarities = rows @ searcher.store.reconstruct(own).T
    finally:
        searcher.close()
    assert matches[0].path == str(paths[0].resolve())
    assert query_source.settings.thresholds == (0.7, 0.5)
    # The query's own regions all match at ~1.0: the one shown is the most like the whole query.
    best = similarities.max(axis=0)
    tied = np.flatnonzero(best >= best.max() - 1e-4)
    assert len(tied) > 1 and matches[0].region_id == own[tied[np.argmax(similarities[:, tied].mean(axis=0))]]
    with Catalog(Index(tmp_path / "index").catalog_url) as catalog:
        image_id = next(image.id for image in catalog.images() if image.path == str(paths[0].resolve()))
        stored = [r.box for r in catalog.regions(catalog.region_ids().tolist()) if r.image_id == image_id]
    found = [r.box for r in query_source.regions_of_image(load_rgb(paths[0]))]
    assert len(found) == len(stored) > 0
    assert np.allclose(sorted(found), sorted(stored), atol=1e-3)


def test_whitened_index_round_trip_and_reuse(tmp_path, instance_folder, instance_scenes, offline_backbone):
    folder, truth = instance_folder
    paths = sorted(folder.glob("*.png"))
    describer = RegionDescriber(offline_backbone)
    # Learned from the first ~20 vectors only, so the later ones are whitened as they stream in.
    settings = WhiteningSettings(dim=16, sample=20)
    build_index(paths[:6], tmp_path / "index", CocoRegions(truth), describer, show_progress=False, whitening=settings)
    learned = PCAWhitening.load(tmp_path / "index" / "whitening.npz")
    assert (learned.dim_in, learned.dim_out) == (describer.dim, 16)
    # A re-run without a whitening request keeps the index's own: the new image's vectors are whitened too.
    summary = build_index(paths, tmp_path / "index", CocoRegions(truth), describer, show_progress=False)
    assert summary.added == 2
    searcher = Searcher(tmp_path / "index", backbone=offline_backbone)
    assert searcher.store.dim == 16 and searcher.config.whitening == WhiteningSettings(dim=16, shrinkage=0.8)
    last = searcher.catalog.region_ids_by_image()[str(paths[-1].resolve())]
    regions = searcher.catalog.regions(last.tolist())
    image = np.asarray(Image.open(paths[-1]).convert("RGB"))
    raw = describer.describe(describer.feature_map([image])[0], np.asarray([r.box for r in regions]),
                             masks=[r.mask_rle for r in regions])
    np.testing.assert_allclose(searcher.store.reconstruct(last), learned.transform(raw), atol=1e-5)
    # A crop of an indexed region still finds that region first, in the whitened space.
    first = searcher.search(folder / "scene_00.png", box=instance_scenes[0].boxes[0], k=1)[0]
    assert first.path.endswith("scene_00.png") and first.score == pytest.approx(1.0, abs=1e-4)
    searcher.close()

    with pytest.raises(IncompatibleIndexError, match="whitened to 16 dimensions"):
        build_index(paths, tmp_path / "index", CocoRegions(truth), describer, show_progress=False,
                    whitening=WhiteningSettings(dim=8))


def test_whitening_needs_enough_vectors(tmp_path, instance_folder, offline_backbone):
    folder, truth = instance_folder
    paths = sorted(folder.glob("*.png"))[:2]
    with pytest.raises(WhiteningError, match="span only"):
        build_index(paths, tmp_path / "index", CocoRegions(truth), RegionDescriber(offline_backbone),
                    show_progress=False, whitening=WhiteningSettings(dim=200))
    # Nothing was stored unwhitened: a smaller dimension then works on the same directory.
    build_index(paths, tmp_path / "index", CocoRegions(truth), RegionDescriber(offline_backbone),
                show_progress=False, whitening=WhiteningSettings(dim=4))
    assert Searcher(tmp_path / "index", backbone=offline_backbone).store.dim == 4


def test_a_second_build_of_the_same_index_is_refused_while_one_runs(tmp_path, instance_folder, offline_backbone):
    import fcntl

    from hassod.locks import BusyError

    folder, truth = instance_folder
    index_dir = tmp_path / "index"
    index_dir.mkdir()
    # Held the way a running build holds it; a second open file of the same lock conflicts, even in one process.
    with open(index_dir / "build.lock", "w") as running:
        fcntl.flock(running, fcntl.LOCK_EX | fcntl.LOCK_NB)
        running.write("4242")
        running.flush()
        with pytest.raises(BusyError, match=r"another `hassod index build` \(pid 4242\) is writing"):
            _build(folder, truth, index_dir, offline_backbone)
    assert not (index_dir / "vectors.faiss").exists()
    summary = _build(folder, truth, index_dir, offline_backbone)  # the lock went with its holder
    assert summary.added == 8 and (index_dir / "build.lock").read_text() == str(os.getpid())
