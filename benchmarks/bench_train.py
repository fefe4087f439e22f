"""Stage-2 training benchmark: pseudo-labels alone vs the detector trained on them (COCO128).

The paper's pattern on data we have: discover pseudo-labels on the first N
images of ../shared/data/coco128 with the offline backbone (or reuse a
pseudo-label file), train the hierarchical detector on them with a small CPU
schedule, and evaluate both against coco128/instances.json (class-agnostic,
pycocotools, those N images only). Prints box AR@10/100/1000 and AP of the
pseudo-labels and of the detector side by side, with the schedule used.

The detector is evaluated on the same images whose pseudo-labels it trained
on (no true label is ever used for training). Measured on 16 images, one
shared CPU core, small heads, shortest edge 320 px, batch 2:
- 200 iterations, lr 0.01 (543 s): box AR@100 0.072 vs 0.150 for the pseudo-labels;
- 600 iterations, lr 0.02 (1450 s): AR@100 0.171, AR@1000 0.190, AR_medium
  0.141 vs the pseudo-labels' 0.150 / 0.150 / 0.029 — the paper's pattern:
  the detector generalises beyond its noisy targets.
The paper's schedule is tens of thousands of iterations at batch 16 on GPUs.

Run: .venv/bin/python benchmarks/bench_train.py [--images 16] [--iterations 200] [--pseudo pseudo.json] [--heads small|full]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from threadpoolctl import threadpool_limits

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hassod.evaluation import evaluate  # noqa: E402
from hassod.train.loop import TrainSettings, predict_coco, train  # noqa: E402

DATA = REPO.parent / "shared" / "data" / "coco128"
METRICS = ("AR@10", "AR@100", "AR@1000", "AR_small", "AR_medium", "AR_large", "AP", "AP50")


def discover(images: list[Path], out: Path, backbone_name: str) -> Path:
    """Run stage 1 (the library behind `hassod discover`) on ``images``; returns the pseudo-label path."""
    from hassod.discover.collection import discover_collection
    from hassod.discover.pipeline import DiscoverySettings
    from hassod.features import build_backbone

    backbone = build_backbone(backbone_name, device="cpu")
    discover_collection(images, out, backbone, DiscoverySettings(), workers=1, show_progress=True)
    return out


def subset(gt: dict, names: set[str]) -> dict:
    """The COCO dataset restricted to the images whose file name is in ``names``."""
    images = [im for im in gt["images"] if im["file_name"] in names]
    ids = {im["id"] for im in images}
    return {**gt, "images": images, "annotations": [a for a in gt["annotations"] if a["image_id"] in ids]}


def pseudo_as_results(pseudo: dict, gt: dict) -> list[dict]:
    """Pseudo-label annotations as COCO results on the gt's image ids (matched by file name)."""
    by_name = {im["file_name"]: im["id"] for im in gt["images"]}
    pseudo_ids = {im["id"]: by_name.get(Path(im["file_name"]).name) for im in pseudo["images"]}
    return [{"image_id": pseudo_ids[a["image_id"]], "category_id": 1, "bbox": a["bbox"], "score": a.get("score", 1.0)}
            for a in pseudo["annotations"] if pseudo_ids.get(a["image_id"]) is not None]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=16, help="how many COCO128 images (sorted by name)")
    parser.add_argument("--pseudo", type=Path, help="reuse this pseudo-label file instead of discovering")
    parser.add_argument("--discover-backbone", default="efficientnet_lite0")
    parser.add_argument("--backbone", default="efficientnet_lite0", help="detector backbone (resnet50 needs weights)")
    parser.add_argument("--backbone-weights", default=None)
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--min-size", type=int, default=320, help="training/test shortest edge (CPU budget)")
    parser.add_argument("--heads", choices=["small", "full"], default="small",
                        help="small: narrower FPN/heads and fewer RoIs so a CPU run takes minutes (full: 26 s/it)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=None, help="run folder [a temporary one]")
    args = parser.parse_args()
    if not (DATA / "instances.json").exists():
        sys.exit(f"missing {DATA}: the benchmark needs ../shared/data beside the repository")
    from hassod.model import DetectorSettings

    torch.set_num_threads(1)  # one core: the box is shared, and timings per core are comparable
    threadpool_limits(1)

    gt_all = json.loads((DATA / "instances.json").read_text())
    work = Path(args.out or tempfile.mkdtemp(prefix="bench_train_"))
    work.mkdir(parents=True, exist_ok=True)
    if args.pseudo is None:
        names = sorted(im["file_name"] for im in gt_all["images"])[: args.images]
        started = time.perf_counter()
        pseudo_path = discover([DATA / "images" / n for n in names], work / "pseudo.json", args.discover_backbone)
        print(f"discovery: {len(names)} images in {time.perf_counter() - started:.0f} s")
    else:
        pseudo_path = args.pseudo
    pseudo = json.loads(pseudo_path.read_text())
    names = {Path(im["file_name"]).name for im in pseudo["images"]}
    gt = subset(gt_all, names)

    detector = dataclasses.replace(DetectorSettings(), backbone=args.backbone,
                                   min_size_train=(args.min_size,), min_size_test=args.min_size,
                                   max_size=max(args.min_size * 5 // 3, args.min_size))
    if args.heads == "small":
        detector = dataclasses.replace(detector, fpn_channels=64, box_head_dim=256, mask_head_dim=64,
                                       rpn_pre_nms_top_n_train=1000, rpn_post_nms_top_n_train=1000,
                                       roi_batch_size_per_image=128)
    settings = TrainSettings(batch_size=args.batch_size, iterations=args.iterations, lr=args.lr,
                             warmup_iters=min(100, args.iterations // 5), checkpoint_period=max(1, args.iterations),
                             device=args.device, workers=0)
    run = work / "run"
    started = time.perf_counter()
    result = train(settings, detector, pseudo_path, None, run, backbone_weights=args.backbone_weights,
                   resume=(run / "last.pth").exists())
    seconds = time.perf_counter() - started
    from hassod.model import load_detector

    model, _ = load_detector(result.final_checkpoint, device=args.device)
    detections = predict_coco(model, gt, DATA / "images", torch.device(args.device), detector.max_size)

    rows = {"pseudo-labels": evaluate(gt, pseudo_as_results(pseudo, gt), "bbox"),
            "trained detector": evaluate(gt, detections, "bbox")}
    print(f"\nschedule: {settings.iterations} iterations x batch {settings.batch_size} on {args.device} "
          f"({seconds:.0f} s, {seconds / max(1, settings.iterations):.2f} s/it), lr {settings.base_lr()} "
          f"cosine, warm-up {settings.warmup_iters}, shortest edge {args.min_size} px, backbone {args.backbone} "
          f"({args.heads} heads); "
          f"{len(gt['images'])} images, {len(gt['annotations'])} true objects, "
          f"{len(pseudo['annotations'])} pseudo-labels, {len(detections)} detections")
    print(f"{'class-agnostic box':<18}" + "".join(f"{m:>10}" for m in METRICS))
    for name, metrics in rows.items():
        print(f"{name:<18}" + "".join(f"{metrics[m]:>10.3f}" for m in METRICS))
    print(f"run folder: {run}")


if __name__ == "__main__":
    main()
