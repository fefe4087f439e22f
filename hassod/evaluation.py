"""Class-agnostic COCO evaluation (pycocotools) of detections or pseudo-labels.

Unsupervised detectors find objects of classes nobody named, and parts that
COCO never labels, so recall (AR) is the meaningful figure (HASSOD appendix A):
every category is collapsed into one before COCOeval runs.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from .errors import UserError

if TYPE_CHECKING:
    from .detect import DetectOptions, Detector

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


class GroundTruthError(UserError, ValueError):
    """A ground-truth file that cannot be evaluated against; ``str()`` says why."""


class DetectionsError(UserError, ValueError):
    """Detections that cannot be evaluated against the ground truth (unreadable, malformed, on none of
    its images); ``str()`` names the file and says why."""


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


# Reading detections and ground truth from files, as `hassod eval` does.


def read_json(path: str | Path, error: type[UserError] = DetectionsError) -> Any:
    """The JSON document at ``path``; raises ``error`` naming the file when it cannot be read."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise error(f"{path}: not a readable JSON file ({exc})") from exc


def read_ground_truth(path: str | Path) -> dict[str, Any]:
    """The COCO dataset at ``path``, checked by :func:`check_ground_truth`; errors name the file."""
    gt = read_json(path, GroundTruthError)
    try:
        check_ground_truth(gt)
    except GroundTruthError as exc:
        raise GroundTruthError(f"{path}: {exc}") from exc
    return gt


def read_predictions(path: str | Path, gt: dict[str, Any]) -> tuple[list[dict[str, Any]], set[int] | None]:
    """Detections with the ground truth's image ids, and the ground-truth ids of the images they cover.

    A results list keeps its ids unless ``<name>.images.json`` (written by
    `hassod detect`) lies beside it; a COCO dataset dict brings its own images.
    Either way images are then matched to the ground truth by file name, and
    the covered images are those listed (an image with no detection counts).
    A bare results list lists no images: covered is then None (all of them).
    """
    from .detect import images_file

    data = read_json(path)
    if isinstance(data, dict) and isinstance(data.get("annotations"), list):
        detections = [{"score": 1.0, **ann} for ann in data["annotations"]]  # pseudo-labels may lack scores
        return _matched(detections, data.get("images", []), gt)
    if not isinstance(data, list):
        raise DetectionsError(f"{path}: expected a COCO results list or a COCO dataset with 'annotations'")
    if any(not isinstance(d, dict) or "image_id" not in d or "score" not in d or "bbox" not in d for d in data):
        raise DetectionsError(f"{path}: every detection needs 'image_id', 'bbox' and 'score'")
    sidecar = images_file(path)
    if sidecar.exists():
        return _matched(data, read_json(sidecar).get("images", []), gt)
    return data, None


def select_detections(detections: list[dict[str, Any]], options: DetectOptions) -> list[dict[str, Any]]:
    """The detections that a detector run with ``options`` keeps: score and level filters,
    then the best ``max_detections`` per image (a stable sort, as the detector's)."""
    if len(options.levels) < 3 and any("hier_level" not in d for d in detections):
        raise DetectionsError(
            "--level needs detections with 'hier_level' (as `hassod detect` and `hassod discover` write)")
    kept = [d for d in detections
            if d["score"] >= options.score_thresh and (len(options.levels) == 3 or d["hier_level"] in options.levels)]
    per_image: dict[Any, int] = {}
    selected = []
    for d in sorted(kept, key=lambda d: -d["score"]):
        per_image[d["image_id"]] = per_image.get(d["image_id"], 0) + 1
        if per_image[d["image_id"]] <= options.max_detections:
            selected.append(d)
    return selected


def predictions_for(
    gt: dict[str, Any], gt_path: str | Path, pred_path: str | Path, options: DetectOptions
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The detections of the file ``pred_path`` that ``options`` select, with ``gt``'s image ids, and
    ``gt`` restricted to the images they cover (the others were never looked at)."""
    detections, image_ids = read_predictions(pred_path, gt)
    detections = select_detections(detections, options)
    if image_ids is None:
        return detections, gt
    if not image_ids:
        raise DetectionsError(f"none of the images of {pred_path} is in {gt_path}; do the file names match?")
    return detections, subset_images(gt, image_ids)


def detections_for(
    gt: dict[str, Any], gt_path: str | Path, detector: Detector, images_path: str | Path, batch_size: int,
    max_pixels: int, on_skip: Callable[[str, str], None] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Run ``detector`` on the ground truth's files under ``images_path``.

    Returns the results with the ground truth's image ids, and ``gt`` restricted
    to the images that were found and readable (the others are left out, not
    counted as misses). ``on_skip(path, reason)`` hears of each unreadable image.
    """
    from .detect import build_results, image_record
    from .images import list_images

    root = Path(images_path).resolve() if Path(images_path).is_dir() else Path(images_path).resolve().parent
    # Only the ground truth's images: a folder may hold many more, and their detections would be ignored.
    names = {image.get("file_name", "") for image in gt["images"]}
    bases = {name.rsplit("/", 1)[-1] for name in names}
    paths = [p for p in list_images([images_path])
             if _relative_name(p, root) in names or Path(p).name in bases]
    records = [image_record(p, image, found, error)
               for p, image, found, error in detector.detect_paths(paths, batch_size, max_pixels)]
    for record in records:
        if record.error is not None and on_skip is not None:
            on_skip(record.path, record.error)
    results, images, _ = build_results(records, root)
    detections, covered = _matched(results, images, gt)  # every readable image is covered, detections or not
    if not covered:
        raise DetectionsError(f"none of the images of {gt_path} was found (and readable) in {images_path}")
    return detections, subset_images(gt, covered)


def _matched(
    detections: list[dict[str, Any]], images: list[dict[str, Any]], gt: dict[str, Any]
) -> tuple[list[dict[str, Any]], set[int]]:
    """``detections`` with the ground truth's image ids, and the ground-truth ids of ``images``."""
    placeholders = [{"image_id": image["id"]} for image in images]
    covered = {d["image_id"] for d in match_image_ids(placeholders, images, gt)} - {None}
    return match_image_ids(detections, images, gt), covered


def _relative_name(path: str | Path, root: Path) -> str:
    try:
        return Path(path).resolve().relative_to(root).as_posix()
    except ValueError:
        return Path(path).name
