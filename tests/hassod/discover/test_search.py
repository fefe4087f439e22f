"""The search recipe: the hierarchy of the merge, its ranking and its cap (hassod.discover.search)."""
from __future__ import annotations

import numpy as np
import pytest

from hassod.discover.levels import levels_from_parents, rle_intersections
from hassod.discover.recipes import RecipeError, recipe_settings, settings_from_dict
from hassod.discover.search import SearchSettings, element_parents, merge_parents, merge_regions, ring_contrast, search_masks
from hassod.synthetic import make_scene, scene_features

# A 2x4 grid merged in three steps; regions named by their patches (raster order):
#   map 0: A {0,1}  B {2,3,7}  C {4}  D {5,6}
#   map 1: E = A+C {0,1,4}, B and D unchanged (the same regions again)
#   map 2: F = E+D {0,1,4,5,6}, B unchanged
STACK = np.array([
    [[10, 10, 11, 11], [12, 13, 13, 11]],
    [[5, 5, 7, 7], [5, 9, 9, 7]],  # label values are arbitrary
    [[0, 0, 1, 1], [0, 0, 0, 1]],
])
NAMES = {"A": {0, 1}, "B": {2, 3, 7}, "C": {4}, "D": {5, 6}, "E": {0, 1, 4}, "F": {0, 1, 4, 5, 6}}


def _names(regions) -> list[str]:
    by_patches = {frozenset(v): k for k, v in NAMES.items()}
    return [by_patches[frozenset(np.flatnonzero(mask.reshape(-1)).tolist())] for mask in regions.masks]


def test_hand_built_stack_gives_distinct_regions_with_their_lifetimes():
    regions = merge_regions(STACK)
    names = _names(regions)
    assert sorted(names) == sorted(NAMES)  # B and D at three and two maps are one region each
    lifetime = {name: (int(b), int(d)) for name, b, d in zip(names, regions.birth, regions.death)}
    assert lifetime == {"A": (0, 0), "B": (0, 2), "C": (0, 0), "D": (0, 1), "E": (1, 1), "F": (2, 2)}
    assert dict(zip(names, regions.sizes.tolist())) == {k: len(v) for k, v in NAMES.items()}


def test_parents_are_the_smallest_strictly_larger_containing_regions_and_levels_follow_depth():
    regions = merge_regions(STACK)
    names = _names(regions)
    kept = np.arange(len(names))
    parents = merge_parents(regions, kept)
    named = {names[i]: (names[p] if p >= 0 else None) for i, p in zip(kept, parents)}
    assert named == {"A": "E", "C": "E", "E": "F", "D": "F", "B": None, "F": None}
    levels = dict(zip(names, levels_from_parents(parents).tolist()))
    assert levels == {"F": 0, "B": 0, "E": 1, "D": 1, "A": 2, "C": 2}


def test_a_parent_that_is_not_kept_passes_its_children_to_the_next_kept_ancestor():
    regions = merge_regions(STACK)
    names = _names(regions)
    kept = np.array([i for i, name in enumerate(names) if name != "E"])
    parents = merge_parents(regions, kept)
    named = {names[i]: (names[kept[p]] if p >= 0 else None) for i, p in zip(kept, parents)}
    assert named["A"] == "F" and named["C"] == "F" and named["D"] == "F"


def test_label_maps_that_are_not_nested_are_refused():
    split = STACK.copy()
    split[2] = [[0, 1, 1, 1], [0, 0, 0, 1]]  # patches 0 and 1 of region A end up in two regions
    with pytest.raises(ValueError, match="not nested"):
        merge_regions(split)


def test_ring_contrast_is_zero_inside_uniform_features_and_high_at_an_edge():
    features = np.zeros((4, 4, 2), np.float32)
    features[..., 0] = 1.0
    features[1:3, 1:3] = [0.0, 1.0]  # a 2x2 object of another feature in the middle
    masks = np.zeros((3, 4, 4), bool)
    masks[0, 1:3, 1:3] = True  # the object: its ring is all background
    masks[1, 0, 0] = True  # a background patch among background
    masks[2] = True  # the whole grid: no ring
    np.testing.assert_allclose(ring_contrast(masks, features), [1.0, 0.0, 0.0], atol=1e-6)


@pytest.fixture(scope="module")
def photo_features(offline_backbone, coco128_images):
    from hassod.images import load_rgb, resize_square

    image = load_rgb(coco128_images[3])
    small = resize_square(image, 480)
    return offline_backbone.extract([small])[0].permute(1, 2, 0).numpy(), image.shape[:2]


def test_every_mask_lies_inside_its_parents_on_a_photo(photo_features):
    features, size = photo_features
    found = search_masks(features, size, SearchSettings(thresholds=(0.8, 0.7, 0.6, 0.5, 0.4, 0.3)))
    assert len(found) > 50 and found.masks.shape[1:] == size
    children = np.flatnonzero(found.parents >= 0)
    assert len(children) > len(found) // 2
    inter = rle_intersections(found.rles)
    # All of the child is inside the parent, and the parent is strictly larger.
    np.testing.assert_array_equal(inter[children, found.parents[children]], found.areas[children])
    assert (found.areas[found.parents[children]] > found.areas[children]).all()
    # Levels count only the ancestors a region fills less than 90% of: chains of near-copies are one element.
    sizes = found.areas.astype(np.float64)
    np.testing.assert_array_equal(found.levels, levels_from_parents(element_parents(found.parents, sizes, 0.9)))
    assert set(found.levels.tolist()) == {0, 1, 2}
    assert (found.levels <= levels_from_parents(found.parents)).all()


def test_levels_skip_ancestors_a_region_nearly_fills():
    # 0 ⊃ 1 ⊃ 2 ⊃ 3 with sizes 100, 95, 50, 48: 1 is most of 0 (both wholes), 3 most of 2 (both parts of 1).
    parents, sizes = np.array([-1, 0, 1, 2]), np.array([100, 95, 50, 48])
    assert element_parents(parents, sizes, 0.9).tolist() == [-1, -1, 1, 1]
    assert levels_from_parents(element_parents(parents, sizes, 0.9)).tolist() == [0, 0, 1, 1]
    assert levels_from_parents(parents).tolist() == [0, 1, 2, 2]


def test_max_regions_keeps_the_best_scored(photo_features):
    features, size = photo_features
    thresholds = (0.8, 0.7, 0.6, 0.5, 0.4, 0.3)
    everything = search_masks(features, size, SearchSettings(thresholds=thresholds, max_regions=100_000))
    top = search_masks(features, size, SearchSettings(thresholds=thresholds, max_regions=25))
    assert len(everything) > 25 and len(top) == 25
    np.testing.assert_allclose(np.sort(top.scores), np.sort(everything.scores)[-25:])
    kept = {rle["counts"] for rle in top.rles}
    assert kept <= {rle["counts"] for rle in everything.rles}
    dropped = np.array([rle["counts"] not in kept for rle in everything.rles])
    assert top.scores.min() >= everything.scores[dropped].max()


def test_regions_are_limited_by_size():
    scene = make_scene(0, n_objects=2, parts_per_object=2)
    features = scene_features(scene, seed=0)
    thresholds = (0.4, 0.2, 0.1)
    found = search_masks(features, scene.image.shape[:2], SearchSettings(thresholds=thresholds, min_patches=4,
                                                                         max_share=0.5))
    grid_pixels = scene.image.shape[0] * scene.image.shape[1]
    assert len(found) > 0 and (found.areas <= 0.5 * grid_pixels + 1e-9).all()
    patch_pixels = grid_pixels / (features.shape[0] * features.shape[1])
    assert found.areas.min() >= 3.5 * patch_pixels  # 4 patches, up to bilinear rounding at the edges


def test_recipes_by_name_and_back_from_their_saved_settings():
    search = recipe_settings("search", (0.7, 0.5), max_regions=50)
    assert isinstance(search, SearchSettings) and search.max_regions == 50
    assert settings_from_dict(search.as_dict()) == search
    paper = recipe_settings("paper", (0.6, 0.4))
    assert paper.recipe == "paper" and settings_from_dict({"thresholds": [0.6, 0.4]}).thresholds == (0.6, 0.4)
    assert settings_from_dict(None).recipe == "paper"  # indexes from before recipes
    with pytest.raises(RecipeError, match="--max-regions applies to the search recipe only"):
        recipe_settings("paper", None, max_regions=10)
