import json

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from scipy import ndimage

from hassod.discover import masks as masks_module
from hassod.discover.masks import (
    MaskFilterSettings,
    bilinear_taps,
    corner_counts,
    fill_holes,
    mask_areas,
    masks_to_boxes_xywh,
    postprocess_masks,
    postprocess_to_rles,
    resize_masks,
)
from hassod.rle import MaskCrop, RleMasks, crops_to_rle, masks_to_rle, rle_areas, rle_boxes_xywh, rle_to_masks


def blank(count: int, height: int = 40, width: int = 50) -> np.ndarray:
    return np.zeros((count, height, width), bool)


def test_area_filter_at_original_size():
    masks = blank(3)
    masks[0, 5:15, 5:15] = True  # 100 px: kept
    masks[1, 5:15, 5:15] = True
    masks[1, 14, 14] = False  # 99 px: dropped
    masks[2, 20:30, 20:35] = True  # 150 px: kept
    kept, indices = postprocess_masks(masks, (40, 50))
    assert indices.tolist() == [0, 2]
    np.testing.assert_array_equal(kept, masks[[0, 2]])


def test_area_is_measured_after_resizing():
    masks = blank(1, 20, 20)
    masks[0, 5:12, 5:12] = True  # 49 px at 20 x 20, 196 px at 40 x 40
    assert postprocess_masks(masks, (20, 20))[1].tolist() == []
    kept, indices = postprocess_masks(masks, (40, 40))
    assert indices.tolist() == [0] and mask_areas(kept).tolist() == [196]


def test_corner_filter_drops_three_or_more_corners():
    masks = blank(4)
    masks[0, :5, :] = True  # top band: 2 corners
    masks[1, :5, :] = True
    masks[1, :, :5] = True  # top + left band: 3 corners
    masks[2] = True  # 4 corners
    masks[3, 10:30, 10:30] = True  # none
    assert corner_counts(masks).tolist() == [2, 3, 4, 0]
    assert postprocess_masks(masks, (40, 50))[1].tolist() == [0, 3]
    relaxed = MaskFilterSettings(max_corners=5)
    assert postprocess_masks(masks, (40, 50), relaxed)[1].tolist() == [0, 1, 2, 3]


def test_hole_filling_turns_a_ring_into_a_disk():
    yy, xx = np.mgrid[0:60, 0:60]
    radius2 = (yy - 30) ** 2 + (xx - 30) ** 2
    disk = radius2 <= 20**2
    ring = disk & (radius2 > 10**2)
    kept, _ = postprocess_masks(ring[None], (60, 60))
    np.testing.assert_array_equal(kept[0], disk)
    unfilled, _ = postprocess_masks(ring[None], (60, 60), MaskFilterSettings(fill_holes=False))
    np.testing.assert_array_equal(unfilled[0], ring)
    # A notch open to the image border is not a hole.
    open_mask = np.zeros((20, 20), bool)
    open_mask[:, 5:15] = True
    open_mask[:10, 8:12] = False
    np.testing.assert_array_equal(fill_holes(open_mask[None])[0], open_mask)


def test_bounding_box_fill_equals_full_image_fill():
    rng = np.random.default_rng(5)
    masks = rng.random((6, 30, 40)) > 0.45  # many holes, touching every border
    masks[0] = False
    masks[1] = False
    masks[1, 3:12, 20:39] = rng.random((9, 19)) > 0.3
    expected = np.stack([ndimage.binary_fill_holes(m) for m in masks])
    np.testing.assert_array_equal(fill_holes(masks), expected)
    assert (expected != masks).sum() > 20  # there were holes to fill


def test_resize_to_non_square_original():
    masks = blank(2, 48, 48)
    masks[0, :, :24] = True  # left half
    masks[1, 12:36, 12:36] = True  # centred square, half the side
    out = resize_masks(masks, (30, 70))
    assert out.shape == (2, 30, 70) and out.dtype == bool
    expected_left = np.zeros((30, 70), bool)
    expected_left[:, :35] = True
    np.testing.assert_array_equal(out[0], expected_left)
    expected_square = np.zeros((30, 70), bool)
    # The square spans rows 7.5..22.5 and columns 17.5..52.5 at the new size:
    # exactly the pixels whose centres lie strictly inside are set.
    expected_square[8:22, 18:52] = True
    np.testing.assert_array_equal(out[1], expected_square)
    kept, indices = postprocess_masks(masks, (30, 70))
    assert kept.shape == (2, 30, 70) and indices.tolist() == [0, 1]


def test_resize_is_identity_at_same_size_and_handles_empty():
    masks = np.random.default_rng(0).random((3, 17, 23)) > 0.5
    np.testing.assert_array_equal(resize_masks(masks, (17, 23)), masks)
    assert resize_masks(blank(0), (10, 12)).shape == (0, 10, 12)
    kept, indices = postprocess_masks(blank(0), (10, 12))
    assert kept.shape == (0, 10, 12) and indices.shape == (0,)


def test_rle_round_trip_is_exact_and_json_ready():
    masks = np.random.default_rng(1).random((4, 31, 17)) > 0.6
    masks[3] = False
    rles = masks_to_rle(masks)
    assert all(isinstance(r["counts"], str) and r["size"] == [31, 17] for r in rles)
    decoded = rle_to_masks(json.loads(json.dumps(rles)))
    assert decoded.dtype == bool
    np.testing.assert_array_equal(decoded, masks)
    flipped = masks[:, ::-1, 1::2]  # a strided view: encoded as its values, not its memory
    np.testing.assert_array_equal(rle_to_masks(masks_to_rle(flipped)), flipped)
    wide = np.random.default_rng(2).random((2, 70, 130)) > 0.5  # several 64 x 64 transpose tiles, ragged edges
    np.testing.assert_array_equal(rle_to_masks(masks_to_rle(wide)), wide)
    assert masks_to_rle(blank(0)) == []
    assert rle_to_masks([], size=(5, 6)).shape == (0, 5, 6)
    with pytest.raises(ValueError):
        rle_to_masks([])


def test_boxes_xywh_on_hand_made_masks():
    masks = blank(4, 10, 12)
    masks[0, 5, 3] = True  # one pixel
    masks[1, 2:5, 1:7] = True  # rows 2..4, cols 1..6
    masks[2, 0, 0] = masks[2, 9, 11] = True  # opposite corners
    boxes = masks_to_boxes_xywh(masks)
    assert boxes.tolist() == [[3, 5, 1, 1], [1, 2, 6, 3], [0, 0, 12, 10], [0, 0, 0, 0]]
    reference = mask_utils.toBbox(mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0), dtype=np.uint8)))
    np.testing.assert_array_equal(boxes, reference)


def test_mask_areas():
    masks = blank(3, 5, 5)
    masks[0] = True
    masks[1, 1:3, 1:4] = True
    assert mask_areas(masks).tolist() == [25, 6, 0]


def _blobs(count: int, size: int = 48, seed: int = 0) -> np.ndarray:
    """Random rectangles, some with a hole, some too small or touching 3+ corners (filtered out)."""
    rng = np.random.default_rng(seed)
    masks = blank(count, size, size)
    for m in masks:
        y0, x0 = rng.integers(0, size - 8, 2)
        y1, x1 = y0 + rng.integers(2, size - y0), x0 + rng.integers(2, size - x0)
        m[y0:y1, x0:x1] = True
        if y1 - y0 > 6 and x1 - x0 > 6 and rng.random() < 0.5:
            m[y0 + 2:y1 - 2, x0 + 2:x1 - 2] = False  # a ring: its hole gets filled
    masks[0] = True  # 4 corners: dropped
    return masks


@pytest.mark.parametrize("out_size", [(100, 130), (30, 41)])
@pytest.mark.parametrize("chunk_elements", [1 << 26, 3 * 48 * 48, 1])
def test_rle_post_processing_equals_the_dense_one_whatever_the_chunking(monkeypatch, chunk_elements, out_size):
    # Upscaling (100 x 130) works mask by mask; downscaling (30 x 41) resizes a
    # bounded chunk of masks at a time: the chunk size must change nothing
    # (1 element: one mask per chunk).
    masks = _blobs(12)
    dense, dense_index = postprocess_masks(masks, out_size)
    resized = resize_masks(masks, out_size)
    monkeypatch.setattr(masks_module, "_RESIZE_CHUNK_ELEMENTS", chunk_elements)
    rles, index = postprocess_to_rles(masks, out_size)
    np.testing.assert_array_equal(index, dense_index)
    assert 0 < len(index) < len(masks)
    np.testing.assert_array_equal(rle_to_masks(rles), dense)
    np.testing.assert_array_equal(postprocess_masks(masks, out_size)[0], dense)
    np.testing.assert_array_equal(resize_masks(masks, out_size), resized)


def _pycocotools_rles(masks: np.ndarray) -> list[dict]:
    coded = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0), dtype=np.uint8))
    return [{"size": [int(s) for s in r["size"]], "counts": r["counts"].decode("ascii")} for r in coded]


def test_rle_encoding_equals_pycocotools_at_every_frame_edge():
    # Runs are counted inside each mask's box only: the runs that start or end
    # at the box's and the frame's edges are where that can go wrong.
    masks = blank(10, 7, 9)
    masks[0, 0, 0] = True  # first pixel: the RLE starts with a run of 0 zeros
    masks[1, 6, 8] = True  # last pixel: no final run of zeros
    masks[2] = True
    masks[3, :, 2:5] = True  # whole columns: one run across them
    masks[4, :, 2:5] = True
    masks[4, 3, 3] = False
    masks[5, 6, :] = True  # bottom row: each run ends at a column's foot
    masks[6, 0, :] = True  # top row
    masks[7, 2:5, 8] = True  # last column, not to the bottom
    masks[8, 0:7:2, 0:9:3] = True  # isolated pixels
    rles = masks_to_rle(masks)
    assert rles == _pycocotools_rles(masks)
    random = np.random.default_rng(4).random((20, 13, 11)) > np.linspace(0.05, 0.95, 20)[:, None, None]
    assert masks_to_rle(random) == _pycocotools_rles(random)


def test_crops_encode_like_their_frames():
    # A crop need not be tight: zeros inside it are zeros of the frame.
    columns = np.zeros((4, 3), bool)  # 4 columns of 3 rows
    columns[1, 0] = columns[1, 1] = columns[2, 2] = True
    frame = np.zeros((1, 6, 8), bool)
    frame[0, 2:5, 3:7] = columns.T
    assert crops_to_rle([MaskCrop(2, 3, columns)], (6, 8)) == _pycocotools_rles(frame)
    full = np.ones((2, 6), bool)  # 2 whole columns of a 6-row frame
    frame = np.zeros((1, 6, 5), bool)
    frame[0, :, 3:5] = True
    assert crops_to_rle([MaskCrop(0, 3, full)], (6, 5)) == _pycocotools_rles(frame)
    assert crops_to_rle([], (6, 5)) == []
    empty = _pycocotools_rles(np.zeros((1, 6, 5), bool))
    assert crops_to_rle([MaskCrop(0, 0, np.zeros((0, 0), bool))], (6, 5)) == empty
    assert crops_to_rle([MaskCrop(2, 1, np.zeros((3, 0), bool))], (6, 5)) == empty


def test_rle_post_processing_of_no_masks():
    rles, index = postprocess_to_rles(blank(0), (10, 12))
    assert rles == [] and index.shape == (0,) and index.dtype == np.int64


def test_rle_areas_boxes_and_lazy_masks_match_the_dense_measures():
    masks = _blobs(300, size=30, seed=2)  # > 255: pycocotools' area() needs chunking on numpy 2
    masks[5] = False
    rles = masks_to_rle(masks)
    np.testing.assert_array_equal(rle_areas(rles), mask_areas(masks))
    np.testing.assert_array_equal(rle_boxes_xywh(rles), masks_to_boxes_xywh(masks))
    lazy = RleMasks(rles)
    assert len(lazy) == 300
    np.testing.assert_array_equal(lazy[7], masks[7])
    np.testing.assert_array_equal(lazy[np.int64(5)], masks[5])
    assert rle_areas([]).shape == (0,) and rle_boxes_xywh([]).shape == (0, 4)


def test_upscaling_inside_each_box_equals_the_full_frame_bilinear():
    # Upscaling evaluates the bilinear value only where a tap reaches the mask's
    # box; a dense float64 evaluation of the same taps over the whole frame must
    # give the same masks (blobs at the borders, single pixels, an empty mask).
    rng = np.random.default_rng(3)
    masks = blank(6, 23, 31)
    masks[0, 5:12, 7:20] = True
    masks[1, 0:4, 25:31] = True  # touches the top and right borders
    masks[2, 22, 0] = True  # one corner pixel
    masks[3, 11, 15] = True  # one pixel inside
    masks[4] = rng.random((23, 31)) > 0.8
    out_size = (203, 377)
    (i0, i1, wy), (j0, j1, wx) = bilinear_taps(23, 203), bilinear_taps(31, 377)
    expected = []
    for m in masks.astype(np.float64):
        rows = (1 - wy)[:, None] * m[i0] + wy[:, None] * m[i1]
        expected.append((1 - wx) * rows[:, j0] + wx * rows[:, j1] > 0.5 + 1e-9)
    np.testing.assert_array_equal(resize_masks(masks, out_size), np.stack(expected))
    assert not resize_masks(masks, out_size)[5].any()
