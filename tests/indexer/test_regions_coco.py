"""A --regions file is checked before any image is indexed: a bad one is a one-line error."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from indexer.regions import CocoRegions, RegionsFileError
from retrieval.cli import app

GOOD_IMAGE = {"id": 1, "file_name": "a.png"}


@pytest.mark.parametrize("content, message", [
    ("{bad", "is not a JSON file (Expecting property name"),
    (json.dumps([1, 2]), "is not a COCO file: it has no 'images' list"),
    (json.dumps({"annotations": []}), "is not a COCO file: it has no 'images' list"),
    (json.dumps({"images": [{"id": 1}]}), "images[0] has no file_name"),
    (json.dumps({"images": [GOOD_IMAGE], "annotations": [{"id": 1, "image_id": 1, "bbox": [0, 0, 1, 1]}]}),
     "annotations[0] has no area, segmentation"),
])
def test_bad_regions_files(tmp_path, content, message):
    path = tmp_path / "regions.json"
    path.write_text(content)
    with pytest.raises(RegionsFileError, match=message.replace("(", r"\(").replace("[", r"\[")):
        CocoRegions(path)


def test_index_build_refuses_a_bad_regions_file_before_indexing(tmp_path, coco128_images):
    regions = tmp_path / "regions.json"
    regions.write_text(json.dumps({"images": [GOOD_IMAGE], "annotations": [{"id": 1}]}))
    index_dir = tmp_path / "index"
    result = CliRunner().invoke(app, ["index", "build", str(coco128_images[0]), "--index", str(index_dir),
                                      "--regions", str(regions), "--device", "cpu"])
    assert result.exit_code == 2
    assert result.output == f"error: {regions}: annotations[0] has no image_id, bbox, area, segmentation\n"
    assert not index_dir.exists()


def test_a_query_finds_its_regions_with_the_settings_the_regions_file_was_discovered_with(tmp_path, instance_folder,
                                                                                           offline_backbone):
    from indexer.index import Index
    from indexer.regions import query_regions

    folder, _ = instance_folder
    pseudo = tmp_path / "pseudo.json"
    runner = CliRunner()
    found = runner.invoke(app, ["discover", str(folder / "scene_00.png"), str(folder / "scene_01.png"), "--out",
                                str(pseudo), "--thresholds", "0.6,0.45", "--device", "cpu", "--workers", "1"])
    assert found.exit_code == 0, found.output
    built = runner.invoke(app, ["index", "build", str(folder / "scene_00.png"), "--index", str(tmp_path / "index"),
                                "--regions", str(pseudo), "--device", "cpu", "--json"])
    assert built.exit_code == 0, built.output
    with Index.open(tmp_path / "index") as index:
        recorded = index.config.query_regions
    assert recorded == {"kind": "discovery", "recipe": "paper", "thresholds": [0.6, 0.45]}
    assert query_regions(recorded, offline_backbone).settings.thresholds == (0.6, 0.45)

    # Regions discovered with other weights say nothing about this backbone's thresholds.
    data = json.loads(pseudo.read_text())
    data["info"]["weights"] = "another"
    pseudo.write_text(json.dumps(data))
    assert CocoRegions(pseudo, backbone=offline_backbone).query_settings == {"kind": "discovery", "thresholds": None}
    assert CocoRegions(pseudo).query_settings == {"kind": "discovery", "thresholds": None}
