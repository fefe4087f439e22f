"""Class-agnostic COCO evaluation (pycocotools) of detections or pseudo-labels.

Unsupervised detectors find objects of classes nobody named, and parts that
COCO never labels, so recall (AR) is the meaningful figure (HASSOD appendix A):
every category is collapsed into one before COCOeval runs.
"""
from __future__ import annotations

import contextlib
import copy
import io
from typing import Any, Sequence

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

MAX_DETS = (10, 100, 1000)


def class_agnostic(dataset: dict[str, Any]) -> dict[str, Any]:
    """A copy of a COCO dataset dict with every annotation in one category (id 1)."""
    out = copy.deepcopy(dataset)
    for ann in out["annotations"]:
        ann["category_id"] = 1
    out["categories"] = [{"id": 1, "name": "fg"}]
    return out


def evaluate(
    gt: dict[str, Any],
    detections: Sequence[dict[str, Any]],
    iou_type: str = "bbox",
    max_dets: Sequence[int] = MAX_DETS,
) -> dict[str, float]:
    """AP / AP50 / AP75 at the largest maxDets, AR at each maxDets, AR small/medium/large.

    gt: a COCO dataset dict (categories are ignored). detections: COCO result
    dicts with ``image_id``, ``score`` and ``bbox`` (xywh, pixels) or
    ``segmentation`` (RLE) for ``iou_type="segm"``; their categories are
    ignored too. Values are in [0, 1]; -1 where COCO has nothing to measure.
    """
    gt_api = COCO()
    gt_api.dataset = class_agnostic(gt)
    with contextlib.redirect_stdout(io.StringIO()):
        gt_api.createIndex()
    dets = [{**d, "category_id": 1} for d in detections if d["image_id"] in gt_api.imgs]
    if not dets:
        return {key: 0.0 for key in _metric_names(max_dets)}
    with contextlib.redirect_stdout(io.StringIO()):
        dt_api = gt_api.loadRes(copy.deepcopy(dets))
        runner = COCOeval(gt_api, dt_api, iou_type)
        runner.params.maxDets = list(max_dets)
        runner.params.imgIds = sorted(gt_api.getImgIds())
        runner.evaluate()
        runner.accumulate()
    return _summarise(runner, max_dets)


def _metric_names(max_dets: Sequence[int]) -> list[str]:
    return ["AP", "AP50", "AP75"] + [f"AR@{m}" for m in max_dets] + ["AR_small", "AR_medium", "AR_large"]


def _mean(values: np.ndarray) -> float:
    valid = values[values > -1]
    return float(valid.mean()) if valid.size else -1.0


def _summarise(runner: COCOeval, max_dets: Sequence[int]) -> dict[str, float]:
    """Read the metrics from COCOeval's accumulated arrays (its own summarize() assumes 3 maxDets of 1/10/100)."""
    precision = runner.eval["precision"]  # (T iou, R recall, K cat, A area, M maxDets)
    recall = runner.eval["recall"]  # (T, K, A, M)
    last = len(max_dets) - 1
    iou = runner.params.iouThrs
    out = {
        "AP": _mean(precision[:, :, :, 0, last]),
        "AP50": _mean(precision[np.isclose(iou, 0.5), :, :, 0, last]),
        "AP75": _mean(precision[np.isclose(iou, 0.75), :, :, 0, last]),
    }
    for m, count in enumerate(max_dets):
        out[f"AR@{count}"] = _mean(recall[:, :, 0, m])
    for a, name in enumerate(["small", "medium", "large"], start=1):
        out[f"AR_{name}"] = _mean(recall[:, :, a, last])
    return out
