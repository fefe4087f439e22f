"""Detector inference ms per image at a batch size of 1 and of 8 (CUDA + AMP), for benchmarks/gpu/check.sh.

A randomly initialised model of the default settings (ResNet-50 FPN, 3-stage
cascade, as benchmarks/bench_detect.py times) runs on COCO128 photos resized
to ``--edge`` px shortest edge (800: the detector's test size), ``--batch``
images per forward. Per batch size it prints and writes (``--json-out``):
the model forward (backbone, RPN, cascade, mask probabilities), the
post-processing (filters, masks pasted at image size, coverage hierarchy),
both in ms per image, detections per image and the peak CUDA memory. A
random model's detections differ in number from a trained one's, so the
post-processing figure is indicative; the forward's cost is the same.

Run: python benchmarks/gpu/bench_infer.py --images DIR [--device cuda] [--batches 1,8] [--edge 800]
     [--count 8] [--settings default|tiny] [--json-out result.json]
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from hassod.detect import DetectOptions, Detector, postprocess  # noqa: E402
from benchmarks.bench_detect import resize_shortest  # noqa: E402
from hassod.images import load_rgb  # noqa: E402


def random_checkpoint(folder: Path, kind: str) -> Path:
    from hassod.model import DetectorSettings, build_detector, save_checkpoint

    torch.manual_seed(0)
    settings = DetectorSettings.tiny() if kind == "tiny" else DetectorSettings()
    path = folder / f"random_{kind}.pt"
    save_checkpoint(path, build_detector(settings, random_init=True), settings)
    return path


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_batches(detector: Detector, images: list[np.ndarray], batch: int, warmup: int) -> dict[str, float]:
    """Mean ms per image of the forward and the post-processing, ``batch`` images per forward."""
    device = detector.device
    batches = [images[i:i + batch] for i in range(0, len(images) - batch + 1, batch)] or [images[:batch]]
    for chunk in (batches * math.ceil(warmup / len(batches)))[:warmup]:
        detector.forward(chunk)  # cuDNN autotuning and the allocator's growth happen in the forward
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    forward = post = 0.0
    count = detections = 0
    for chunk in batches:
        sync(device)
        start = time.perf_counter()
        outputs = detector.forward(chunk)
        sync(device)
        forwarded = time.perf_counter()
        found = [postprocess(o, detector.options, image_size=im.shape[:2]) for o, im in zip(outputs, chunk)]
        sync(device)
        forward += forwarded - start
        post += time.perf_counter() - forwarded
        count += len(chunk)
        detections += sum(len(f) for f in found)
    result = {"batch": batch, "images": count, "forward_ms": 1000 * forward / count,
              "postprocess_ms": 1000 * post / count, "detections_per_image": detections / count}
    result["total_ms"] = result["forward_ms"] + result["postprocess_ms"]
    if device.type == "cuda":
        result["peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, required=True, help="folder of photos (COCO128)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    parser.add_argument("--edge", type=int, default=800, help="shortest edge in pixels")
    parser.add_argument("--count", type=int, default=8, help="timed images per batch size")
    parser.add_argument("--warmup", type=int, default=2, help="untimed forwards (of one batch each) first")
    parser.add_argument("--settings", choices=["default", "tiny"], default="default",
                        help="default: ResNet-50 cascade (the real cost); tiny: the smoke-test model")
    parser.add_argument("--no-amp", action="store_true")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()

    paths = sorted(p for p in args.images.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[: args.count]
    if not paths:
        sys.exit(f"no photos in {args.images}")
    images = [resize_shortest(load_rgb(p), args.edge) for p in paths]
    with tempfile.TemporaryDirectory() as scratch:
        detector = Detector(random_checkpoint(Path(scratch), args.settings), device=args.device,
                            options=DetectOptions(), amp=not args.no_amp)
        label = (torch.cuda.get_device_name(detector.device) if detector.device.type == "cuda" else "CPU")
        label += " AMP" if detector.amp else " fp32"
        rows = [time_batches(detector, images, int(b), args.warmup) for b in args.batches.split(",")]
    print(f"{label}; random-init {args.settings} model; {len(images)} photos at shortest edge {args.edge} px; "
          f"torch {torch.__version__}")
    for row in rows:
        print(f"batch {row['batch']}: forward {row['forward_ms']:.1f} + post-processing {row['postprocess_ms']:.1f} "
              f"= {row['total_ms']:.1f} ms/img, {row['detections_per_image']:.0f} dets/img"
              + (f", peak {row['peak_mib']:.0f} MiB" if "peak_mib" in row else ""))
    if args.json_out:
        args.json_out.write_text(json.dumps({"device": label, "edge": args.edge, "settings": args.settings,
                                             "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
