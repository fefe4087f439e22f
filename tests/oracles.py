"""Slow, obviously-correct reference implementations and test inputs.

A plain module (no pytest imports) so benchmarks can use it too, after putting
the repository root on ``sys.path``::

    from tests.oracles import quadratic_merge
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image

from hassod.discover.merge import SIMILARITY_SCALE


def quadratic_merge(features: np.ndarray, thresholds: Sequence[float]) -> np.ndarray:
    """Reference for :func:`hassod.discover.merge.hierarchical_merge`, same output.

    At every step all neighbouring pairs are listed and all their cosines
    computed afresh from the regions' summed features (summed in the
    features' dtype, float32 or float64, as the fast code does); the best
    pair (highest similarity rounded to 2**-32, then smallest (min id, max id))
    is merged if it reaches the threshold. O(merges * pairs * C).
    features: (h, w, C) float; returns (T, h, w) int32, thresholds descending.
    """
    feats = np.asarray(features)
    # Sums are kept in the features' precision, like the fast code.
    feats = feats.astype(np.float64 if feats.dtype == np.float64 else np.float32)
    h, w, c = feats.shape
    n = h * w
    sums = {i: row.copy() for i, row in enumerate(feats.reshape(n, c))}
    members = {i: [i] for i in range(n)}
    neighbours = {i: set() for i in range(n)}
    for i in range(n):
        y, x = divmod(i, w)
        if x + 1 < w:
            neighbours[i].add(i + 1)
            neighbours[i + 1].add(i)
        if y + 1 < h:
            neighbours[i].add(i + w)
            neighbours[i + w].add(i)
    # unit[r] is always normalise(sums[r]).
    unit = np.zeros((n, c), dtype=np.float64)
    for r in range(n):
        unit[r] = _unit(sums[r])

    partitions = []
    for theta in sorted(thresholds, reverse=True):
        while True:
            pairs = sorted((a, b) for a, nbs in neighbours.items() for b in nbs if a < b)
            if not pairs:
                break
            pa, pb = np.array(pairs).T
            sims = np.einsum("ij,ij->i", unit[pa], unit[pb])
            scores = np.floor(sims * SIMILARITY_SCALE + 0.5)
            best = int(np.argmax(scores))  # first of the maxima = smallest pair
            if scores[best] / SIMILARITY_SCALE < theta:
                break
            a, b = pairs[best]
            sums[a] = sums[a] + sums.pop(b)
            unit[a] = _unit(sums[a])
            members[a] += members.pop(b)
            for r in neighbours.pop(b):
                neighbours[r].discard(b)
                if r != a:
                    neighbours[r].add(a)
                    neighbours[a].add(r)
            neighbours[a].discard(b)
        partitions.append(_labels(members, h, w))
    return np.stack(partitions)


def _unit(vector: np.ndarray) -> np.ndarray:
    vector = vector.astype(np.float64)
    norm = np.sqrt(np.sum(vector * vector))
    if norm == 0:
        return np.zeros_like(vector)
    return vector / norm


def _labels(members: dict[int, list[int]], h: int, w: int) -> np.ndarray:
    """Regions numbered by their first patch in raster order (= smallest member)."""
    labels = np.empty(h * w, dtype=np.int32)
    for label, region in enumerate(sorted(members, key=lambda r: min(members[r]))):
        labels[members[region]] = label
    return labels.reshape(h, w)


def segment_features(
    rng: np.random.Generator,
    h: int,
    w: int,
    c: int,
    n_objects: int = 4,
    parts_per_object: int = 3,
    part_spread: float = 0.8,
    noise: float = 1.0,
) -> np.ndarray:
    """(h, w, c) float32 piecewise-constant "texture" features plus noise.

    The grid is cut into Voronoi cells of random seeds; each cell gets a part
    prototype = its object's prototype + ``part_spread`` * Gaussian, so parts of
    one object are similar to each other (cosine ~ 1 / (1 + spread^2)) and
    unrelated across objects; every patch adds ``noise`` * Gaussian.
    """
    objects = rng.normal(size=(n_objects, c))
    parts = np.repeat(objects, parts_per_object, axis=0)
    parts = parts + part_spread * rng.normal(size=parts.shape)
    seeds = rng.uniform(0, 1, size=(len(parts), 2)) * (h, w)
    yy, xx = np.mgrid[0:h, 0:w] + 0.5
    dist = (yy[..., None] - seeds[:, 0]) ** 2 + (xx[..., None] - seeds[:, 1]) ** 2
    cell = np.argmin(dist, axis=-1)
    feats = parts[cell] + noise * rng.normal(size=(h, w, c))
    return feats.astype(np.float32)


def colour_gradient_features(rgb: np.ndarray, grid: tuple[int, int], patch: int = 8) -> np.ndarray:
    """(gh, gw, 16) float32 cheap "real" patch features of an RGB image.

    The image is resized to (gh * patch, gw * patch) pixels; per patch: mean and
    std of R, G, B, and an 8-bin gradient-orientation histogram weighted by
    magnitude (grey level, 2 extra bins: mean |dx|, mean |dy|). Each dimension
    is standardised over the image so that cosines spread over [-1, 1].
    """
    gh, gw = grid
    img = Image.fromarray(rgb).resize((gw * patch, gh * patch), Image.BILINEAR)
    pix = np.asarray(img, dtype=np.float64) / 255.0
    grey = pix.mean(axis=2)
    dy, dx = np.gradient(grey)
    magnitude = np.hypot(dx, dy)
    bins = ((np.arctan2(dy, dx) + np.pi) / (2 * np.pi) * 8).astype(int) % 8
    hist = np.zeros(grey.shape + (8,))
    np.put_along_axis(hist, bins[..., None], magnitude[..., None], axis=2)

    def per_patch(values: np.ndarray) -> np.ndarray:  # (H, W, k) -> (gh, gw, patch*patch, k)
        k = values.shape[-1]
        blocks = values.reshape(gh, patch, gw, patch, k).transpose(0, 2, 1, 3, 4)
        return blocks.reshape(gh, gw, patch * patch, k)

    colour = per_patch(pix)
    feats = np.concatenate(
        [
            colour.mean(axis=2),
            colour.std(axis=2),
            per_patch(hist).mean(axis=2),
            per_patch(np.abs(np.stack([dx, dy], axis=-1))).mean(axis=2),
        ],
        axis=-1,
    )
    flat = feats.reshape(-1, feats.shape[-1])
    flat = (flat - flat.mean(axis=0)) / (flat.std(axis=0) + 1e-6)
    return flat.reshape(gh, gw, -1).astype(np.float32)
