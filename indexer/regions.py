"""Where an index's regions come from, behind one interface.

A region source turns image files into regions: box, mask, score, level
(whole / part / subpart) and parent. Three sources exist: stage-1
discovery (training-free, the default; by the ``search`` recipe unless told
``paper``, see :mod:`hassod.discover.recipes`), a trained stage-2 detector
checkpoint, and a COCO file of regions made earlier. The build asks only for :meth:`RegionSource.regions` and
:attr:`RegionSource.identity`, so a new source plugs in without changes there.
"""
from __future__ import annotations

import os

import hashlib
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Protocol, Sequence

import numpy as np

from hassod.detect import DetectOptions, Detector
from hassod.discover.collection import discover_records
from hassod.discover.recipes import RegionRecipe, settings_from_dict
from hassod.discover.search import SearchSettings
from hassod.features import Backbone
from hassod.errors import UserError
from hassod.images import DEFAULT_MAX_PIXELS, ImageError, load_rgb
from hassod.rle import segmentation_rle

from .descriptors import GRID_LAYER, FeatureMap, RegionDescriber, default_settings


@dataclass(frozen=True)
class Region:
    """One region of an image, in original image pixels.

    box: (x0, y0, x1, y1), xyxy. parent: index of the parent region in the
    same image's list, -1 for roots. mask_rle: COCO RLE with str counts.
    """

    box: tuple[float, float, float, float]
    score: float
    level: int
    parent: int
    area: int
    mask_rle: dict[str, Any]


@dataclass
class ImageRegions:
    """The regions of one file, or why it has none.

    image: the decoded (H, W, 3) uint8 original, handed on so that the
    descriptor step does not decode the file again; ``None`` with ``error``.
    feature_map: the image's :class:`~indexer.descriptors.FeatureMap` when
    the source ran the descriptor's forward itself (the search recipe), made
    by the describer named ``described_by``: the build describes from it
    instead of running the backbone again.
    """

    path: str
    image: np.ndarray | None
    regions: list[Region]
    error: str | None = None
    feature_map: FeatureMap | None = None
    described_by: str | None = None


class RegionSource(Protocol):
    identity: str  # recorded in the index configuration, e.g. "discovery:efficientnet_lite0:0.6,0.5,0.4"
    # JSON-ready: how a whole-image query finds its own regions the same way (see query_regions).
    query_settings: dict[str, Any]
    recipe: str | None  # the discovery recipe ("paper", "search"), None for regions from elsewhere

    def regions(self, paths: Sequence[str]) -> Iterator[ImageRegions]:
        """Regions of every path, yielded as each image finishes (any order)."""
        ...


class DiscoveryRegions:
    """Regions from stage-1 discovery: no training, works on any collection at once.

    settings: the recipe, :class:`~hassod.discover.search.SearchSettings`
    (the default) or :class:`~hassod.discover.pipeline.DiscoverySettings`
    (``paper``). The identity of a ``paper`` source is what indexes recorded
    before recipes existed, so those indexes update as before.

    The search recipe runs in this process on the region descriptor's
    forward (its input is the descriptor's, :meth:`SearchSettings.input_shape`):
    the grid and the descriptor layers come from one pass through the
    network, and each image's feature map goes on to the build with its
    regions. The paper recipe runs in ``workers`` processes (its CRF).
    """

    def __init__(
        self,
        backbone: Backbone,
        settings: RegionRecipe | None = None,
        workers: int = 1,
        batch_size: int = 8,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ):
        self.backbone = backbone
        self.settings = (settings or SearchSettings()).for_backbone(backbone)
        self.recipe = self.settings.recipe
        self.workers, self.batch_size, self.max_pixels = workers, batch_size, max_pixels
        descriptor = replace(default_settings(backbone), long_side=self.settings.input_size, size_multiple=32)
        self.describer = RegionDescriber(backbone, descriptor)
        thresholds = ",".join(f"{t:g}" for t in self.settings.thresholds)
        self.query_settings = discovery_query_settings(self.settings)
        if self.recipe == "paper":
            self.identity = f"discovery:{backbone.name}:{backbone.weights_id}:{thresholds}"
        else:
            digest = hashlib.sha256(json.dumps(self.settings.as_dict(), sort_keys=True).encode()).hexdigest()[:8]
            self.identity = f"{self.recipe}:{backbone.name}:{backbone.weights_id}:{thresholds}:{digest}"

    def regions(self, paths: Sequence[str]) -> Iterator[ImageRegions]:
        if self.recipe == "search":
            yield from self._search_regions(paths)
            return
        records = discover_records(
            paths, self.backbone, self.settings, self.workers, self.batch_size, max_pixels=self.max_pixels
        )
        for record, image in records:
            if record.error is not None:
                yield ImageRegions(record.path, None, [], record.error)
                continue
            yield ImageRegions(record.path, image, [_from_annotation(a) for a in record.annotations])

    def _search_regions(self, paths: Sequence[str]) -> Iterator[ImageRegions]:
        """The search recipe, ``batch_size`` images per forward of the descriptor's network."""
        for start in range(0, len(paths), self.batch_size):
            loaded, images = [], []
            for path in paths[start:start + self.batch_size]:
                try:
                    images.append(load_rgb(path, self.max_pixels))
                    loaded.append(path)
                except ImageError as exc:
                    yield ImageRegions(path, None, [], str(exc))
            if not images:
                continue
            for path, image, fmap in zip(loaded, images, self.describer.feature_map(images, grid=True)):
                yield ImageRegions(path, image, self._found(image, fmap), feature_map=fmap,
                                   described_by=self.describer.name)

    def _found(self, image: np.ndarray, fmap: FeatureMap) -> list[Region]:
        """The search recipe's regions on the grid layer of ``fmap``, which is taken out of it."""
        fmap.strides.pop(GRID_LAYER, None)
        features = fmap.layers.pop(GRID_LAYER).permute(1, 2, 0).float().cpu().numpy()
        found = self.settings.find(image, features, image.shape[:2])
        return [_from_annotation(a) for a in found.annotations()]

    def regions_of_image(self, image: np.ndarray) -> list[Region]:
        """Regions of one in-memory (H, W, 3) uint8 image (a query), computed in this process."""
        if self.recipe == "search":
            return self._found(image, self.describer.feature_map([image], grid=True)[0])
        small, grid = self.settings.grid(self.backbone, [image])
        found = self.settings.find(small[0], grid[0], image.shape[:2])
        return [_from_annotation(a) for a in found.annotations()]


def _from_annotation(ann: dict[str, Any]) -> Region:
    x, y, w, h = ann["bbox"]
    return Region(
        box=(float(x), float(y), float(x + w), float(y + h)),
        score=float(ann["score"]),
        level=int(ann["hier_level"]),
        parent=int(ann["parent"]),
        area=int(ann["area"]),
        mask_rle=ann["segmentation"],
    )


def discovery_query_settings(settings: RegionRecipe) -> dict[str, Any]:
    """What an index records (``query_regions``) to find a query image's regions by discovery with
    ``settings``: all of the search recipe's settings, the paper recipe's thresholds."""
    if settings.recipe == "paper":
        return {"kind": "discovery", "recipe": "paper", "thresholds": list(settings.thresholds)}
    return {"kind": "discovery", **settings.as_dict()}


class CocoRegions:
    """Regions read from a COCO file: the output of `hassod discover`, or any detections with masks.

    Images are matched by path: ``file_name`` relative to the file's
    ``info.root`` (what `hassod discover` writes), else to the JSON's folder.
    Levels and parents come from ``hier_level`` / ``parent_id`` when present
    (else every region is a whole); polygon segmentations are converted to RLE.

    A query image is not in the file: its regions are discovered, with the
    settings ``info.discovery`` records when the file was discovered with
    ``backbone`` (same name and weights), else by the paper recipe at the
    backbone's default thresholds.
    """

    def __init__(self, coco_json: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS, backbone: Backbone | None = None):
        path = Path(coco_json)
        raw = path.read_bytes()
        data = _read_coco(raw, path)
        info = data.get("info") if isinstance(data.get("info"), dict) else {}
        root = Path(info.get("root") or path.parent)
        anns_by_image: dict[int, list[dict[str, Any]]] = {}
        for ann in data.get("annotations", []):
            anns_by_image.setdefault(ann["image_id"], []).append(ann)
        self.entries = {
            str((root / image["file_name"]).resolve()): (image, anns_by_image.get(image["id"], []))
            for image in data.get("images", [])
        }
        self.max_pixels = max_pixels
        self.source = path
        self.identity = f"coco:{hashlib.sha256(raw).hexdigest()[:16]}"
        self.recipe = None
        self.query_settings: dict[str, Any] = {"kind": "discovery", "thresholds": None}
        discovered_here = backbone is not None and (info.get("backbone"), info.get("weights")) == (
            backbone.name, backbone.weights_id)
        if discovered_here and isinstance(info.get("discovery"), dict):
            settings = settings_from_dict(info["discovery"]).for_backbone(backbone)
            self.query_settings = discovery_query_settings(settings)

    def regions(self, paths: Sequence[str]) -> Iterator[ImageRegions]:
        for path in paths:
            entry = self.entries.get(os.path.realpath(path))
            if entry is None:
                yield ImageRegions(path, None, [], f"no entry for this file in {self.source}")
                continue
            try:
                image = load_rgb(path, self.max_pixels)
            except ImageError as exc:
                yield ImageRegions(path, None, [], str(exc))
                continue
            yield ImageRegions(path, image, _coco_regions(entry[1], image.shape[:2]))


class RegionsFileError(UserError, ValueError):
    """A regions file that is not a COCO file of images and annotations with masks."""


_IMAGE_KEYS = ("id", "file_name")
_ANNOTATION_KEYS = ("id", "image_id", "bbox", "area", "segmentation")


def _read_coco(raw: bytes, path: Path) -> dict[str, Any]:
    """The parsed COCO file, checked up front so that a bad file fails before any image is indexed."""
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RegionsFileError(f"{path} is not a JSON file ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise RegionsFileError(f"{path} is not a COCO file: it has no 'images' list")
    for kind, keys in (("images", _IMAGE_KEYS), ("annotations", _ANNOTATION_KEYS)):
        for i, item in enumerate(data.get(kind, [])):
            missing = [k for k in keys if not isinstance(item, dict) or k not in item]
            if missing:
                raise RegionsFileError(f"{path}: {kind}[{i}] has no {', '.join(missing)}")
    return data


def _coco_regions(anns: list[dict[str, Any]], size: tuple[int, int]) -> list[Region]:
    position = {ann["id"]: i for i, ann in enumerate(anns)}
    regions = []
    for ann in anns:
        rle = segmentation_rle(ann["segmentation"], *size)  # polygons, uncompressed or compressed RLE
        rle = {"size": list(rle["size"]), "counts": rle["counts"].decode()}
        parent = ann.get("parent_id")
        regions.append(_from_annotation({
            **ann,
            "segmentation": rle,
            "score": ann.get("score", 1.0),
            "hier_level": ann.get("hier_level", 0),
            "parent": position.get(parent, -1) if parent is not None else -1,
        }))
    return regions


class DetectorRegions:
    """Regions from a trained stage-2 detector, through :class:`hassod.detect.Detector` (the same path as
    `hassod detect`): box, mask, score, predicted level, and parent by the coverage rule among the kept detections.

    The identity names the checkpoint by content hash, its weights (student
    or teacher) and the detection options, so an index refuses regions from
    another checkpoint.
    """

    def __init__(
        self,
        checkpoint: str | Path,
        device: str | None = "auto",
        options: DetectOptions | None = None,
        batch_size: int = 2,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        use: str = "student",
    ):
        self.detector = Detector(checkpoint, device=device, options=options, use=use)
        self.batch_size, self.max_pixels = batch_size, max_pixels
        self.identity = self.detector.identity
        self.recipe = None
        self.query_settings = {"kind": "detector", "checkpoint": str(Path(checkpoint).resolve()),
                               "digest": self.detector.digest, "options": asdict(self.detector.options), "use": use}

    def regions(self, paths: Sequence[str]) -> Iterator[ImageRegions]:
        for path, image, found, error in self.detector.detect_paths(paths, self.batch_size, self.max_pixels):
            if found is None:
                yield ImageRegions(path, None, [], error)
                continue
            yield ImageRegions(path, image, [_from_annotation(a) for a in found.annotations()])

    def regions_of_image(self, image: np.ndarray) -> list[Region]:
        """Regions of one in-memory (H, W, 3) uint8 image (a query)."""
        return [_from_annotation(a) for a in self.detector.detect([image])[0].annotations()]


def detector_regions(
    checkpoint: str | Path,
    device: str | None = "auto",
    batch_size: int = 2,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    use: str = "student",
) -> RegionSource:
    """Regions from a trained stage-2 detector checkpoint (``hassod index build --detector``), its
    student or its teacher weights (``use``).

    Raises ``hassod.model.CheckpointError`` for a file that is not a detector checkpoint.
    """
    return DetectorRegions(checkpoint, device=device, batch_size=batch_size, max_pixels=max_pixels, use=use)


class QuerySourceError(UserError, ValueError):
    """The regions of a whole-image query cannot be found the way the index found its own; ``str()`` says why."""


def query_regions(
    settings: dict[str, Any] | None, backbone: Backbone, detector: str | Path | None = None, device: str | None = None
) -> DiscoveryRegions | DetectorRegions:
    """The region source that finds a query image's regions the way the index's were found.

    settings: the index's ``query_regions`` configuration (a source's
    ``query_settings``): discovery by the recipe it names, ``paper`` when it
    names none (indexes from before recipes); None (indexes from before it
    was recorded) means ``paper`` with the backbone's default thresholds. detector: where the
    index's detector checkpoint is now, when it has moved since the build;
    it must be the same file (checked by content hash).
    """
    settings = settings or {"kind": "discovery", "thresholds": None}
    if settings["kind"] == "discovery":
        return DiscoveryRegions(backbone, settings_from_dict({k: v for k, v in settings.items() if k != "kind"}))
    path = Path(detector or settings["checkpoint"])
    if not path.is_file():
        raise QuerySourceError(
            f"this index's regions come from the detector checkpoint {settings['checkpoint']}, which is not there; "
            "pass --detector PATH to where it is now (whole-image queries need it)")
    source = DetectorRegions(path, device=device, options=DetectOptions(**settings["options"]),
                             use=settings.get("use", "student"))
    if source.detector.digest != settings["digest"]:
        raise QuerySourceError(
            f"{path} is not the detector this index was built with (checkpoint {settings['digest']})")
    return source
