"""Stage 1 for one image: patch features → merge → CRF + filters → ensemble → levels."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Sequence

import numpy as np

from ..images import resize_square
from .crf import CRFSettings, refine_partition
from .levels import distinct_masks, find_parents, levels_from_parents, rle_intersections
from ..rle import rle_boxes_xywh, rle_to_masks
from .masks import MaskFilterSettings, postprocess_to_rles
from .merge import hierarchical_merge


@dataclass
class DiscoverySettings:
    """Settings of stage-1 discovery; defaults are the paper's (docs/design.md §4).

    thresholds: merge thresholds on cosine similarity, processed high to low;
        ``None`` takes the backbone's own defaults.
    input_size: side in pixels of the square the image is resized to for the
        backbone and the CRF (aspect not kept).
    tau: coverage ratio of the whole/part/subpart tree.
    duplicate_iou: of masks from different thresholds overlapping at least
        this much (IoU), only the first (finest threshold) is kept.
    """

    thresholds: tuple[float, ...] | None = None
    input_size: int = 480
    tau: float = 0.9
    duplicate_iou: float = 0.9
    crf: CRFSettings = field(default_factory=CRFSettings)
    masks: MaskFilterSettings = field(default_factory=MaskFilterSettings)

    recipe = "paper"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def with_default_thresholds(self, defaults: tuple[float, ...]) -> "DiscoverySettings":
        """These settings with ``thresholds`` filled from ``defaults`` if unset, sorted high to low."""
        return replace(self, thresholds=tuple(sorted(self.thresholds or defaults, reverse=True)))

    def for_backbone(self, backbone: Any) -> "DiscoverySettings":
        """These settings with unset thresholds taken from the backbone's ``default_thresholds``."""
        return self.with_default_thresholds(backbone.default_thresholds)

    def grid(self, backbone: Any, images: Sequence[np.ndarray]) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """(H, W, 3) uint8 images → (each resized to the ``input_size`` square, its (h, w, C) float32 patch
        features), one forward for all."""
        small = [resize_square(image, self.input_size) for image in images]
        features = backbone.extract(small, size=self.input_size)  # (B, C, h, w)
        return small, list(features.permute(0, 2, 3, 1).float().cpu().numpy())

    def find(self, image: np.ndarray, features: np.ndarray, original_size: tuple[int, int],
             timings: dict[str, float] | None = None) -> "Discovered":
        """Masks of one image by this recipe (see :func:`discover_masks`)."""
        return discover_masks(image, features, original_size, self, timings)


@dataclass
class Discovered:
    """Masks found in one image, at its original size (H, W) = ``image_size``.

    rles: N COCO RLEs (str counts). areas: (N,) int64 mask pixels.
    levels: (N,) 0 whole / 1 part / 2 subpart. parents: (N,) index of the
    parent mask or -1. scores: (N,) agreement of the mask with its CRF
    refinement (IoU, 0..1) for the ``paper`` recipe, objectness for
    ``search`` (:mod:`.search`). thresholds: (N,) the merge threshold each
    mask came from (for ``search``: the finest one it exists at).
    """

    rles: list[dict]
    areas: np.ndarray
    levels: np.ndarray
    parents: np.ndarray
    scores: np.ndarray
    thresholds: np.ndarray
    image_size: tuple[int, int]

    def __len__(self) -> int:
        return len(self.rles)

    @property
    def masks(self) -> np.ndarray:
        """(N, H, W) bool, decoded on every access: N·H·W bytes
        (:class:`~hassod.rle.RleMasks` decodes one at a time)."""
        return rle_to_masks(self.rles, self.image_size)

    def annotations(self) -> list[dict[str, Any]]:
        """Per-mask dicts for :class:`hassod.runs.ImageRecord` (RLE, xywh box)."""
        boxes = rle_boxes_xywh(self.rles)
        return [
            {
                "segmentation": rle,
                "bbox": [round(float(v), 2) for v in box],
                "area": int(area),
                "score": round(float(score), 4),
                "hier_level": int(level),
                "parent": int(parent),
                "threshold": float(threshold),
            }
            for rle, box, area, score, level, parent, threshold in zip(
                self.rles, boxes, self.areas, self.scores, self.levels, self.parents, self.thresholds
            )
        ]


def discover_masks(
    image: np.ndarray,
    features: np.ndarray,
    original_size: tuple[int, int],
    settings: DiscoverySettings,
    timings: dict[str, float] | None = None,
) -> Discovered:
    """Run stage 1 on one image.

    image: (S, S, 3) uint8, the image resized to the backbone input.
    features: (h, w, C) patch features of that image.
    original_size: (H, W) in pixels; masks are returned at this size.
    settings: must have ``thresholds`` set (see ``with_default_thresholds``).
    timings: if given, CPU seconds of the calling thread spent per stage
        ("merge", "crf_filters", "levels") are added to it (for benchmarks:
        per-core cost, not inflated by other processes on the machine).
    """
    if not settings.thresholds:
        raise ValueError("discover_masks needs settings.thresholds; use settings.with_default_thresholds()")
    thresholds = tuple(sorted(settings.thresholds, reverse=True))
    clock = StageClock(timings)
    partitions = hierarchical_merge(features, thresholds)
    clock.lap("merge")
    rles: list[dict] = []
    scores, origins = [], []
    for threshold, labels in zip(thresholds, partitions):
        refined = refine_partition(image, labels, settings.crf)
        kept, keep_index = postprocess_to_rles(refined.masks, original_size, settings.masks)
        rles += kept
        scores.append(refined.ious[keep_index])
        origins.append(np.full(len(kept), threshold))
    clock.lap("crf_filters")
    inter = rle_intersections(rles)
    keep = distinct_masks(inter, settings.duplicate_iou)
    parents = find_parents(inter[np.ix_(keep, keep)], settings.tau)
    clock.lap("levels")
    return Discovered(
        rles=[rles[i] for i in keep],
        areas=np.diagonal(inter)[keep].astype(np.int64),
        levels=levels_from_parents(parents),
        parents=parents,
        scores=np.concatenate(scores)[keep],
        thresholds=np.concatenate(origins)[keep],
        image_size=(int(original_size[0]), int(original_size[1])),
    )


class StageClock:
    """Adds the thread CPU seconds since the previous lap to ``timings[stage]`` (no-op without a dict)."""

    def __init__(self, timings: dict[str, float] | None):
        self.timings = timings
        self.last = time.thread_time()

    def lap(self, stage: str) -> None:
        if self.timings is None:
            return
        now = time.thread_time()
        self.timings[stage] = self.timings.get(stage, 0.0) + now - self.last
        self.last = now
