"""Stage 1 end to end on synthetic scenes whose wholes, parts and subparts are known."""
from __future__ import annotations

import numpy as np
import pytest

from hassod.discover.crf import CRFSettings
from hassod.discover.masks import masks_to_boxes_xywh
from hassod.discover.pipeline import DiscoverySettings, discover_masks
from hassod.synthetic import make_scene, scene_features

PAPER = DiscoverySettings(thresholds=(0.4, 0.2, 0.1))
EXACT_CRF = DiscoverySettings(thresholds=(0.4, 0.2, 0.1), crf=CRFSettings(work_size=None))


def _best_match(truth: np.ndarray, found: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each true mask, the IoU of its best found mask and that mask's index."""
    t = truth.reshape(len(truth), -1).astype(np.float64)
    f = found.reshape(len(found), -1).astype(np.float64)
    inter = t @ f.T
    iou = inter / (t.sum(1)[:, None] + f.sum(1)[None] - inter)
    return iou.max(axis=1), iou.argmax(axis=1)


@pytest.mark.parametrize(("seed", "settings", "min_iou"), [(0, EXACT_CRF, 0.97), (1, PAPER, 0.8), (2, PAPER, 0.8)])
def test_hand_made_features_recover_the_exact_hierarchy(seed, settings, min_iou):
    scene = make_scene(seed, n_objects=2, parts_per_object=2)
    features = scene_features(scene, seed=seed)
    found = discover_masks(scene.image, features, scene.image.shape[:2], settings)
    iou, index = _best_match(scene.masks, found.masks)
    # The CRF at its default 160 px working size blurs the edges of small subparts a little.
    assert iou.min() >= min_iou
    np.testing.assert_array_equal(found.levels[index], scene.levels)
    # Parents of the matched masks are the matches of the true parents.
    for element, parent in enumerate(scene.parents):
        expected = -1 if parent < 0 else index[parent]
        assert found.parents[index[element]] == expected
    # Hole filling turns the finest partition's rings into full wholes and
    # parts, so every element is already found at 0.4 and later copies are
    # pooled away as duplicates.
    assert set(found.thresholds[index]) == {0.4}
    assert len(found.masks) == len(scene.masks)


def test_masks_are_returned_at_the_original_size():
    scene = make_scene(3, n_objects=1)
    features = scene_features(scene)
    found = discover_masks(scene.image, features, (300, 700), PAPER)
    assert found.masks.shape[1:] == (300, 700)
    whole = found.masks[found.levels == 0]
    assert len(whole) == 1
    ys, xs = np.nonzero(scene.masks[0])
    x0, x1 = xs.min() * 700 / 480, (xs.max() + 1) * 700 / 480
    found_xs = np.nonzero(whole[0].any(axis=0))[0]
    assert abs(found_xs.min() - x0) <= 3 and abs(found_xs.max() + 1 - x1) <= 3
    annotations = found.annotations()
    assert [a["hier_level"] for a in annotations] == found.levels.tolist()
    assert all(a["area"] >= 100 for a in annotations)
    # Masks are kept as RLEs; boxes and areas measured on them equal the dense measures.
    assert [a["area"] for a in annotations] == found.masks.sum(axis=(1, 2)).tolist() == found.areas.tolist()
    np.testing.assert_allclose([a["bbox"] for a in annotations], masks_to_boxes_xywh(found.masks))
