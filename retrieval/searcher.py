"""Answering "where does this appear?" over an index: the library API behind `hassod search`.

>>> searcher = Searcher("my_index")  # or Searcher(Index.open("my_index"))
>>> for match in searcher.search("query.jpg", box=(120, 40, 260, 180), level="part", k=10):
...     print(match.path, match.score, match.box, match.level_name)

A query box is described by the same function as the indexed regions, so a
crop of an indexed region finds that region first. Results are images, each
with its best-matching region; with ``level`` only regions of that level are
searched (through a FAISS id filter, so k images come back whenever k exist).
Without a box the whole image is a multi-instance query: its own regions are
found by the index's region source, each searches the index, and every image
found scores the mean over query regions of its best match among all its
regions (computed from its stored vectors, so a score does not depend on k).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np

from hassod.errors import UserError
from hassod.images import DEFAULT_MAX_PIXELS, load_rgb
from hassod.runs import LEVEL_NAMES
from indexer.catalog import Catalog
from indexer.index import Index, IndexConfig
from indexer.vectors import VectorStore

# torch, the backbone and the descriptors are imported when the first image
# query needs them: seconds that a query by region id does without
# (docs/benchmarks.md, "Catalog and query service").
if TYPE_CHECKING:
    from hassod.features import Backbone
    from indexer.descriptors import RegionDescriber
    from indexer.regions import DetectorRegions, DiscoveryRegions, Region

# Region candidates fetched per wanted image on the first try; doubled until
# k distinct images are found or the (allowed) regions are exhausted.
_CANDIDATES_PER_IMAGE = 8

# Similarities within this of an image's best count as tied when choosing the region to show.
_SHOWN_TIE = 1e-4


class QueryError(UserError, ValueError):
    """A query that cannot be answered as asked (bad box, unreadable image, unknown level)."""


@dataclass(frozen=True)
class Match:
    """One result image with its best region. box: xyxy pixels of the result image; score: cosine."""

    path: str
    image_id: int
    region_id: int
    score: float
    box: tuple[float, float, float, float]
    level: int

    @property
    def level_name(self) -> str:
        return LEVEL_NAMES[self.level]


class Searcher:
    """Queries an index built by `hassod index build`.

    Args:
        index: a built :class:`~indexer.index.Index`, or its directory (opened with :meth:`Index.open`).
        device: where the backbone runs (``None``: CUDA if present).
        weights: backbone weight file, needed when the index was built with an
            explicit ``--weights``; it must be the same file (checked by hash).
        backbone: an already loaded backbone to use instead (checked the same way).
        detector: where the index's detector checkpoint is now, if it has moved
            since the build (only whole-image queries need it).
        load_backbone: load and check the backbone now (a wrong ``weights`` is
            reported here); False defers that to the first image query, for a
            caller that only queries by region id.
    """

    def __init__(
        self,
        index: Index | str | os.PathLike,
        device: str | None = None,
        weights: str | None = None,
        backbone: Backbone | None = None,
        detector: str | os.PathLike | None = None,
        load_backbone: bool = True,
    ):
        self.index = index if isinstance(index, Index) else Index.open(index)
        self.index.check_built()
        self._backbone, self._weights, self._device, self._detector = backbone, weights, device, detector
        self._describer: RegionDescriber | None = None
        if load_backbone:
            self._describer = self._load_describer()
        self.index.whitening  # a damaged whitening file is reported now, not at the first query
        self._filters: dict[int, object] = {}
        self._query_source: DiscoveryRegions | DetectorRegions | None = None

    @property
    def config(self) -> IndexConfig:
        return self.index.config

    @property
    def catalog(self) -> Catalog:
        return self.index.catalog

    @property
    def store(self) -> VectorStore:
        return self.index.vectors

    @property
    def describer(self) -> RegionDescriber:
        """The index's region describer on its backbone, loaded and checked on first use."""
        if self._describer is None:
            self._describer = self._load_describer()
        return self._describer

    def _load_describer(self) -> RegionDescriber:
        from hassod.device import resolve_device
        from hassod.features import build_backbone

        backbone = self._backbone
        if backbone is None:
            backbone = build_backbone(self.config.backbone, weights=self._weights, device=resolve_device(self._device))
        return self.config.describer(backbone)

    def close(self) -> None:
        self.index.close()

    def refresh(self) -> bool:
        """Reload the vectors if a build has replaced them since they were loaded; True when it did.

        For a long-lived searcher (`hassod serve`) next to later `hassod index
        build` runs: the catalog is read live, the vectors through
        :meth:`Index.refresh_vectors`.
        """
        if not self.index.refresh_vectors():
            return False
        self._filters.clear()
        return True

    def search(
        self,
        image: str | os.PathLike | np.ndarray,
        box: Sequence[float] | None = None,
        level: str | int | None = None,
        k: int = 10,
    ) -> list[Match]:
        """Best k images for ``box`` (xyxy pixels) of ``image``, or for the whole image when ``box`` is None."""
        pixels = load_query(image)
        level_id = _level_id(level)
        if box is not None:
            query = self.describer.describe_query(pixels, check_box(box, pixels.shape[:2]))
            return self._rank(self._project(query[None]), level_id, k)
        return self._rank(self._image_regions(pixels), level_id, k)

    def search_region(self, region_id: int, level: str | int | None = None, k: int = 10) -> list[Match]:
        """Best k images for an indexed region (its stored vector is the query)."""
        # Ids are int64 (FAISS ids): an integer beyond that range names no region.
        if not -(2**63) <= region_id < 2**63 or not self.store.contains(np.asarray([region_id], dtype=np.int64))[0]:
            raise QueryError(f"no region {region_id} in this index")
        return self._rank(self.store.reconstruct(np.asarray([region_id], dtype=np.int64)), _level_id(level), k)

    def search_vector(self, vector: np.ndarray, level: str | int | None = None, k: int = 10) -> list[Match]:
        """Best k images for a descriptor already in the index's space (a row of :meth:`query_regions`)."""
        return self._rank(np.asarray(vector, dtype=np.float32).reshape(1, -1), _level_id(level), k)

    def query_regions(self, image: str | os.PathLike | np.ndarray) -> tuple[list[Region], np.ndarray]:
        """The image's own regions, found as the index found its regions, and their (N, index dim)
        descriptors, described as the build describes regions (with their masks)."""
        pixels = load_query(image)
        found = self._find_regions(pixels)
        if not found:
            return [], np.zeros((0, self.store.dim), dtype=np.float32)
        fmap = self.describer.feature_map([pixels])[0]
        boxes = np.asarray([r.box for r in found], dtype=np.float64)
        return found, self._project(self.describer.describe(fmap, boxes, masks=[r.mask_rle for r in found]))

    def _image_regions(self, pixels: np.ndarray) -> np.ndarray:
        """(Q, dim) descriptors of the query image's own regions plus the whole image."""
        found = self._find_regions(pixels)
        fmap = self.describer.feature_map([pixels])[0]
        boxes = np.asarray([fmap.whole_box] + [r.box for r in found], dtype=np.float64)
        return self._project(self.describer.describe(fmap, boxes))

    def _find_regions(self, pixels: np.ndarray) -> list[Region]:
        """The regions of a query image, found as the index's were: the same discovery recipe
        (``paper`` for indexes that record none) and settings, or the same detector checkpoint and options."""
        if self._query_source is None:
            # Imported here: discovery and the detector are slow to import, and box
            # queries (most of `hassod search`'s calls) never need them.
            from hassod.model import CheckpointError
            from indexer.regions import QuerySourceError, query_regions

            try:
                self._query_source = query_regions(self.config.query_regions, self.describer.backbone,
                                                   self._detector, self._device)
            except (QuerySourceError, CheckpointError) as exc:
                raise QueryError(str(exc)) from None
        return self._query_source.regions_of_image(pixels)

    def _project(self, vectors: np.ndarray) -> np.ndarray:
        """(Q, descriptor dim) → (Q, index dim): the index's whitening, if it has one."""
        whitening = self.index.whitening
        return vectors if whitening is None else whitening.transform(vectors)

    def _allowed(self, level: int | None):
        if level is None:
            return None
        if level not in self._filters:
            self._filters[level] = self.store.make_filter(self.catalog.region_ids(level))
        return self._filters[level]

    def _rank(self, queries: np.ndarray, level: int | None, k: int) -> list[Match]:
        """Images ranked by the mean over query rows of their best region's similarity."""
        if k < 1:
            raise QueryError("k must be at least 1")
        allowed = self._allowed(level)
        available = len(self.store) if level is None else len(self.catalog.region_ids(level))
        wanted = min(max(k * _CANDIDATES_PER_IMAGE, 32), max(available, 1))
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        while True:
            scores, ids = self.store.search(queries, wanted, allowed)
            if len(queries) == 1:
                best = self._best_per_image(scores[0], ids[0])
                found = len(best)
            else:  # only the candidate images matter here: _rescore scores them
                candidates = self.catalog.image_ids_of_regions(ids[ids >= 0])
                found = len(candidates)
            if found >= k or wanted >= available:
                break
            wanted = min(wanted * 4, available)
        if len(queries) > 1:
            best = self._rescore(queries, candidates, level)
        ranked = sorted(best.values(), key=lambda m: (-m.score, m.image_id))
        return ranked[:k]

    def _rescore(self, queries: np.ndarray, image_ids: Sequence[int], level: int | None) -> dict[int, Match]:
        """Exact scores of candidate images for a multi-row (Q, dim) float32 query: the mean over
        rows of the best similarity among all the image's (allowed) regions.

        The nearest-neighbour lists only see each row's top regions, so an
        image missing from one row's list would score 0 there, and the total
        would depend on how deep the lists went (on k). Cost: one product of
        the rows with the candidates' stored vectors, whose reconstruction
        reads the whole id map of IVF indexes (VectorStore.reconstruct).
        """
        region_ids, owners = self.catalog.region_ids_of_images(image_ids, level)
        stored = self.store.contains(region_ids)
        region_ids, owners = region_ids[stored], owners[stored]
        if region_ids.size == 0:
            return {}
        similarities = queries @ self.store.reconstruct(region_ids).T
        starts = np.flatnonzero(np.r_[True, owners[1:] != owners[:-1]])
        scores = np.maximum.reduceat(similarities, starts, axis=1).mean(axis=0)
        # An image's shown region: its single best match to any query row. Near-ties (the query's own
        # image, or a duplicate, matches many regions at ~1.0) go to the region most like the query as
        # a whole (highest mean over rows), not to whichever float rounding favoured.
        row_best, row_mean = similarities.max(axis=0), similarities.mean(axis=0)
        ends = np.r_[starts[1:], owners.size]
        chosen = []
        for a, b in zip(starts, ends):
            near = a + np.flatnonzero(row_best[a:b] >= row_best[a:b].max() - _SHOWN_TIE)
            chosen.append(int(region_ids[near[np.argmax(row_mean[near])]]))
        records = self.catalog.region_places(chosen)
        images = self.catalog.images_by_id(owners[starts].tolist())
        return {
            int(image_id): Match(images[image_id].path, int(image_id), region_id, float(score),
                                 tuple(records[region_id].box), records[region_id].level)
            for image_id, region_id, score in zip(owners[starts].tolist(), chosen, scores)
        }

    def _best_per_image(self, scores: np.ndarray, ids: np.ndarray) -> dict[int, Match]:
        """One query row's hits, best first ((k,) scores and region ids, -1
        padded) → each image's best region."""
        valid = ids >= 0
        scores, ids = scores[valid], ids[valid]
        records = self.catalog.region_places(ids.tolist())
        images = self.catalog.images_by_id({r.image_id for r in records.values()})
        matches: dict[int, Match] = {}
        for score, region_id in zip(scores, ids.tolist()):
            record = records.get(region_id)
            if record is not None and record.image_id not in matches:
                matches[record.image_id] = Match(images[record.image_id].path, record.image_id, record.id,
                                                 float(score), tuple(record.box), record.level)
        return matches


def load_query(image: str | os.PathLike | np.ndarray, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """The query as (H, W, 3) uint8 RGB, or :class:`QueryError` (unreadable, not an image, over ``max_pixels``)."""
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise QueryError(f"query image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
        return image
    from hassod.images import ImageError

    try:
        return load_rgb(image, max_pixels)
    except (ImageError, FileNotFoundError) as exc:
        raise QueryError(f"query image {image}: {exc}") from None


def _level_id(level: str | int | None) -> int | None:
    if level is None:
        return None
    if isinstance(level, str):
        if level not in LEVEL_NAMES:
            raise QueryError(f"unknown level {level!r}; choose one of {', '.join(LEVEL_NAMES)}")
        return LEVEL_NAMES.index(level)
    if level not in (0, 1, 2):
        raise QueryError(f"level must be 0, 1 or 2, got {level}")
    return int(level)


def parse_box(text: str) -> tuple[float, float, float, float]:
    """"x0,y0,x1,y1" (pixels) → four floats, or :class:`QueryError` saying what is wrong."""
    try:
        box = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise QueryError(f"expected x0,y0,x1,y1 in pixels, got {text!r}") from None
    if len(box) != 4:
        raise QueryError(f"expected 4 numbers x0,y0,x1,y1, got {len(box)}")
    return box  # type: ignore[return-value]


def check_box(box: Sequence[float], size: tuple[int, int]) -> np.ndarray:
    """The box as a (4,) float array, or :class:`QueryError` when it is malformed or not inside the image."""
    height, width = size
    values = np.asarray(box, dtype=np.float64).reshape(-1)
    if values.shape != (4,) or not np.isfinite(values).all():
        raise QueryError(f"box must be four numbers x0,y0,x1,y1, got {list(box)}")
    x0, y0, x1, y1 = values
    if x1 <= x0 or y1 <= y0:
        raise QueryError(f"box {x0:g},{y0:g},{x1:g},{y1:g} is empty: need x1 > x0 and y1 > y0")
    limits = ((f"x0 {x0:g} < 0", x0 < 0), (f"y0 {y0:g} < 0", y0 < 0),
              (f"x1 {x1:g} > width {width}", x1 > width), (f"y1 {y1:g} > height {height}", y1 > height))
    off = ", ".join(text for text, crossed in limits if crossed)
    if off:
        raise QueryError(f"box {x0:g},{y0:g},{x1:g},{y1:g} is not inside the {width}x{height} query image ({off})")
    return values
