"""The Index object: its configuration's round trip through the catalog, refusal of a mismatched one, opening."""
from __future__ import annotations

import dataclasses
import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from indexer.build import build_index
from indexer.descriptors import DescriptorSettings, RegionDescriber
from indexer.index import (IncompatibleIndexError, IncompatibleSourceError, Index, IndexConfig,
                           IndexNotFoundError)
from indexer.regions import CocoRegions, DiscoveryRegions
from indexer.whitening import WhiteningSettings
from hassod.discover.search import SearchSettings
from retrieval.searcher import Searcher


@pytest.fixture
def built(tmp_path, instance_folder, offline_backbone) -> tuple[Path, IndexConfig, list[Path]]:
    """An index of three scenes with regions from their COCO file: (directory, the configuration of that
    build, the images)."""
    folder, truth = instance_folder
    paths = sorted(folder.glob("*.png"))[:3]
    source, describer = CocoRegions(truth), RegionDescriber(offline_backbone)
    build_index(paths, tmp_path / "index", source, describer, show_progress=False)
    return tmp_path / "index", IndexConfig.of_build(describer, source), paths


def test_the_configuration_round_trips_through_the_catalog(built, offline_backbone):
    directory, expected, _ = built
    with Index.open(directory) as index:
        config = index.config
        stored = index.catalog.get_config()
    assert dataclasses.replace(config, created_at=None) == expected
    assert config.created_at.endswith("+00:00") and config.format_version == 1
    assert IndexConfig.from_dict(config.to_dict()) == config
    assert IndexConfig.from_dict(json.loads(json.dumps(stored))) == config
    # The catalog holds one row per field, named as before the Index object: old indexes read the same.
    assert set(stored) == {"backbone", "weights", "descriptor", "descriptor_version", "descriptor_dim",
                           "descriptor_settings", "region_source", "recipe", "query_regions", "whitening",
                           "format_version", "created_at"}
    assert stored["region_source"].startswith("coco:") and stored["recipe"] is None
    assert config.dim == config.descriptor_dim == RegionDescriber(offline_backbone).dim
    assert config.describer(offline_backbone).name == config.descriptor


def test_a_whitened_configuration_keeps_its_dimension(tmp_path, instance_folder, offline_backbone):
    folder, truth = instance_folder
    paths = sorted(folder.glob("*.png"))[:4]
    build_index(paths, tmp_path / "index", CocoRegions(truth), RegionDescriber(offline_backbone),
                whitening=WhiteningSettings(dim=12, sample=20), show_progress=False)
    with Index.open(tmp_path / "index") as index:
        assert index.config.whitening == WhiteningSettings(dim=12, shrinkage=0.8)
        assert index.config.dim == 12 and index.vectors.dim == 12 and index.whitening.dim_out == 12
        assert index.catalog.get_config()["whitening"] == {"dim": 12, "shrinkage": 0.8}
        assert index.stats()["whitening"] == {"dim_in": index.config.descriptor_dim, "dim_out": 12}


def _mismatches(config: IndexConfig) -> list[tuple[IndexConfig, type[Exception], str]]:
    """Requests an index built with ``config`` must refuse: (request, error, the start of its message)."""
    return [
        (dataclasses.replace(config, backbone="dino_vits8"), IncompatibleIndexError,
         f"index was built with backbone {config.backbone}, but backbone dino_vits8 was requested"),
        (dataclasses.replace(config, weights="sha256:ffff"), IncompatibleIndexError,
         f"index was built with weights {config.weights}, but weights sha256:ffff was requested"),
        (dataclasses.replace(config, descriptor="other", descriptor_dim=7), IncompatibleIndexError,
         f"index was built with descriptor {config.descriptor} / descriptor dim {config.descriptor_dim}, "
         "but descriptor other / descriptor dim 7 was requested"),
        (dataclasses.replace(config, whitening=WhiteningSettings(dim=8)), IncompatibleIndexError,
         "this index was built without whitening; build into a new --index directory to whiten"),
        (dataclasses.replace(config, region_source="detector:abc"), IncompatibleSourceError,
         f"this index holds regions from {config.region_source}, not detector:abc"),
    ]


def test_a_mismatched_configuration_is_refused_with_what_differs(built):
    directory, expected, _ = built
    with Index.open(directory) as index:
        stored = index.config
    stored.check_update(expected)  # the same build again is accepted
    for request, error, message in _mismatches(stored):
        with pytest.raises(error) as raised:
            stored.check_update(request)
        assert str(raised.value).startswith(message), str(raised.value)
    searched = dataclasses.replace(stored, recipe="search", region_source="search:x")
    with pytest.raises(IncompatibleSourceError, match="regions of the search recipe, not paper; pass --recipe search"):
        searched.check_update(dataclasses.replace(searched, recipe="paper"))
    with pytest.raises(IncompatibleIndexError, match="format version 99, this hassod reads version 1"):
        dataclasses.replace(stored, format_version=99).check_update(expected)


def test_a_build_with_other_descriptor_settings_is_refused_and_changes_nothing(built, offline_backbone):
    directory, _, paths = built
    with Index.open(directory) as index:
        before = (index.catalog.get_config(), len(index.vectors))
    other = RegionDescriber(offline_backbone, DescriptorSettings(layers=("s32",)))
    with pytest.raises(IncompatibleIndexError, match="descriptor dim"):
        build_index(paths, directory, DiscoveryRegions(offline_backbone, SearchSettings(max_regions=5)), other,
                    show_progress=False)
    with Index.open(directory) as index:
        assert (index.catalog.get_config(), len(index.vectors)) == before


def test_an_index_from_before_recipes_reads_as_paper(built):
    directory, _, _ = built
    with Index.open(directory) as index:
        stored = index.catalog.get_config()
    legacy = {k: v for k, v in stored.items() if k != "recipe"}
    assert IndexConfig.from_dict({**legacy, "region_source": "discovery:lite0:w:0.5"}).recipe == "paper"
    assert IndexConfig.from_dict(legacy).recipe is None  # COCO regions have no recipe
    paper = IndexConfig.from_dict({**legacy, "region_source": "discovery:lite0:w:0.5",
                                   "query_regions": {"kind": "discovery", "thresholds": [0.5, 0.3]}})
    recipe = paper.discovery_recipe()
    assert recipe.recipe == "paper" and tuple(recipe.thresholds) == (0.5, 0.3)


def test_a_damaged_configuration_is_refused_in_one_line(built):
    directory, _, _ = built
    with Index.open(directory) as index:
        stored = index.catalog.get_config()
        index.catalog.set_config({k: v for k, v in stored.items() if k != "descriptor_dim"})
    with pytest.raises(IncompatibleIndexError, match=r"configuration in the catalog .* is damaged \(KeyError"):
        Index.open(directory)


def test_open_says_what_is_missing(tmp_path, built):
    directory, _, _ = built
    with pytest.raises(IndexNotFoundError, match=f"no index at {tmp_path / 'nowhere'}"):
        Index.open(tmp_path / "nowhere")
    (tmp_path / "file").write_text("x")
    with pytest.raises(IndexNotFoundError, match="is a file, not an index directory"):
        Index.open(tmp_path / "file")
    empty = tmp_path / "empty"
    empty.mkdir()
    sqlite3.connect(empty / "catalog.sqlite").close()  # a first build killed before it recorded anything
    with pytest.raises(IndexNotFoundError, match="empty: its first build has not finished"):
        Index.open(empty)
    with pytest.raises(IndexNotFoundError, match="empty: its first build has not finished"):
        Searcher(Index(empty), load_backbone=False)


def test_stats_and_the_searcher_read_the_same_index(built, offline_backbone):
    directory, _, paths = built
    index = Index.open(directory)
    stats = index.stats()
    searcher = Searcher(index, backbone=offline_backbone)
    try:
        assert searcher.store is index.vectors and searcher.config is index.config
        assert stats["images_ok"] == 3 and stats["regions"] == len(index.vectors) == len(index.catalog.region_ids())
        assert stats["regions_without_vectors"] == 0 and stats["config"] == index.catalog.get_config()
        assert stats["bytes_on_disk"] == index.vectors_path.stat().st_size
        assert searcher.search(paths[1], k=1)[0].path == str(paths[1].resolve())
    finally:
        searcher.close()


def test_a_load_racing_a_build_that_replaces_the_on_disk_lists_reads_the_new_index(tmp_path, instance_folder,
                                                                                      offline_backbone, monkeypatch):
    from indexer.vectors.ondisk import OnDiskKind

    folder, truth = instance_folder
    paths = sorted(folder.glob("*.png"))
    source, describer = CocoRegions(truth), RegionDescriber(offline_backbone)
    build_index(paths[:4], tmp_path / "index", source, describer, index_type="ondisk", show_progress=False)
    first_lists = list((tmp_path / "index").glob("vectors.*.ivfdata"))
    real_opened, raced = OnDiskKind.opened, []

    def opened_after_a_build(kind, index, path):
        # The file this load read names lists that the build below replaces and deletes before they are mapped.
        if not raced:
            raced.append(build_index(paths, tmp_path / "index", source, describer, index_type="ondisk",
                                     show_progress=False))
        real_opened(kind, index, path)

    monkeypatch.setattr(OnDiskKind, "opened", opened_after_a_build)
    with Index.open(tmp_path / "index") as index:
        assert raced[0].added == 4 and not any(lists.exists() for lists in first_lists)
        np.testing.assert_array_equal(np.sort(index.vectors.ids()), np.sort(index.catalog.region_ids()))
        assert len(index.catalog.images()) == 8
