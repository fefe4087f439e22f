"""`hassod serve`: the HTTP API gives the library's answers, the page is served, errors are 400s with the CLI's words."""
from __future__ import annotations

import io
import json
import re
import socket
import subprocess
import sys
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from fastapi import HTTPException
from fastapi.testclient import TestClient
from PIL import Image
from pycocotools import mask as mask_utils

from hassod.synthetic import save_scenes
from indexer.build import build_index
from hassod.runs import LEVEL_NAMES
from indexer.descriptors import RegionDescriber
from indexer.regions import CocoRegions
from retrieval.cli import app as cli
from retrieval.searcher import Searcher
from retrieval.outlines import MAX_POINTS
from retrieval.server import _Upload, _Uploads, create_app
from tests.retrieval.retrieval_helpers import polygon_mask


@pytest.fixture(scope="module")
def served(scenes_index, offline_backbone):
    """(folder, searcher, client): one searcher answers both the library calls and the HTTP ones."""
    folder, index_dir = scenes_index
    searcher = Searcher(index_dir, backbone=offline_backbone)
    with TestClient(create_app(searcher)) as client:
        yield folder, searcher, client


def _expected(searcher: Searcher, matches) -> list[dict]:
    images = searcher.catalog.images_by_id(m.image_id for m in matches)
    return [(m.image_id, m.region_id, pytest.approx(m.score, abs=1e-6), list(m.box), m.level_name,
             images[m.image_id].width, images[m.image_id].height) for m in matches]


def _got(results: list[dict]) -> list[tuple]:
    assert [r["rank"] for r in results] == list(range(1, len(results) + 1))
    return [(r["image_id"], r["region_id"], r["score"], r["box"], r["level"], r["width"], r["height"])
            for r in results]


def test_box_and_region_queries_give_the_library_answers(served, instance_scenes):
    folder, searcher, client = served
    query = folder / "scene_00.png"
    box = [float(v) for v in instance_scenes[0].boxes[0]]
    expected = searcher.search(query, box=box, k=4)
    response = client.post("/api/search", files={"image": query.read_bytes()},
                           data={"box": ",".join(map(str, box)), "k": "4"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["query"] == {"width": 480, "height": 320, "box": box}
    assert _got(body["results"]) == _expected(searcher, expected)
    first = body["results"][0]
    assert first["path"].endswith("scene_00.png") and first["score"] == pytest.approx(1.0, abs=1e-4)

    subparts = client.post("/api/search", files={"image": query.read_bytes()},
                           data={"box": "5,5,200,200", "level": "subpart", "k": "4"}).json()["results"]
    assert [r["level"] for r in subparts] == ["subpart"] * 4

    similar = client.get(f"/api/regions/{first['region_id']}/similar", params={"k": 3}).json()["results"]
    assert _got(similar) == _expected(searcher, searcher.search_region(first["region_id"], k=3))

    # The same query by the id of the indexed image instead of an upload.
    by_id = client.post("/api/search", data={"image_id": str(first["image_id"]), "box": ",".join(map(str, box)),
                                             "k": "4"}).json()
    assert by_id["query"] == body["query"] and by_id["results"] == body["results"]


def test_indexed_images_are_listed_by_path_in_pages(served):
    folder, searcher, client = served
    listed = client.get("/api/images", params={"offset": 2, "limit": 3}).json()
    assert listed["total"] == 8
    assert [Path(i["path"]).name for i in listed["images"]] == ["scene_02.png", "scene_03.png", "scene_04.png"]
    record = searcher.catalog.images_by_id([listed["images"][0]["id"]])[listed["images"][0]["id"]]
    assert listed["images"][0] == {"id": record.id, "path": record.path, "width": record.width,
                                   "height": record.height, "regions": record.n_regions}


def test_pictures_stats_and_page(served, instance_scenes):
    _, searcher, client = served
    response = client.get("/api/images/1", params={"side": 200})
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
    picture = Image.open(io.BytesIO(response.content))
    record = searcher.catalog.images_by_id([1])[1]
    assert max(picture.size) == 200
    assert picture.size[0] / picture.size[1] == pytest.approx(record.width / record.height, abs=0.01)
    assert client.get("/api/images/999").status_code == 404

    stats = client.get("/api/stats").json()
    assert stats["images_ok"] == 8 and stats["regions"] == sum(len(s.masks) for s in instance_scenes)
    assert stats["vectors"]["size"] == stats["regions"] and stats["backbone"] == "efficientnet_lite0"

    paths = client.get("/openapi.json").json()["paths"]
    assert {"/api/search", "/api/regions/{region_id}/similar", "/api/images/{image_id}", "/api/stats"} <= set(paths)

    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "/api/search" in page.text and "/api/images/" in page.text


def test_bad_queries_are_400_with_the_command_line_message(served, tmp_path):
    folder, _, client = served
    photo = (folder / "scene_00.png").read_bytes()

    def refused(data: dict, message: str, image: bytes = photo, status: int = 400) -> None:
        response = client.post("/api/search", files={"image": image}, data=data)
        assert response.status_code == status, response.text
        assert message in json.dumps(response.json()["detail"]), response.text

    refused({"box": "400,10,600,100"}, "not inside the 480x320 query image (x1 600 > width 480)")
    refused({"box": "50,50,50,90"}, "is empty")
    refused({"box": "1,2,3"}, "expected 4 numbers x0,y0,x1,y1, got 3")
    refused({"box": "a,b,c,d"}, "expected x0,y0,x1,y1 in pixels")
    refused({"level": "wing"}, "unknown level 'wing'")
    refused({}, "not an image", image=b"hello")
    refused({"k": "0"}, "greater than or equal to 1", status=422)
    refused({"image_id": "1"}, "give one of image (a file), image_id (an indexed image) or region")
    assert client.post("/api/search", data={"image_id": "999"}).json()["detail"] == "no image 999 in this index"
    assert client.post("/api/search", data={}).json()["detail"].startswith("give one of image")
    assert client.get("/api/regions/999999/similar").json()["detail"] == "no region 999999 in this index"


def test_serve_command(scenes_index):
    _, index_dir = scenes_index
    missing = CliRunner().invoke(cli, ["serve", "--index", str(index_dir.parent / "nowhere")])
    assert missing.exit_code == 2 and "no index at" in missing.output

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    taken = CliRunner().invoke(cli, ["serve", "--index", str(index_dir), "--port", str(busy.getsockname()[1])])
    busy.close()
    assert taken.exit_code == 2 and "cannot listen on 127.0.0.1:" in taken.output

    server = subprocess.Popen([sys.executable, "-m", "retrieval.cli", "serve", "--index", str(index_dir),
                               "--port", "0", "--device", "cpu"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    try:
        line = server.stdout.readline()  # printed once the index is loaded and the port bound
        url = re.search(r"http://\S+/", line)
        assert url, line + server.stderr.read()
        direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # no proxy for localhost
        with direct.open(url.group(0) + "api/stats", timeout=60) as response:
            assert json.load(response)["images_ok"] == 8
    finally:
        server.terminate()
        server.wait(timeout=60)


def test_concurrent_queries_get_their_own_answers(served, instance_scenes):
    folder, searcher, client = served
    queries = [(folder / f"scene_0{i}.png", instance_scenes[i].boxes[0]) for i in range(4)]
    expected = [_expected(searcher, searcher.search(path, box=box, k=3)) for path, box in queries]

    def ask(query) -> list[tuple]:
        path, box = query
        response = client.post("/api/search", files={"image": path.read_bytes()},
                               data={"box": ",".join(map(str, box)), "k": "3"})
        return _got(response.json()["results"])

    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(ask, queries * 2)) == expected * 2


def test_oversized_queries_are_refused_before_decoding(scenes_index, offline_backbone):
    folder, index_dir = scenes_index
    photo = (folder / "scene_00.png").read_bytes()
    with TestClient(create_app(Searcher(index_dir, backbone=offline_backbone), max_upload_bytes=1000)) as client:
        response = client.post("/api/search", files={"image": photo})
    assert response.status_code == 413 and response.json()["detail"] == "image file over the limit of 1,000 bytes"
    with TestClient(create_app(Searcher(index_dir, backbone=offline_backbone), max_pixels=1000)) as client:
        for query in ({"files": {"image": photo}}, {"data": {"image_id": "1"}}):
            response = client.post("/api/search", **query)
            assert response.status_code == 400
            assert "image too large: 480x320 = 0.154 MP exceeds the limit of 0.001 MP" in response.json()["detail"]


def test_a_later_build_is_picked_up_without_a_restart(tmp_path, instance_scenes, offline_backbone):
    folder = tmp_path / "collection"
    truth = save_scenes(instance_scenes, folder, tmp_path / "truth.json")
    paths = sorted(folder.glob("*.png"))

    def build(images) -> None:
        build_index(images, tmp_path / "index", CocoRegions(truth), RegionDescriber(offline_backbone),
                    show_progress=False)

    build(paths[:4])
    box = ",".join(map(str, instance_scenes[6].boxes[0]))
    with TestClient(create_app(Searcher(tmp_path / "index", backbone=offline_backbone))) as client:
        def top() -> dict:
            response = client.post("/api/search", files={"image": paths[6].read_bytes()}, data={"box": box, "k": "1"})
            return response.json()["results"][0]

        assert client.get("/api/stats").json()["images_ok"] == 4
        assert not top()["path"].endswith("scene_06.png")
        build(paths)  # a build while serving: the next request sees the 8 images and their vectors
        assert client.get("/api/stats").json()["vectors"]["size"] == sum(len(s.masks) for s in instance_scenes)
        found = top()
        assert found["path"].endswith("scene_06.png") and found["score"] == pytest.approx(1.0, abs=1e-4)




def test_an_images_regions_come_with_their_outlines(served, instance_scenes):
    _, searcher, client = served
    image_id = searcher.catalog.indexed_images(3, 1)[1][0].id
    body = client.get(f"/api/images/{image_id}/regions").json()
    records = searcher.catalog.regions_of_image(image_id)
    assert body["image"]["id"] == image_id and (body["image"]["width"], body["image"]["height"]) == (480, 320)
    assert [(r["id"], r["box"], r["level"], r["parent_id"], r["score"]) for r in body["regions"]] == [
        (r.id, list(r.box), LEVEL_NAMES[r.level], r.parent_id, r.score) for r in records]
    assert {r["level"] for r in body["regions"]} == {"whole", "part", "subpart"}
    for region, record in zip(body["regions"], records):
        assert 3 <= sum(len(ring) for ring in region["outline"]) <= MAX_POINTS
        points = np.concatenate([np.asarray(ring) for ring in region["outline"]])
        x0, y0, x1, y1 = record.box
        assert (points >= [x0, y0]).all() and (points <= [x1, y1]).all()
        mask = mask_utils.decode(record.mask_rle).astype(bool)
        traced = polygon_mask(region["outline"], mask.shape)
        assert (mask & traced).sum() / (mask | traced).sum() > 0.8  # the outline follows the mask, not its box

    parts = client.get(f"/api/images/{image_id}/regions", params={"level": "part"}).json()["regions"]
    assert [r["id"] for r in parts] == [r.id for r in records if r.level == 1]

    subpart = next(r for r in records if r.level == 2)
    tree = client.get(f"/api/regions/{subpart.id}").json()
    assert tree["region"] == next(r for r in body["regions"] if r["id"] == subpart.id)
    assert [(r["id"], r["level"]) for r in tree["ancestors"]] == [
        (subpart.parent_id, "part"), (searcher.catalog.regions([subpart.parent_id])[0].parent_id, "whole")]
    whole = tree["ancestors"][-1]["id"]
    children = client.get(f"/api/regions/{whole}").json()["children"]
    assert [r["id"] for r in children] == [r.id for r in records if r.parent_id == whole] and len(children) >= 2
    assert client.get(f"/api/regions/{whole}").json()["ancestors"] == []

    listed = client.get("/api/images", params={"level": "subpart", "limit": 100}).json()
    holding = {r.image_id for r in searcher.catalog.regions(searcher.catalog.region_ids(2))}
    assert listed["total"] == len(holding) and {i["id"] for i in listed["images"]} == holding


def test_results_show_the_matched_regions_outline(served):
    _, searcher, client = served
    region = searcher.catalog.regions(searcher.catalog.region_ids(1)[:1])[0]
    results = client.get(f"/api/regions/{region.id}/similar", params={"k": 3}).json()["results"]
    assert results[0]["region_id"] == region.id
    shown = {r["id"]: r["outline"] for r in client.get(f"/api/images/{region.image_id}/regions").json()["regions"]}
    assert results[0]["outline"] == shown[region.id]
    for result in results:
        assert result["outline"] == client.get(f"/api/regions/{result['region_id']}").json()["region"]["outline"]


def test_unknown_or_out_of_range_ids_are_404_or_422(served):
    _, _, client = served
    for url in ("/api/images/999/regions", "/api/regions/999999", "/api/images/999"):
        response = client.get(url)
        assert response.status_code == 404 and "999" in response.json()["detail"], url
    for url in (f"/api/images/{2**40}/regions", f"/api/images/{2**40}", f"/api/regions/{2**70}",
                f"/api/regions/{2**70}/similar", "/api/images/-1/regions", "/api/regions/x",
                "/api/images/1/regions?level=wing", "/api/images?level=wing"):
        assert client.get(url).status_code == 422, url
    assert client.post("/api/search", data={"image_id": str(2**40)}).status_code == 422
    assert "/api/images/{image_id}/regions" in client.get("/openapi.json").json()["paths"]


def test_an_uploaded_images_regions_are_queries_by_handle(served):
    folder, searcher, client = served
    photo = (folder / "scene_05.png").read_bytes()
    body = client.post("/api/regions", files={"image": photo}).json()
    found, vectors = searcher.query_regions(np.array(Image.open(io.BytesIO(photo)).convert("RGB")))
    assert (body["width"], body["height"]) == (480, 320) and len(body["regions"]) == len(found) > 0
    assert [(r["box"], r["level"]) for r in body["regions"]] == [(list(f.box), LEVEL_NAMES[f.level]) for f in found]
    handles = [r["handle"] for r in body["regions"]]
    assert len(set(handles)) == len(handles)
    assert [r["parent"] for r in body["regions"]] == [None if f.parent < 0 else handles[f.parent] for f in found]

    index = int(np.argmax([f.area for f in found]))
    response = client.post("/api/search", data={"region": handles[index], "k": "3"})
    assert response.status_code == 200, response.text
    expected = searcher.search_vector(vectors[index], k=3)
    assert _got(response.json()["results"]) == _expected(searcher, expected)
    assert response.json()["query"]["box"] == list(found[index].box)
    assert Path(response.json()["results"][0]["path"]).name == "scene_05.png"

    assert client.post("/api/search", data={"region": handles[0], "box": "1,1,9,9"}).status_code == 400
    for bad in (handles[0].split(".")[0] + ".9999", "nothing.0", "x"):
        response = client.post("/api/search", data={"region": bad})
        assert response.status_code == 404 and "upload the image again" in response.json()["detail"]
    assert client.post("/api/regions", files={"image": b"hello"}).status_code == 400


def test_only_the_latest_uploads_keep_their_handles():
    uploads = _Uploads(2)
    made = [_Upload(4, 4, [None] * 2, np.zeros((2, 3))) for _ in range(3)]
    tokens = [uploads.add(u) for u in made]
    assert uploads.find(f"{tokens[2]}.1") == (made[2], 1)
    with pytest.raises(HTTPException):
        uploads.find(f"{tokens[0]}.0")
    assert uploads.find(f"{tokens[1]}.0") == (made[1], 0)
