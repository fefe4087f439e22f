import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hassod.discover.crf import (
    CRFSettings,
    _region_ious,
    _upsampled_argmax,
    _upsampled_one_hot,
    refine_partition,
)

# Small sizes keep the CRF fast; the code does not depend on 480.
PATCH = 8
SIZE = 240
GRID = SIZE // PATCH
RED, BLUE, YELLOW = (200, 60, 40), (40, 120, 200), (250, 250, 0)
# At the image's own size: these tests check the CRF's decisions pixel by pixel.
FULL = CRFSettings(work_size=None)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def halves_image() -> np.ndarray:
    image = np.zeros((SIZE, SIZE, 3), np.uint8)
    image[:, : SIZE // 2] = RED
    image[:, SIZE // 2:] = BLUE
    return image


def halves_labels() -> np.ndarray:
    labels = np.zeros((GRID, GRID), np.int32)
    labels[:, GRID // 2:] = 1
    return labels


def disk_scene():
    """A noisy red disk on blue, and its patch-resolution (blocky) partition."""
    centre, radius = (113.0, 131.0), 61.0
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] + 0.5
    disk = (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 < radius**2
    rng = np.random.default_rng(0)
    image = np.where(disk[..., None], np.array(RED), np.array(BLUE)).astype(np.float64)
    image = np.clip(image + rng.normal(0, 4, image.shape), 0, 255).astype(np.uint8)
    cy, cx = np.mgrid[0:GRID, 0:GRID] * PATCH + PATCH / 2
    labels = ((cy - centre[0]) ** 2 + (cx - centre[1]) ** 2 < radius**2).astype(np.int32)
    return image, labels, disk


def test_partition_agreeing_with_image_is_kept_whole():
    result = refine_partition(halves_image(), halves_labels(), FULL)
    assert result.label_ids.tolist() == [0, 1]
    assert np.all(result.ious > 0.99)
    left = np.zeros((SIZE, SIZE), bool)
    left[:, : SIZE // 2] = True
    assert iou(result.masks[0], left) > 0.99
    assert iou(result.masks[1], ~left) > 0.99


def test_region_without_image_support_is_dropped():
    labels = halves_labels()
    labels[8:10, 5:7] = 2  # a 16 x 16 px region inside the uniform red half
    unsupported = refine_partition(halves_image(), labels, FULL)
    assert unsupported.label_ids.tolist() == [0, 1]

    # The same partition on an image that has a yellow square there keeps it.
    image = halves_image()
    image[64:80, 40:56] = YELLOW
    supported = refine_partition(image, labels, FULL)
    assert supported.label_ids.tolist() == [0, 1, 2]
    square = np.zeros((SIZE, SIZE), bool)
    square[64:80, 40:56] = True
    assert iou(supported.masks[2], square) > 0.8


def test_crf_snaps_blocky_boundary_to_colour_edge():
    image, labels, disk = disk_scene()
    pre = (_upsampled_argmax(*_upsampled_one_hot(labels, (SIZE, SIZE)), 2) == 1).reshape(SIZE, SIZE)
    result = refine_partition(image, labels, FULL)
    assert result.label_ids.tolist() == [0, 1]
    before, after = iou(pre, disk), iou(result.masks[1], disk)
    assert before < 0.96
    assert after > 0.99
    assert after > before + 0.03


def test_working_size_variant_stays_close_at_its_own_size():
    image, labels, disk = disk_scene()
    result = refine_partition(image, labels, CRFSettings(work_size=120))
    assert result.masks.shape == (2, 120, 120)
    small_disk = disk.reshape(120, 2, 120, 2).mean(axis=(1, 3)) >= 0.5
    assert iou(result.masks[1], small_disk) > 0.95


def test_single_region_is_kept_without_crf():
    labels = np.full((GRID, GRID), 5, np.int32)
    result = refine_partition(halves_image(), labels, FULL)
    assert result.label_ids.tolist() == [5]
    assert result.masks.shape == (1, SIZE, SIZE) and result.masks.all()
    assert result.ious.tolist() == [1.0]


def test_output_types_shapes_and_original_label_ids():
    labels = np.where(halves_labels() == 0, 7, 3)
    image = np.ascontiguousarray(halves_image()[:160])  # non-square: 160 x 240 px
    result = refine_partition(image, labels[:20], FULL)
    assert result.masks.dtype == bool and result.masks.shape == (2, 160, SIZE)
    assert result.label_ids.dtype == np.int64 and result.label_ids.tolist() == [3, 7]
    assert result.ious.dtype == np.float32
    assert result.masks[1][:, : SIZE // 2].mean() > 0.99  # label 7 is the left half
    assert not (result.masks[0] & result.masks[1]).any()


def test_read_only_image_is_accepted():
    image = halves_image()
    image.setflags(write=False)
    assert refine_partition(image, halves_labels(), FULL).label_ids.tolist() == [0, 1]


def test_rejects_bad_shapes():
    with pytest.raises(ValueError):
        refine_partition(np.zeros((SIZE, SIZE), np.uint8), halves_labels())
    with pytest.raises(ValueError):
        refine_partition(halves_image(), np.zeros(GRID, np.int32))


@pytest.mark.parametrize("grid,size", [((60, 60), (480, 480)), ((7, 5), (33, 50)), ((10, 12), (5, 7))])
def test_sparse_upsampling_matches_torch_bilinear(grid, size):
    num = 6
    dense = np.random.default_rng(1).integers(0, num, grid)
    one_hot = F.one_hot(torch.from_numpy(dense), num).permute(2, 0, 1).float()[None]
    expected = F.interpolate(one_hot, size=size, mode="bilinear", align_corners=False)[0]
    expected = expected.reshape(num, -1).numpy()
    labels, probs = _upsampled_one_hot(dense, size)
    rebuilt = np.zeros_like(expected)
    rebuilt[labels, np.broadcast_to(np.arange(labels.shape[1]), labels.shape)] = probs
    np.testing.assert_allclose(rebuilt, expected, atol=1e-6)
    np.testing.assert_array_equal(_upsampled_argmax(labels, probs, num), expected.argmax(axis=0))


def test_region_ious_match_per_label_computation():
    rng = np.random.default_rng(2)
    pre, post = rng.integers(0, 5, 1000), rng.integers(0, 5, 1000)
    post[:600] = pre[:600]
    expected = [((pre == k) & (post == k)).sum() / ((pre == k) | (post == k)).sum() for k in range(5)]
    np.testing.assert_allclose(_region_ious(pre, post, 5), expected, rtol=1e-6)
