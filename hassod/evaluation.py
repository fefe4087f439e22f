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
    """A copy of a COCO dataset dict with every annotation in one category (id 1).

    A missing ``area`` is taken as the box's (pixels²), a missing ``iscrowd`` as 0.
    """
    out = copy.deepcopy(dataset)
    for ann in out["annotations"]:
        ann["category_id"] = 1
        # COCOeval needs both; files made by hand or by other tools often omit them.
        ann.setdefault("iscrowd", 0)
        ann.setdefault("area", float(ann["bbox"][2] * ann["bbox"][3]))
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


LEVELS = ("whole", "part", "subpart")  # predicted hier_level 0, 1, 2


class GroundTruthError(ValueError):
    """A ground-truth file that cannot be evaluated against; ``str()`` says why."""


def check_ground_truth(gt: dict[str, Any]) -> None:
    """Raise :class:`GroundTruthError` unless ``gt`` is a COCO dataset dict with images and boxes."""
    if not isinstance(gt, dict) or not isinstance(gt.get("images"), list):
        raise GroundTruthError("ground truth is not a COCO dataset (no 'images' list)")
    if not gt["images"]:
        raise GroundTruthError("ground truth has no images: nothing to evaluate on")
    for ann in gt.get("annotations", []):
        if "bbox" not in ann or "image_id" not in ann:
            raise GroundTruthError(f"ground-truth annotation {ann.get('id')} lacks 'bbox' or 'image_id'")


def can_evaluate_masks(gt: dict[str, Any], detections: Sequence[dict[str, Any]]) -> bool:
    """True when every ground-truth annotation and every detection carries a segmentation."""
    return all("segmentation" in a for a in gt.get("annotations", [])) and all(
        "segmentation" in d for d in detections
    )


def evaluate_report(
    gt: dict[str, Any],
    detections: Sequence[dict[str, Any]],
    max_dets: Sequence[int] = MAX_DETS,
) -> dict[str, Any]:
    """Box and mask metrics (see :func:`evaluate`) overall and per predicted level.

    Detections of images absent from ``gt`` are ignored (counted in
    ``ignored_detections``). The per-level figures are the same metrics on
    only the detections whose ``hier_level`` is that level, against all of the
    ground truth: how much of it each level alone recovers. Mask metrics are
    left out (``segm`` absent) when the ground truth or the detections have no
    masks. Returns ``{"bbox": metrics, "segm": metrics, "by_level": {"whole":
    {"bbox": ..., "segm": ...}, ...}, "images": int, "detections": int,
    "ignored_detections": int}``.
    """
    check_ground_truth(gt)
    known = {image["id"] for image in gt["images"]}
    kept = [d for d in detections if d["image_id"] in known]
    iou_types = ["bbox"] + (["segm"] if can_evaluate_masks(gt, kept) else [])
    report: dict[str, Any] = {
        "images": len(known),
        "detections": len(kept),
        "ignored_detections": len(detections) - len(kept),
    }
    for iou_type in iou_types:
        report[iou_type] = evaluate(gt, kept, iou_type, max_dets)
    report["by_level"] = {}
    for level, name in enumerate(LEVELS):
        subset = [d for d in kept if d.get("hier_level", 0) == level]
        report["by_level"][name] = {
            "detections": len(subset),
            **{iou_type: evaluate(gt, subset, iou_type, max_dets) for iou_type in iou_types},
        }
    return report


def match_image_ids(
    detections: Sequence[dict[str, Any]], pred_images: Sequence[dict[str, Any]], gt: dict[str, Any]
) -> list[dict[str, Any]]:
    """Detections with ``image_id`` rewritten from the predictions' image list to the ground truth's.

    Images are matched by ``file_name``: the same relative path, else the same
    base name when it is unique in the ground truth. Detections of images
    that match nothing get ``image_id`` None (and are ignored by evaluation).
    """
    by_name = {image["file_name"]: image["id"] for image in gt["images"] if "file_name" in image}
    base_counts: dict[str, int] = {}
    for name in by_name:
        base = name.rsplit("/", 1)[-1]
        base_counts[base] = base_counts.get(base, 0) + 1
    by_base = {name.rsplit("/", 1)[-1]: i for name, i in by_name.items() if base_counts[name.rsplit("/", 1)[-1]] == 1}
    mapping: dict[int, int | None] = {}
    for image in pred_images:
        name = image["file_name"]
        mapping[image["id"]] = by_name.get(name, by_base.get(name.rsplit("/", 1)[-1]))
    return [{**d, "image_id": mapping.get(d["image_id"])} for d in detections]


def subset_images(gt: dict[str, Any], image_ids: set[int]) -> dict[str, Any]:
    """``gt`` restricted to the images with these ids and their annotations (other keys kept)."""
    return {
        **gt,
        "images": [image for image in gt["images"] if image["id"] in image_ids],
        "annotations": [ann for ann in gt.get("annotations", []) if ann["image_id"] in image_ids],
    }


def format_report(report: dict[str, Any]) -> str:
    """A plain-text table of :func:`evaluate_report`'s output: one row per (level, iou type), metrics as %."""
    iou_types = [t for t in ("bbox", "segm") if t in report]
    names = list(report[iou_types[0]])
    header = f"{'':16s}{'dets':>7s}" + "".join(f"{n:>10s}" for n in names)
    rows = [header]
    groups = [("all", report["detections"], report)] + [
        (name, part["detections"], part) for name, part in report["by_level"].items()
    ]
    for group, count, metrics in groups:
        for iou_type in iou_types:
            values = "".join(f"{_percent(metrics[iou_type][n]):>10s}" for n in names)
            rows.append(f"{group + ' ' + iou_type:16s}{count:>7d}{values}")
    rows.append(f"{report['images']} ground-truth images; "
                f"{report['ignored_detections']} detections on other images ignored")
    return "\n".join(rows)


def _percent(value: float) -> str:
    return "-" if value < 0 else f"{100 * value:.1f}"
