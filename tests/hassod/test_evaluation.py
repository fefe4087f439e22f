from __future__ import annotations

import pytest

from hassod.evaluation import evaluate


def _gt() -> dict:
    return {
        "images": [{"id": 1, "width": 200, "height": 200}, {"id": 2, "width": 200, "height": 200}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 7, "bbox": [10, 10, 100, 100], "area": 10000, "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 3, "bbox": [120, 120, 50, 50], "area": 2500, "iscrowd": 0},
            {"id": 3, "image_id": 2, "category_id": 7, "bbox": [0, 0, 60, 60], "area": 3600, "iscrowd": 0},
        ],
        "categories": [{"id": 3, "name": "a"}, {"id": 7, "name": "b"}],
    }


def test_known_recall_values_ignore_categories():
    dets = [
        {"image_id": 1, "category_id": 99, "bbox": [10, 10, 100, 100], "score": 0.9},  # exact
        # IoU 0.7 exactly: box 50x35 inside 50x50 → 1750 / 2500
        {"image_id": 1, "category_id": 99, "bbox": [120, 120, 50, 35], "score": 0.8},
    ]  # image 2's object is missed
    metrics = evaluate(_gt(), dets, "bbox")
    # Recall per object over IoU 0.50:0.95 → 1.0, 0.5 (0.50..0.70 of 10 thresholds), 0.0.
    assert metrics["AR@100"] == pytest.approx((1.0 + 0.5 + 0.0) / 3)
    assert metrics["AR@1000"] == metrics["AR@100"]


def test_max_dets_limits_recall():
    gt = _gt()
    # Ten confident wrong boxes ahead of the right one on image 2.
    dets = [{"image_id": 2, "category_id": 1, "bbox": [150, 150, 10, 10], "score": 0.99} for _ in range(10)]
    dets.append({"image_id": 2, "category_id": 1, "bbox": [0, 0, 60, 60], "score": 0.5})
    metrics = evaluate(gt, dets, "bbox")
    assert metrics["AR@10"] == 0.0
    assert metrics["AR@100"] == pytest.approx(1 / 3)


def test_no_detections_gives_zero():
    assert evaluate(_gt(), [], "bbox")["AR@100"] == 0.0


# ---------------------------------------------------------------------------------------------------------
# Known AR values with masks, the per-level breakdown, image matching and input checks.

import numpy as np  # noqa: E402

from hassod.rle import masks_to_rle  # noqa: E402
from hassod.evaluation import (  # noqa: E402
    GroundTruthError,
    check_ground_truth,
    evaluate_report,
    format_report,
    match_image_ids,
)

_SIZE = (100, 120)  # H, W
# Four ground-truth objects on one image, xywh, all "medium"/"small" sized squares apart from each other.
_BOXES = [(0, 0, 40, 40), (50, 0, 40, 40), (0, 50, 30, 30), (60, 60, 20, 20)]


def _mask(box: tuple[int, int, int, int]) -> np.ndarray:
    x, y, w, h = box
    mask = np.zeros(_SIZE, dtype=bool)
    mask[y:y + h, x:x + w] = True
    return mask


def _four_object_gt() -> dict:
    rles = masks_to_rle(np.stack([_mask(b) for b in _BOXES]))
    return {
        "images": [{"id": 5, "file_name": "sub/a.png", "width": _SIZE[1], "height": _SIZE[0]},
                   {"id": 6, "file_name": "b.png", "width": _SIZE[1], "height": _SIZE[0]}],
        "annotations": [
            {"id": i + 1, "image_id": 5, "category_id": 4, "bbox": list(b), "area": b[2] * b[3], "iscrowd": 0,
             "segmentation": rle}
            for i, (b, rle) in enumerate(zip(_BOXES, rles))
        ],
        "categories": [{"id": 4, "name": "thing"}],
    }


def _det(box, score: float, level: int, image_id: int = 5) -> dict:
    return {"image_id": image_id, "category_id": 1, "bbox": list(box), "score": score, "hier_level": level,
            "segmentation": masks_to_rle(_mask(box)[None])[0]}


def test_two_of_four_matched_exactly_gives_half_recall_for_boxes_and_masks():
    dets = [_det(_BOXES[0], 0.9, 0), _det(_BOXES[2], 0.8, 0), _det((100, 80, 10, 10), 0.7, 0)]
    report = evaluate_report(_four_object_gt(), dets)
    for iou_type in ("bbox", "segm"):
        assert report[iou_type]["AR@100"] == pytest.approx(0.5)
        assert report[iou_type]["AR@10"] == pytest.approx(0.5)
        # Two true positives ranked first, then a false one: precision 1 up to recall 0.5, none beyond.
        assert report[iou_type]["AP50"] == pytest.approx(51 / 101, abs=1e-6)


def test_iou_between_thresholds_gives_known_fraction():
    # 40x24 inside the 40x40 box: IoU 0.6 (on boxes and on the square masks) → matched at 0.50, 0.55, 0.60.
    dets = [_det((0, 0, 40, 24), 0.9, 0)]
    report = evaluate_report(_four_object_gt(), dets)
    assert report["bbox"]["AR@100"] == pytest.approx(3 / 10 / 4)
    assert report["segm"]["AR@100"] == pytest.approx(3 / 10 / 4)
    # 40x25: IoU 0.625 → still 3 of 10 thresholds; 40x26: IoU 0.65 → 4 of 10.
    assert evaluate_report(_four_object_gt(), [_det((0, 0, 40, 25), 0.9, 0)])["bbox"]["AR@100"] == pytest.approx(0.075)
    assert evaluate_report(_four_object_gt(), [_det((0, 0, 40, 26), 0.9, 0)])["bbox"]["AR@100"] == pytest.approx(0.1)


def test_breakdown_by_predicted_level():
    dets = [
        _det(_BOXES[0], 0.9, 0), _det(_BOXES[1], 0.8, 0),  # wholes find 2 of 4
        _det(_BOXES[2], 0.7, 1), _det((100, 80, 10, 10), 0.95, 1),  # parts find 1 of 4
        _det((100, 0, 15, 15), 0.6, 2),  # the subpart finds nothing
    ]
    report = evaluate_report(_four_object_gt(), dets)
    levels = report["by_level"]
    assert [levels[n]["detections"] for n in ("whole", "part", "subpart")] == [2, 2, 1]
    assert levels["whole"]["bbox"]["AR@100"] == pytest.approx(0.5)
    assert levels["part"]["bbox"]["AR@100"] == pytest.approx(0.25)
    assert levels["subpart"]["bbox"]["AR@100"] == 0.0
    assert levels["part"]["segm"]["AR@100"] == pytest.approx(0.25)
    assert report["bbox"]["AR@100"] == pytest.approx(0.75)
    # Metric keys and ranges.
    for metrics in (report["bbox"], report["segm"], levels["whole"]["bbox"]):
        assert set(metrics) == {"AP", "AP50", "AP75", "AR@10", "AR@100", "AR@1000", "AR_small", "AR_medium",
                                "AR_large"}
        assert all(-1.0 <= v <= 1.0 for v in metrics.values())
    table = format_report(report).splitlines()
    assert table[0].split()[:3] == ["dets", "AP", "AP50"]
    assert [row.split()[:2] for row in table[1:7]] == [
        ["all", "bbox"], ["all", "segm"], ["whole", "bbox"], ["whole", "segm"], ["part", "bbox"], ["part", "segm"]
    ]
    assert table[1].split()[2] == "5" and table[1].split()[7] == "75.0"  # dets, AR@100 in %


def test_detections_on_unknown_images_are_ignored_and_boxes_only_skip_masks():
    gt = _four_object_gt()
    for ann in gt["annotations"]:
        del ann["segmentation"], ann["area"]  # area falls back to the box's
    dets = [_det(_BOXES[3], 0.9, 0), _det(_BOXES[0], 0.9, 0, image_id=99)]
    report = evaluate_report(gt, dets)
    assert "segm" not in report and report["ignored_detections"] == 1 and report["detections"] == 1
    assert report["bbox"]["AR@100"] == pytest.approx(0.25)
    # Small is < 32² px: the 30x30 and 20x20 objects; only the 20x20 one is found. The 40x40 ones are medium.
    assert report["bbox"]["AR_small"] == pytest.approx(0.5)
    assert report["bbox"]["AR_medium"] == 0.0


def test_match_image_ids_by_path_then_base_name():
    gt = _four_object_gt()
    pred_images = [{"id": 1, "file_name": "sub/a.png"}, {"id": 2, "file_name": "other/b.png"},
                   {"id": 3, "file_name": "c.png"}]
    dets = [{"image_id": i, "bbox": [0, 0, 1, 1], "score": 1.0} for i in (1, 2, 3)]
    assert [d["image_id"] for d in match_image_ids(dets, pred_images, gt)] == [5, 6, None]


def test_ground_truth_checks():
    with pytest.raises(GroundTruthError, match="no images"):
        check_ground_truth({"images": [], "annotations": []})
    with pytest.raises(GroundTruthError, match="not a COCO dataset"):
        check_ground_truth([{"image_id": 1}])
    with pytest.raises(GroundTruthError, match="no images"):
        evaluate_report({"images": [], "annotations": []}, [])
