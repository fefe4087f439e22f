"""Post-filters for discovered masks: resizing to the original image, area, corners, holes.

Order of stage-1 post-processing (docs/design.md §4), after the CRF filter of
:mod:`hassod.discover.crf`: resize each mask to the original image size, drop
small masks and masks touching too many image corners, then fill holes.
The area filter runs before hole filling, as in the reference implementation:
filling can only grow a mask, so this order keeps a few thin rings the other
order would rescue; it also fills fewer masks. Filling never changes the corner
count (a pixel on the image border is never inside a hole).

At the original size a mask is only ever held as the crop of the frame it can
cover (:class:`MaskCrop`), from upscaling to RLE encoding: on a 12-megapixel
photo, a mask costs what it covers, not 12 MB per step.

Boxes follow COCO: ``xywh`` is (x, y, width, height) in pixels with (x, y) the
top-left pixel edge, so a single pixel at column 3, row 5 is (3, 5, 1, 1).
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numba
import numpy as np
import torch
import torch.nn.functional as F

from ..rle import EMPTY_CROP, MaskCrop, crops_to_rle, frame_crops, tight_crop

# Masks are downscaled a chunk at a time, at most this many elements at the
# larger of the two sizes: it bounds torch's float32 buffer (~256 MB).
_RESIZE_CHUNK_ELEMENTS = 1 << 26


@dataclass(frozen=True)
class MaskFilterSettings:
    """Post-CRF filters, at the original image size; the defaults are HASSOD's.

    Attributes:
        min_area: masks with fewer pixels than this are dropped.
        max_corners: masks touching at least this many of the 4 image corners
            are dropped (they are usually background); 3 keeps a mask along
            one full side (2 corners). Set above 4 to disable.
        fill_holes: fill the holes of every kept mask.
    """

    min_area: int = 100
    max_corners: int = 3
    fill_holes: bool = True


def postprocess_masks(
    masks: np.ndarray, out_size: tuple[int, int], settings: MaskFilterSettings | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Resize CRF-filtered masks to the original image and apply the area, corner and hole filters.

    Args:
        masks: (N, S_h, S_w) bool masks on the resized image.
        out_size: (H, W) original image size in pixels.
        settings: filter settings, :class:`MaskFilterSettings` defaults when ``None``.

    Returns:
        (kept, indices): (M, H, W) bool masks at the original size and (M,)
        int64 indices into ``masks`` of the kept ones, in input order.
        :func:`postprocess_to_rles` gives the same masks without ever holding
        one at the original size.
    """
    kept = list(_postprocessed_crops(masks, out_size, settings or MaskFilterSettings()))
    return _pasted([crop for _, crop in kept], out_size), np.array([index for index, _ in kept], dtype=np.int64)


def postprocess_to_rles(
    masks: np.ndarray, out_size: tuple[int, int], settings: MaskFilterSettings | None = None
) -> tuple[list[dict], np.ndarray]:
    """:func:`postprocess_masks` with the kept masks encoded as COCO RLEs (str counts).

    Each mask lives only as the crop of the original frame its resized pixels
    can reach, so the cost and memory of a mask follow its size, not the
    photo's: a small part of a 64-megapixel photo costs what it covers.
    """
    # Each crop is encoded as soon as it is made: only one is held at a time.
    kept = [(index, crops_to_rle([crop], out_size)[0])
            for index, crop in _postprocessed_crops(masks, out_size, settings or MaskFilterSettings())]
    return [rle for _, rle in kept], np.array([index for index, _ in kept], dtype=np.int64)


def _postprocessed_crops(
    masks: np.ndarray, out_size: tuple[int, int], settings: MaskFilterSettings
) -> Iterator[tuple[int, MaskCrop]]:
    """(index into ``masks``, tight crop at out_size) of each mask the filters keep, holes filled."""
    for index, crop in enumerate(_resized_crops(masks, out_size)):
        crop = tight_crop(crop)
        if np.count_nonzero(crop.columns) < settings.min_area or _corners(crop, out_size) >= settings.max_corners:
            continue
        yield index, (_filled(crop) if settings.fill_holes else crop)


def resize_masks(masks: np.ndarray, out_size: tuple[int, int]) -> np.ndarray:
    """(N, h, w) bool -> (N, H, W) bool by bilinear interpolation of 0/1 and a 0.5 threshold.

    Bilinear-then-threshold gives smooth edges when upscaling (nearest would
    turn every resized-image pixel into a visible step) and, with
    antialiasing, keeps the majority when downscaling. Torch's
    align_corners=False convention (half-pixel centres) is used. Upscaling
    (H >= h and W >= w, the usual case: masks come from a 160-480 px working
    size) is computed only inside each mask's box, so its cost follows the
    mask's size, not the photo's; downscaling uses torch's antialiased kernel.
    """
    return _pasted(list(_resized_crops(masks, out_size)), out_size)


def resized_rles(masks: np.ndarray, out_size: tuple[int, int]) -> list[dict]:
    """(N, h, w) bool → N COCO RLEs (str counts) of the masks resized to ``out_size`` (H, W) as
    :func:`resize_masks` does, encoded together and never held as full frames when upscaling."""
    return crops_to_rle(list(_resized_crops(masks, out_size)), out_size)


def _resized_crops(masks: np.ndarray, out_size: tuple[int, int]) -> Iterator[MaskCrop]:
    """One crop per mask of (N, h, w) bool ``masks`` resized to ``out_size`` (see resize_masks), in order."""
    height, width = int(out_size[0]), int(out_size[1])
    if height >= masks.shape[1] and width >= masks.shape[2]:
        rows, cols = bilinear_taps(masks.shape[1], height), bilinear_taps(masks.shape[2], width)
        for mask in masks:
            yield _upscaled_crop(mask, rows, cols)
        return
    # torch's float32 buffer is bounded by resizing a chunk of masks at a time.
    step = max(1, _RESIZE_CHUNK_ELEMENTS // max(height * width, masks.shape[1] * masks.shape[2], 1))
    for start in range(0, masks.shape[0], step):
        values = torch.from_numpy(np.ascontiguousarray(masks[start:start + step], dtype=np.float32))
        big = F.interpolate(values[:, None], size=(height, width), mode="bilinear",
                            align_corners=False, antialias=True)
        for frame in (big[:, 0] > 0.5).numpy():
            yield MaskCrop(0, 0, frame.T)


Taps = tuple[np.ndarray, np.ndarray, np.ndarray]


def bilinear_taps(n_in: int, n_out: int) -> Taps:
    """Source indices (i0, i1) and weight of i1 per output index, as torch's bilinear
    with align_corners=False computes them (half-pixel centres, clamped at the borders)."""
    src = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, src - i0


def _upscaled_crop(mask: np.ndarray, rows: Taps, cols: Taps) -> MaskCrop:
    """Bilinear upscaling of one (h, w) bool mask (taps from :func:`bilinear_taps`),
    evaluated only on the output rows and columns whose taps reach the mask's box:
    everywhere else both taps read 0."""
    row_any, col_any = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if len(row_any) == 0:
        return EMPTY_CROP
    y0, y1 = _reaching(rows, row_any[0], row_any[-1])
    x0, x1 = _reaching(cols, col_any[0], col_any[-1])
    columns = np.empty((x1 - x0, y1 - y0), dtype=bool)
    _bilinear_columns(np.ascontiguousarray(mask, dtype=np.uint8), rows[0][y0:y1], rows[1][y0:y1],
                      rows[2][y0:y1], cols[0][x0:x1], cols[1][x0:x1], cols[2][x0:x1], columns)
    return MaskCrop(y0, x0, columns)


def _reaching(taps: Taps, first: int, last: int) -> tuple[int, int]:
    """[start, stop) of the output indices with a tap in [first, last] (taps increase with the index)."""
    i0, i1, _ = taps
    return int(np.searchsorted(i1, first, side="left")), int(np.searchsorted(i0, last, side="right"))


@numba.njit(cache=True, nogil=True)
def _bilinear_columns(mask, r0, r1, wy, c0, c1, wx, out):
    """out[x, y] = whether the bilinear value of ``mask`` ((h, w) uint8 0/1) at taps
    (r0, r1, wy)[y], (c0, c1, wx)[x] is above 0.5; out is (len(c0), len(r0)).

    Per output column, the mask is first interpolated across columns (one value
    per mask row); output pixels whose two row taps read equal values are that
    value, so only rows between unequal taps (the mask's edges) are computed
    one by one, and the rest of the column is filled in runs."""
    height = r0.shape[0]
    run_end = np.empty(height, np.int64)  # first output row past y whose row taps differ from y's
    end = height
    for y in range(height - 1, -1, -1):
        if y + 1 < height and (r0[y + 1] != r0[y] or r1[y + 1] != r1[y]):
            end = y + 1
        run_end[y] = end
    across = np.empty(mask.shape[0], np.float64)
    for x in range(out.shape[0]):
        c, d, u = c0[x], c1[x], wx[x]
        for r in range(r0[0], r1[height - 1] + 1):
            across[r] = (1.0 - u) * mask[r, c] + u * mask[r, d]
        y = 0
        while y < height:
            a, b = r0[y], r1[y]
            if across[a] == across[b]:
                inside = across[a] > 0.5 + 1e-9
                for k in range(y, run_end[y]):
                    out[x, k] = inside
                y = run_end[y]
            else:
                t = wy[y]
                # Exact ties (0.5 at a midpoint, common at integer-ish scale
                # factors) are not set, whatever the last bit of float rounding says.
                out[x, y] = (1.0 - t) * across[a] + t * across[b] > 0.5 + 1e-9
                y += 1


def _corners(crop: MaskCrop, size: tuple[int, int]) -> int:
    """How many of the 4 corner pixels of a (H, W) frame the crop's mask covers."""
    width, height = crop.columns.shape
    if width == 0:
        return 0
    top, left = crop.top == 0, crop.left == 0
    bottom, right = crop.top + height == size[0], crop.left + width == size[1]
    cols = crop.columns
    return int(top and left and cols[0, 0]) + int(top and right and cols[-1, 0]) + int(
        bottom and left and cols[0, -1]) + int(bottom and right and cols[-1, -1])


def _pasted(crops: Sequence[MaskCrop], size: tuple[int, int]) -> np.ndarray:
    """Crops -> (N, H, W) bool frames."""
    out = np.zeros((len(crops), int(size[0]), int(size[1])), dtype=bool)
    for frame, (top, left, columns) in zip(out, crops):
        frame[top:top + columns.shape[1], left:left + columns.shape[0]] = columns.T
    return out


def mask_areas(masks: np.ndarray) -> np.ndarray:
    """(N, H, W) bool -> (N,) int64 pixel counts."""
    flat = masks.reshape(masks.shape[0], masks.shape[1] * masks.shape[2])
    return np.count_nonzero(flat, axis=1).astype(np.int64)


def corner_counts(masks: np.ndarray) -> np.ndarray:
    """(N, H, W) bool -> (N,) int64, how many of the 4 image corner pixels each mask covers."""
    return masks[:, [0, 0, -1, -1], [0, -1, 0, -1]].sum(axis=1).astype(np.int64)


def fill_holes(masks: np.ndarray) -> np.ndarray:
    """(N, H, W) bool -> (N, H, W) bool, each mask with its holes filled.

    A hole is background not 4-connected to the image border: the result
    equals ``scipy.ndimage.binary_fill_holes`` (tested). Each mask is filled
    inside its bounding box (all background outside it is one region touching
    the border), by joining background runs rather than labelling pixels.
    """
    return _pasted([_filled(crop) for crop in frame_crops(masks)], masks.shape[1:])


def _filled(crop: MaskCrop) -> MaskCrop:
    """A tight crop with its holes filled (the same crop if it has none)."""
    filled, holes = _fill_background_holes(crop.columns)
    return MaskCrop(crop.top, crop.left, filled) if holes else crop


@numba.njit(cache=True, nogil=True)
def _fill_background_holes(columns):
    """(copy of ``columns`` with its holes set, True), or (empty array, False)
    if it has none. ``columns`` is a tight crop, seen as lines (its first axis)
    of pixels; all outside it is background.

    Works on background runs, not pixels: a run touches the outside if it
    reaches a crop edge; runs of adjacent lines that overlap are 4-connected.
    Runs joined to the outside by a union-find are not holes. Labelling
    every pixel instead (scipy.ndimage.label) costs far more on the large
    masks of megapixel photos (docs/benchmarks.md, "Hole filling"), and the
    result is the same (tested against binary_fill_holes)."""
    starts, ends, first = _background_runs(columns)
    parent = _joined_runs(starts, ends, first, columns.shape[1])
    outside = _root(parent, len(starts))
    holes = [i for i in range(len(starts)) if _root(parent, i) != outside]
    if not holes:
        return np.empty((0, 0), np.bool_), False
    filled = columns.copy()
    line = 0
    for i in holes:  # increasing, like the runs' lines
        while first[line + 1] <= i:
            line += 1
        filled[line, starts[i]:ends[i]] = True
    return filled, True


@numba.njit(cache=True, nogil=True)
def _background_runs(columns):
    """(starts, ends, first): the runs of 0s along each line x of ``columns``,
    [starts[i], ends[i]) for i in first[x] .. first[x + 1] - 1."""
    width, height = columns.shape
    count = 0
    for x in range(width):
        line = columns[x]
        count += not line[0]
        for y in range(1, height):
            count += line[y - 1] and not line[y]
    starts = np.empty(count, np.int64)
    ends = np.empty(count, np.int64)
    first = np.empty(width + 1, np.int64)
    k = 0
    for x in range(width):
        first[x] = k
        line = columns[x]
        y = 0
        while y < height:
            if line[y]:
                y += 1
                continue
            starts[k] = y
            while y < height and not line[y]:
                y += 1
            ends[k] = y
            k += 1
    first[width] = k
    return starts, ends, first


@numba.njit(cache=True, nogil=True)
def _joined_runs(starts, ends, first, height):
    """Union-find parents of the runs of _background_runs plus one more node,
    the outside (index len(starts)): runs are joined to the outside where they
    reach the crop's edge, and to the runs of the next line they overlap."""
    width = len(first) - 1
    outside = len(starts)
    parent = np.arange(outside + 1)
    for x in range(width):
        for i in range(first[x], first[x + 1]):
            if x == 0 or x == width - 1 or starts[i] == 0 or ends[i] == height:
                _join(parent, i, outside)
        if x + 1 < width:
            i, j = first[x], first[x + 1]
            while i < first[x + 1] and j < first[x + 2]:
                if starts[i] < ends[j] and starts[j] < ends[i]:
                    _join(parent, i, j)
                if ends[i] <= ends[j]:
                    i += 1
                else:
                    j += 1
    return parent


@numba.njit(cache=True, nogil=True)
def _root(parent, i):
    while parent[i] != i:
        parent[i] = parent[parent[i]]  # path halving
        i = parent[i]
    return i


@numba.njit(cache=True, nogil=True)
def _join(parent, i, j):
    a, b = _root(parent, i), _root(parent, j)
    if a != b:
        parent[min(a, b)] = max(a, b)


def masks_to_boxes_xywh(masks: np.ndarray) -> np.ndarray:
    """(N, H, W) bool -> (N, 4) float64 tight COCO boxes (x, y, width, height) in pixels.

    Same values as ``pycocotools.mask.toBbox``; an empty mask gets (0, 0, 0, 0).
    """
    count = masks.shape[0]
    rows = masks.any(axis=2)
    cols = masks.any(axis=1)
    boxes = np.zeros((count, 4), dtype=np.float64)
    present = rows.any(axis=1)
    if not present.any():
        return boxes
    rows, cols = rows[present], cols[present]
    y0 = rows.argmax(axis=1)
    y1 = rows.shape[1] - rows[:, ::-1].argmax(axis=1)
    x0 = cols.argmax(axis=1)
    x1 = cols.shape[1] - cols[:, ::-1].argmax(axis=1)
    boxes[present] = np.stack([x0, y0, x1 - x0, y1 - y0], axis=1)
    return boxes
