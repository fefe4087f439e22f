"""Searcher ranking against brute force over the stored vectors (real catalog, FAISS, backbone)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from hassod.images import load_rgb
from indexer.build import build_index
from indexer.descriptors import RegionDescriber
from indexer.regions import CocoRegions
from retrieval.searcher import Searcher


def _with_random_boxes(truth: Path, out: Path, per_image: int, seed: int = 0) -> Path:
    """The COCO file ``truth`` plus ``per_image`` random box regions per image, written to ``out``."""
    data = json.loads(truth.read_text())
    rng = np.random.default_rng(seed)
    next_id = max(a["id"] for a in data["annotations"]) + 1
    for image in data["images"]:
        for _ in range(per_image):
            x0, y0 = rng.uniform(0, 0.7 * image["width"]), rng.uniform(0, 0.7 * image["height"])
            w, h = rng.uniform(16, image["width"] - x0), rng.uniform(16, image["height"] - y0)
            data["annotations"].append({
                "id": next_id, "image_id": image["id"], "bbox": [x0, y0, w, h], "area": w * h,
                "segmentation": [[x0, y0, x0 + w, y0, x0 + w, y0 + h, x0, y0 + h]],
            })
            next_id += 1
    out.write_text(json.dumps(data))
    return out


def test_whole_image_query_scores_every_image_by_all_its_regions(tmp_path, instance_folder, offline_backbone):
    folder, truth = instance_folder
    paths = sorted(folder.glob("*.png"))
    # Far more regions than one query row's first nearest-neighbour list holds.
    regions = CocoRegions(_with_random_boxes(truth, tmp_path / "regions.json", per_image=30))
    build_index(paths, tmp_path / "index", regions, RegionDescriber(offline_backbone), show_progress=False)
    searcher = Searcher(tmp_path / "index", backbone=offline_backbone)
    try:
        rows = searcher._image_regions(load_rgb(paths[1]))
        ids = searcher.catalog.region_ids()
        owners = np.array([r.image_id for r in searcher.catalog.regions(ids.tolist())])
        similarities = rows @ searcher.store.reconstruct(ids).T
        top = searcher.search(paths[1], k=3)
        everything = searcher.search(paths[1], k=len(paths))
    finally:
        searcher.close()
    # An image scores the mean over query rows of its best region, over ALL its regions.
    expected = {int(i): float(similarities[:, owners == i].max(axis=1).mean()) for i in np.unique(owners)}
    ranking = sorted(expected, key=lambda i: (-expected[i], i))
    assert len(rows) > 3 and len(everything) == len(paths) and len(ids) > 8 * 30
    assert [m.image_id for m in everything] == ranking
    np.testing.assert_allclose([m.score for m in everything], [expected[i] for i in ranking], rtol=1e-5)
    # The same images and scores whatever k is.
    assert [m.image_id for m in top] == [m.image_id for m in everything[:3]]
    np.testing.assert_allclose([m.score for m in top], [m.score for m in everything[:3]], rtol=1e-6)
    for match in everything:
        # The region shown is the image's best match to any query row; among near-ties (the query's own
        # image matches many of its regions at ~1.0) the one most like the query as a whole.
        mine = owners == match.image_id
        best = similarities[:, mine].max(axis=0)
        tied = ids[mine][best >= best.max() - 1e-4]
        assert match.region_id in tied
        means = similarities[:, np.isin(ids, tied)].mean(axis=0)
        assert similarities[:, ids == match.region_id].mean() >= means.max() - 1e-5
