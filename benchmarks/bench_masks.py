"""Stage-1 post-processing of large photos: our mask steps against the plain library calls.

    .venv/bin/python benchmarks/bench_masks.py [--images 6] [--sizes 3000x4000,8000x8000]

Masks are real: the CRF-kept regions of COCO128 photos (../shared/data) at the
CRF working size (offline backbone, default thresholds), then brought to each
original size. Per size, one thread, it prints the time per mask of

- upscaling: bilinear evaluated inside each mask's box (ours) vs torch's
  antialiased interpolation of the whole frame (baseline), and the share of
  pixels that differ (only exact 0.5 ties, which we do not set);
- hole filling: background runs joined by a union-find (ours) vs scipy's
  binary_fill_holes on the box crop; results must be equal;
- RLE encoding: runs counted inside each mask's box, compressed by
  pycocotools (ours) vs pycocotools encoding a Fortran copy of the whole
  frame; RLEs must be equal;
- the whole post-processing of a photo's masks to RLEs vs the same steps by
  the plain library calls on whole (N, H, W) frames, with the peak of traced
  numpy memory of each.
"""
from __future__ import annotations

import argparse
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from hassod.discover.crf import refine_partition  # noqa: E402
from hassod.discover.masks import (  # noqa: E402
    corner_counts,
    fill_holes,
    mask_areas,
    masks_to_boxes_xywh,
    postprocess_to_rles,
    resize_masks,
)
from hassod.rle import masks_to_rle  # noqa: E402
from hassod.discover.merge import hierarchical_merge  # noqa: E402
from hassod.discover.pipeline import DiscoverySettings  # noqa: E402
from hassod.features import build_backbone  # noqa: E402
from hassod.images import load_rgb, resize_square  # noqa: E402

PHOTOS = ROOT / ".." / "shared" / "data" / "coco128" / "images"


def crf_masks(count: int) -> list[np.ndarray]:
    """Per photo, the (K, s, s) bool CRF-kept masks of all default thresholds."""
    backbone = build_backbone("efficientnet_lite0", device="cpu")
    settings = DiscoverySettings().with_default_thresholds(backbone.default_thresholds)
    out = []
    for path in sorted(PHOTOS.glob("*.jpg"))[:count]:
        small = resize_square(load_rgb(path), settings.input_size)
        features = backbone.extract([small])[0].permute(1, 2, 0).float().numpy()
        partitions = hierarchical_merge(features, settings.thresholds)
        out.append(np.concatenate([refine_partition(small, labels, settings.crf).masks for labels in partitions]))
    return out


def _seconds(fn: Callable[..., object], *args: object) -> tuple[float, object]:
    start = time.thread_time()
    result = fn(*args)
    return time.thread_time() - start, result


def _torch_resize(masks: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    out = np.empty((len(masks), *size), dtype=bool)
    for i, mask in enumerate(masks):  # one at a time: a 64 MP float32 frame is 256 MB
        values = torch.from_numpy(mask.astype(np.float32))[None, None]
        out[i] = (F.interpolate(values, size=size, mode="bilinear", align_corners=False, antialias=True)[0, 0] > 0.5)
    return out


def _scipy_fill(masks: np.ndarray) -> np.ndarray:
    filled = masks.copy()
    for i, (x, y, w, h) in enumerate(masks_to_boxes_xywh(masks).astype(np.int64)):
        if w:
            filled[i, y:y + h, x:x + w] = ndimage.binary_fill_holes(np.pad(masks[i, y:y + h, x:x + w], 1))[1:-1, 1:-1]
    return filled


def _numpy_rle(masks: np.ndarray) -> list[dict]:
    rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0), dtype=np.uint8))
    return [{"size": [int(s) for s in r["size"]], "counts": r["counts"].decode("ascii")} for r in rles]


def _peak_mb(fn: Callable[..., object], *args: object) -> float:
    tracemalloc.start()
    fn(*args)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak / 2**20


def _dense_rles(masks: np.ndarray, size: tuple[int, int]) -> list[dict]:
    """The same post-processing by the plain library calls on whole frames."""
    big = _torch_resize(masks, size)
    keep = (mask_areas(big) >= 100) & (corner_counts(big) < 3)
    return _numpy_rle(_scipy_fill(big[keep]))


def run(n_images: int, sizes: list[tuple[int, int]], per_size: int) -> None:
    torch.set_num_threads(1)
    photos = crf_masks(n_images)
    first = photos[0]
    print(f"{sum(len(p) for p in photos)} CRF masks from {n_images} COCO128 photos at "
          f"{first.shape[1]}x{first.shape[2]} px; up to {per_size} timed per size, one thread")
    resize_masks(first[:1], (64, 64))  # compile
    masks_to_rle(first[:1])
    for size in sizes:
        # Four dense copies are held at once: cap each near 512 MB.
        count = max(1, min(per_size, (512 << 20) // (size[0] * size[1])))
        _report(np.concatenate(photos)[:count], first, size)


def _report(masks: np.ndarray, photo: np.ndarray, size: tuple[int, int]) -> None:
    per = 1000.0 / len(masks)
    print(f"\n== {size[0]}x{size[1]} ({size[0] * size[1] / 1e6:.1f} MP), {len(masks)} masks ==")
    ours_s, big = _seconds(resize_masks, masks, size)
    base_s, reference = _seconds(_torch_resize, masks, size)
    ties = np.count_nonzero(big != reference) / big.size
    print(f"  upscale      {ours_s * per:8.1f} ms/mask  torch full frame {base_s * per:8.1f}  "
          f"x{base_s / ours_s:5.1f}  pixels differing {100 * ties:.5f}% (0.5 ties)")
    ours_s, filled = _seconds(fill_holes, big)
    base_s, expected = _seconds(_scipy_fill, big)
    print(f"  fill holes   {ours_s * per:8.1f} ms/mask  binary_fill_holes {base_s * per:7.1f}  "
          f"x{base_s / ours_s:5.1f}  equal {np.array_equal(filled, expected)}")
    ours_s, rles = _seconds(masks_to_rle, filled)
    base_s, expected_rles = _seconds(_numpy_rle, filled)
    print(f"  RLE encode   {ours_s * per:8.1f} ms/mask  numpy Fortran copy {base_s * per:6.1f}  "
          f"x{base_s / ours_s:5.1f}  equal {rles == expected_rles}")
    ours_s, _ = _seconds(postprocess_to_rles, photo, size)
    base_s, _ = _seconds(_dense_rles, photo, size)
    ours_mb, base_mb = _peak_mb(postprocess_to_rles, photo, size), _peak_mb(_dense_rles, photo, size)
    print(f"  one photo's {len(photo)} masks to RLEs: {ours_s:.2f} s, peak {ours_mb:.0f} MB; "
          f"library calls on whole frames {base_s:.2f} s, peak {base_mb:.0f} MB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=6, help="COCO128 photos to take CRF masks from")
    parser.add_argument("--sizes", default="3000x4000,8000x8000", help="original sizes HxW, comma-separated")
    parser.add_argument("--masks", type=int, default=40, help="masks timed per size")
    args = parser.parse_args()
    if not PHOTOS.is_dir():
        sys.exit(f"missing {PHOTOS.resolve()}: the benchmark needs ../shared/data beside the repository")
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    run(args.images, sizes, args.masks)


if __name__ == "__main__":
    main()
