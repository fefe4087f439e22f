"""`hassod index build --detector`: the index's regions are the detector's detections, and it refuses other weights."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from hassod.detect import Detector
from indexer.build import build_index
from indexer.catalog import Catalog
from indexer.descriptors import RegionDescriber
from indexer.index import IncompatibleSourceError, Index
from indexer.regions import DetectorRegions
from retrieval.cli import app
from retrieval.searcher import Searcher


def _checkpoint(path: Path, seed: int) -> Path:
    from hassod.model import DetectorSettings, build_detector, save_checkpoint

    torch.manual_seed(seed)
    settings = DetectorSettings.tiny()
    save_checkpoint(path, build_detector(settings, random_init=True), settings)
    return path


@pytest.fixture(scope="module")
def scenes_folder(tmp_path_factory) -> Path:
    from hassod.synthetic import make_scene, save_scenes

    root = tmp_path_factory.mktemp("collection")
    save_scenes([make_scene(seed, size=(96, 128)) for seed in range(3)], root / "images", root / "truth.json")
    return root / "images"


def test_index_regions_are_the_detections_and_search_finds_them(tmp_path, scenes_folder, offline_backbone):
    checkpoint = _checkpoint(tmp_path / "a.pt", seed=0)
    index_dir = tmp_path / "index"
    built = CliRunner().invoke(app, ["index", "build", str(scenes_folder), "--index", str(index_dir),
                                     "--detector", str(checkpoint), "--device", "cpu", "--json"])
    assert built.exit_code == 0, built.output
    summary = json.loads(built.output.strip().splitlines()[-1])

    paths = sorted(str(p.resolve()) for p in scenes_folder.glob("*.png"))
    detector = Detector(checkpoint, device="cpu")
    expected = {path: found for path, _, found, _ in detector.detect_paths(paths)}
    assert summary["added"] == 3 and summary["regions"] == sum(len(f) for f in expected.values()) > 0

    with Catalog(Index(index_dir).catalog_url) as catalog:
        assert catalog.get_config()["region_source"] == detector.identity
        assert detector.digest in detector.identity
        by_path = {image.id: image.path for image in catalog.images()}
        regions = catalog.regions(catalog.region_ids().tolist())
    for path, found in expected.items():
        mine = sorted((r for r in regions if by_path[r.image_id] == path), key=lambda r: r.id)
        assert len(mine) == len(found)
        # Regions are stored in detection order, so ids follow it.
        assert np.allclose([r.box for r in mine], found.boxes, atol=1e-3)
        assert [r.level for r in mine] == found.levels.tolist()
        assert [r.area for r in mine] == found.masks.reshape(len(found), -1).sum(axis=1).tolist()
        position = {r.id: i for i, r in enumerate(mine)}
        assert [position[r.parent_id] if r.parent_id is not None else -1 for r in mine] == found.parents.tolist()

    # A crop of an indexed region finds its own image first, at similarity ~1.
    first_path = paths[0]
    box = expected[first_path].boxes[0].tolist()
    searcher = Searcher(index_dir, backbone=offline_backbone)
    try:
        matches = searcher.search(first_path, box=box, k=2)
    finally:
        searcher.close()
    assert len(matches) == 2 and matches[0].path == first_path and matches[0].score == pytest.approx(1.0, abs=1e-3)


def test_whole_image_queries_use_the_index_detector(tmp_path, scenes_folder, offline_backbone):
    checkpoint = _checkpoint(tmp_path / "a.pt", seed=0)
    index_dir = tmp_path / "index"
    paths = sorted(scenes_folder.glob("*.png"))
    build_index(paths, index_dir, DetectorRegions(checkpoint, device="cpu"), RegionDescriber(offline_backbone),
                show_progress=False)
    first = str(paths[0].resolve())
    searcher = Searcher(index_dir, backbone=offline_backbone, device="cpu")
    try:
        matches = searcher.search(first, k=3)
        assert isinstance(searcher._query_source, DetectorRegions)
        assert searcher._query_source.detector.digest == Detector(checkpoint, device="cpu").digest
    finally:
        searcher.close()
    # Its own image first: every query region (the same detections) finds itself at similarity 1; only the
    # whole-image row, not an indexed region, scores less (0.9975 measured, a mean over 1 + detections rows).
    assert matches[0].path == first and matches[0].score >= 0.99

    moved = checkpoint.rename(tmp_path / "moved.pt")
    lost = CliRunner().invoke(app, ["search", "--index", str(index_dir), "--query", first, "--device", "cpu"])
    assert lost.exit_code == 2 and "pass --detector" in lost.stderr and len(lost.stderr.splitlines()) == 1
    found = CliRunner().invoke(app, ["search", "--index", str(index_dir), "--query", first, "--device", "cpu",
                                     "--detector", str(moved), "--json"])
    assert found.exit_code == 0, found.output
    assert json.loads(found.stdout.splitlines()[0])["path"] == first
    other = _checkpoint(tmp_path / "other.pt", seed=1)
    wrong = CliRunner().invoke(app, ["search", "--index", str(index_dir), "--query", first, "--device", "cpu",
                                     "--detector", str(other)])
    assert wrong.exit_code == 2 and "not the detector this index was built with" in wrong.stderr


def test_index_refuses_another_checkpoint(tmp_path, scenes_folder, offline_backbone):
    first, second = _checkpoint(tmp_path / "a.pt", seed=0), _checkpoint(tmp_path / "b.pt", seed=1)
    one, other = DetectorRegions(first, device="cpu"), DetectorRegions(second, device="cpu")
    assert one.identity != other.identity and one.identity == DetectorRegions(first, device="cpu").identity
    index_dir = tmp_path / "index"
    image = sorted(scenes_folder.glob("*.png"))[:1]
    describer = RegionDescriber(offline_backbone)
    assert build_index(image, index_dir, one, describer, show_progress=False).added == 1
    with pytest.raises(IncompatibleSourceError, match="regions from detector:"):
        build_index(image, index_dir, other, describer, show_progress=False)
    not_a_checkpoint = tmp_path / "notes.pt"
    not_a_checkpoint.write_text("hello")
    bad = CliRunner().invoke(app, ["index", "build", str(image[0]), "--index", str(index_dir), "--device", "cpu",
                                   "--detector", str(not_a_checkpoint)])
    assert bad.exit_code == 2 and bad.stderr.startswith("error: --detector") and len(bad.stderr.splitlines()) == 1
