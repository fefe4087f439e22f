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
