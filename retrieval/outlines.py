"""Region outlines for the web page: a region's RLE mask traced as a few simplified polygons.

Contract: an outline is a list of polygons (the mask's separate pieces and its
holes, largest first), each a list of ``[x, y]`` points in pixels of the
original image, the frame of the region boxes (xyxy); a polygon closes by
itself (the last point joins the first). Drawn with the even-odd rule, holes
stay holes. An outline holds at most :data:`MAX_POINTS` points in all, so a
page of hundreds of regions stays small.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils
from skimage.measure import approximate_polygon, find_contours

from hassod.rle import coded_rles

Outline = list[list[list[float]]]

MAX_POINTS = 48
# Masks are traced on a grid of at most this many cells along their box's longer
# side: finer detail than a page shows would cost time and points for nothing.
GRID_CELLS = 128
# Pieces (or holes) smaller than this fraction of the largest one are left out.
MIN_PIECE = 0.02
MAX_PIECES = 6


def outline(mask_rle: dict[str, Any], box: Sequence[float]) -> Outline:
    """The outline of one region: its COCO RLE mask and its box (xyxy original pixels)."""
    cells, origin, step, end = _mask_cells(mask_rle, box)
    if not cells.any():
        return []
    # Padded so that a mask touching the crop's border still gives closed contours.
    contours = find_contours(np.pad(cells, 1).astype(np.float32), 0.5)
    areas = np.array([abs(_signed_area(c)) for c in contours])
    order = np.argsort(-areas, kind="stable")
    kept = [contours[i] for i in order[:MAX_PIECES] if areas[i] >= MIN_PIECE * areas[order[0]]]
    return [_to_pixels(c, origin, step, end) for c in _simplified(kept)]


def _mask_cells(mask_rle: dict[str, Any], box: Sequence[float]) -> tuple[np.ndarray, np.ndarray, int, np.ndarray]:
    """The mask within its box as a grid of at most GRID_CELLS cells a side (a cell is set when any
    of its pixels is), the crop's (x, y) origin and end in pixels, and a cell's side in pixels."""
    mask = mask_utils.decode(coded_rles([mask_rle])[0])
    height, width = mask.shape
    x0, y0 = max(int(math.floor(box[0])), 0), max(int(math.floor(box[1])), 0)
    x1, y1 = min(int(math.ceil(box[2])), width), min(int(math.ceil(box[3])), height)
    crop = mask[y0:y1, x0:x1]
    step = max(1, math.ceil(max(crop.shape, default=0) / GRID_CELLS))
    rows, cols = -(-crop.shape[0] // step), -(-crop.shape[1] // step)
    padded = np.zeros((rows * step, cols * step), dtype=bool)
    padded[: crop.shape[0], : crop.shape[1]] = crop
    cells = padded.reshape(rows, step, cols, step).any(axis=(1, 3))
    return cells, np.array([x0, y0], dtype=np.float64), step, np.array([x1, y1], dtype=np.float64)


def _simplified(contours: list[np.ndarray]) -> list[np.ndarray]:
    """The contours (row, col in cells), simplified with a tolerance that grows until they hold
    at most MAX_POINTS points together; each keeps at least a triangle."""
    # Douglas-Peucker (approximate_polygon) runs in Python: on every 2nd point of a contour traced
    # at a cell's resolution it loses nothing visible and is much faster (docs/benchmarks.md,
    # "Catalog and query service").
    contours = [c[:-1:2] if len(c) > 4 * MAX_POINTS else c[:-1] for c in contours]
    tolerance = 1.0
    while True:
        polygons = [approximate_polygon(np.vstack([c, c[:1]]), tolerance)[:-1] for c in contours]  # closed
        polygons = [p for p in polygons if len(p) >= 3]
        if sum(len(p) for p in polygons) <= MAX_POINTS or not polygons:
            return polygons
        if tolerance > 4 * GRID_CELLS:  # cannot happen for closed contours; a guard against looping
            return polygons[:1]
        tolerance *= 1.5


def _to_pixels(contour: np.ndarray, origin: np.ndarray, step: int, limit: np.ndarray) -> list[list[float]]:
    """(n, 2) row, col on the padded cell grid → [[x, y], ...] original pixels, to 0.1 px.

    A contour runs half a cell outside the set cells, which is where their edge
    lies in pixels once the padding cell is taken off. The last, partial cell
    of a crop can reach past it: points are clipped to the crop (``limit``).
    """
    xy = (contour[:, ::-1] - 0.5) * step + origin
    return np.round(np.clip(xy, origin, limit), 1).tolist()


def _signed_area(contour: np.ndarray) -> float:
    rows, cols = contour[:, 0], contour[:, 1]
    return 0.5 * float(np.dot(cols, np.roll(rows, -1)) - np.dot(rows, np.roll(cols, -1)))
