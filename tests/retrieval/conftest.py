"""Indexes of the synthetic instance scenes: one built through the command line per test, one shared by a module."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from hassod.synthetic import save_scenes
from indexer.build import build_index
from indexer.descriptors import RegionDescriber
from indexer.regions import CocoRegions
from retrieval.cli import app


@pytest.fixture
def built_index(tmp_path, instance_folder):
    """(folder of the 8 scenes, index directory built from their true regions)."""
    folder, truth = instance_folder
    index_dir = tmp_path / "index"
    result = CliRunner().invoke(app, ["index", "build", str(folder), "--index", str(index_dir),
                                      "--regions", str(truth), "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert summary["added"] == 8 and summary["errors"] == []
    return folder, index_dir


@pytest.fixture(scope="module")
def scenes_index(tmp_path_factory, instance_scenes, offline_backbone):
    """(folder of the 8 scenes, index directory of their true regions), built once per module: its tests only read it."""
    root = tmp_path_factory.mktemp("scenes_index")
    folder = root / "collection"
    truth = save_scenes(instance_scenes, folder, root / "truth.json")
    build_index(sorted(folder.glob("*.png")), root / "index", CocoRegions(truth), RegionDescriber(offline_backbone),
                show_progress=False)
    return folder, root / "index"
