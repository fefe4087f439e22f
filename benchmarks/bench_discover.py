"""Stage-1 discovery benchmark on COCO128 (../shared/data) with the offline backbone.

Prints, in one run:
- per-image time of each stage (backbone forward, merge, CRF + filters,
  levels), as CPU time of one thread (one core; other load barely counts);
- the merge's speed-up over the quadratic oracle on the same 60x60x768 maps;
- masks per image per threshold and per level;
- class-agnostic box and mask AR@100 / AR@1000 (and AR@10, AP) of the
  pseudo-labels against coco128/instances.json (pycocotools, categories ignored).

Run: .venv/bin/python benchmarks/bench_discover.py [--images 128] [--backbone efficientnet_lite0]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from threadpoolctl import threadpool_limits

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from hassod.discover.crf import CRFSettings  # noqa: E402
from hassod.discover.pipeline import DiscoverySettings, discover_masks  # noqa: E402
from hassod.evaluation import evaluate  # noqa: E402
from hassod.features import build_backbone  # noqa: E402
from hassod.images import load_rgb, resize_square  # noqa: E402

DATA = REPO.parent / "shared" / "data" / "coco128"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=128, help="how many COCO128 images")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--weights", default=None)
    parser.add_argument("--thresholds", default=None, help="e.g. 0.4,0.2,0.1 (default: the backbone's)")
    parser.add_argument("--oracle-maps", type=int, default=1, help="60x60x768 maps for the oracle comparison")
    parser.add_argument("--work-size", type=int, default=CRFSettings().work_size,
                        help="CRF working size in pixels (0 = the full 480 px reference)")
    parser.add_argument("--save", default=None, help="write the pseudo-labels (COCO results) here")
    args = parser.parse_args()
    if not (DATA / "instances.json").exists():
        sys.exit(f"missing {DATA}: the benchmark needs ../shared/data beside the repository")

    torch.set_num_threads(1)  # the targets are per core
    threadpool_limits(1)  # BLAS too (the levels' matrix product)
    gt = json.loads((DATA / "instances.json").read_text())
    backbone = build_backbone(args.backbone, weights=args.weights, device="cpu")
    thresholds = tuple(float(t) for t in args.thresholds.split(",")) if args.thresholds else backbone.default_thresholds
    thresholds = tuple(sorted(thresholds, reverse=True))
    settings = DiscoverySettings(thresholds=thresholds, crf=CRFSettings(work_size=args.work_size or None))
    print(f"backbone {backbone.name} (dim {backbone.dim}, stride {backbone.patch_size}), thresholds {thresholds}, "
          f"CRF work size {settings.crf.work_size or settings.input_size} px")

    images = sorted(gt["images"], key=lambda im: im["file_name"])[: args.images]
    timings: dict[str, float] = {"backbone": 0.0}
    per_threshold: Counter = Counter()
    per_level: Counter = Counter()
    detections = []
    warm = resize_square(load_rgb(DATA / "images" / images[0]["file_name"]), settings.input_size)
    discover_masks(warm, backbone.extract([warm])[0].permute(1, 2, 0).numpy(), warm.shape[:2], settings)
    for info in images:
        image = load_rgb(DATA / "images" / info["file_name"])
        small = resize_square(image, settings.input_size)
        start = time.thread_time()
        features = backbone.extract([small])[0].permute(1, 2, 0).float().numpy()
        timings["backbone"] += time.thread_time() - start
        found = discover_masks(small, features, image.shape[:2], settings, timings=timings)
        per_threshold.update(found.thresholds.tolist())
        per_level.update(found.levels.tolist())
        for ann in found.annotations():
            detections.append({"image_id": info["id"], "category_id": 1, "bbox": ann["bbox"],
                               "segmentation": ann["segmentation"], "score": ann["score"]})

    n = len(images)
    print(f"\n== time per image ({n} images, 1 thread) ==")
    for stage in ("backbone", "merge", "crf_filters", "levels"):
        print(f"  {stage:12s} {1000 * timings.get(stage, 0.0) / n:8.1f} ms")
    post = sum(v for k, v in timings.items() if k != "backbone") / n
    print(f"  {'all but backbone':12s} {1000 * post:8.1f} ms   (target <= 1000 ms)")

    print("\n== masks per image ==")
    for threshold in thresholds:
        print(f"  threshold {threshold:<5} {per_threshold[threshold] / n:6.2f}")
    for level, name in enumerate(("whole", "part", "subpart")):
        print(f"  {name:15s} {per_level[level] / n:6.2f}")
    print(f"  {'total':15s} {len(detections) / n:6.2f}")

    gt_subset = {**gt, "images": images, "annotations": [a for a in gt["annotations"]
                                                          if a["image_id"] in {im["id"] for im in images}]}
    print("\n== class-agnostic quality of the pseudo-labels vs coco128/instances.json ==")
    for iou_type in ("bbox", "segm"):
        metrics = evaluate(gt_subset, detections, iou_type)
        print(f"  {iou_type:5s} " + "  ".join(f"{k} {100 * v:5.1f}" for k, v in metrics.items()
                                          if k in ("AR@10", "AR@100", "AR@1000", "AP", "AP50")))
    if args.save:
        Path(args.save).write_text(json.dumps(detections))

    print("\n== merge: priority queue vs quadratic oracle, 60x60x768 ==")
    import bench_merge

    bench_merge.run(oracle_images=args.oracle_maps)


if __name__ == "__main__":
    main()
