"""The coverage tree: which mask is part of which, and the whole / part / subpart levels.

Mask A is *covered* by mask B when |A∩B| >= tau·|A| and |A∩B| < tau·|B|:
B contains (almost) all of A but not the reverse. A's parent is the smallest
mask covering it (ties: lowest index). Roots are wholes (level 0), their
children parts (1), every deeper descendant a subpart (2). Stage 1 uses
tau = 0.9; the detector's Mean Teacher recomputes levels with tau = 0.75.

The parent relation is acyclic: from |A∩B| >= tau·|A| and |A∩B| < tau·|B| it
follows that tau·|A| < tau·|B|, i.e. a parent is strictly larger than its
child, so following parents strictly increases the area and cannot loop.
"""
from __future__ import annotations

import numpy as np
from pycocotools import mask as mask_utils

from ..rle import coded_rles, masks_to_rle, rle_areas

WHOLE, PART, SUBPART = 0, 1, 2


def intersection_matrix(masks: np.ndarray) -> np.ndarray:
    """(N, H, W) bool -> (N, N) int64 with [a, b] = |A∩B| in pixels (diagonal = areas).

    Dense masks go through :func:`rle_intersections`, the one counting path
    that discovery and detection use (exact for any image size).
    """
    return rle_intersections(masks_to_rle(masks))


def rle_intersections(rles: list[dict]) -> np.ndarray:
    """N COCO RLEs (``counts`` str or bytes) -> (N, N) int64 with [a, b] = |A∩B| in pixels.

    Counted without decoding a mask: pycocotools' RLE IoU with every B flagged
    "crowd" is |A∩B| / |A|, and it skips pairs whose boxes do not meet. Memory
    is O(N² + runs), so a thousand detections on a 24-megapixel photo cost
    kilobytes of masks, not gigabytes.
    """
    count = len(rles)
    if count == 0:
        return np.zeros((0, 0), dtype=np.int64)
    coded = coded_rles(rles)
    areas = rle_areas(coded).astype(np.float64)
    shares = np.asarray(mask_utils.iou(coded, coded, [1] * count), dtype=np.float64).reshape(count, count)
    # shares * areas is within 1e-8 of an integer (areas < 2**31): rounding restores the exact count.
    return np.rint(shares * areas[:, None]).astype(np.int64)


def coverage_matrix(masks: np.ndarray) -> np.ndarray:
    """(N, H, W) bool -> (N, N) float64 with [a, b] = |A∩B| / |A|, the share of A inside B.

    Rows of empty masks are 0.
    """
    return _coverage(intersection_matrix(masks))


def _coverage(inter: np.ndarray) -> np.ndarray:
    areas = np.diagonal(inter).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = inter / areas[:, None]
    return np.where(areas[:, None] > 0, share, 0.0)


def find_parents(inter: np.ndarray, tau: float = 0.9) -> np.ndarray:
    """(N, N) pairwise intersections (see :func:`intersection_matrix`) -> (N,) int64 parent index, -1 for roots.

    The parent of A is the smallest-area mask B with |A∩B|/|A| >= tau and
    |A∩B|/|B| < tau; among equal areas the lowest index. Ratios are compared
    as correctly rounded quotients, so a share of exactly tau counts as
    covered. An empty mask is a root and covers nothing.
    """
    if not 0.0 < tau <= 1.0:
        raise ValueError(f"tau must be in (0, 1], got {tau}")
    count = inter.shape[0]
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    share = _coverage(inter)  # [a, b]: share of a inside b
    areas = np.diagonal(inter).astype(np.int64)
    # share.T[a, b] = share of b inside a: B must not be covered back by A.
    covered_by = (share >= tau) & ~(share.T >= tau) & (areas[None, :] > 0)
    # One sortable key per candidate: area first, index to break ties.
    key = np.where(covered_by, areas[None, :] * count + np.arange(count)[None, :], np.iinfo(np.int64).max)
    best = key.argmin(axis=1)
    return np.where(covered_by.any(axis=1), best, -1).astype(np.int64)


def distinct_masks(inter: np.ndarray, max_iou: float = 0.9) -> np.ndarray:
    """Indices of the masks to keep when near-duplicates are dropped, ascending.

    Masks are taken in order; one whose IoU with an already kept mask is at
    least ``max_iou`` is dropped. Pooling the partitions of several
    thresholds yields many such near-copies (a region that did not merge
    further, its boundary moved by a few pixels in another CRF): two masks
    that cover each other at tau = 0.9 are the same element of the hierarchy
    and, kept together, would stand side by side as siblings.

    inter: (N, N) pairwise intersections from :func:`intersection_matrix`.
    """
    areas = np.diagonal(inter).astype(np.float64)
    union = areas[:, None] + areas[None, :] - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        duplicate = np.where(union > 0, inter / union, 1.0) >= max_iou
    keep = np.ones(len(areas), dtype=bool)
    for index in range(len(areas)):  # N masks, not pixels: at most a few hundred steps
        if keep[index]:
            later = duplicate[index].copy()
            later[: index + 1] = False
            keep &= ~later
    return np.flatnonzero(keep)


def levels_from_parents(parents: np.ndarray) -> np.ndarray:
    """(N,) int parent indices (-1 for roots) -> (N,) int8 levels: 0 whole, 1 part, 2 subpart.

    Depth is found by following all parent pointers at once, one step per
    round, so the masks may come in any order. Raises ValueError on a cycle.
    """
    parents = np.asarray(parents, dtype=np.int64)
    depth = np.zeros(len(parents), dtype=np.int64)
    cursor = parents.copy()
    for _ in range(len(parents) + 1):
        active = cursor >= 0
        if not active.any():
            return np.minimum(depth, SUBPART).astype(np.int8)
        depth[active] += 1
        cursor[active] = parents[cursor[active]]
    raise ValueError("parent pointers contain a cycle")


def assign_levels(masks: np.ndarray, tau: float = 0.9) -> tuple[np.ndarray, np.ndarray]:
    """Coverage tree of a set of masks.

    Args:
        masks: (N, H, W) bool, all at the same size (original image pixels).
        tau: coverage threshold, 0.9 in stage 1.

    Returns:
        (levels, parents): (N,) int8 levels (0 whole, 1 part, 2 subpart) and
        (N,) int64 index of each mask's parent, -1 for roots.
    """
    parents = find_parents(intersection_matrix(masks), tau)
    return levels_from_parents(parents), parents
