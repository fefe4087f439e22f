"""`hassod index build` refuses a bad catalog URL or index type in one line, before writing anything."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from retrieval.cli import app


@pytest.mark.parametrize("option, message", [
    (["--db", "postgresql://someone:secret@127.0.0.1:1/nowhere"],
     "cannot open the catalog at postgresql://someone:***@127.0.0.1:1/nowhere: connection failed"),
    (["--db", "nosuchdb://x"], "cannot open the catalog at nosuchdb://x: Can't load plugin: sqlalchemy.dialects:nosuchdb"),
    (["--db", "not a url"], "cannot open the catalog at not a url: Could not parse SQLAlchemy URL"),
    (["--index-type", "bogus"], "index type 'bogus' is neither one of auto, flat, ivf, ivfsq, ivfpq, hnsw, pqfs, "
                                "ondisk nor a faiss factory string (could not parse index string bogus)"),
    (["--index-type", "Flat"], "factory string 'Flat' must describe an IVF index"),
    (["--actors", "2"], "--actors, --gpus-per-actor, --train-sample and --shard-images go with --ray ADDRESS"),
    (["--ray", "auto", "--whiten"], "a --ray build writes an ondisk index without whitening"),
])
def test_refused_before_anything_is_written(tmp_path, coco128_images, option, message):
    regions = tmp_path / "regions.json"
    regions.write_text(json.dumps({"images": [], "annotations": []}))
    index_dir = tmp_path / "index"
    result = CliRunner().invoke(app, ["index", "build", str(coco128_images[0]), "--index", str(index_dir),
                                      "--regions", str(regions), "--device", "cpu", *option])
    assert result.exit_code == 2, result.output
    assert result.output.startswith(f"error: {message}") and len(result.output.splitlines()) == 1
    assert "secret" not in result.output
    # Nothing left behind: in particular no pointer to a catalog that never opened.
    assert not index_dir.exists()


def test_detector_and_regions_exclude_each_other(tmp_path, coco128_images):
    regions = tmp_path / "regions.json"
    regions.write_text(json.dumps({"images": [], "annotations": []}))
    checkpoint = tmp_path / "detector.pth"
    checkpoint.write_bytes(b"never read")
    result = CliRunner().invoke(app, ["index", "build", str(coco128_images[0]), "--index", str(tmp_path / "index"),
                                      "--regions", str(regions), "--detector", str(checkpoint)])
    assert result.exit_code == 2 and result.output.startswith("error: give either --detector")
    assert not (tmp_path / "index").exists()


def test_remove_takes_images_out_of_the_index_and_a_build_puts_them_back(tmp_path, instance_folder, instance_scenes,
                                                                          offline_backbone):
    import numpy as np

    from indexer.index import Index
    from retrieval.searcher import Searcher

    folder, truth = instance_folder
    index = tmp_path / "index"
    runner = CliRunner()
    build = ["index", "build", str(folder), "--index", str(index), "--regions", str(truth), "--device", "cpu", "--json"]
    assert json.loads(runner.invoke(app, build).stdout)["added"] == 8

    gone = [folder / "scene_02.png", folder / "scene_05.png"]
    result = runner.invoke(app, ["index", "remove", *map(str, gone), str(tmp_path / "elsewhere"), "--index",
                                 str(index), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"removed": 2, "regions": len(instance_scenes[2].masks) + len(
        instance_scenes[5].masks), "unmatched": [str(tmp_path / "elsewhere")]}
    assert all(path.exists() for path in gone)  # the files stay
    with Index.open(index) as opened:
        assert sorted(image.path for image in opened.catalog.images()) == sorted(
            str(path.resolve()) for path in folder.glob("*.png") if path not in gone)
        np.testing.assert_array_equal(np.sort(opened.vectors.ids()), opened.catalog.region_ids())
    searcher = Searcher(index, backbone=offline_backbone)
    found = searcher.search(gone[0], box=instance_scenes[2].boxes[0], k=8)
    searcher.close()
    assert len(found) == 6 and all(not match.path.endswith("scene_02.png") for match in found)

    again = runner.invoke(app, build)
    assert json.loads(again.stdout)["added"] == 2 and json.loads(again.stdout)["unchanged"] == 6
    human = runner.invoke(app, ["index", "remove", str(folder), "--index", str(index)])
    assert human.exit_code == 0 and human.stdout.strip().splitlines()[-1] == (
        f"8 images removed with {sum(len(s.masks) for s in instance_scenes)} regions")
