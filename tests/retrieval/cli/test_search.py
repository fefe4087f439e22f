"""`hassod index build|stats` and `hassod search` through the command line."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from retrieval.cli import app


def test_search_prints_ranked_results_and_writes_html(built_index, instance_scenes, tmp_path):
    folder, index_dir = built_index
    box = instance_scenes[0].boxes[0]
    page = tmp_path / "out.html"
    result = CliRunner().invoke(app, ["search", "--index", str(index_dir), "--query", str(folder / "scene_00.png"),
                                      "--box", ",".join(map(str, box)), "-k", "3", "--json", "--html", str(page)])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.output.strip().splitlines()]
    assert [r["rank"] for r in rows] == [1, 2, 3]
    assert Path(rows[0]["path"]).name == "scene_00.png" and rows[0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert rows[0]["box"] == [float(v) for v in box] and rows[0]["level"] == "whole"
    assert rows[0]["score"] >= rows[1]["score"] >= rows[2]["score"]
    html = page.read_text()
    assert len(re.findall(r"<img src=\"data:image/jpeg;base64,", html)) == 2 + 3  # query, crop, results

    region_page = tmp_path / "region.html"
    by_region = CliRunner().invoke(app, ["search", "--index", str(index_dir), "--region", str(rows[0]["region_id"]),
                                         "-k", "1", "--json", "--html", str(region_page)])
    assert json.loads(by_region.output)["region_id"] == rows[0]["region_id"]
    # The region's own image and box stand for the query picture.
    assert f"<title>hassod search: region {rows[0]['region_id']}</title>" in region_page.read_text()
    assert len(re.findall(r"<img src=\"data:image/jpeg;base64,", region_page.read_text())) == 2 + 1

    subparts = CliRunner().invoke(app, ["search", "--index", str(index_dir), "--query", str(folder / "scene_00.png"),
                                        "--box", "5,5,200,200", "--level", "subpart", "-k", "4", "--json"])
    assert [json.loads(line)["level"] for line in subparts.output.strip().splitlines()] == ["subpart"] * 4

    stats = CliRunner().invoke(app, ["index", "stats", str(index_dir), "--json"])
    info = json.loads(stats.output)
    assert info["images_ok"] == 8 and info["regions"] == sum(len(s.masks) for s in instance_scenes)
    # Building one file again updates that file only: the command passes what it was given as the roots.
    one = CliRunner().invoke(app, ["index", "build", str(folder / "scene_03.png"), "--index", str(index_dir),
                                   "--regions", str(folder.parent / "truth.json"), "--device", "cpu", "--json"])
    assert json.loads(one.output.splitlines()[-1])["removed"] == 0
    assert json.loads(CliRunner().invoke(app, ["index", "stats", str(index_dir), "--json"]).output)["images_ok"] == 8
    assert info["regions_by_level"]["whole"] == 16 and info["vectors"]["kind"] == "flat"


def test_errors_are_one_line_and_exit_2(built_index, tmp_path):
    folder, index_dir = built_index
    query = str(folder / "scene_00.png")
    runner = CliRunner()

    def fails(args: list[str], message: str) -> None:
        result = runner.invoke(app, args)
        assert result.exit_code == 2, result.output
        assert message in result.output, result.output

    fails(["search", "--index", str(tmp_path / "nowhere"), "--query", query], "no index at")
    (tmp_path / "empty").mkdir()
    fails(["search", "--index", str(tmp_path / "empty"), "--query", query], "no index at")
    fails(["search", "--index", str(index_dir), "--query", query, "--box", "400,10,600,100"], "not inside the 480x320 query image (x1 600 > width 480)")
    fails(["search", "--index", str(index_dir), "--query", query, "--box", "50,50,50,90"], "is empty")
    fails(["search", "--index", str(index_dir), "--query", query, "--box", "1,2,3"], "expected 4 numbers")
    fails(["search", "--index", str(index_dir), "--query", query, "--max-pixels", "1000"],
          "image too large: 480x320 = 0.154 MP exceeds the limit of 0.001 MP")
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    fails(["search", "--index", str(index_dir), "--query", str(notes)], "not an image")
    fails(["search", "--index", str(index_dir)], "give either --query")
    fails(["search", "--index", str(index_dir), "--region", "999999"], "no region 999999")
    fails(["search", "--index", str(index_dir), "--region", "1", "--box", "1,2,30,40"], "--box goes with --query")
    empty_folder = tmp_path / "nothing"
    empty_folder.mkdir()
    fails(["index", "build", str(empty_folder), "--index", str(index_dir)], "no files found")


def test_whitening_is_chosen_at_the_first_build_and_kept(built_index, instance_folder, instance_scenes, tmp_path):
    folder, truth = instance_folder
    index_dir = tmp_path / "whitened"
    runner = CliRunner()

    def build(target: Path, *extra: str):
        return runner.invoke(app, ["index", "build", str(folder), "--index", str(target), "--regions", str(truth),
                                   "--device", "cpu", "--json", *extra])

    assert build(index_dir, "--whiten-dim", "12").exit_code == 0
    info = json.loads(runner.invoke(app, ["index", "stats", str(index_dir), "--json"]).output)
    assert info["vectors"]["dim"] == 12 and info["config"]["whitening"] == {"dim": 12, "shrinkage": 0.8}
    assert "12 (PCA-whitened from 432)" in runner.invoke(app, ["index", "stats", str(index_dir)]).output
    # Later builds keep the index's whitening; another one is refused in one line.
    again = build(index_dir)
    assert again.exit_code == 0 and json.loads(again.output.splitlines()[-1])["unchanged"] == 8
    refused = build(index_dir, "--whiten-dim", "6")
    assert refused.exit_code == 2 and "whitened to 12 dimensions" in refused.output
    # Queries are whitened the same way: a box around an indexed object finds that object first.
    box = instance_scenes[0].boxes[0]
    found = runner.invoke(app, ["search", "--index", str(index_dir), "--query", str(folder / "scene_00.png"),
                                "--box", ",".join(map(str, box)), "-k", "1", "--json"])
    top = json.loads(found.output)
    assert Path(top["path"]).name == "scene_00.png" and top["score"] == pytest.approx(1.0, abs=1e-4)
    assert top["box"] == [float(v) for v in box]

    _, plain_index = built_index
    unwhitened = build(plain_index, "--whiten")
    assert unwhitened.exit_code == 2 and "built without whitening" in unwhitened.output
    too_wide = build(tmp_path / "wide", "--whiten-dim", "5000")
    assert too_wide.exit_code == 2 and "cannot whiten to 5000 dimensions: the descriptor has 432" in too_wide.output
    assert not (tmp_path / "wide").exists()


def test_an_index_inside_its_collection_does_not_index_itself(instance_folder, instance_scenes):
    folder, truth = instance_folder
    index_dir = folder / "index"
    truth = Path(shutil.copy(truth, folder / "regions.json"))  # the regions file may sit there too
    runner = CliRunner()
    for expected in ({"added": 8, "unchanged": 0}, {"added": 0, "unchanged": 8}):
        result = runner.invoke(app, ["index", "build", str(folder), "--index", str(index_dir), "--regions",
                                     str(truth), "--device", "cpu", "--json"])
        summary = json.loads(result.output.splitlines()[-1])
        assert {k: summary[k] for k in expected} == expected and summary["errors"] == []


def test_a_search_without_results_says_why(built_index, tmp_path):
    folder, _ = built_index
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "notes.txt").write_text("not an image")
    runner = CliRunner()
    built = runner.invoke(app, ["index", "build", str(tmp_path / "texts"), "--index", str(tmp_path / "empty"),
                                "--device", "cpu"])
    assert built.exit_code == 0, built.output
    query = ["--query", str(folder / "scene_00.png"), "--box", "5,5,100,100"]
    result = runner.invoke(app, ["search", "--index", str(tmp_path / "empty"), *query])
    assert result.exit_code == 0 and result.output == "no results: the index holds no regions\n"


def test_index_built_with_another_backbone_is_refused(built_index, tmp_path):
    import timm
    import torch

    folder, index_dir = built_index
    weights = tmp_path / "dino_deitsmall16_pretrain.pth"
    torch.save(timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0).state_dict(), weights)
    result = CliRunner().invoke(app, ["index", "build", str(folder), "--index", str(index_dir), "--device", "cpu",
                                      "--backbone", "dino_vits16", "--weights", str(weights)])
    assert result.exit_code == 2, result.output
    assert "index was built with backbone efficientnet_lite0" in result.output
    assert "dino_vits16" in result.output


def test_the_command_line_starts_without_the_heavy_libraries():
    # `hassod --help` (and every typo) must not pay for importing torch,
    # torchvision, numba or faiss: ~4 s and ~900 MB before a command even runs.
    import subprocess
    import sys

    heavy = ("torch", "torchvision", "numba", "faiss", "scipy", "sqlalchemy", "pycocotools")
    code = f"import sys, retrieval.cli; print(','.join(m for m in {heavy!r} if m in sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == ""


def test_a_region_query_needs_neither_torch_nor_the_backbone(built_index, instance_scenes, offline_backbone):
    # A query by region id reads stored vectors only, so it skips the ~4 s of importing torch and loading
    # the backbone; an image query on a searcher opened that way loads them then.
    import subprocess
    import sys

    from retrieval.searcher import Searcher

    folder, index_dir = built_index
    code = (
        "import json, sys\n"
        "from click.testing import CliRunner\n"
        "from retrieval.cli import app\n"
        f"out = CliRunner().invoke(app, ['search', '--index', {str(index_dir)!r}, '--region', '3', '--json']).output\n"
        "print(json.dumps({'torch': 'torch' in sys.modules, 'rows': [json.loads(r) for r in out.splitlines()]}))"
    )
    report = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                       check=True).stdout)
    assert report["torch"] is False
    assert report["rows"][0]["region_id"] == 3 and report["rows"][0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert len(report["rows"]) == 8  # every scene, each once

    box = instance_scenes[1].boxes[1]
    lazy = Searcher(index_dir, backbone=offline_backbone, load_backbone=False)
    eager = Searcher(index_dir, backbone=offline_backbone)
    try:
        assert [m.region_id for m in lazy.search_region(3)] == [r["region_id"] for r in report["rows"]]
        assert lazy.search(folder / "scene_01.png", box=box, k=3) == eager.search(folder / "scene_01.png", box=box, k=3)
    finally:
        lazy.close()
        eager.close()


def test_version_is_the_project_version():
    import tomllib

    version = tomllib.loads((Path(__file__).parents[3] / "pyproject.toml").read_text())["project"]["version"]
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"hassod-search {version}"
