"""Index build speed per stage and instance-search quality on the synthetic instance set.

Builds two indexes over the same synthetic images (hassod.synthetic: object
instances with parts, pasted into other scenes at other scales): one with the
true regions (the descriptor and search alone) and one with stage-1 discovery
(the whole training-free system). Every object is then searched by a box
around it in every image that holds it. Prints, in one run:
- build images/s and per-stage ms per image (regions, describe, store);
- query latency p50 / p95;
- mAP (relevant = images holding the object) and mean IoU of the returned
  boxes against the pasted instance, for both region sources.

Run: .venv/bin/python benchmarks/bench_index.py [--objects 10] [--images 20]
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hassod.features import build_backbone  # noqa: E402
from hassod.synthetic import make_instance_scenes, save_scenes  # noqa: E402
from indexer.build import build_index  # noqa: E402
from indexer.descriptors import RegionDescriber  # noqa: E402
from indexer.regions import CocoRegions, DiscoveryRegions  # noqa: E402
from retrieval.searcher import Searcher  # noqa: E402


def box_iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def evaluate(searcher: Searcher, scenes, folder: Path) -> dict[str, float]:
    """mAP over (object, holder) box queries, mean IoU of returned holder boxes, latency."""
    aps, ious, latencies = [], [], []
    for obj in sorted({o for s in scenes for o in s.objects}):
        holders = {i for i, s in enumerate(scenes) if obj in s.objects}
        for q in sorted(holders):
            box = scenes[q].boxes[scenes[q].objects.index(obj)]
            start = time.perf_counter()
            matches = searcher.search(folder / f"scene_{q:02d}.png", box=box, k=len(scenes))
            latencies.append(time.perf_counter() - start)
            found = [int(Path(m.path).stem.split("_")[1]) for m in matches]
            hits, precision_sum = 0, 0.0
            for rank, (match, index) in enumerate(zip(matches, found), start=1):
                if index in holders:
                    hits += 1
                    precision_sum += hits / rank
                    ious.append(box_iou(match.box, scenes[index].boxes[scenes[index].objects.index(obj)]))
            aps.append(precision_sum / len(holders))
    return {"mAP": float(np.mean(aps)), "mean_IoU": float(np.mean(ious)), "IoU>=0.5": float(np.mean(np.array(ious) >= 0.5)),
            "query_p50_ms": 1000 * float(np.percentile(latencies, 50)),
            "query_p95_ms": 1000 * float(np.percentile(latencies, 95)), "queries": len(aps)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--objects", type=int, default=10)
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(2)

    scenes = make_instance_scenes(seed=1, n_objects=args.objects, n_images=args.images)
    work = Path(tempfile.mkdtemp(prefix="bench_index_"))
    folder = work / "images"
    save_scenes(scenes, folder, work / "truth.json")
    backbone = build_backbone("efficientnet_lite0", device="cpu")
    describer = RegionDescriber(backbone)
    paths = sorted(folder.glob("*.png"))
    print(f"{len(paths)} synthetic images, {args.objects} objects, descriptor {describer.name} ({describer.dim}-d)")

    sources = {
        "true regions": CocoRegions(work / "truth.json"),
        "stage-1 discovery": DiscoveryRegions(backbone, workers=args.workers),
    }
    for name, source in sources.items():
        timings: dict[str, float] = {}
        start = time.perf_counter()
        summary = build_index(paths, work / name.replace(" ", "_"), source, describer, show_progress=False,
                              timings=timings)
        seconds = time.perf_counter() - start
        searcher = Searcher(work / name.replace(" ", "_"), backbone=backbone)
        quality = evaluate(searcher, scenes, folder)
        searcher.close()
        stages = "  ".join(f"{k} {1000 * v / len(paths):.0f} ms" for k, v in timings.items())
        print(f"\n== {name} ==")
        print(f"  build: {len(paths) / seconds:.2f} images/s, {summary.regions / len(paths):.1f} regions/image; "
              f"per image: {stages}")
        print(f"  search ({quality['queries']} box queries): mAP {quality['mAP']:.3f}, "
              f"mean IoU of returned boxes {quality['mean_IoU']:.3f} ({100 * quality['IoU>=0.5']:.0f}% >= 0.5), "
              f"latency p50 {quality['query_p50_ms']:.0f} ms p95 {quality['query_p95_ms']:.0f} ms")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
