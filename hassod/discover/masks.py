"""Post-filters for discovered masks, pooling across thresholds, and mask encodings.

Order of stage-1 post-processing (DESIGN.md §4), after the CRF filter of
:mod:`hassod.discover.crf`: resize each mask to the original image size, drop
small masks and masks touching too many image corners, then fill holes.
The area filter runs before hole filling, as in the reference implementation:
filling can only grow a mask, so this order keeps a few thin rings the other
order would rescue; it also fills fewer masks. Filling never changes the corner
count (a pixel on the image border is never inside a hole).

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
from pycocotools import mask as mask_utils
from scipy import ndimage

# Masks are resized a chunk at a time, at most this many elements at the
# larger of the two sizes: it bounds torch's float32 buffer when downscaling
# (~256 MB) and the bool masks held at the original size (~64 MB).
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
        :func:`postprocess_to_rles` gives the same masks without holding them
        all at the original size.
    """
    chunks = list(_postprocessed_chunks(masks, out_size, settings or MaskFilterSettings()))
    kept = [k for k, _, _ in chunks] or [np.zeros((0, *out_size), dtype=bool)]
    return np.concatenate(kept), np.concatenate([i for _, _, i in chunks] or [np.zeros(0, np.int64)])


def postprocess_to_rles(
    masks: np.ndarray, out_size: tuple[int, int], settings: MaskFilterSettings | None = None
) -> tuple[list[dict], np.ndarray]:
    """:func:`postprocess_masks` with the kept masks encoded as COCO RLEs (str counts).

    Masks are resized, filtered and encoded a bounded chunk at a time
    (~256 MB of float32 resize buffer), so a 64-megapixel original costs a
    few hundred MB however many masks it has, not N·H·W bytes.
    """
    rles: list[dict] = []
    indices = []
    for kept, boxes, index in _postprocessed_chunks(masks, out_size, settings or MaskFilterSettings()):
        rles += _encoded(kept, boxes)
        indices.append(index)
    return rles, np.concatenate(indices or [np.zeros(0, np.int64)])


def _postprocessed_chunks(
    masks: np.ndarray, out_size: tuple[int, int], settings: MaskFilterSettings
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(kept masks at out_size, their (n, 4) int64 xywh boxes, their int64 indices into
    ``masks``) per chunk of resized masks. Filling holes never changes a box."""
    for start, resized in _resized_chunks(masks, out_size):
        keep = (mask_areas(resized) >= settings.min_area) & (corner_counts(resized) < settings.max_corners)
        indices = np.flatnonzero(keep)
        kept = resized[indices]  # a copy: filled in place
        boxes = masks_to_boxes_xywh(kept).astype(np.int64)
        if settings.fill_holes:
            _fill_holes_in_place(kept, boxes)
        yield kept, boxes, indices.astype(np.int64) + start


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
    chunks = [resized for _, resized in _resized_chunks(masks, out_size)]
    return np.concatenate(chunks) if chunks else np.zeros((0, *out_size), dtype=bool)


def _resized_chunks(masks: np.ndarray, out_size: tuple[int, int]) -> Iterator[tuple[int, np.ndarray]]:
    """(start index, (n, H, W) bool resized masks[start:start + n]) with n·max(H·W, h·w) bounded."""
    height, width = int(out_size[0]), int(out_size[1])
    step = max(1, _RESIZE_CHUNK_ELEMENTS // max(height * width, masks.shape[1] * masks.shape[2], 1))
    upscale = height >= masks.shape[1] and width >= masks.shape[2]
    if upscale:
        rows, cols = bilinear_taps(masks.shape[1], height), bilinear_taps(masks.shape[2], width)
    for start in range(0, masks.shape[0], step):
        chunk = masks[start:start + step]
        if chunk.shape[1:] == (height, width):
            yield start, chunk.astype(bool, copy=True)
        elif upscale:
            yield start, _upscaled(chunk, rows, cols)
        else:
            values = torch.from_numpy(np.ascontiguousarray(chunk, dtype=np.float32))
            big = F.interpolate(values[:, None], size=(height, width), mode="bilinear",
                                align_corners=False, antialias=True)
            yield start, (big[:, 0] > 0.5).numpy()


Taps = tuple[np.ndarray, np.ndarray, np.ndarray]


def bilinear_taps(n_in: int, n_out: int) -> Taps:
    """Source indices (i0, i1) and weight of i1 per output index, as torch's bilinear
    with align_corners=False computes them (half-pixel centres, clamped at the borders)."""
    src = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, src - i0


def _upscaled(masks: np.ndarray, rows: Taps, cols: Taps) -> np.ndarray:
    """(n, h, w) bool -> (n, H, W) bool bilinear upscaling (taps from :func:`bilinear_taps`),
    evaluated only on the output rows and columns whose taps reach the mask's box:
    everywhere else both taps read 0."""
    out = np.zeros((masks.shape[0], len(rows[0]), len(cols[0])), dtype=bool)
    for index, mask in enumerate(masks):
        row_any, col_any = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        if len(row_any) == 0:
            continue
        y0, y1 = _reaching(rows, row_any[0], row_any[-1])
        x0, x1 = _reaching(cols, col_any[0], col_any[-1])
        _bilinear_window(np.ascontiguousarray(mask, dtype=np.uint8), rows[0][y0:y1], rows[1][y0:y1], rows[2][y0:y1],
                         cols[0][x0:x1], cols[1][x0:x1], cols[2][x0:x1], out[index, y0:y1, x0:x1])
    return out


def _reaching(taps: Taps, first: int, last: int) -> tuple[int, int]:
    """[start, stop) of the output indices with a tap in [first, last] (taps increase with the index)."""
    i0, i1, _ = taps
    return int(np.searchsorted(i1, first, side="left")), int(np.searchsorted(i0, last, side="right"))


@numba.njit(cache=True, nogil=True)
def _bilinear_window(mask, r0, r1, wy, c0, c1, wx, out):
    """out[y, x] = whether the bilinear value of ``mask`` (uint8 0/1) at taps
    (r0, r1, wy)[y], (c0, c1, wx)[x] is above 0.5."""
    for y in range(out.shape[0]):
        a, b, t = r0[y], r1[y], wy[y]
        for x in range(out.shape[1]):
            c, d, u = c0[x], c1[x], wx[x]
            top = (1.0 - u) * mask[a, c] + u * mask[a, d]
            bottom = (1.0 - u) * mask[b, c] + u * mask[b, d]
            # Exact ties (0.5 at a midpoint, common at integer-ish scale
            # factors) are not set, whatever the last bit of float rounding says.
            out[y, x] = (1.0 - t) * top + t * bottom > 0.5 + 1e-9


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
    equals ``scipy.ndimage.binary_fill_holes`` (tested), computed by one
    labelling of the background instead of iterated dilations (3-4x faster
    on large masks). Each mask is filled inside its bounding box padded by
    one background pixel, which gives the same result (all background
    outside the box is one region touching the border) at a fraction of the
    cost for small masks; one call per mask, since a single 3-D call would
    let holes connect across masks.
    """
    filled = masks.astype(bool, copy=True)
    _fill_holes_in_place(filled, masks_to_boxes_xywh(masks).astype(np.int64))
    return filled


def _fill_holes_in_place(masks: np.ndarray, boxes: np.ndarray) -> None:
    """Fill the holes of (N, H, W) bool ``masks`` inside their (N, 4) int xywh ``boxes``."""
    for index, (x, y, w, h) in enumerate(boxes):
        if w == 0:
            continue
        crop = np.pad(masks[index, y:y + h, x:x + w], 1)
        background, _ = ndimage.label(~crop)  # 4-connected components; [0, 0] is the outside
        masks[index, y:y + h, x:x + w] = (background != background[0, 0])[1:-1, 1:-1]


def masks_to_rle(masks: np.ndarray) -> list[dict]:
    """(N, H, W) bool -> N COCO RLE dicts ``{"size": [H, W], "counts": str}``, JSON-ready."""
    masks = np.asarray(masks, dtype=bool)
    return _encoded(masks, masks_to_boxes_xywh(masks).astype(np.int64))


def _encoded(masks: np.ndarray, boxes: np.ndarray) -> list[dict]:
    """masks_to_rle of (N, H, W) bool masks whose (N, 4) int64 xywh boxes are known."""
    if len(masks) == 0:
        return []
    rles = mask_utils.encode(_column_major(masks, boxes))
    return [{"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")} for rle in rles]


def _column_major(masks: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """(N, H, W) bool -> the same masks as the (H, W, N) Fortran-ordered uint8 array pycocotools encodes."""
    out = np.zeros((masks.shape[0], masks.shape[2], masks.shape[1]), dtype=np.uint8)
    _transpose_boxes(np.ascontiguousarray(masks).view(np.uint8), boxes, out)
    return out.transpose(2, 1, 0)


@numba.njit(cache=True, nogil=True)
def _transpose_boxes(masks: np.ndarray, boxes: np.ndarray, out: np.ndarray) -> None:
    """out[i] = masks[i].T for a zeroed ``out``, copying only the mask's xywh box
    in 64x64 tiles: numpy's strided copy of a transposed 64-megapixel mask
    takes ~0.5 s, a tiled copy of the whole frame ~0.07 s."""
    for i in range(masks.shape[0]):
        left, top, right, bottom = boxes[i, 0], boxes[i, 1], boxes[i, 0] + boxes[i, 2], boxes[i, 1] + boxes[i, 3]
        for y0 in range(top, bottom, 64):
            for x0 in range(left, right, 64):
                for x in range(x0, min(x0 + 64, right)):
                    for y in range(y0, min(y0 + 64, bottom)):
                        out[i, x, y] = masks[i, y, x]


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
