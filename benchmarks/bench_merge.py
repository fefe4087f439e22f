"""Speed of the stage-1 hierarchical merge against the quadratic oracle.

    .venv/bin/python benchmarks/bench_merge.py [--images 4] [--oracle-images 1] [--widths]

Feature maps are 60x60 grids (a 480 px image at stride 8), merged at the
paper's thresholds (0.4, 0.2, 0.1):

- structured: piecewise-constant part prototypes + Gaussian noise, 768-d;
  parts of one object are similar (cosine ~0.3), so regions are parts at 0.4
  and objects at 0.2; isotropic noise makes large regions grow patch by patch
  along a boundary of near-equal similarities (the hardest case for the
  bounds the fast merge relies on);
- random: i.i.d. Gaussian 768-d; cosines are ~N(0, 1/768), so almost nothing
  merges (a lower bound on the cost);
- photo: real COCO photos (``../shared/data``): per-patch colour and gradient
  statistics, lifted to 768-d by a fixed random projection;
- efficientnet: the project's offline backbone on the same photos (472-d),
  when its package weights are installed.

Per set it prints the mean CPU time per image of the fast merge (numba, one
thread, compiled before timing; best of a few passes), the oracle's time on the first map(s) in the
same run (structured, random and photo sets by default: the oracle needs
~20-60 s per merge-heavy map), the speed-up, whether both gave identical
partitions, and the mean number of regions per threshold.

It also prints the "floor" of each set: the time of the work that every exact
merge of the same map does at least, with nothing else: reading every patch row
once (its norm and its products with the upper and left neighbours: the initial
pair scores), then, for each merge of the final partition, one exact product and
one update of a region's sum. The floor takes the merges region by region in
raster order, the most cache-friendly order there is; the real order follows
similarity across the whole image. ``fast / floor`` is how far the merge is
from that on this machine, whose memory speed sets most of it.

With ``--widths`` it then times the same photo merges at 16, 64, 384 and 768
channels (:func:`width_sweep`): what ordering the merges costs on its own.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Callable

import numba
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from hassod.discover.merge import hierarchical_merge  # noqa: E402
from hassod.images import load_rgb  # noqa: E402
from tests.oracles import colour_gradient_features, quadratic_merge, segment_features  # noqa: E402

THRESHOLDS = (0.4, 0.2, 0.1)
GRID = 60
DIM = 768
PHOTOS = ROOT / ".." / "shared" / "data" / "coco128" / "images"


def structured_maps(count: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [segment_features(rng, GRID, GRID, DIM, part_spread=1.5, noise=1.5) for _ in range(count)]


def random_maps(count: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(GRID, GRID, DIM)).astype(np.float32) for _ in range(count)]


def _photo_paths(count: int) -> list[Path]:
    if not PHOTOS.is_dir():
        raise FileNotFoundError(f"photos missing: expected {PHOTOS.resolve()}")
    return sorted(PHOTOS.glob("*.jpg"))[:count]


def photo_maps(count: int, seed: int) -> list[np.ndarray]:
    projection = np.random.default_rng(seed).normal(size=(16, DIM)).astype(np.float32)
    return [colour_gradient_features(load_rgb(p), (GRID, GRID)) @ projection for p in _photo_paths(count)]


def efficientnet_maps(count: int, seed: int) -> list[np.ndarray]:
    import torch

    from hassod.features import build_backbone

    torch.set_num_threads(1)
    backbone = build_backbone("efficientnet_lite0", device="cpu")
    maps = []
    with torch.inference_mode():
        for path in _photo_paths(count):
            batch = backbone.prepare([load_rgb(path)], GRID * backbone.patch_size)
            maps.append(backbone(batch)[0].permute(1, 2, 0).numpy().copy())
    return maps


FEATURE_SETS: dict[str, Callable[[int, int], list[np.ndarray]]] = {
    "structured": structured_maps,
    "random": random_maps,
    "photo": photo_maps,
    "efficientnet": efficientnet_maps,
}


@numba.njit(nogil=True, fastmath={"reassoc", "contract"})
def _floor_work(flat: np.ndarray, w: int, regions: np.ndarray, sums: np.ndarray, summed: np.ndarray) -> float:
    """The unavoidable work of a merge (module docstring) on ``flat`` (n, C)
    patch rows of a grid ``w`` patches wide, whose final partition is
    ``regions`` (n,) (raster-order labels); ``sums`` (n, C) and ``summed``
    (n,) bool are scratch. Returns a checksum so that nothing is optimised away."""
    n, c = flat.shape
    checksum = 0.0
    for j in range(n):
        up, left = max(j - w, 0), max(j - 1, 0)
        for k in range(c):
            value = np.float64(flat[j, k])
            checksum += value * (value + np.float64(flat[up, k]) + np.float64(flat[left, k]))
    first = np.full(n, -1, np.int64)
    summed[:] = False
    for j in range(n):
        label = regions[j]
        if first[label] < 0:
            first[label] = j
            continue
        r = first[label]
        # Separate loops over plain rows: the tightest code numba makes of it.
        source = sums[r] if summed[r] else flat[r]
        patch, target = flat[j], sums[r]
        dot = 0.0
        for k in range(c):
            dot += np.float64(source[k]) * np.float64(patch[k])
        for k in range(c):
            target[k] = source[k] + patch[k]
        summed[r] = True
        checksum += dot
    return checksum


def floor_work(maps: list[np.ndarray], partitions: list[np.ndarray]) -> Callable[[], object]:
    """A function that does the floor work (module docstring) on each map;
    partitions: the fast merge's (T, h, w) label maps of each map."""
    n, c = maps[0].shape[0] * maps[0].shape[1], maps[0].shape[2]
    sums, summed = np.empty((n, c), maps[0].dtype), np.empty(n, np.bool_)
    rows = [np.ascontiguousarray(m.reshape(n, c)) for m in maps]
    finals = [p[-1].reshape(-1).astype(np.int64) for p in partitions]
    return lambda: [_floor_work(r, m.shape[1], f, sums, summed) for r, m, f in zip(rows, maps, finals)]


def _best_ms(functions: Sequence[Callable[[], object]], repeats: int) -> list[float]:
    """Best CPU time of this thread over ``repeats`` rounds, per function, in
    ms; each round calls every function once, so that a slow spell of a shared
    machine hits them alike (wall time there mostly measures the others)."""
    best = [float("inf")] * len(functions)
    for _ in range(repeats):
        for i, fn in enumerate(functions):
            start = time.thread_time()
            fn()
            best[i] = min(best[i], time.thread_time() - start)
    return [b * 1e3 for b in best]


def run(
    n_images: int = 4,
    oracle_images: int = 1,
    sets: tuple[str, ...] = tuple(FEATURE_SETS),
    oracle_sets: tuple[str, ...] = ("structured", "random", "photo"),
    repeats: int = 3,
    seed: int = 0,
    print_fn: Callable[[str], None] = print,
) -> dict[str, dict[str, object]]:
    """Time the merge on each feature set; returns per-set results.

    Each result: ``fast_ms`` (mean per image, best of ``repeats`` passes),
    ``floor_ms`` (the same for the floor of the module docstring, timed
    in the same rounds),
    ``oracle_ms`` and ``speedup`` (on the first ``oracle_images`` maps of the
    ``oracle_sets``; None elsewhere), ``identical`` (fast == oracle on those
    maps), ``regions`` (mean region count per threshold, descending
    thresholds), ``channels``, ``images``; or ``skipped`` (the reason) when a
    set could not be built.
    """
    hierarchical_merge(np.ones((2, 2, 4), np.float32), THRESHOLDS)  # compile / load cache
    hierarchical_merge(np.ones((2, 2, 4), np.float64), THRESHOLDS)
    print_fn(f"hierarchical merge, {GRID}x{GRID} grids, thresholds {THRESHOLDS}, one thread")
    print_fn(
        f"{'set':<13} {'C':>4} {'fast ms/img':>11} {'floor ms':>8} {'fast/floor':>10} {'oracle ms':>10}"
        f" {'speed-up':>9} {'same':>5}"
        "  regions per threshold"
    )
    results: dict[str, dict[str, object]] = {}
    for name in sets:
        try:
            maps = FEATURE_SETS[name](n_images, seed)
        except (ImportError, FileNotFoundError) as exc:
            print_fn(f"{name:<13} skipped: {exc}")
            results[name] = {"skipped": str(exc)}
            continue
        partitions = [hierarchical_merge(m, THRESHOLDS) for m in maps]
        floor_fn = floor_work(maps, partitions)
        floor_fn()  # compile
        fast_total, floor_total = _best_ms(
            [lambda: [hierarchical_merge(m, THRESHOLDS) for m in maps], floor_fn], repeats
        )
        fast_ms, floor = fast_total / len(maps), floor_total / len(maps)
        regions = np.mean([[int(p.max()) + 1 for p in parts] for parts in partitions], axis=0)
        oracle_ms = speedup = identical = None
        checked = maps[:oracle_images] if name in oracle_sets else []
        if checked:
            start = time.thread_time()
            slow = [quadratic_merge(m, THRESHOLDS) for m in checked]
            oracle_ms = (time.thread_time() - start) * 1e3 / len(checked)
            (fast_checked_ms,) = _best_ms([lambda: [hierarchical_merge(m, THRESHOLDS) for m in checked]], repeats)
            speedup = oracle_ms / (fast_checked_ms / len(checked))
            identical = all(np.array_equal(s, p) for s, p in zip(slow, partitions))
        results[name] = {
            "fast_ms": fast_ms,
            "floor_ms": floor,
            "oracle_ms": oracle_ms,
            "speedup": speedup,
            "identical": identical,
            "regions": [float(r) for r in regions],
            "channels": int(maps[0].shape[-1]),
            "images": len(maps),
        }
        if checked:
            oracle_text = f"{oracle_ms:10.0f} {speedup:8.0f}x {str(identical):>5}"
        else:
            oracle_text = f"{'-':>10} {'-':>9} {'-':>5}"
        print_fn(
            f"{name:<13} {maps[0].shape[-1]:>4} {fast_ms:11.2f} {floor:8.2f} {fast_ms / floor:9.1f}x {oracle_text}  "
            + " / ".join(f"{r:.1f}" for r in regions)
        )
    return results


def width_sweep(
    n_images: int = 4, widths: Sequence[int] = (16, 64, 384, 768), repeats: int = 3, seed: int = 0,
    print_fn: Callable[[str], None] = print,
) -> dict[int, float]:
    """Fast-merge ms per image of the same merges at several row widths.

    The photo set's 16-d colour/gradient features are lifted to C channels by
    a projection with orthonormal columns, which keeps every cosine: the merge
    order is the same at every width, only the vector work grows with C. The
    narrowest width shows what the ordering itself (heaps, neighbour lists,
    re-scoring decisions) costs. Returns {C: ms per image}.
    """
    base = [colour_gradient_features(load_rgb(p), (GRID, GRID)).astype(np.float64) for p in _photo_paths(n_images)]
    rng = np.random.default_rng(seed)
    lifted = {}
    for width in widths:
        columns = np.linalg.qr(rng.normal(size=(width, base[0].shape[-1])))[0]  # (width, 16), orthonormal
        lifted[width] = [(m @ columns.T).astype(np.float32) for m in base]
    partitions = {width: [hierarchical_merge(m, THRESHOLDS) for m in maps] for width, maps in lifted.items()}
    times = _best_ms([lambda maps=maps: [hierarchical_merge(m, THRESHOLDS) for m in maps]
                      for maps in lifted.values()], repeats)
    widest = max(widths)
    print_fn(f"same merges at other widths (photo features lifted to C channels, cosines kept; {n_images} maps)")
    print_fn(f"{'C':>5} {'fast ms/img':>11}  same partitions as C={widest}")
    results = {}
    for (width, maps), total in zip(lifted.items(), times):
        same = all(np.array_equal(a, b) for a, b in zip(partitions[width], partitions[widest]))
        results[width] = total / len(maps)
        print_fn(f"{width:>5} {results[width]:11.2f}  {same}")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=4, help="feature maps per set (default 4)")
    parser.add_argument("--oracle-images", type=int, default=1, help="maps per set also run through the oracle")
    parser.add_argument("--sets", nargs="+", choices=list(FEATURE_SETS), default=list(FEATURE_SETS))
    parser.add_argument(
        "--oracle-sets", nargs="*", choices=list(FEATURE_SETS), default=["structured", "random", "photo"]
    )
    parser.add_argument("--widths", action="store_true",
                        help="also time the same photo merges at 16, 64, 384 and 768 channels (the ordering's own cost)")
    args = parser.parse_args()
    run(args.images, args.oracle_images, tuple(args.sets), tuple(args.oracle_sets))
    if args.widths:
        width_sweep(args.images)


if __name__ == "__main__":
    main()
