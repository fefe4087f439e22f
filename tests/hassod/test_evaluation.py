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
