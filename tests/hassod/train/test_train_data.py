"""The pseudo-label dataset: decoding, flip, copy-paste, skipped files, seeded index stream."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from hassod.train.data import (
    Augmentation, IndexStream, ObjectSet, PseudoLabelDataset, PseudoLabelError, collate, copy_paste,
    masks_to_boxes_xyxy,
)
from tests.hassod.train.train_helpers import boxes_xyxy, write_scenes

NO_AUG = Augmentation(flip_prob=0.0, copy_paste_prob=0.0)


@pytest.fixture
def scene_set(tmp_path: Path):
    return write_scenes(tmp_path, [1, 2, 3])


def test_targets_equal_the_masks_written(scene_set):
    pseudo, scenes = scene_set
    # images_dir None: file names resolve against the file's info.root, as discover writes it.
    dataset = PseudoLabelDataset(pseudo, None, NO_AUG)
    assert len(dataset) == 3 and dataset.missing == []
    for index, scene in enumerate(scenes):
        sample = dataset[index]
        assert sample.error is None
        assert sample.image.shape == (3, 96, 128) and sample.image.dtype == torch.float32
        assert torch.equal(sample.image, torch.from_numpy(scene.image).permute(2, 0, 1).float() / 255)
        target = sample.target
        assert target["masks"].dtype == torch.uint8
        assert np.array_equal(target["masks"].numpy().astype(bool), scene.masks)
        assert np.array_equal(target["levels"].numpy(), scene.levels)
        assert torch.equal(target["labels"], torch.ones(len(scene.masks), dtype=torch.int64))
        assert np.array_equal(target["boxes"].numpy(), boxes_xyxy(scene.masks))
        assert target["boxes"].dtype == torch.float32


def test_horizontal_flip_maps_boxes_and_masks_exactly(scene_set):
    pseudo, scenes = scene_set
    dataset = PseudoLabelDataset(pseudo, pseudo.parent / "images", Augmentation(flip_prob=1.0, copy_paste_prob=0.0))
    sample, scene = dataset[(5, 1, 0)], scenes[0]
    width = scene.image.shape[1]
    assert np.array_equal(sample.target["masks"].numpy().astype(bool), scene.masks[:, :, ::-1])
    original = boxes_xyxy(scene.masks)
    expected = np.stack([width - original[:, 2], original[:, 1], width - original[:, 0], original[:, 3]], axis=1)
    assert np.array_equal(sample.target["boxes"].numpy(), expected)
    assert torch.equal(sample.image, torch.from_numpy(scene.image[:, ::-1].copy()).permute(2, 0, 1).float() / 255)


def _nested_source() -> ObjectSet:
    """A 40x40 image with one whole (level 0) holding a part (1) holding a subpart (2), each its own colour."""
    image = np.zeros((40, 40, 3), np.uint8)
    masks = np.zeros((3, 40, 40), bool)
    masks[0, 5:25, 8:30] = True
    masks[1, 8:20, 10:22] = True
    masks[2, 11:15, 13:17] = True
    for k, colour in enumerate([(200, 0, 0), (0, 200, 0), (0, 0, 200)]):
        image[masks[k]] = colour
    return ObjectSet(image, masks, np.array([0, 1, 2]), np.array([-1, 0, 1]), masks.sum(axis=(1, 2)))


def test_copy_paste_carries_parts_levels_and_occludes():
    source = _nested_source()
    image = np.full((64, 64, 3), 90, np.uint8)
    masks = np.zeros((2, 64, 64), bool)
    masks[0, 0:64, 0:64] = True   # a large object: keeps most of its area under the paste
    masks[1, 30:34, 30:34] = True  # a small object: wherever the 20x22 paste lands it may vanish
    target = ObjectSet(image, masks, np.array([0, 1]), np.array([-1, -1]), masks.sum(axis=(1, 2)))
    aug = Augmentation(paste_scale=(1.0, 1.0), max_pasted=1, min_visible=0.2, min_area=4)
    for seed in range(12):
        out = copy_paste(np.random.default_rng(seed), target, source, aug)
        # The pasted whole, part and subpart are the last three, in order, with their levels.
        assert out.levels[-3:].tolist() == [0, 1, 2]
        pasted = out.masks[-3:]
        ys, xs = np.nonzero(pasted[0])
        top, left = ys.min(), xs.min()
        for k in range(3):  # scale 1: each pasted mask is the source's, shifted
            shifted = np.zeros((64, 64), bool)
            shifted[top:top + 20, left:left + 22] = source.masks[k, 5:25, 8:30]
            assert np.array_equal(pasted[k], shifted)
        cover = pasted[0]
        assert np.array_equal(out.image[cover], np.broadcast_to(source.image[5:25, 8:30][source.masks[0, 5:25, 8:30]],
                                                                (int(cover.sum()), 3)))
        assert (out.image[~cover] == 90).all()
        # The big object lost exactly the covered pixels; the small one is kept only if ≥ 20 % and ≥ 4 px remain.
        assert np.array_equal(out.masks[0], masks[0] & ~cover)
        small_left = int((masks[1] & ~cover).sum())
        kept_small = len(out.masks) == 5
        assert kept_small == (small_left >= max(4, 0.2 * 16))
        if kept_small:
            assert np.array_equal(out.masks[1], masks[1] & ~cover)
        n = len(out.masks)
        assert out.parents[-3:].tolist() == [-1, n - 3, n - 2]


def test_dataset_copy_paste_keeps_boxes_consistent_with_masks(scene_set):
    pseudo, scenes = scene_set
    dataset = PseudoLabelDataset(pseudo, None, Augmentation(flip_prob=0.5, copy_paste_prob=1.0, min_area=8))
    grew = 0
    for step in range(8):
        sample = dataset[(step, 0, step % 3)]
        masks = sample.target["masks"].numpy().astype(bool)
        boxes = sample.target["boxes"].numpy()
        assert masks.shape[1:] == sample.image.shape[1:]
        assert np.array_equal(boxes, masks_to_boxes_xyxy(masks))
        assert (masks.sum(axis=(1, 2)) >= 8).all()
        assert len(sample.target["levels"]) == len(masks) == len(boxes)
        assert set(sample.target["levels"].tolist()) <= {0, 1, 2}
        grew += len(masks) > len(scenes[step % 3].masks)
        # The same key gives the same sample: augmentation is a function of (seed, step, slot, index).
        again = dataset[(step, 0, step % 3)]
        assert torch.equal(again.image, sample.image) and torch.equal(again.target["masks"], sample.target["masks"])
    assert grew >= 4  # pasting adds objects on most images


def test_large_images_are_scaled_down_to_max_size(scene_set):
    pseudo, scenes = scene_set
    dataset = PseudoLabelDataset(pseudo, None, Augmentation(flip_prob=0.0, copy_paste_prob=0.0, max_size=64))
    sample = dataset[0]
    assert sample.image.shape == (3, 48, 64)
    assert sample.target["masks"].shape[1:] == (48, 64)
    assert np.array_equal(sample.target["boxes"].numpy(), masks_to_boxes_xyxy(sample.target["masks"].numpy() > 0))


def test_bad_images_are_skipped_with_reasons(scene_set, tmp_path):
    pseudo, _ = scene_set
    coco = json.loads(pseudo.read_text())
    images = pseudo.parent / "images"
    (images / "scene_002.png").write_bytes(b"not a png at all")  # unreadable
    (images / "scene_003.png").unlink()  # missing
    dataset = PseudoLabelDataset(coco, images, NO_AUG)
    assert [name for name, _ in dataset.missing] == ["scene_003.png"]
    assert "file not found" in dataset.missing[0][1]
    assert len(dataset) == 2
    batch = collate([dataset[(0, 0, 0)], dataset[(0, 1, 1)]])
    assert len(batch.images) == 1 and len(batch.targets) == 1
    assert batch.skipped == [("scene_002.png", "not an image (unrecognised format)")]
    with pytest.raises(PseudoLabelError, match="none of the images"):
        PseudoLabelDataset(coco, tmp_path / "nowhere", NO_AUG)


def test_mask_size_mismatch_is_skipped_not_raised(scene_set):
    pseudo, _ = scene_set
    coco = json.loads(pseudo.read_text())
    coco["images"][0]["width"] = 100  # the pseudo-labels claim another size than the file has
    sample = PseudoLabelDataset(coco, pseudo.parent / "images", NO_AUG)[0]
    assert sample.error is not None and "128x96" in sample.error


def test_index_stream_is_resumable_and_shards_exactly():
    full = list(IndexStream(10, 4, seed=3, start_step=0, stop_step=7))
    resumed = list(IndexStream(10, 4, seed=3, start_step=4, stop_step=7))
    assert resumed == full[4:]
    # Each pass over the data is a permutation; positions run on across steps.
    order = [key[2] for batch in full for key in batch]
    assert sorted(order[:10]) == list(range(10)) and sorted(order[10:20]) == list(range(10))
    assert order[:10] != order[10:20]
    assert [k[:2] for k in full[2]] == [(2, 0), (2, 1), (2, 2), (2, 3)]
    ranks = [list(IndexStream(10, 4, seed=3, stop_step=7, rank=r, world_size=2)) for r in range(2)]
    for step in range(7):
        assert ranks[0][step] + ranks[1][step] == full[step]
    endless = iter(IndexStream(10, 4, seed=3))
    assert [next(endless) for _ in range(7)] == full
    with pytest.raises(ValueError, match="divisible"):
        IndexStream(10, 3, world_size=2)
