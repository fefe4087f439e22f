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

Every mode is scored raw and with PCA-whitening (``+w``) fitted on all
database region descriptors. Rows compare layers and pooling at 640 px, then
input size, GeM p, mask weighting, whitening shrinkage and whether the
database holds the whole-image region. Ends with the describe time per image.

Run: .venv/bin/python benchmarks/bench_descriptors.py [--refresh-regions]
"""
from __future__ import annotations

import argparse
import dataclasses
import pickle
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hassod.discover.masks import masks_to_boxes_xywh, masks_to_rle  # noqa: E402
from hassod.discover.pipeline import DiscoverySettings, discover_masks  # noqa: E402
from hassod.features import build_backbone  # noqa: E402
from hassod.images import load_rgb, resize_square  # noqa: E402
from indexer.descriptors import DescriptorSettings, FeatureMap, RegionDescriber  # noqa: E402
from indexer.whitening import PCAWhitening  # noqa: E402

DATA = REPO.parent / "shared" / "data" / "ukbench56"
CACHE = Path("/tmp/hassod_bench_descriptors")
MODES = ("global", "mi-sum", "mi-sym", "box-obj", "box-c80")
ALL_LAYERS = ("grid", "s8", "s16", "s32", "head")


@dataclasses.dataclass
class Regions:
    """Stage-1 regions of one image: (R, 4) xyxy boxes, (R,) levels and areas, R RLEs."""

    boxes: np.ndarray
    levels: np.ndarray
    areas: np.ndarray
    rles: list


def discover_regions(images: list[np.ndarray], backbone, refresh: bool) -> list[Regions]:
    """Stage-1 regions of every image, cached per backbone weights (discovery takes ~1 s/image)."""
    settings = DiscoverySettings(thresholds=tuple(sorted(backbone.default_thresholds, reverse=True)))
    cache = CACHE / f"ukbench56_regions_{backbone.name}_{backbone.weights_id}.pkl"
    if cache.exists() and not refresh:
        return pickle.loads(cache.read_bytes())
    out = []
    for image in images:
        small = resize_square(image, settings.input_size)
        features = backbone.extract([small])[0].permute(1, 2, 0).float().cpu().numpy()
        found = discover_masks(small, features, image.shape[:2], settings.thresholds, settings)
        xywh = masks_to_boxes_xywh(found.masks).reshape(-1, 4).astype(np.float64)
        boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
        out.append(Regions(boxes, found.levels, found.masks.sum(axis=(1, 2)), masks_to_rle(found.masks)))
    CACHE.mkdir(parents=True, exist_ok=True)
    cache.write_bytes(pickle.dumps(out))
    return out


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


def evaluate(describer: RegionDescriber, fmaps: list[FeatureMap], regions: list[Regions], groups: np.ndarray,
             with_whole: bool = True, shrinkage: float = 0.1) -> dict[str, float]:
    """N-S of every mode, raw and whitened (key suffix ``+w``)."""
    use_masks = describer.settings.mask_weighting
    db = []
    for fmap, reg in zip(fmaps, regions):
        boxes = region_boxes(reg, fmap, with_whole)
        masks = None
        if use_masks:
            whole = {"size": list(fmap.image_size), "counts": masks_to_rle(np.ones((1, *fmap.image_size), bool))[0]["counts"]}
            masks = reg.rles + ([whole] if with_whole else [])
        db.append(describer.describe(fmap, boxes, masks))
    # Queries are what a user gives: an image, or an image and a box (never a mask).
    glob = np.stack([describer.global_descriptor(f) for f in fmaps])
    box_obj = np.stack([describer.describe(f, object_box(r, f)[None])[0] for f, r in zip(fmaps, regions)])
    box_c80 = np.stack([describer.describe(f, central_box(f)[None])[0] for f, r in zip(fmaps, regions)])
    # The whole-image query's regions are described like the database's.
    queries = db
    whitening = PCAWhitening.fit(np.concatenate(db), shrinkage=shrinkage)
    results = {}
    for suffix, tf in (("", lambda v: v), ("+w", whitening.transform)):
        d = [tf(v) for v in db]
        q = [tf(v) for v in queries]
        g = tf(glob)
        results["global" + suffix] = ns_score(g @ g.T, groups)
        sims = [[qi @ dj.T for dj in d] for qi in q]
        results["mi-sum" + suffix] = ns_score(np.array([[s.max(1).sum() for s in row] for row in sims]), groups)
        results["mi-sym" + suffix] = ns_score(
            np.array([[s.max(1).mean() + s.max(0).mean() for s in row] for row in sims]), groups)
        for name, vectors in (("box-obj", box_obj), ("box-c80", box_c80)):
            v = tf(vectors)
            results[name + suffix] = ns_score(np.array([[float((dj @ vi).max()) for dj in d] for vi in v]), groups)
    return results


def print_row(label: str, results: dict[str, float]) -> None:
    cells = "  ".join(f"{results[m]:4.2f}/{results[m + '+w']:4.2f}" for m in MODES)
    print(f"  {label:34s} {cells}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--refresh-regions", action="store_true", help="rerun discovery instead of the /tmp cache")
    parser.add_argument("--quick", action="store_true", help="only the layer/pooling table")
    args = parser.parse_args()
    paths = sorted(DATA.glob("ukbench*.jpg"))
    if len(paths) != 56:
        sys.exit(f"expected 56 images in {DATA}, found {len(paths)}: the benchmark needs ../shared/data")
    groups = np.array([int(p.stem[len("ukbench"):]) // 4 for p in paths])
    images = [load_rgb(p) for p in paths]
    backbone = build_backbone("efficientnet_lite0", device="cpu")

    start = time.perf_counter()
    regions = discover_regions(images, backbone, args.refresh_regions)
    counts = np.array([len(r.boxes) for r in regions])
    print(f"stage-1 regions: {counts.mean():.1f} per image (min {counts.min()}, max {counts.max()}), "
          f"{time.perf_counter() - start:.0f} s (cached in {CACHE})")

    fmap_cache: dict[int, list[FeatureMap]] = {}

    def fmaps_at(long_side: int) -> list[FeatureMap]:
        if long_side not in fmap_cache:
            every = RegionDescriber(backbone, DescriptorSettings(layers=ALL_LAYERS, long_side=long_side))
            fmap_cache[long_side] = every.feature_map(images)
        return fmap_cache[long_side]

    def run(label: str, with_whole: bool = True, shrinkage: float = 0.1, **changes) -> dict[str, float]:
        settings = dataclasses.replace(DescriptorSettings(), **changes)
        describer = RegionDescriber(backbone, settings)
        results = evaluate(describer, fmaps_at(settings.long_side), regions, groups, with_whole, shrinkage)
        print_row(label, results)
        return results

    header = "  ".join(f"{m:>9s}" for m in MODES)
    print(f"\n== N-S (max 4.0), raw/whitened ==\n  {'variant':34s} {header}")
    print("-- layers x pooling, 640 px, GeM p=3")
    for layers in (("grid",), ("s16",), ("s32",), ("head",), ("s16", "s32"), ("s32", "head"), ("s16", "s32", "head")):
        for pooling in ("gem", "avg", "max"):
            run(f"{'+'.join(layers)} {pooling}", layers=layers, pooling=pooling)
    if args.quick:
        return
    print("-- defaults with one change")
    run("defaults", )
    for long_side in (320, 480, 800):
        run(f"long_side {long_side}", long_side=long_side)
    for p in (2.0, 4.0):
        run(f"gem_p {p:g}", gem_p=p)
    run("mask weighting", mask_weighting=True)
    run("no whole-image region in database", with_whole=False)
    for shrinkage in (0.0, 0.5):
        run(f"whitening shrinkage {shrinkage:g}", shrinkage=shrinkage)

    print("\n== describe time per image (1 thread; forward + all its regions) ==")
    torch.set_num_threads(1)
    describer = RegionDescriber(backbone, DescriptorSettings())
    describer.feature_map(images[:1])  # warm-up
    forward = pooling_time = 0.0
    for image, reg in zip(images, regions):
        t0 = time.perf_counter()
        fmap = describer.feature_map([image])[0]
        t1 = time.perf_counter()
        describer.describe(fmap, region_boxes(reg, fmap, True))
        t2 = time.perf_counter()
        forward, pooling_time = forward + t1 - t0, pooling_time + t2 - t1
    n = len(images)
    print(f"  {describer.name}: forward {1000 * forward / n:.1f} ms + describe {1000 * pooling_time / n:.1f} ms "
          f"({counts.mean() + 1:.1f} regions) per {images[0].shape[1]}x{images[0].shape[0]} image")


if __name__ == "__main__":
    main()
