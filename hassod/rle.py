"""The COCO RLE codec: binary masks and mask crops to compressed RLEs and back, and what RLEs measure.

An RLE here is a dict ``{"size": [H, W], "counts": str}`` (JSON-ready, what
every output file and the catalog store); ``counts`` given as bytes (what
pycocotools returns) is accepted everywhere. Runs go down the columns, so a
mask is best held as a :class:`MaskCrop` of its frame with columns first:
encoding then costs what the mask covers, not the whole frame
(docs/design.md §2, §4).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numba
import numpy as np
from pycocotools import mask as mask_utils


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


EMPTY_CROP = MaskCrop(0, 0, np.zeros((0, 0), dtype=bool))


def tight_crop(crop: MaskCrop) -> MaskCrop:
    """The same mask, cropped to its bounding box (a view)."""
    set_columns = np.flatnonzero(crop.columns.any(axis=1))
    if len(set_columns) == 0:
        return EMPTY_CROP
    set_rows = np.flatnonzero(crop.columns.any(axis=0))
    x0, x1, y0, y1 = set_columns[0], set_columns[-1] + 1, set_rows[0], set_rows[-1] + 1
    return MaskCrop(crop.top + int(y0), crop.left + int(x0), crop.columns[x0:x1, y0:y1])


def frame_crops(masks: np.ndarray) -> list[MaskCrop]:
    """(N, H, W) bool frames -> their tight crops (views)."""
    return [tight_crop(MaskCrop(0, 0, frame.T)) for frame in np.asarray(masks, dtype=bool)]


def masks_to_rle(masks: np.ndarray) -> list[dict]:
    """(N, H, W) bool -> N COCO RLE dicts ``{"size": [H, W], "counts": str}``, JSON-ready."""
    return crops_to_rle(frame_crops(masks), masks.shape[1:])


def crops_to_rle(crops: Sequence[MaskCrop], size: tuple[int, int]) -> list[dict]:
    """Mask crops of an (H, W) frame -> COCO RLE dicts ``{"size": [H, W], "counts": str}``.

    The run lengths are counted inside each crop only (pycocotools' encoder
    scans a whole column-major copy of the frame per mask: docs/benchmarks.md,
    "RLE encoding"); pycocotools compresses them.
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
    """COCO RLEs -> (N, 4) float64 tight boxes (x, y, width, height), as :func:`hassod.discover.masks.masks_to_boxes_xywh`."""
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


def segmentation_rle(segmentation: dict | list, height: int, width: int) -> dict:
    """A COCO ``segmentation`` (compressed RLE with str or bytes counts, uncompressed RLE, or polygons)
    of an (H, W) image → one compressed RLE with bytes counts, what pycocotools' C calls take."""
    if isinstance(segmentation, dict):
        if isinstance(segmentation["counts"], list):
            return mask_utils.frPyObjects(segmentation, height, width)
        return coded_rles([segmentation])[0]
    return mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
