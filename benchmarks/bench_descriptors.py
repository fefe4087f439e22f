"""Region descriptors on UKBench-56: N-S score of region-level search vs a global baseline.

UKBench-56 (../shared/data/ukbench56): 14 objects x 4 views; images with the
same ``NNNNN // 4`` show the same object. N-S = for each image as the query,
how many of the top 4 results are of its object (the query itself counts),
averaged; max 4.0.

Database: every image's stage-1 regions (``discover_masks`` with the
efficientnet_lite0 backbone, cached under /tmp) plus its whole-image box as
one more region, each described by :class:`indexer.descriptors.RegionDescriber`
from one forward per image. Query modes, all in one run:

- ``global``: one whole-image descriptor per image against the same of the
  database (the baseline).
- ``mi-sum``: whole-image multi-instance query: the query image's regions
  (plus its whole box) against each database image's regions; score = sum over
  query regions of the best similarity in that database image.
- ``mi-sym``: the same, symmetrised: mean over query regions of their best
  match plus mean over the database image's regions of theirs (does not
  favour database images with many regions).
- ``box-obj``: box query, the box around the object = the box of the query
  image's largest discovered *whole* region (whole image if none); database
  score = its best region.
- ``box-c80``: box query with the central 80% of the query image as the box.

Two databases, same 56 queries (the UKBench photos):

- ``ukbench56``: the standard protocol, database = the query photos. With
  this backbone nearly every variant scores 3.9-4.0 here (too easy to choose
  anything by), so a harder one decides:
- ``clutter``: each UKBench photo shrunk to 35-50% of the width of a COCO128
  photo and pasted into it at a random place (seed 0); database = these 56
  composites, queries = the original photos. The object now fills ~15% of a
  database image among unrelated content, the case region search is for.
  ``IoU`` = mean IoU of the best-matching region (box-obj query, whitened or
  not as the column says) with the pasted photo's box, over the 4 right images.

Every mode is scored raw and with PCA-whitening (``+w``, shrinkage 0.8 unless
the row says otherwise) fitted on all database region descriptors. Rows
compare layers and pooling at 640 px, then the defaults with one change each
(input size, the head layer, GeM, mask weighting, whitening shrinkage, the
whole-image region). Ends with the describe time per image.

Run: .venv/bin/python benchmarks/bench_descriptors.py [--refresh-regions]
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import pickle
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hassod.rle import masks_to_rle, rle_boxes_xywh  # noqa: E402
from hassod.discover.pipeline import DiscoverySettings, discover_masks  # noqa: E402
from hassod.features import build_backbone  # noqa: E402
from hassod.images import load_rgb, resize_square  # noqa: E402
from indexer.descriptors import DescriptorSettings, FeatureMap, RegionDescriber  # noqa: E402
from indexer.whitening import PCAWhitening  # noqa: E402

DATA = REPO.parent / "shared" / "data" / "ukbench56"
COCO = REPO.parent / "shared" / "data" / "coco128" / "images"
CACHE = Path("/tmp/hassod_bench_descriptors")
MODES = ("global", "mi-sum", "mi-sym", "box-obj", "box-c80")
ALL_LAYERS = ("grid", "s16", "s32", "head")


@dataclasses.dataclass
class Regions:
    """Stage-1 regions of one image: (R, 4) xyxy boxes, (R,) levels and areas, R RLEs."""

    boxes: np.ndarray
    levels: np.ndarray
    areas: np.ndarray
    rles: list


def discover_regions(images: list[np.ndarray], backbone, refresh: bool, name: str) -> list[Regions]:
    """Stage-1 regions of every image, cached per backbone weights (discovery takes ~1 s/image)."""
    settings = DiscoverySettings().with_default_thresholds(backbone.default_thresholds)
    # Keyed by what decides the regions; --refresh-regions after changes to the discovery code itself.
    key = hashlib.sha256(repr((backbone.name, backbone.weights_id, settings.as_dict())).encode()).hexdigest()[:12]
    cache = CACHE / f"{name}_regions_{key}.pkl"
    if cache.exists() and not refresh:
        return [Regions(**fields) for fields in pickle.loads(cache.read_bytes())]
    out = []
    for image in images:
        small = resize_square(image, settings.input_size)
        features = backbone.extract([small])[0].permute(1, 2, 0).float().cpu().numpy()
        found = discover_masks(small, features, image.shape[:2], settings)
        xywh = rle_boxes_xywh(found.rles)
        boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
        out.append(Regions(boxes, found.levels, found.areas, found.rles))
    CACHE.mkdir(parents=True, exist_ok=True)
    cache.write_bytes(pickle.dumps([dataclasses.asdict(r) for r in out]))  # plain dicts: loadable from any script
    return out


def paste_in_clutter(objects: list[np.ndarray], backgrounds: list[np.ndarray], seed: int = 0):
    """Each object photo shrunk to 35-50% of its background's width, pasted at a random place.

    Returns the composites and the (N, 4) xyxy boxes of the pasted photos.
    """
    rng = np.random.default_rng(seed)
    composites, boxes = [], []
    for obj, background in zip(objects, backgrounds):
        height, width = background.shape[:2]
        w = int(round(width * rng.uniform(0.35, 0.5)))
        h = int(round(obj.shape[0] * w / obj.shape[1]))
        x, y = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
        tensor = torch.from_numpy(obj).permute(2, 0, 1)[None].float()
        small = torch.nn.functional.interpolate(tensor, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
        composite = background.copy()
        composite[y:y + h, x:x + w] = small[0].permute(1, 2, 0).round().clamp(0, 255).byte().numpy()
        composites.append(composite)
        boxes.append([x, y, x + w, y + h])
    return composites, np.array(boxes, dtype=np.float64)


def box_iou(a: np.ndarray, b: np.ndarray) -> float:
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def ns_score(scores: np.ndarray, groups: np.ndarray) -> float:
    """Mean over queries (rows) of how many of the 4 best-scored database images share the query's group."""
    top = np.argsort(-scores, axis=1, kind="stable")[:, :4]
    return float((groups[top] == groups[:, None]).sum(axis=1).mean())


def region_boxes(regions: Regions, fmap: FeatureMap, with_whole: bool) -> np.ndarray:
    return np.concatenate([regions.boxes, fmap.whole_box[None]]) if with_whole else regions.boxes


def object_box(regions: Regions, fmap: FeatureMap) -> np.ndarray:
    """The query box 'around the object': the largest whole-level region's box, else the whole image."""
    wholes = np.flatnonzero(regions.levels == 0)
    if len(wholes) == 0:
        return fmap.whole_box
    return regions.boxes[wholes[np.argmax(regions.areas[wholes])]]


def central_box(fmap: FeatureMap, fraction: float = 0.8) -> np.ndarray:
    height, width = fmap.image_size
    mx, my = width * (1 - fraction) / 2, height * (1 - fraction) / 2
    return np.array([mx, my, width - mx, height - my])


@dataclasses.dataclass
class Collection:
    """Images with their stage-1 regions (and, for composites, the pasted object's box per image)."""

    images: list[np.ndarray]
    regions: list[Regions]
    truth: np.ndarray | None = None


def describe_regions(describer: RegionDescriber, fmaps: list[FeatureMap], regions: list[Regions],
                     with_whole: bool) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per image: (R, dim) descriptors and (R, 4) boxes of its regions (+ the whole-image box)."""
    vectors, boxes = [], []
    for fmap, reg in zip(fmaps, regions):
        rows = region_boxes(reg, fmap, with_whole)
        masks = None
        if describer.settings.mask_weighting:
            masks = reg.rles + (masks_to_rle(np.ones((1, *fmap.image_size), bool)) if with_whole else [])
        vectors.append(describer.describe(fmap, rows, masks) if len(rows) else np.zeros((0, describer.dim), np.float32))
        boxes.append(rows)
    return vectors, boxes


def evaluate(describer: RegionDescriber, queries: tuple[list[FeatureMap], list[Regions]],
             database: tuple[list[FeatureMap], list[Regions]], groups: np.ndarray, truth: np.ndarray | None,
             with_whole: bool = True, shrinkage: float = 0.8) -> dict[str, float]:
    """N-S of every mode, raw and whitened (key suffix ``+w``); ``IoU``/``IoU+w`` when ``truth`` boxes are given."""
    q_fmaps, q_regions = queries
    db_vectors, db_boxes = describe_regions(describer, *database, with_whole)
    q_vectors, _ = describe_regions(describer, q_fmaps, q_regions, True)
    # Queries are what a user gives: an image, or an image and a box (never a mask).
    glob_q = np.stack([describer.global_descriptor(f) for f in q_fmaps])
    glob_db = np.stack([describer.global_descriptor(f) for f in database[0]])
    box_obj = np.stack([describer.describe(f, object_box(r, f)[None])[0] for f, r in zip(q_fmaps, q_regions)])
    box_c80 = np.stack([describer.describe(f, central_box(f)[None])[0] for f in q_fmaps])
    whitening = PCAWhitening.fit(np.concatenate(db_vectors), shrinkage=shrinkage)
    results = {}
    same = groups[:, None] == groups[None, :]
    for suffix, tf in (("", lambda v: v), ("+w", whitening.transform)):
        d = [tf(v) if len(v) else v for v in db_vectors]
        q = [tf(v) for v in q_vectors]
        results["global" + suffix] = ns_score(tf(glob_q) @ tf(glob_db).T, groups)
        sims = [[qi @ dj.T for dj in d] for qi in q]
        results["mi-sum" + suffix] = ns_score(
            np.array([[s.max(1).sum() if s.size else 0.0 for s in row] for row in sims]), groups)
        results["mi-sym" + suffix] = ns_score(
            np.array([[s.max(1).mean() + s.max(0).mean() if s.size else 0.0 for s in row] for row in sims]), groups)
        for name, vectors in (("box-obj", box_obj), ("box-c80", box_c80)):
            per_region = [[dj @ vi for dj in d] for vi in tf(vectors)]
            scores = np.array([[float(r.max()) if r.size else -1.0 for r in row] for row in per_region])
            results[name + suffix] = ns_score(scores, groups)
            if name == "box-obj" and truth is not None:
                ious = [box_iou(db_boxes[j][int(np.argmax(per_region[i][j]))], truth[j])
                        for i, j in zip(*np.nonzero(same))]
                results["IoU" + suffix] = float(np.mean(ious))
    return results


def print_row(label: str, results: dict[str, float]) -> None:
    modes = MODES + (("IoU",) if "IoU" in results else ())
    cells = "  ".join(f"{results[m]:4.2f}/{results[m + '+w']:4.2f}" for m in modes)
    print(f"  {label:34s} {cells}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--refresh-regions", action="store_true", help="rerun discovery instead of the /tmp cache")
    parser.add_argument("--quick", action="store_true", help="only the layer/pooling table")
    args = parser.parse_args()
    paths = sorted(DATA.glob("ukbench*.jpg"))
    backgrounds = sorted(COCO.glob("*.jpg"))[: len(paths)]
    if len(paths) != 56 or len(backgrounds) != 56:
        sys.exit(f"expected 56 images in {DATA} and >= 56 in {COCO}: the benchmark needs ../shared/data")
    groups = np.array([int(p.stem[len("ukbench"):]) // 4 for p in paths])
    photos = [load_rgb(p) for p in paths]
    composites, truth = paste_in_clutter(photos, [load_rgb(p) for p in backgrounds])
    backbone = build_backbone("efficientnet_lite0", device="cpu")

    start = time.perf_counter()
    sets = {
        "ukbench56": Collection(photos, discover_regions(photos, backbone, args.refresh_regions, "ukbench56")),
        "clutter": Collection(composites, discover_regions(composites, backbone, args.refresh_regions, "clutter"),
                              truth),
    }
    for name, collection in sets.items():
        counts = np.array([len(r.boxes) for r in collection.regions])
        print(f"{name}: stage-1 regions {counts.mean():.1f} per image (min {counts.min()}, max {counts.max()})")
    print(f"discovery {time.perf_counter() - start:.0f} s (cached in {CACHE})")

    fmap_cache: dict[tuple[str, int], list[FeatureMap]] = {}

    def fmaps_at(name: str, long_side: int) -> list[FeatureMap]:
        if (name, long_side) not in fmap_cache:
            every = RegionDescriber(backbone, DescriptorSettings(layers=ALL_LAYERS, long_side=long_side))
            fmap_cache[name, long_side] = every.feature_map(sets[name].images)
        return fmap_cache[name, long_side]

    def run(label: str, with_whole: bool = True, shrinkage: float = 0.8, **changes) -> None:
        settings = dataclasses.replace(DescriptorSettings(), **changes)
        describer = RegionDescriber(backbone, settings)
        queries = (fmaps_at("ukbench56", settings.long_side), sets["ukbench56"].regions)
        for name, collection in sets.items():
            database = (fmaps_at(name, settings.long_side), collection.regions)
            results = evaluate(describer, queries, database, groups, collection.truth, with_whole, shrinkage)
            print_row(f"{label} [{name}]", results)

    header = "  ".join(f"{m:>9s}" for m in MODES + ("IoU",))
    print(f"\n== N-S (max 4.0), raw/whitened ==\n  {'variant [database]':34s} {header}")
    print("-- layers x pooling, 640 px, GeM p=3")
    for layers in (("grid",), ("s16",), ("s32",), ("head",), ("s16", "s32"), ("s32", "head"), ("s16", "s32", "head")):
        for pooling in ("gem", "avg", "max"):
            run(f"{'+'.join(layers)} {pooling}", layers=layers, pooling=pooling, long_side=640)
    if args.quick:
        return
    print("-- defaults, then one change each")
    run(f"defaults ({RegionDescriber(backbone).name})")
    for long_side in (320, 640, 800):
        run(f"long_side {long_side}", long_side=long_side)
    run("+ head layer (1712-d)", layers=("s16", "s32", "head"))
    run("gem p=3", pooling="gem")
    run("mask weighting", mask_weighting=True)
    run("no whole-image region in database", with_whole=False)
    for shrinkage in (0.1, 0.5, 1.0):
        run(f"whitening shrinkage {shrinkage:g}", shrinkage=shrinkage)

    print("\n== describe time per image (1 thread; forward + all its regions) ==")
    torch.set_num_threads(1)
    describer = RegionDescriber(backbone, DescriptorSettings())
    describer.feature_map(photos[:1])  # warm-up
    for name, collection in sets.items():
        forward = pooling_time = 0.0
        for image, reg in zip(collection.images, collection.regions):
            t0 = time.perf_counter()
            fmap = describer.feature_map([image])[0]
            t1 = time.perf_counter()
            describer.describe(fmap, region_boxes(reg, fmap, True))
            t2 = time.perf_counter()
            forward, pooling_time = forward + t1 - t0, pooling_time + t2 - t1
        n = len(collection.images)
        regions = np.mean([len(r.boxes) + 1 for r in collection.regions])
        print(f"  {name:10s} {describer.name}: forward {1000 * forward / n:.1f} ms + describe "
              f"{1000 * pooling_time / n:.1f} ms ({regions:.1f} regions) per image")


if __name__ == "__main__":
    main()
