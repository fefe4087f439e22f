"""Stage-2 training benchmark: pseudo-labels vs the burn-in detector vs burn-in + Mean Teacher (COCO128).

COCO128 (../shared/data) is split in two halves by file name. Stage 1
discovers pseudo-labels on all of it with the offline backbone (or a
``--pseudo`` file is reused); the detector trains on the first half's
pseudo-labels only — ``--burn-in`` iterations on them, then Mean Teacher up
to ``--iterations`` — and everything is evaluated on the second half against
the true COCO boxes (class-agnostic, pycocotools): that half's pseudo-labels,
the burn-in detector (the run's checkpoint at the burn-in's last iteration),
and the Mean Teacher student and teacher at the end. No true label is ever
used for training. Prints box AR@10/100/1000, AR by size and AP side by side
with the schedule; measured figures are kept in benchmarks/RESULTS.md.

Run: .venv/bin/python benchmarks/bench_train.py [--burn-in 300] [--iterations 400] [--pseudo pseudo.json]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from threadpoolctl import threadpool_limits

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hassod.evaluation import evaluate  # noqa: E402
from hassod.train.hooks import predict_coco  # noqa: E402
from hassod.train.loop import train  # noqa: E402
from hassod.train.settings import TrainSettings  # noqa: E402

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


def subset(coco: dict, names: set[str]) -> dict:
    """The COCO dataset restricted to the images whose file name (base name) is in ``names``."""
    images = [im for im in coco["images"] if Path(im["file_name"]).name in names]
    ids = {im["id"] for im in images}
    return {**coco, "images": images, "annotations": [a for a in coco["annotations"] if a["image_id"] in ids]}


def pseudo_as_results(pseudo: dict, gt: dict) -> list[dict]:
    """Pseudo-label annotations as COCO results on the gt's image ids (matched by file name)."""
    by_name = {im["file_name"]: im["id"] for im in gt["images"]}
    pseudo_ids = {im["id"]: by_name.get(Path(im["file_name"]).name) for im in pseudo["images"]}
    return [{"image_id": pseudo_ids[a["image_id"]], "category_id": 1, "bbox": a["bbox"], "score": a.get("score", 1.0)}
            for a in pseudo["annotations"] if pseudo_ids.get(a["image_id"]) is not None]


def detector_results(weights: dict, detector, gt: dict, device: str) -> list[dict]:
    """COCO box results of a detector with ``weights`` (a state dict) on the gt's images."""
    from hassod.model import build_detector

    model = build_detector(detector, random_init=True)
    model.load_state_dict(weights)
    return predict_coco(model.to(device).eval(), gt, DATA / "images", torch.device(device), detector.max_size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=128, help="how many COCO128 images (sorted by name), both halves")
    parser.add_argument("--pseudo", type=Path, help="reuse this pseudo-label file (covering both halves)")
    parser.add_argument("--discover-backbone", default="efficientnet_lite0")
    parser.add_argument("--backbone", default="efficientnet_lite0", help="detector backbone (resnet50 needs weights)")
    parser.add_argument("--backbone-weights", default=None)
    parser.add_argument("--burn-in", type=int, default=300, help="iterations on the pseudo-labels alone")
    parser.add_argument("--iterations", type=int, default=400, help="burn-in + Mean Teacher iterations")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--min-size", type=int, default=320, help="training/test shortest edge (CPU budget)")
    parser.add_argument("--heads", choices=["small", "full"], default="small",
                        help="small: narrower FPN/heads and fewer RoIs so a CPU run takes minutes (full: 26 s/it)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (one: timings per core)")
    parser.add_argument("--out", type=Path, default=None, help="work folder [a temporary one]")
    args = parser.parse_args()
    if not (DATA / "instances.json").exists():
        sys.exit(f"missing {DATA}: the benchmark needs ../shared/data beside the repository")
    from hassod.model import DetectorSettings, read_checkpoint

    torch.set_num_threads(args.threads)
    threadpool_limits(args.threads)

    gt_all = json.loads((DATA / "instances.json").read_text())
    work = Path(args.out or tempfile.mkdtemp(prefix="bench_train_"))
    work.mkdir(parents=True, exist_ok=True)
    names = sorted(im["file_name"] for im in gt_all["images"])[: args.images]
    train_names, eval_names = set(names[: len(names) // 2]), set(names[len(names) // 2:])
    if args.pseudo is None:
        started = time.perf_counter()
        pseudo_path = discover([DATA / "images" / n for n in names], work / "pseudo.json", args.discover_backbone)
        print(f"discovery: {len(names)} images in {time.perf_counter() - started:.0f} s")
    else:
        pseudo_path = args.pseudo
    pseudo = json.loads(pseudo_path.read_text())
    train_pseudo = work / "pseudo_train.json"
    train_pseudo.write_text(json.dumps(subset(pseudo, train_names)))
    gt = subset(gt_all, eval_names)

    detector = dataclasses.replace(DetectorSettings(), backbone=args.backbone,
                                   min_size_train=(args.min_size,), min_size_test=args.min_size,
                                   max_size=max(args.min_size * 5 // 3, args.min_size))
    if args.heads == "small":
        detector = dataclasses.replace(detector, fpn_channels=64, box_head_dim=256, mask_head_dim=64,
                                       rpn_pre_nms_top_n_train=1000, rpn_post_nms_top_n_train=1000,
                                       roi_batch_size_per_image=128)
    settings = TrainSettings(batch_size=args.batch_size, iterations=args.iterations, burn_in=args.burn_in,
                             lr=args.lr, warmup_iters=min(100, args.burn_in // 5), mt_warmup_iters=min(
                                 100, max(1, (args.iterations - args.burn_in) // 10)),
                             checkpoint_period=max(1, args.iterations), device=args.device, workers=0)
    run = work / "run"
    shutil.rmtree(run, ignore_errors=True)
    started = time.perf_counter()
    train(settings, detector, train_pseudo, None, run, backbone_weights=args.backbone_weights,
          stop_after=args.burn_in)
    burn_in_seconds = time.perf_counter() - started
    burn_in = read_checkpoint(run / "last.pth")["model"]
    started = time.perf_counter()
    result = train(settings, detector, train_pseudo, None, run, backbone_weights=args.backbone_weights, resume=True)
    teacher_seconds = time.perf_counter() - started
    final = read_checkpoint(result.final_checkpoint)

    rows = {"pseudo-labels": evaluate(gt, pseudo_as_results(pseudo, gt), "bbox"),
            "burn-in": evaluate(gt, detector_results(burn_in, detector, gt, args.device), "bbox")}
    if final.get("teacher") is not None:
        rows["+ MT student"] = evaluate(gt, detector_results(final["model"], detector, gt, args.device), "bbox")
        rows["+ MT teacher"] = evaluate(gt, detector_results(final["teacher"], detector, gt, args.device), "bbox")
    mt_iters = settings.teacher_iters
    print(f"\nschedule: {settings.burn_in_iters} burn-in iterations ({burn_in_seconds / max(1, args.burn_in):.2f} s/it, "
          f"lr {settings.base_lr()} warm-up {settings.warmup_iters} then cosine to 0) + {mt_iters} Mean Teacher "
          f"iterations ({teacher_seconds / max(1, mt_iters):.2f} s/it, warm-up {settings.mt_warmup_iters} then "
          f"cosine, keep {settings.ema_keep}, teacher > {settings.teacher_thresh}), batch {settings.batch_size} "
          f"(+{settings.batch_size} unlabelled in MT) on {args.device}, {args.threads} thread(s), shortest edge "
          f"{args.min_size} px, backbone {args.backbone} ({args.heads} heads)")
    print(f"trained on {len(train_names)} images' pseudo-labels; evaluated on the other {len(gt['images'])} images "
          f"({len(gt['annotations'])} true objects)")
    print(f"{'class-agnostic box':<18}" + "".join(f"{m:>10}" for m in METRICS))
    for name, metrics in rows.items():
        print(f"{name:<18}" + "".join(f"{metrics[m]:>10.3f}" for m in METRICS))
    print(f"run folder: {run}")


if __name__ == "__main__":
    main()
