"""Post-filters for discovered masks, pooling across thresholds, and mask encodings.

Order of stage-1 post-processing (DESIGN.md §4), after the CRF filter of
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
from typing import NamedTuple

import numba
import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils

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


class MaskCrop(NamedTuple):
    """One mask of a frame, held as the part of the frame where it can be set.

    ``columns[x, y]`` (bool, any strides) is pixel (top + y, left + x) of the
    frame; every pixel outside the crop is 0. Columns come first because COCO
    RLE runs go down the columns: a contiguous crop encodes in one linear pass.
    A crop of nothing is ``(0, 0, (0, 0) array)``.
    """

    top: int
    left: int
    columns: np.ndarray


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
        crop = _tight(crop)
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


_NOTHING = MaskCrop(0, 0, np.zeros((0, 0), dtype=bool))


def _upscaled_crop(mask: np.ndarray, rows: Taps, cols: Taps) -> MaskCrop:
    """Bilinear upscaling of one (h, w) bool mask (taps from :func:`bilinear_taps`),
    evaluated only on the output rows and columns whose taps reach the mask's box:
    everywhere else both taps read 0."""
    row_any, col_any = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if len(row_any) == 0:
        return _NOTHING
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


def _tight(crop: MaskCrop) -> MaskCrop:
    """The same mask, cropped to its bounding box (a view)."""
    set_columns = np.flatnonzero(crop.columns.any(axis=1))
    if len(set_columns) == 0:
        return _NOTHING
    set_rows = np.flatnonzero(crop.columns.any(axis=0))
    x0, x1, y0, y1 = set_columns[0], set_columns[-1] + 1, set_rows[0], set_rows[-1] + 1
    return MaskCrop(crop.top + int(y0), crop.left + int(x0), crop.columns[x0:x1, y0:y1])


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


def _frame_crops(masks: np.ndarray) -> list[MaskCrop]:
    """(N, H, W) bool frames -> their tight crops (views)."""
    return [_tight(MaskCrop(0, 0, frame.T)) for frame in np.asarray(masks, dtype=bool)]


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
    return _pasted([_filled(crop) for crop in _frame_crops(masks)], masks.shape[1:])


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
    every pixel instead (scipy.ndimage.label) costs ~10x more on the large
    masks of megapixel photos, and the result is the same (tested against
    binary_fill_holes)."""
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


def masks_to_rle(masks: np.ndarray) -> list[dict]:
    """(N, H, W) bool -> N COCO RLE dicts ``{"size": [H, W], "counts": str}``, JSON-ready."""
    return crops_to_rle(_frame_crops(masks), masks.shape[1:])


def crops_to_rle(crops: Sequence[MaskCrop], size: tuple[int, int]) -> list[dict]:
    """Mask crops of an (H, W) frame -> COCO RLE dicts ``{"size": [H, W], "counts": str}``.

    The run lengths are counted inside each crop only (pycocotools' encoder
    scans a whole column-major copy of the frame per mask: ~20 ms for a small
    part of a 12-megapixel photo); pycocotools compresses them.
    """
    if not crops:
        return []
    height, width = int(size[0]), int(size[1])
    runs = [{"size": [height, width], "counts": _run_lengths(crop, height, height * width)} for crop in crops]
    return [{"size": [height, width], "counts": rle["counts"].decode("ascii")}
            for rle in mask_utils.frPyObjects(runs, height, width)]


def _run_lengths(crop: MaskCrop, height: int, total: int) -> np.ndarray:
    """COCO run lengths (uint32, column-major, starting with a run of 0s) of a
    frame of ``height`` rows and ``total`` pixels that is 0 outside the crop."""
    top, left, columns = crop
    if columns.size == 0:
        return np.array([total], np.uint32)
    width, crop_height = columns.shape
    # Every change of value ends a run; so does the frame's end, unless a change is there.
    ends_at_last_pixel = (left + width) * height == total and top + crop_height == height and columns[-1, -1]
    runs = np.empty(_count_changes(top, columns, height) + (0 if ends_at_last_pixel else 1), np.uint32)
    written = _write_runs(top, left, columns, height, total, runs)
    if written != len(runs):  # a bug, never the input's fault: fail loudly rather than encode garbage
        raise RuntimeError(f"RLE encoding counted {len(runs)} runs but found {written}")
    return runs


@numba.njit(cache=True, nogil=True)
def _count_changes(top, columns, height):
    """How often the value changes along the column-major frame of ``height``
    rows that is 0 outside ``columns`` placed at row ``top``, counting a change
    at the frame's end: a sum of comparisons, which vectorises."""
    crop_width, crop_height = columns.shape
    # A crop column spanning its whole frame column runs on into the next one.
    full_columns = top == 0 and crop_height == height
    changes = 0
    for x in range(crop_width):
        column = columns[x]
        for y in range(1, crop_height):
            changes += column[y] != column[y - 1]
        arriving = full_columns and x > 0 and columns[x - 1, crop_height - 1]
        leaving = not (full_columns and x + 1 < crop_width)
        changes += (column[0] != arriving) + (column[crop_height - 1] and leaving)
    return changes


@numba.njit(cache=True, nogil=True)
def _write_runs(top, left, columns, height, total, out):
    """Fill ``out`` with the run lengths of _run_lengths; returns how many
    there are (runs past the end of ``out`` are not written)."""
    count = 0
    value = False
    start = 0  # frame index (column-major) where the current run began
    crop_width, crop_height = columns.shape
    # A run reaching the foot of a crop column goes on in the next crop column
    # only if the crop spans whole frame columns.
    full_columns = top == 0 and crop_height == height
    for x in range(crop_width):
        base = (left + x) * height + top
        for y in range(crop_height):
            if columns[x, y] != value:
                if count < out.shape[0]:
                    out[count] = base + y - start
                count += 1
                start = base + y
                value = not value
        if value and not (full_columns and x + 1 < crop_width):
            if count < out.shape[0]:
                out[count] = base + crop_height - start
            count += 1
            start = base + crop_height
            value = False
    if start < total:
        if count < out.shape[0]:
            out[count] = total - start
        count += 1
    return count


def rle_to_masks(rles: list[dict], size: tuple[int, int] | None = None) -> np.ndarray:
    """COCO RLE dicts (``counts`` str or bytes) -> (N, H, W) bool.

    ``size`` (H, W) is only needed to shape an empty result.
    """
    if not rles:
        if size is None:
            raise ValueError("rle_to_masks needs size=(H, W) for an empty list")
        return np.zeros((0, *size), dtype=bool)
    return np.ascontiguousarray(mask_utils.decode(coded_rles(rles)).transpose(2, 0, 1), dtype=bool)


def rle_areas(rles: Sequence[dict]) -> np.ndarray:
    """COCO RLEs (``counts`` str or bytes) -> (N,) int64 pixel counts."""
    coded = coded_rles(rles)
    # pycocotools' area() fails on numpy 2 for more than 255 RLEs (it sizes a uint8 array by the count).
    chunks = [np.asarray(mask_utils.area(coded[i:i + 255]), dtype=np.int64) for i in range(0, len(coded), 255)]
    return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int64)


def rle_boxes_xywh(rles: Sequence[dict]) -> np.ndarray:
    """COCO RLEs -> (N, 4) float64 tight boxes (x, y, width, height), as :func:`masks_to_boxes_xywh`."""
    if not rles:
        return np.zeros((0, 4), dtype=np.float64)
    return np.asarray(mask_utils.toBbox(coded_rles(rles)), dtype=np.float64).reshape(-1, 4)


class RleMasks:
    """A sequence of COCO RLEs that decodes one (H, W) bool mask per index:
    what :func:`hassod.discover.viz.draw_hierarchy` needs, in H·W bytes."""

    def __init__(self, rles: Sequence[dict]):
        self.rles = rles

    def __len__(self) -> int:
        return len(self.rles)

    def __getitem__(self, index: int) -> np.ndarray:
        return rle_to_masks([self.rles[int(index)]])[0]


def coded_rles(rles: Sequence[dict]) -> list[dict]:
    """Compressed COCO RLE dicts with ``counts`` str (JSON) or bytes -> the bytes form pycocotools' C calls take."""
    return [{"size": list(rle["size"]),
             "counts": rle["counts"].encode("ascii") if isinstance(rle["counts"], str) else rle["counts"]}
            for rle in rles]


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
