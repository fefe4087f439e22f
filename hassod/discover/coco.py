"""COCO-format pseudo-labels from the records of a discovery run.

Image and annotation ids are given in sorted path order, so the same inputs
always give the same ids; the records come from the run's progress log
(:mod:`hassod.runs`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from ..runs import ImageRecord, numbered_images


def build_coco(records: Iterable[ImageRecord], root: Path, info: dict[str, Any]) -> dict[str, Any]:
    """Assemble a COCO dataset dict with one category "fg" from per-image records.

    ``file_name`` is each path relative to ``root``. Annotations gain
    ``hier_level`` and ``parent_id`` (a global annotation id or None). Skipped
    files are listed under the extra key ``skipped`` with their reasons.
    """
    images, annotations, skipped = numbered_images(records, root, _annotation)
    return {
        "info": {**info, "root": str(root)},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": 1, "name": "fg", "supercategory": "object"}],
        "skipped": skipped,
    }


def _annotation(ann: dict[str, Any], ann_id: int, image_id: int, parent_id: int | None) -> dict[str, Any]:
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": 1,
        "segmentation": ann["segmentation"],
        "bbox": ann["bbox"],
        "area": ann["area"],
        "score": ann["score"],
        "iscrowd": 0,
        "hier_level": ann["hier_level"],
        "parent_id": parent_id,
        "threshold": ann["threshold"],
    }
