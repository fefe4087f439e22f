"""Detector inference speed: ms per image at 800 px shortest edge, on CPU and (when present) CUDA with AMP.

Images are COCO128 photos (../shared/data) resized so that their shortest
edge is 800 px, the detector's test size, so neither the model's own resize
nor the mask pasting works at another resolution. Per image it prints the
time of the model forward (backbone, RPN, cascade, 28×28 mask probabilities
per box), of :func:`hassod.detect.postprocess` (filters, pasting the kept
masks at image size binarised at 0.5 a batch at a time, RLE encoding,
coverage hierarchy from the RLEs) and of building the COCO annotations, plus
detections per image and the peak memory (the process's resident set on the
CPU, allocated tensors on CUDA).

Without ``--checkpoint`` a randomly initialised model of the default
settings (ResNet-50 FPN cascade) is timed: the network cost is the same as a
trained one's, but the number of detections (hence mask pasting and
hierarchy time) differs, so the detections per image are printed beside
the times; ``--max-detections`` caps them for both.

Run: .venv/bin/python benchmarks/bench_detect.py [--checkpoint ckpt] [--images 8] [--devices cpu,cuda]
"""
from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hassod.detect import DetectOptions, Detector, postprocess  # noqa: E402
from hassod.images import load_rgb  # noqa: E402

DATA = REPO.parent / "shared" / "data" / "coco128"


def resize_shortest(image: np.ndarray, edge: int) -> np.ndarray:
    """(H, W, 3) uint8 → same aspect with min(H, W) == edge, bilinear."""
    tensor = torch.from_numpy(image).permute(2, 0, 1)[None].float()
    scale = edge / min(image.shape[:2])
    size = (round(image.shape[0] * scale), round(image.shape[1] * scale))
    resized = torch.nn.functional.interpolate(tensor, size=size, mode="bilinear", align_corners=False, antialias=True)
    return resized[0].round().clamp(0, 255).byte().permute(1, 2, 0).numpy()


def _random_checkpoint(folder: Path) -> Path:
    from hassod.model import DetectorSettings, build_detector, save_checkpoint

    torch.manual_seed(0)
    settings = DetectorSettings()
    path = folder / "random.pt"
    save_checkpoint(path, build_detector(settings, random_init=True), settings)
    return path


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_device(detector: Detector, warmup: list[np.ndarray], images: list[np.ndarray]) -> dict[str, float]:
    """Mean ms per image of each stage over ``images``, one image per forward, after untimed ``warmup`` ones."""
    device = detector.device
    for image in warmup:
        detector.detect([image])
    stages = {"forward": 0.0, "postprocess": 0.0, "annotations": 0.0}
    detections = 0
    for image in images:
        _sync(device)
        start = time.perf_counter()
        output = detector.forward([image])[0]
        _sync(device)
        forwarded = time.perf_counter()
        found = postprocess(output, detector.options, image_size=image.shape[:2])
        processed = time.perf_counter()
        found.annotations()
        encoded = time.perf_counter()
        stages["forward"] += forwarded - start
        stages["postprocess"] += processed - forwarded
        stages["annotations"] += encoded - processed
        detections += len(found)
    out = {name: 1000 * value / len(images) for name, value in stages.items()}
    out["total"] = sum(out.values())
    out["detections"] = detections / len(images)
    out["peak_mb"] = _peak_mb(device)
    return out


def _peak_mb(device: torch.device) -> float:
    """Peak memory so far in MB: CUDA tensors on a GPU, the process's resident set (Linux: KiB) on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=None, help="detector checkpoint [random default-settings model]")
    parser.add_argument("--images", type=int, default=8, help="timed COCO128 images per device")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--edge", type=int, default=800, help="shortest edge in pixels")
    parser.add_argument("--devices", default="cpu,cuda", help="comma-separated; cuda is skipped when absent")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--max-detections", type=int, default=1000)
    parser.add_argument("--score-thresh", type=float, default=0.0)
    args = parser.parse_args()
    if not DATA.exists():
        sys.exit(f"missing {DATA}: the benchmark needs ../shared/data beside the repository")
    if args.threads:
        torch.set_num_threads(args.threads)

    paths = sorted((DATA / "images").glob("*.jpg"))[: args.images + args.warmup]
    images = [resize_shortest(load_rgb(p), args.edge) for p in paths]
    options = DetectOptions(score_thresh=args.score_thresh, max_detections=args.max_detections)
    with tempfile.TemporaryDirectory() as scratch:
        checkpoint = Path(args.checkpoint) if args.checkpoint else _random_checkpoint(Path(scratch))
        print(f"checkpoint {'(random init, default settings)' if not args.checkpoint else checkpoint}; "
              f"{len(images) - args.warmup} images of {images[0].shape[1]}x{images[0].shape[0]} px and similar "
              f"(shortest edge {args.edge}), {args.warmup} warm-up; torch {torch.__version__}, "
              f"{torch.get_num_threads()} CPU threads")
        header = (f"{'device':38s}{'forward':>10s}{'postproc':>10s}{'annot':>8s}{'total':>9s}{'dets/img':>10s}"
                  f"{'peak MB':>9s}")
        print(header)
        for name in args.devices.split(","):
            if name.startswith("cuda") and not torch.cuda.is_available():
                print(f"{name:38s} not available on this machine")
                continue
            detector = Detector(checkpoint, device=name, options=options, amp=True)
            on_cpu = detector.device.type == "cpu"
            label = "CPU fp32" if on_cpu else f"{torch.cuda.get_device_name(detector.device)} AMP"
            result = _time_device(detector, images[: args.warmup], images[args.warmup:])
            print(f"{label:38s}{result['forward']:10.1f}{result['postprocess']:10.1f}{result['annotations']:8.1f}"
                  f"{result['total']:9.1f}{result['detections']:10.0f}{result['peak_mb']:9.0f}   (ms per image)")


if __name__ == "__main__":
    main()
