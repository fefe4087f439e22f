"""The ``search`` region recipe: every distinct region of the merge hierarchy, ranked, without the CRF.

An index needs boxes and pooled descriptors, not pixel-exact edges (docs/design.md §4, §8;
why: docs/benchmarks.md, "Search recipe").

- Input: (h, w, C) patch features of the image resized with its aspect kept
  (:meth:`SearchSettings.input_shape`, the descriptor's own input, so that an index
  build makes one forward per image), and the original (H, W) in pixels.
- A region is a set of patches, one region however many thresholds yield it (born at
  the finest). Its parent is the smallest strictly larger kept region containing it at
  a coarser threshold, so every mask lies inside its parent's. Levels follow depth (0
  whole, 1 part, 2+ subpart), counting only ancestors it fills less than ``level_share`` of.
- Masks are the patch masks upscaled bilinearly to (H, W) (threshold 0.5), which keeps nesting.
- ``min_patches`` and ``max_share`` are in patches of the grid; boxes out of
  :class:`~.pipeline.Discovered` are COCO xywh in original pixels.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, NamedTuple, Sequence

import numpy as np
from scipy import sparse

from .levels import levels_from_parents
from ..rle import rle_areas
from .masks import resized_rles
from .merge import hierarchical_merge
from .pipeline import Discovered, StageClock


@dataclass(frozen=True)
class SearchSettings:
    """Settings of the ``search`` recipe, with efficientnet_lite0 defaults chosen by box AR
    on COCO128 (figures: docs/benchmarks.md, "Search recipe settings").

    thresholds: merge thresholds (cosine), any order; ``None`` takes the
        backbone's ``search_thresholds`` (efficientnet_lite0: 0.8 to 0.3 in
        steps of 0.05: coarser steps lose recall, finer ones add a little for
        more merge time).
    input_size: the longer side in pixels of the backbone's input, aspect
        kept (:meth:`input_shape`); one scale: a second one raises recall but
        costs a second forward.
    min_patches: regions with fewer patches are dropped.
    max_share: regions covering more than this share of the grid are dropped.
    max_regions: at most this many regions per image, the best-scored kept:
        200 keeps most of the recall of all regions at a fraction of the index.
    contrast_weight: the score is sqrt(share of the grid) + this x the
        feature contrast with the surrounding ring (:func:`objectness`); 0.3
        ranked best of the weights tried.
    level_share: a region counts as a part of an ancestor only when it fills less than this
        share of it (:func:`element_parents`); 0.9 is stage 1's coverage τ.
    """

    thresholds: tuple[float, ...] | None = None
    input_size: int = 480
    min_patches: int = 2
    max_share: float = 0.95
    max_regions: int = 200
    level_share: float = 0.9
    contrast_weight: float = 0.3

    recipe = "search"

    def __post_init__(self) -> None:
        if self.min_patches < 1 or not 0.0 < self.max_share <= 1.0 or self.max_regions < 1:
            raise ValueError("search settings need min_patches >= 1, 0 < max_share <= 1 and max_regions >= 1")

    def as_dict(self) -> dict[str, Any]:
        return {"recipe": self.recipe, **asdict(self)}

    def with_default_thresholds(self, defaults: tuple[float, ...]) -> "SearchSettings":
        """These settings with ``thresholds`` filled from ``defaults`` if unset, sorted high to low."""
        return replace(self, thresholds=tuple(sorted(set(self.thresholds or defaults), reverse=True)))

    def for_backbone(self, backbone: Any) -> "SearchSettings":
        """These settings with unset thresholds taken from the backbone's ``search_thresholds``."""
        return self.with_default_thresholds(backbone.search_thresholds)

    def input_shape(self, height: int, width: int) -> tuple[int, int]:
        """Network input (h, w) in pixels for an H x W image: aspect kept, the longer side about
        ``input_size``, both sides multiples of 32 (the region descriptor's input, so that
        :mod:`indexer.regions` serves both from one forward)."""
        factor = self.input_size / max(height, width)
        return tuple(max(32, int(round(side * factor / 32)) * 32) for side in (height, width))

    def grid(self, backbone: Any, images: Sequence[np.ndarray]) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """(H, W, 3) uint8 images → (empty arrays: no CRF needs them, each image's (h, w, C) float32 patch
        features at :meth:`input_shape`), one forward per input shape."""
        shapes = [self.input_shape(*np.shape(image)[:2]) for image in images]
        features: list[np.ndarray] = [np.zeros(0)] * len(images)
        for shape in dict.fromkeys(shapes):
            members = [i for i, other in enumerate(shapes) if other == shape]
            batch = backbone.extract([images[i] for i in members], size=shape)  # (B, C, h, w)
            for i, grid in zip(members, batch.permute(0, 2, 3, 1).float().cpu().numpy()):
                features[i] = grid
        return [np.zeros((0, 0, 3), np.uint8)] * len(images), features

    def find(self, image: np.ndarray, features: np.ndarray, original_size: tuple[int, int],
             timings: dict[str, float] | None = None) -> Discovered:
        """Regions of one image (see :func:`search_masks`); ``image`` is unused (no CRF)."""
        return search_masks(features, original_size, self, timings)


class MergeRegions(NamedTuple):
    """The distinct regions of a stack of nested label maps.

    masks: (N, h, w) bool patch masks. birth / death: (N,) int64 index of the
    finest and the coarsest map holding the region. first: (N,) int64 raster
    index of its first patch. sizes: (N,) int64 patches. containers: (N, T)
    int64 index of the region holding the first patch in each map (a region
    contains its own first patch, so this is the region itself from birth to
    death).
    """

    masks: np.ndarray
    birth: np.ndarray
    death: np.ndarray
    first: np.ndarray
    sizes: np.ndarray
    containers: np.ndarray


def merge_regions(labels: np.ndarray) -> MergeRegions:
    """(T, h, w) int label maps, finest first, each map's regions unions of the previous map's
    (what :func:`~.merge.hierarchical_merge` returns) → its distinct regions, ordered by birth.

    Two regions of nested partitions are the same set of patches exactly when
    they share their first patch and their size, so that pair identifies a
    region across maps. Raises ValueError when the maps are not nested.
    """
    stack = np.asarray(labels)
    if stack.ndim != 3 or 0 in stack.shape:
        raise ValueError(f"labels must be a non-empty (T, h, w) stack, got shape {stack.shape}")
    count, n = stack.shape[0], stack.shape[1] * stack.shape[2]
    flat = np.stack([np.unique(level, return_inverse=True)[1].reshape(-1) for level in stack])
    for finer, coarser in zip(flat[:-1], flat[1:]):
        if len(np.unique(finer)) != len(np.unique(finer * n + coarser)):
            raise ValueError("label maps are not nested: a region of one map is split in the next")
    sizes = [np.bincount(level) for level in flat]
    firsts = [np.unique(level, return_index=True)[1] for level in flat]
    keys = np.concatenate([first * (n + 1) + size for first, size in zip(firsts, sizes)])
    levels = np.repeat(np.arange(count), [len(s) for s in sizes])
    unique, start, inverse = np.unique(keys, return_index=True, return_inverse=True)
    death = np.zeros(len(unique), np.int64)
    np.maximum.at(death, inverse, levels)
    order = np.lexsort((unique, levels[start]))  # by birth, then first patch
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    node = rank[inverse]  # region id of every (map, label)
    offsets = np.concatenate([[0], np.cumsum([len(s) for s in sizes])])
    first = unique[order] // (n + 1)
    containers = np.stack([node[offsets[t] + flat[t][first]] for t in range(count)], axis=1)
    birth = levels[start][order]
    masks = flat[birth] == flat[birth, first][:, None]
    return MergeRegions(masks.reshape(-1, *stack.shape[1:]), birth, death[order], first,
                        unique[order] % (n + 1), containers)


def merge_parents(regions: MergeRegions, kept: np.ndarray) -> np.ndarray:
    """(K,) indices of kept regions → (K,) int64 parent positions in ``kept`` (-1 for roots).

    A region's parent is the smallest strictly larger kept region containing
    it: the container in the first coarser map that is strictly larger and kept.
    """
    kept = np.asarray(kept, dtype=np.int64)
    position = np.full(len(regions.sizes), -1, np.int64)
    position[kept] = np.arange(len(kept))
    candidates = regions.containers[kept]  # (K, T)
    valid = (regions.sizes[candidates] > regions.sizes[kept][:, None]) & (position[candidates] >= 0)
    chosen = candidates[np.arange(len(kept)), valid.argmax(axis=1)]
    return np.where(valid.any(axis=1), position[chosen], -1)


def element_parents(parents: np.ndarray, sizes: np.ndarray, share: float) -> np.ndarray:
    """(K,) merge parents and sizes → (K,) each region's nearest ancestor that it fills less than
    ``share`` of (-1: none), the links that count for its level.

    Dense thresholds grow a region by a few patches from one to the next; a region that is most of
    its parent is the same element of the scene, as stage 1's coverage rule says at τ = 0.9 (a mask
    covered by another that it covers back at τ is no part of it). Without this, levels by depth
    made nearly every region a subpart.
    """
    ancestors = np.asarray(parents, dtype=np.int64).copy()
    for _ in range(len(ancestors)):
        near = (ancestors >= 0) & (sizes >= share * sizes[np.maximum(ancestors, 0)])
        if not near.any():
            break
        ancestors[near] = parents[ancestors[near]]
    return ancestors


def objectness(masks: np.ndarray, features: np.ndarray, contrast_weight: float) -> np.ndarray:
    """(N, h, w) bool patch masks → (N,) score: sqrt(share of the grid) + ``contrast_weight`` x
    :func:`ring_contrast`. features: the (h, w, C) patch features the regions were merged from."""
    share = np.count_nonzero(masks.reshape(len(masks), -1), axis=1) / float(masks.shape[1] * masks.shape[2])
    return np.sqrt(share) + contrast_weight * ring_contrast(masks, features)


def ring_contrast(masks: np.ndarray, features: np.ndarray) -> np.ndarray:
    """(N, h, w) bool patch masks and (h, w, C) features → (N,) 1 - cosine of the summed features of each
    region and of its ring (the patches 4-adjacent to it); 0 for a region without a ring.

    The masks of nested partitions hold few patches in all (at most T·h·w for
    T maps), so the sums are sparse products.
    """
    count = len(masks)
    if count == 0:
        return np.zeros(0)
    grown = masks.copy()
    grown[:, 1:] |= masks[:, :-1]
    grown[:, :-1] |= masks[:, 1:]
    grown[:, :, 1:] |= masks[:, :, :-1]
    grown[:, :, :-1] |= masks[:, :, 1:]
    ring = (grown & ~masks).reshape(count, -1)
    flat = np.asarray(features, dtype=np.float32).reshape(ring.shape[1], -1)
    inside = sparse.csr_matrix(masks.reshape(count, -1), dtype=np.float32) @ flat
    around = sparse.csr_matrix(ring, dtype=np.float32) @ flat
    norms = np.linalg.norm(inside, axis=1) * np.linalg.norm(around, axis=1)
    cosine = np.einsum("ij,ij->i", inside, around) / np.maximum(norms, 1e-12)
    return np.where(ring.any(axis=1), 1.0 - cosine, 0.0)


def search_masks(
    features: np.ndarray,
    original_size: tuple[int, int],
    settings: SearchSettings,
    timings: dict[str, float] | None = None,
) -> Discovered:
    """The ``search`` recipe on one image's (h, w, C) patch features; masks at ``original_size`` (H, W).

    ``settings.thresholds`` must be set (see ``with_default_thresholds``);
    ``timings`` as in :func:`~.pipeline.discover_masks` (stages "merge", "regions").
    """
    if not settings.thresholds:
        raise ValueError("search_masks needs settings.thresholds; use settings.with_default_thresholds()")
    thresholds = np.sort(np.asarray(settings.thresholds, dtype=np.float64))[::-1]
    clock = StageClock(timings)
    regions = merge_regions(hierarchical_merge(features, thresholds))
    clock.lap("merge")
    grid = regions.masks.shape[1] * regions.masks.shape[2]
    eligible = np.flatnonzero((regions.sizes >= settings.min_patches) & (regions.sizes <= settings.max_share * grid))
    scores = np.zeros(len(regions.sizes))
    scores[eligible] = objectness(regions.masks[eligible], features, settings.contrast_weight)
    kept = np.sort(eligible[np.argsort(-scores[eligible], kind="stable")[: settings.max_regions]])
    rles = resized_rles(regions.masks[kept], original_size)
    areas = rle_areas(rles)
    present = np.flatnonzero(areas > 0)  # a region can vanish only when the image is smaller than the grid
    kept, rles, areas = kept[present], [rles[i] for i in present], areas[present]
    parents = merge_parents(regions, kept)
    clock.lap("regions")
    return Discovered(
        rles=rles,
        areas=areas,
        levels=levels_from_parents(element_parents(parents, areas, settings.level_share)),
        parents=parents,
        scores=scores[kept],
        thresholds=thresholds[regions.birth[kept]],
        image_size=(int(original_size[0]), int(original_size[1])),
    )

