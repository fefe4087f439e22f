"""Region recipes side by side: ``paper``, ``search`` and a Felzenszwalb baseline, in one run.

For each recipe, one row of:
- regions per image and class-agnostic box AR@10/100/1000 and mask AR@100
  on COCO128 (``../shared/data/coco128``, pycocotools, categories ignored);
- ms per image after the backbone (thread CPU time of finding the regions;
  Felzenszwalb has no backbone: all of its time);
- index build speed (images/s, wall clock, one worker) and box-query mAP /
  mean IoU of the returned boxes on the synthetic instance scenes
  (``bench_index.py``'s set and scoring);
- UKBench N-S on the clutter set (``bench_descriptors.py``: the 56 photos
  pasted into COCO photos; database regions and the queries' own regions by
  the recipe): whole-image multi-instance query / box query of the central 80%.

The Felzenszwalb baseline is the classic training-free anchor: scikit-image's
``felzenszwalb`` at scales 100, 300 and 1000 (sigma 0.8, min size 100) on the
original image, every segment a region, score = its share of the image,
levels by the coverage tree (tau 0.9).

Run: .venv/bin/python benchmarks/bench_regions.py [--images 64]
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from scipy import ndimage
from threadpoolctl import threadpool_limits

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import bench_descriptors  # noqa: E402
import bench_index  # noqa: E402
from hassod.discover.levels import find_parents, levels_from_parents, rle_intersections  # noqa: E402
from hassod.rle import MaskCrop, crops_to_rle, rle_areas, rle_boxes_xywh  # noqa: E402
from hassod.discover.pipeline import Discovered, DiscoverySettings  # noqa: E402
from hassod.discover.search import SearchSettings  # noqa: E402
from hassod.evaluation import evaluate, subset_images  # noqa: E402
from hassod.features import build_backbone  # noqa: E402
from hassod.images import ImageError, load_rgb  # noqa: E402
from hassod.synthetic import make_instance_scenes, save_scenes  # noqa: E402
from indexer.build import build_index  # noqa: E402
from indexer.descriptors import RegionDescriber  # noqa: E402
from indexer.regions import DiscoveryRegions, ImageRegions, _from_annotation  # noqa: E402
from retrieval.searcher import Searcher  # noqa: E402

COCO = REPO.parent / "shared" / "data" / "coco128"
UKBENCH = REPO.parent / "shared" / "data" / "ukbench56"
FELZENSZWALB_SCALES = (100, 300, 1000)


def felzenszwalb_regions(image: np.ndarray) -> Discovered:
    """Every segment of scikit-image's Felzenszwalb at the three scales; score = share of the image."""
    from skimage.segmentation import felzenszwalb

    height, width = image.shape[:2]
    rles = []
    for scale in FELZENSZWALB_SCALES:
        labels = felzenszwalb(image, scale=scale, sigma=0.8, min_size=100)
        crops = [MaskCrop(rows.start, cols.start, (labels[rows, cols] == label).T)
                 for label, (rows, cols) in enumerate(ndimage.find_objects(labels + 1))]
        rles += crops_to_rle(crops, (height, width))
    areas = rle_areas(rles)
    parents = find_parents(rle_intersections(rles), 0.9)
    return Discovered(rles=rles, areas=areas, levels=levels_from_parents(parents), parents=parents,
                      scores=areas / float(height * width), thresholds=np.zeros(len(rles)),
                      image_size=(height, width))


class Recipe:
    """One row of the table: how an image's regions are found."""

    def __init__(self, name: str, backbone, settings=None):
        self.name, self.backbone = name, backbone
        self.settings = None if settings is None else settings.for_backbone(backbone)

    def regions(self, image: np.ndarray) -> tuple[Discovered, float]:
        """(regions, thread CPU seconds after the backbone) of an (H, W, 3) uint8 image."""
        if self.settings is None:
            start = time.thread_time()
            return felzenszwalb_regions(image), time.thread_time() - start
        small, features = self.settings.grid(self.backbone, [image])
        start = time.thread_time()
        found = self.settings.find(small[0], features[0], image.shape[:2])
        return found, time.thread_time() - start


class FelzenszwalbSource:
    """The baseline as an index region source (see indexer.regions.RegionSource)."""

    identity = "felzenszwalb"
    query_settings: dict[str, Any] = {"kind": "discovery", "thresholds": None}
    recipe = None

    def regions(self, paths: Sequence[str]) -> Iterator[ImageRegions]:
        for path in paths:
            try:
                image = load_rgb(path)
            except ImageError as exc:
                yield ImageRegions(path, None, [], str(exc))
                continue
            found = felzenszwalb_regions(image)
            yield ImageRegions(path, image, [_from_annotation(a) for a in found.annotations()])


def coco_row(recipe: Recipe, gt: dict, images: list[dict]) -> dict[str, float]:
    detections, seconds, counts = [], 0.0, []
    for info in images:
        found, spent = recipe.regions(load_rgb(COCO / "images" / info["file_name"]))
        seconds += spent
        counts.append(len(found))
        for ann in found.annotations():
            detections.append({"image_id": info["id"], "category_id": 1, "bbox": ann["bbox"],
                               "segmentation": ann["segmentation"], "score": ann["score"]})
    subset = subset_images(gt, {info["id"] for info in images})
    box, mask = evaluate(subset, detections, "bbox"), evaluate(subset, detections, "segm")
    return {"regions": float(np.mean(counts)), "AR@10": box["AR@10"], "AR@100": box["AR@100"],
            "AR@1000": box["AR@1000"], "mask AR@100": mask["AR@100"], "ms": 1000 * seconds / len(images)}


def ukbench_row(recipe: Recipe, describer: RegionDescriber, photos, composites, truth, groups) -> dict[str, float]:
    def regions_of(images):
        out = []
        for image in images:
            found = recipe.regions(image)[0]
            xywh = rle_boxes_xywh(found.rles)
            out.append(bench_descriptors.Regions(np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1),
                                                 found.levels, found.areas, found.rles))
        return out

    queries = (describer.feature_map(photos), regions_of(photos))
    database = (describer.feature_map(composites), regions_of(composites))
    results = bench_descriptors.evaluate(describer, queries, database, groups, truth)
    return {"N-S mi": results["mi-sum"], "N-S box": results["box-c80"]}


def synthetic_row(source, describer: RegionDescriber, backbone, scenes, folder: Path, work: Path) -> dict[str, float]:
    paths = sorted(folder.glob("*.png"))
    start = time.perf_counter()
    build_index(paths, work, source, describer, show_progress=False)
    speed = len(paths) / (time.perf_counter() - start)
    searcher = Searcher(work, backbone=backbone)
    quality = bench_index.evaluate(searcher, scenes, folder)
    searcher.close()
    return {"build img/s": speed, "mAP": quality["mAP"], "IoU": quality["mean_IoU"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64, help="how many COCO128 images")
    parser.add_argument("--objects", type=int, default=10, help="synthetic objects")
    parser.add_argument("--scenes", type=int, default=20, help="synthetic scenes")
    args = parser.parse_args()
    if not (COCO / "instances.json").exists() or len(list(UKBENCH.glob("ukbench*.jpg"))) != 56:
        sys.exit(f"missing {COCO} or {UKBENCH}: the benchmark needs ../shared/data beside the repository")
    torch.set_num_threads(1)  # per core, like bench_discover
    threadpool_limits(1)

    backbone = build_backbone("efficientnet_lite0", device="cpu")
    describer = RegionDescriber(backbone)
    recipes = [Recipe("paper", backbone, DiscoverySettings()), Recipe("search", backbone, SearchSettings()),
               Recipe("felzenszwalb", backbone)]
    sources = {"paper": DiscoveryRegions(backbone, DiscoverySettings()),
               "search": DiscoveryRegions(backbone, SearchSettings()), "felzenszwalb": FelzenszwalbSource()}
    warm = load_rgb(COCO / "images" / sorted(p.name for p in (COCO / "images").glob("*.jpg"))[0])
    for recipe in recipes:  # numba compilation and caches outside the timings
        recipe.regions(warm)

    gt = json.loads((COCO / "instances.json").read_text())
    images = sorted(gt["images"], key=lambda im: im["file_name"])[: args.images]
    paths = sorted(UKBENCH.glob("ukbench*.jpg"))
    groups = np.array([int(p.stem[len("ukbench"):]) // 4 for p in paths])
    photos = [load_rgb(p) for p in paths]
    backgrounds = [load_rgb(p) for p in sorted((COCO / "images").glob("*.jpg"))[: len(paths)]]
    composites, truth = bench_descriptors.paste_in_clutter(photos, backgrounds)
    scenes = make_instance_scenes(seed=1, n_objects=args.objects, n_images=args.scenes)
    work = Path(tempfile.mkdtemp(prefix="bench_regions_"))
    save_scenes(scenes, work / "images", work / "truth.json")

    print(f"COCO128: {len(images)} images; UKBench clutter: 56 queries x 56 composites; synthetic: "
          f"{args.scenes} scenes, {args.objects} objects; backbone {backbone.name}, 1 thread")
    rows = {}
    for recipe in recipes:
        start = time.perf_counter()
        rows[recipe.name] = {
            **coco_row(recipe, gt, images),
            **ukbench_row(recipe, describer, photos, composites, truth, groups),
            **synthetic_row(sources[recipe.name], describer, backbone, scenes, work / "images", work / recipe.name),
        }
        print(f"  {recipe.name}: {time.perf_counter() - start:.0f} s", flush=True)
    shutil.rmtree(work, ignore_errors=True)

    print("\n| recipe | regions/img | box AR@10/100/1000 | mask AR@100 | ms/img after backbone | build img/s "
          "| UKBench clutter N-S (whole image / box) | synthetic mAP / box IoU |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['regions']:.0f} | {100 * r['AR@10']:.1f} / {100 * r['AR@100']:.1f} / "
              f"{100 * r['AR@1000']:.1f} | {100 * r['mask AR@100']:.1f} | {r['ms']:.0f} | {r['build img/s']:.2f} | "
              f"{r['N-S mi']:.2f} / {r['N-S box']:.2f} | {r['mAP']:.3f} / {r['IoU']:.3f} |")
    paper, search, fz = rows["paper"], rows["search"], rows["felzenszwalb"]
    print(f"\nsearch vs felzenszwalb: box AR@100 x{search['AR@100'] / fz['AR@100']:.2f} (target >= 1.1), "
          f"AR@1000 x{search['AR@1000'] / fz['AR@1000']:.2f} (target >= 1.0)")
    print(f"search vs paper: build x{search['build img/s'] / paper['build img/s']:.2f} (target >= 3), "
          f"N-S {search['N-S mi'] - paper['N-S mi']:+.2f} / {search['N-S box'] - paper['N-S box']:+.2f}, "
          f"mAP {search['mAP'] - paper['mAP']:+.3f} (targets >= 0)")


if __name__ == "__main__":
    main()
