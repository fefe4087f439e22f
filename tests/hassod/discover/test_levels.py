from fractions import Fraction

import numpy as np
import pytest

from hassod.discover.levels import (
    assign_levels,
    coverage_matrix,
    distinct_masks,
    find_parents,
    intersection_matrix,
    levels_from_parents,
    rle_intersections,
)
from hassod.rle import masks_to_rle

SIZE = 64


def box(y0: int, x0: int, y1: int, x1: int, size: int = SIZE) -> np.ndarray:
    mask = np.zeros((size, size), bool)
    mask[y0:y1, x0:x1] = True
    return mask


def with_pixels(count: int, start: int = 0, size: int = SIZE) -> np.ndarray:
    """A mask of exactly ``count`` pixels, filled row-major from flat index ``start``."""
    mask = np.zeros(size * size, bool)
    mask[start:start + count] = True
    return mask.reshape(size, size)


def test_nested_squares_give_whole_part_subpart():
    masks = np.stack([box(0, 0, 60, 60), box(10, 10, 40, 40), box(15, 15, 25, 25)])
    levels, parents = assign_levels(masks)
    assert levels.dtype == np.int8 and parents.dtype == np.int64
    assert levels.tolist() == [0, 1, 2]
    assert parents.tolist() == [-1, 0, 1]


def test_siblings_share_their_parent():
    masks = np.stack([box(0, 0, 60, 60), box(5, 5, 20, 20), box(30, 30, 50, 50)])
    levels, parents = assign_levels(masks)
    assert levels.tolist() == [0, 1, 1]
    assert parents.tolist() == [-1, 0, 0]


def test_smallest_covering_mask_is_the_parent():
    # Both 0 and 1 cover 2; 1 is smaller, so 2 is a subpart under 1.
    masks = np.stack([box(0, 0, 60, 60), box(0, 0, 30, 60), box(5, 5, 15, 15)])
    levels, parents = assign_levels(masks)
    assert parents.tolist() == [-1, 0, 1]
    assert levels.tolist() == [0, 1, 2]


def test_equal_area_candidates_tie_to_the_lower_index():
    masks = np.stack([box(0, 0, 40, 20), box(0, 0, 20, 40), box(2, 2, 8, 8)])
    _, parents = assign_levels(masks)
    assert parents.tolist() == [-1, -1, 0]


def test_shuffled_order_gives_the_same_tree():
    masks = np.stack([box(0, 0, 64, 64), box(0, 0, 40, 40), box(5, 5, 30, 30),
                      box(10, 10, 20, 20), box(45, 45, 60, 60)])
    order = np.array([3, 0, 4, 2, 1])
    levels, parents = assign_levels(masks[order])
    position = np.argsort(order)  # original index -> shuffled position
    expected_parents = {0: -1, 1: 0, 2: 1, 3: 2, 4: 0}
    for shuffled, original in enumerate(order):
        parent = expected_parents[original]
        assert parents[shuffled] == (-1 if parent < 0 else position[parent])
    assert levels.tolist() == [[0, 1, 2, 2, 1][o] for o in order]


def test_identical_masks_are_both_roots():
    masks = np.stack([box(5, 5, 30, 30), box(5, 5, 30, 30)])
    levels, parents = assign_levels(masks)
    assert parents.tolist() == [-1, -1] and levels.tolist() == [0, 0]


def test_four_deep_chain_caps_at_subpart():
    masks = np.stack([box(0, 0, 64, 64), box(0, 0, 40, 40), box(0, 0, 20, 20), box(0, 0, 8, 8)])
    levels, parents = assign_levels(masks[::-1])
    assert parents.tolist() == [1, 2, 3, -1]
    assert levels.tolist() == [2, 2, 1, 0]


def test_partial_overlap_below_tau_is_no_relation():
    masks = np.stack([box(0, 0, 40, 40), box(20, 20, 60, 60)])
    levels, parents = assign_levels(masks)
    assert parents.tolist() == [-1, -1] and levels.tolist() == [0, 0]


def test_tau_boundary_is_inclusive_for_the_child():
    big = with_pixels(100)
    exactly = with_pixels(10, start=91)  # 9 of its 10 pixels inside big: share 0.9
    below = with_pixels(10, start=92)  # 8 of 10: share 0.8
    _, parents = assign_levels(np.stack([big, exactly, below]))
    assert parents.tolist() == [-1, 0, -1]
    # Two masks each 90 % inside the other: neither covers.
    _, mutual = assign_levels(np.stack([with_pixels(10), with_pixels(10, start=1)]))
    assert mutual.tolist() == [-1, -1]
    # tau = 0.75 for the Mean Teacher: 3 of 4 pixels counts.
    _, teacher = assign_levels(np.stack([with_pixels(100), with_pixels(4, start=97)]), tau=0.75)
    assert teacher.tolist() == [-1, 0]


def test_empty_mask_is_an_isolated_root():
    masks = np.stack([box(0, 0, 30, 30), np.zeros((SIZE, SIZE), bool), box(5, 5, 10, 10)])
    levels, parents = assign_levels(masks)
    assert parents.tolist() == [-1, -1, 0]
    assert coverage_matrix(masks)[1].tolist() == [0.0, 0.0, 0.0]


def test_no_masks():
    levels, parents = assign_levels(np.zeros((0, 8, 8), bool))
    assert levels.shape == (0,) and parents.shape == (0,)


def test_cycle_in_parent_pointers_is_rejected():
    with pytest.raises(ValueError):
        levels_from_parents(np.array([1, 2, 0]))
    with pytest.raises(ValueError):
        find_parents(np.eye(2, dtype=np.int64), tau=0.0)


def test_intersections_count_pixels_exactly():
    rng = np.random.default_rng(3)
    masks = rng.random((6, 37, 41)) > 0.4
    expected = np.einsum("ahw,bhw->ab", masks.astype(np.int64), masks.astype(np.int64))
    np.testing.assert_array_equal(intersection_matrix(masks), expected)
    assert intersection_matrix(masks[:0]).shape == (0, 0)


def test_rle_intersections_equal_dense_counts():
    rng = np.random.default_rng(0)
    masks = rng.random((7, 70, 41)) < 0.4
    masks[2] = False  # empty
    masks[3, :40] = False  # only in the lower rows
    masks[4, 10:] = False  # only in the top rows: its box misses mask 3's
    masks[5] = masks[6]  # a duplicate
    inter = rle_intersections(masks_to_rle(masks))
    np.testing.assert_array_equal(inter, np.einsum("ahw,bhw->ab", masks.astype(np.int64), masks.astype(np.int64)))
    assert inter[3, 4] == 0 and inter[2].sum() == 0 and inter[5, 6] == inter[6, 6] > 0
    assert rle_intersections([]).shape == (0, 0)
    many = rng.random((300, 9, 8)) < 0.5  # more than 255 RLEs: pycocotools' area() alone fails there
    dense = many.reshape(300, -1).astype(np.int64)
    np.testing.assert_array_equal(rle_intersections(masks_to_rle(many)), dense @ dense.T)


def brute_force_tree(masks: np.ndarray, tau: float) -> tuple[list[int], list[int]]:
    areas = [int(m.sum()) for m in masks]
    tau_q = Fraction(str(tau))  # the decimal the caller meant: exactly 9/10 for 0.9
    parents = []
    for a, mask_a in enumerate(masks):
        best = -1
        for b, mask_b in enumerate(masks):
            inter = int((mask_a & mask_b).sum())
            if a == b or areas[a] == 0 or areas[b] == 0:
                continue
            if Fraction(inter, areas[a]) >= tau_q and Fraction(inter, areas[b]) < tau_q:
                if best < 0 or (areas[b], b) < (areas[best], best):
                    best = b
        parents.append(best)

    def depth(i: int) -> int:
        return 0 if parents[i] < 0 else 1 + depth(parents[i])

    return parents, [min(depth(i), 2) for i in range(len(masks))]


@pytest.mark.parametrize("tau", [0.9, 0.75])
def test_bulk_matches_brute_force_on_random_masks(tau):
    rng = np.random.default_rng(4)
    masks = []
    # Random boxes plus shrunken copies of them, so coverage chains exist.
    for _ in range(20):
        y0, x0 = rng.integers(0, SIZE - 8, 2)
        y1, x1 = y0 + rng.integers(4, SIZE - y0 + 1), x0 + rng.integers(4, SIZE - x0 + 1)
        masks.append(box(y0, x0, y1, x1))
        mask = masks[-1].copy()
        mask[y0:y0 + rng.integers(0, 3), :] = False
        mask &= rng.random(mask.shape) > 0.05
        masks.append(mask)
    masks = np.stack(masks)
    levels, parents = assign_levels(masks, tau=tau)
    expected_parents, expected_levels = brute_force_tree(masks, tau)
    assert parents.tolist() == expected_parents
    assert levels.tolist() == expected_levels
    assert (parents >= 0).sum() >= 10 and (levels == 2).any()
    # Acyclic: every parent is strictly larger than its child.
    areas = masks.reshape(len(masks), -1).sum(axis=1)
    child = parents >= 0
    assert np.all(areas[parents[child]] > areas[child])


def test_distinct_masks_drops_near_duplicates_keeping_the_first():
    whole = box(0, 0, 40, 40)
    near = whole.copy()
    near[0, :10] = False  # IoU 1590/1600 with whole
    inner = box(10, 10, 30, 30)  # IoU 0.25 with whole: kept
    inner_shifted = box(11, 10, 31, 30)  # IoU 380/420 ≈ 0.905 with inner: dropped
    masks = np.stack([whole, inner, near, inner_shifted])
    keep = distinct_masks(intersection_matrix(masks), max_iou=0.9)
    assert keep.tolist() == [0, 1]
    assert distinct_masks(intersection_matrix(masks), max_iou=0.95).tolist() == [0, 1, 3]
    assert distinct_masks(intersection_matrix(masks[:0]), max_iou=0.9).tolist() == []
