"""Region recipes in an index: recorded in its configuration, used by whole-image queries, kept on update."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from hassod.discover.pipeline import DiscoverySettings
from hassod.discover.search import SearchSettings
from hassod.images import load_rgb
from indexer.build import build_index
from indexer.catalog import Catalog
from indexer.descriptors import RegionDescriber
from indexer.index import IncompatibleSourceError, Index
from indexer.regions import DiscoveryRegions
from retrieval.cli import app
from retrieval.searcher import Searcher


def _stored_boxes(index_dir: Path, path: Path) -> list:
    with Catalog(Index(index_dir).catalog_url) as catalog:
        image_id = next(image.id for image in catalog.images() if image.path == str(path.resolve()))
        return [r.box for r in catalog.regions(catalog.region_ids().tolist()) if r.image_id == image_id]


def test_search_is_the_default_recorded_recipe_and_whole_image_queries_use_it(tmp_path, instance_folder,
                                                                               offline_backbone):
    folder, _ = instance_folder
    paths = sorted(folder.glob("*.png"))[:3]
    settings = SearchSettings(max_regions=40)
    source = DiscoveryRegions(offline_backbone, settings)
    assert source.settings.thresholds == offline_backbone.search_thresholds
    build_index(paths, tmp_path / "index", source, RegionDescriber(offline_backbone), show_progress=False)
    searcher = Searcher(tmp_path / "index", backbone=offline_backbone)
    try:
        assert searcher.config.recipe == "search"
        assert searcher.config.query_regions["max_regions"] == 40
        matches = searcher.search(paths[0], k=3)
        query_source = searcher._query_source
    finally:
        searcher.close()
    assert matches[0].path == str(paths[0].resolve())
    assert query_source.settings == source.settings
    found = [r.box for r in query_source.regions_of_image(load_rgb(paths[0]))]
    stored = _stored_boxes(tmp_path / "index", paths[0])
    assert 0 < len(found) == len(stored) <= 40
    assert np.allclose(sorted(found), sorted(stored), atol=1e-3)


def _forget_recipe(index_dir: Path) -> None:
    """Make the index's configuration look like one written before recipes existed."""
    with Catalog(Index(index_dir).catalog_url) as catalog:
        config = catalog.get_config()
        del config["recipe"]
        config["query_regions"] = {"kind": "discovery", "thresholds": config["query_regions"]["thresholds"]}
        catalog.set_config({k: v for k, v in config.items() if k not in ("format_version", "created_at")})


def test_an_index_built_with_paper_before_recipes_opens_answers_and_updates_as_paper(tmp_path, instance_folder,
                                                                                     instance_scenes, offline_backbone):
    folder, _ = instance_folder
    paths = sorted(folder.glob("*.png"))
    index_dir = tmp_path / "index"
    paper = DiscoveryRegions(offline_backbone, DiscoverySettings())
    build_index(paths[:2], index_dir, paper, RegionDescriber(offline_backbone), show_progress=False)
    _forget_recipe(index_dir)

    searcher = Searcher(index_dir, backbone=offline_backbone)
    try:
        assert searcher.config.recipe == "paper"  # what an index from before recipes was built with
        whole = searcher.search(paths[1], k=2)
        boxed = searcher.search(paths[0], box=instance_scenes[0].boxes[0], k=2)
        query_source = searcher._query_source
    finally:
        searcher.close()
    assert whole[0].path == str(paths[1].resolve()) and boxed[0].path == str(paths[0].resolve())
    assert query_source.recipe == "paper" and query_source.settings.thresholds == offline_backbone.default_thresholds

    # Without --recipe, an update keeps the index's recipe; asking for another one is refused in one line.
    runner = CliRunner()
    refused = runner.invoke(app, ["index", "build", str(paths[2]), "--index", str(index_dir), "--recipe", "search",
                                  "--device", "cpu", "--workers", "1"])
    assert refused.exit_code == 2, refused.output
    assert refused.output.strip().splitlines() == [
        "error: this index holds regions of the paper recipe, not search; pass --recipe paper to update it, "
        "or build into a new --index directory"]
    updated = runner.invoke(app, ["index", "build", str(paths[2]), "--index", str(index_dir), "--device", "cpu",
                                  "--workers", "1", "--json"])
    assert updated.exit_code == 0, updated.output
    with Catalog(Index(index_dir).catalog_url) as catalog:
        assert len(catalog.images()) == 3 and "recipe" not in catalog.get_config()


def test_a_recipe_mismatch_is_refused_by_the_library_too(tmp_path, instance_folder, offline_backbone):
    folder, _ = instance_folder
    paths = sorted(folder.glob("*.png"))[:1]
    describer = RegionDescriber(offline_backbone)
    build_index(paths, tmp_path / "index", DiscoveryRegions(offline_backbone, SearchSettings(max_regions=10)),
                describer, show_progress=False)
    with pytest.raises(IncompatibleSourceError, match="regions of the search recipe, not paper; pass --recipe search"):
        build_index(paths, tmp_path / "index", DiscoveryRegions(offline_backbone, DiscoverySettings()), describer,
                    show_progress=False)
    with Catalog(Index(tmp_path / "index").catalog_url) as catalog:
        assert catalog.get_config()["recipe"] == "search"


def test_an_update_without_options_keeps_the_index_settings(tmp_path, instance_folder, offline_backbone):
    folder, _ = instance_folder
    paths = sorted(folder.glob("*.png"))[:2]
    build_index(paths[:1], tmp_path / "index", DiscoveryRegions(offline_backbone, SearchSettings(max_regions=7)),
                RegionDescriber(offline_backbone), show_progress=False)
    result = CliRunner().invoke(app, ["index", "build", str(paths[1]), "--index", str(tmp_path / "index"),
                                      "--device", "cpu", "--workers", "1", "--json"])
    assert result.exit_code == 0, result.output
    with Catalog(Index(tmp_path / "index").catalog_url) as catalog:
        assert [image.n_regions for image in catalog.images()] == [7, 7]
    refused = CliRunner().invoke(app, ["index", "build", str(paths[1]), "--index", str(tmp_path / "index"),
                                       "--device", "cpu", "--recipe", "paper", "--max-regions", "5"])
    assert refused.exit_code == 2
    assert refused.output.strip().splitlines() == ["error: --max-regions applies to the search recipe only "
                                                   "(paper keeps every mask it finds)"]


def test_a_search_build_runs_the_network_once_per_image(tmp_path, instance_folder, offline_backbone, monkeypatch):
    folder, _ = instance_folder
    paths = sorted(folder.glob("*.png"))[:3]
    calls = []
    forward = RegionDescriber.feature_map

    def counted(self, images, grid=False):
        calls.append((len(images), grid))
        return forward(self, images, grid)

    monkeypatch.setattr(RegionDescriber, "feature_map", counted)
    summary = build_index(paths, tmp_path / "index", DiscoveryRegions(offline_backbone, SearchSettings(max_regions=20)),
                          RegionDescriber(offline_backbone), show_progress=False)
    assert summary.added == 3 and summary.regions == 60
    assert calls == [(3, True)]  # one batch for the regions and their descriptors, nothing more
