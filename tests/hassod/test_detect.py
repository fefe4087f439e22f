"""Detector inference: filtering and hierarchy of raw outputs, COCO results, and a tiny real checkpoint."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO

from hassod.detect import (
    DetectOptions,
    Detector,
    build_results,
    detect_collection,
    detection_parents,
    image_record,
    images_file,
    postprocess,
)
from hassod.runs import ImageRecord
from hassod.rle import rle_to_masks

H, W = 60, 80


def _square(x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    mask = np.zeros((H, W), dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


# A whole (car), its part (door) and the door's subpart (handle); a second, separate whole; and a
# near-copy of the car that covers it back (IoU > 0.9): neither is the other's parent.
NESTED = {
    "car": (_square(0, 0, 40, 40), 0.9, 0),
    "door": (_square(5, 5, 25, 25), 0.8, 1),
    "handle": (_square(10, 10, 15, 15), 0.7, 2),
    "tree": (_square(50, 10, 70, 50), 0.6, 0),
    "car_copy": (_square(0, 0, 40, 39), 0.5, 0),
}


def _raw_output(names: list[str]) -> dict[str, torch.Tensor]:
    """A model output dict for the named masks (probabilities 0.8 inside, 0.2 outside, one pixel at 0.5)."""
    masks = np.stack([NESTED[n][0] for n in names]).astype(np.float32) * 0.6 + 0.2
    masks[:, H - 1, W - 1] = 0.5  # exactly at the threshold: inside
    boxes = []
    for mask in masks >= 0.5:
        ys, xs = np.nonzero(mask)
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32),
        "scores": torch.tensor([NESTED[n][1] for n in names]),
        "labels": torch.ones(len(names), dtype=torch.int64),
        "levels": torch.tensor([NESTED[n][2] for n in names]),
        "level_scores": torch.full((len(names), 3), 1 / 3),
        "masks": torch.from_numpy(masks)[:, None],
    }


def test_hierarchy_of_nested_masks_follows_coverage():
    names = ["handle", "tree", "car", "door", "car_copy"]  # any order
    masks = np.stack([NESTED[n][0] for n in names])
    parents = detection_parents(masks)
    named = {names[i]: (names[p] if p >= 0 else None) for i, p in enumerate(parents)}
    # car and its near-copy cover each other: both roots; the door's smallest cover is the copy (40x39).
    assert named == {"handle": "door", "door": "car_copy", "tree": None, "car": None, "car_copy": None}


def test_postprocess_sorts_binarises_and_links():
    names = ["tree", "handle", "car", "door"]
    found = postprocess(_raw_output(names), DetectOptions())
    assert list(found.scores) == pytest.approx([0.9, 0.8, 0.7, 0.6])
    assert list(found.levels) == [0, 1, 2, 0]  # car, door, handle, tree
    assert found.masks.dtype == bool and found.masks.shape == (4, H, W)
    expected = _square(0, 0, 40, 40)
    expected[H - 1, W - 1] = True  # the pixel at probability 0.5
    assert np.array_equal(found.masks[0], expected)
    assert list(found.parents) == [-1, 0, 1, -1]
    assert found.boxes.shape == (4, 4) and found.boxes.dtype == np.float32
    assert found.boxes[0].tolist() == [0.0, 0.0, 80.0, 60.0]


def test_postprocess_filters_levels_scores_and_count():
    raw = _raw_output(["car", "door", "handle", "tree"])
    parts = postprocess(raw, DetectOptions(levels=(1, 2)))
    assert list(parts.levels) == [1, 2]
    assert list(parts.parents) == [-1, 0]  # the door's whole was filtered out: it is a root here
    confident = postprocess(raw, DetectOptions(score_thresh=0.75))
    assert list(confident.scores) == pytest.approx([0.9, 0.8])
    top = postprocess(raw, DetectOptions(levels=(0,), max_detections=1))
    assert list(top.scores) == pytest.approx([0.9]) and list(top.levels) == [0]
    empty = postprocess(raw, DetectOptions(score_thresh=0.95))
    assert len(empty) == 0 and empty.masks.shape == (0, H, W) and empty.parents.shape == (0,)
    with pytest.raises(ValueError):
        DetectOptions(levels=(3,))


def test_results_ids_parents_and_load_res():
    found = postprocess(_raw_output(["car", "door", "handle", "tree"]), DetectOptions())
    records = [
        ImageRecord(path="/data/b.png", width=W, height=H, annotations=found.annotations()),
        ImageRecord(path="/data/a.png", error="not an image (unrecognised format)"),
        ImageRecord(path="/data/0.png", width=W, height=H, annotations=[]),
    ]
    results, images, skipped = build_results(records, Path("/data"))
    assert images == [{"id": 1, "file_name": "0.png", "width": W, "height": H},
                      {"id": 2, "file_name": "b.png", "width": W, "height": H}]
    assert skipped == [{"file_name": "a.png", "error": "not an image (unrecognised format)"}]
    assert [r["id"] for r in results] == [1, 2, 3, 4]
    assert [r["parent_id"] for r in results] == [None, 1, 2, None]
    assert all(r["image_id"] == 2 and r["category_id"] == 1 for r in results)
    assert results[1]["bbox"] == [5.0, 5.0, 75.0, 55.0]  # xywh of the door's box (its mask holds the corner pixel)
    assert results[1]["area"] == 20 * 20 + 1
    # pycocotools reads the list as results; the ids it assigns are ours, so parent_id points at the parent.
    gt = COCO()
    gt.dataset = {"images": images, "annotations": [], "categories": [{"id": 1, "name": "fg"}]}
    gt.createIndex()
    loaded = gt.loadRes(json.loads(json.dumps(results)))
    door = loaded.anns[2]
    assert door["parent_id"] == 1 and loaded.anns[door["parent_id"]]["hier_level"] == 0
    assert np.array_equal(loaded.annToMask(door).astype(bool), found.masks[1])


# -------------------------------------------------------------------------------- with a tiny real detector


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    from hassod.model import DetectorSettings, build_detector, save_checkpoint

    torch.manual_seed(0)
    settings = DetectorSettings.tiny()
    model = build_detector(settings, random_init=True)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    save_checkpoint(path, model, settings)
    return path


@pytest.fixture(scope="module")
def scenes():
    from hassod.synthetic import make_scene

    return [make_scene(seed, size=(96, 128)) for seed in range(3)]


def _image(scene) -> np.ndarray:
    return scene.image


def test_detector_output_structure(tiny_checkpoint, scenes):
    detector = Detector(tiny_checkpoint, device="cpu", options=DetectOptions(score_thresh=0.0))
    images = [_image(s) for s in scenes[:2]]
    found = detector.detect(images)
    assert len(found) == 2
    for detections, image in zip(found, images):
        n = len(detections)
        assert n > 0
        assert detections.boxes.shape == (n, 4) and detections.masks.shape == (n, *image.shape[:2])
        assert detections.masks.dtype == bool and set(np.unique(detections.levels)) <= {0, 1, 2}
        assert np.all(np.diff(detections.scores) <= 0) and np.all((detections.scores >= 0) & (detections.scores <= 1))
        assert np.all(detections.boxes[:, 2:] >= detections.boxes[:, :2])
        assert np.all(detections.boxes[:, [0, 2]] <= image.shape[1] + 1e-3)
        assert np.all(detections.boxes[:, [1, 3]] <= image.shape[0] + 1e-3)
        assert np.array_equal(detections.parents, detection_parents(detections.masks))
    assert detector.identity.startswith("detector:") and len(detector.digest) == 16
    # Options filter the same raw output.
    wholes = Detector(tiny_checkpoint, device="cpu", options=DetectOptions(levels=(0,))).detect(images)
    for all_levels, only_wholes in zip(found, wholes):
        assert set(only_wholes.levels.tolist()) <= {0}
        assert len(only_wholes) == int((all_levels.levels == 0).sum())
    threshold = float(np.median(found[0].scores))
    confident = Detector(tiny_checkpoint, device="cpu", options=DetectOptions(score_thresh=threshold)).detect(images)
    assert np.all(confident[0].scores >= threshold) and len(confident[0]) == int((found[0].scores >= threshold).sum())
    # The cap is pushed into the model (fewer masks predicted): the same top 5 as cutting the full list.
    top = Detector(tiny_checkpoint, device="cpu", options=DetectOptions(max_detections=5))
    assert top.model.roi_heads.detections_per_img == 5
    first = top.detect(images)[0]
    assert np.array_equal(first.scores, found[0].scores[:5]) and np.array_equal(first.boxes, found[0].boxes[:5])
    assert np.array_equal(first.masks, found[0].masks[:5]) and np.array_equal(first.levels, found[0].levels[:5])


def test_detector_pastes_kept_masks_as_torchvision_does(tiny_checkpoint, scenes):
    from torchvision.models.detection.roi_heads import paste_masks_in_image

    image = _image(scenes[0])
    detector = Detector(tiny_checkpoint, device="cpu", options=DetectOptions(levels=(0, 2), max_detections=30))
    raw = detector.forward([image])[0]
    assert raw["masks"].shape[1:] == (1, 28, 28)  # box-relative: only the kept ones get pasted
    found = postprocess(raw, detector.options, image_size=image.shape[:2])
    # The same output in torchvision's form (every mask pasted as float32 at image size), thresholded at 0.5.
    pasted = dict(raw, masks=paste_masks_in_image(raw["masks"], raw["boxes"], image.shape[:2]))
    expected = postprocess(pasted, detector.options)
    assert 0 < len(found) <= 30 and np.array_equal(found.scores, expected.scores)
    assert np.array_equal(found.masks, expected.masks) and np.array_equal(found.parents, expected.parents)
    assert np.array_equal(detector.detect([image])[0].masks, found.masks)


def test_detect_collection_writes_results_skips_bad_files_and_resumes(tmp_path, tiny_checkpoint, scenes):
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, scene in enumerate(scenes[:2]):
        Image.fromarray(_image(scene)).save(folder / f"s{i}.png")
    (folder / "broken.png").write_bytes(b"not a png")
    paths = sorted(folder.iterdir())
    detector = Detector(tiny_checkpoint, device="cpu", options=DetectOptions(max_detections=20))
    out = tmp_path / "det.json"
    summary = detect_collection(paths, out, detector, viz_dir=tmp_path / "viz", show_progress=False)
    assert summary.images == 2 and [Path(p).name for p, _ in summary.skipped] == ["broken.png"]
    results = json.loads(out.read_text())
    listing = json.loads(images_file(out).read_text())
    assert [i["file_name"] for i in listing["images"]] == ["s0.png", "s1.png"]
    assert listing["skipped"][0]["file_name"] == "broken.png"
    assert sum(summary.detections_per_level) == len(results) <= 40
    assert len(list((tmp_path / "viz").glob("*.png"))) == 2
    gt = COCO()
    gt.dataset = {"images": listing["images"], "annotations": [], "categories": [{"id": 1, "name": "fg"}]}
    gt.createIndex()
    loaded = gt.loadRes(str(out))
    for ann in loaded.anns.values():
        if ann["parent_id"] is not None:
            parent = loaded.anns[ann["parent_id"]]
            assert parent["image_id"] == ann["image_id"]
            both = rle_to_masks([ann["segmentation"], parent["segmentation"]])
            assert (both[0] & both[1]).sum() >= 0.9 * both[0].sum()
    # Same results straight from the detector (same path, same ids).
    direct = [image_record(*item) for item in detector.detect_paths(paths)]
    assert build_results(direct, folder.resolve())[0] == results
    # A second run resumes everything from the progress log.
    again = detect_collection(paths, out, detector, show_progress=False)
    assert again.resumed == 3 and json.loads(out.read_text()) == results


def test_masks_pasted_in_small_batches_give_the_same_detections(monkeypatch, tiny_checkpoint, scenes):
    import hassod.detect as detect_module

    image = _image(scenes[0])
    detector = Detector(tiny_checkpoint, device="cpu", options=DetectOptions(max_detections=40))
    raw = detector.forward([image])[0]
    whole = postprocess(raw, detector.options, image_size=image.shape[:2])
    monkeypatch.setattr(detect_module, "_PASTE_BYTES", 3 * image.shape[0] * image.shape[1])  # 3 masks a batch
    batched = postprocess(raw, detector.options, image_size=image.shape[:2])
    assert len(whole) > 6 and whole.rles == batched.rles
    assert np.array_equal(whole.parents, batched.parents) and np.array_equal(whole.areas, batched.areas)
    assert whole.areas.tolist() == whole.masks.reshape(len(whole), -1).sum(axis=1).tolist()
    assert np.array_equal(whole.mask(4), whole.masks[4])
