"""Training data: the stage-1 pseudo-labels as detector targets, with seeded augmentation.

Input: the COCO file `hassod discover` writes (RLE masks, ``bbox`` xywh in pixels,
``hier_level``, ``parent_id``; ``info.root`` is the folder the ``file_name`` paths
are relative to). Each item is an image tensor (3, H, W) float32 in [0, 1] and the
detector's target dict: ``boxes`` (N, 4) float32 xyxy pixels, ``labels`` (N,) int64
ones, ``masks`` (N, H, W) uint8, ``levels`` (N,) int64 (0 whole, 1 part, 2 subpart).

:class:`IndexStream` yields, for every step, the keys ``(step, slot, index)`` of
that step's batch, and all randomness of an item comes from a generator seeded by
``(seed, step, slot, index)``: step *k*'s data is the same whether or not the run
was interrupted before it, and with any number of loader workers. Multi-scale
resizing is the detector's own transform; here images whose longest edge exceeds
``max_size`` are only scaled down, to bound the memory of decoded masks.
"""
from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from pycocotools import mask as mask_utils

from ..errors import UserError
from ..images import DEFAULT_MAX_PIXELS, ImageError, load_rgb, resize_image
from ..rle import segmentation_rle
from .views import StrongAugmentation, strong_view

Key = tuple[int, int, int]  # (step, slot in the global batch, dataset index)


class PseudoLabelError(UserError, ValueError):
    """The pseudo-label file cannot be used for training; ``str()`` is a one-line reason."""


@dataclass(frozen=True)
class Augmentation:
    """What the dataset does to each training image.

    flip_prob: chance of a horizontal flip. copy_paste_prob: chance that
    objects of another training image are pasted on this one (CutLER pastes
    on every image, rate 1.0). paste_scale: (low, high) range of the pasted
    object's scale relative to its original size, CutLER's 0.5–1.0.
    max_pasted: at most this many whole objects (each with its parts) pasted
    per image. min_visible: a target occluded below this fraction of its
    area is dropped; min_area: and any target below this many pixels.
    max_size: longest image edge in pixels kept before the model's transform.
    """

    flip_prob: float = 0.5
    copy_paste_prob: float = 0.5
    paste_scale: tuple[float, float] = (0.5, 1.0)
    max_pasted: int = 3
    min_visible: float = 0.2
    min_area: int = 8
    max_size: int = 1333


@dataclass
class ObjectSet:
    """An image and its objects while augmenting (numpy, unbatched).

    image: (H, W, 3) uint8. masks: (N, H, W) bool. levels: (N,) int64.
    parents: (N,) int64 index into this set or -1. full_area: (N,) int64,
    each mask's area before any occlusion by pasted objects (pixels).
    """

    image: np.ndarray
    masks: np.ndarray
    levels: np.ndarray
    parents: np.ndarray
    full_area: np.ndarray


@dataclass
class Sample:
    """One loaded item: tensors for the model, or the reason it was skipped."""

    key: Key
    file_name: str
    image: torch.Tensor | None = None
    target: dict[str, torch.Tensor] | None = None
    error: str | None = None
    strong: torch.Tensor | None = None


@dataclass
class Batch:
    """A collated batch: the usable images and targets, plus the files skipped with their reasons.

    strong_images: the same images' strong views, row-aligned, when the dataset makes them (else empty).
    """

    images: list[torch.Tensor]
    targets: list[dict[str, torch.Tensor]]
    keys: list[Key]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    strong_images: list[torch.Tensor] = field(default_factory=list)

    def pin_memory(self) -> "Batch":
        """Page-locked copies of the tensors, so the copy to the GPU can overlap compute (DataLoader pin_memory)."""
        return Batch([img.pin_memory() for img in self.images],
                     [{k: v.pin_memory() for k, v in t.items()} for t in self.targets], self.keys, self.skipped,
                     [img.pin_memory() for img in self.strong_images])


@dataclass(frozen=True)
class ImageEntry:
    """One image of the pseudo-label file and its annotations (in file order)."""

    path: str
    file_name: str
    width: int
    height: int
    annotations: tuple[dict[str, Any], ...]


def load_pseudo_labels(pseudo_json: str | os.PathLike | dict, images_dir: str | os.PathLike | None = None
                       ) -> tuple[list[ImageEntry], list[tuple[str, str]]]:
    """Parse a COCO pseudo-label file into image entries; files missing on disk are returned apart.

    ``file_name`` is resolved against ``images_dir``, else the file's
    ``info.root``, else the folder of the json. Returns (entries, missing) with
    missing = [(file_name, reason)].
    """
    if isinstance(pseudo_json, dict):
        coco, default_root = pseudo_json, Path.cwd()
    else:
        try:
            coco = json.loads(Path(pseudo_json).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise PseudoLabelError(f"no such pseudo-label file: {pseudo_json}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise PseudoLabelError(f"{pseudo_json} is not valid JSON: {exc}") from None
        default_root = Path(pseudo_json).resolve().parent
    if not isinstance(coco, dict) or not isinstance(coco.get("images"), list) or "annotations" not in coco:
        raise PseudoLabelError("the pseudo-label file is not a COCO dataset (needs 'images' and 'annotations')")
    root = Path(images_dir) if images_dir is not None else Path((coco.get("info") or {}).get("root") or default_root)
    by_image: dict[int, list[dict[str, Any]]] = {}
    for ann in coco["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    entries, missing = [], []
    for img in coco["images"]:
        path = root / img["file_name"]
        if not path.is_file():
            missing.append((img["file_name"], f"file not found: {path}"))
            continue
        entries.append(ImageEntry(str(path), img["file_name"], int(img["width"]), int(img["height"]),
                                  tuple(by_image.get(img["id"], ()))))
    return entries, missing


def decode_segmentation(ann: dict[str, Any], height: int, width: int) -> np.ndarray:
    """One annotation's mask as (H, W) bool: RLE (str/bytes counts), uncompressed RLE or polygons.

    An annotation without ``segmentation`` becomes its filled ``bbox`` (xywh, pixels).
    """
    seg = ann.get("segmentation")
    if not seg:
        x, y, w, h = ann["bbox"]
        mask = np.zeros((height, width), dtype=bool)
        mask[int(round(y)):int(round(y + h)), int(round(x)):int(round(x + w))] = True
        return mask
    rle = segmentation_rle(seg, height, width)
    if list(rle["size"]) != [height, width]:
        raise ValueError(f"mask size {list(rle['size'])} differs from the image's {[height, width]}")
    return mask_utils.decode(rle).astype(bool)


def masks_to_boxes_xyxy(masks: np.ndarray) -> np.ndarray:
    """(N, H, W) bool -> (N, 4) float32 tight boxes (x0, y0, x1, y1), x1/y1 exclusive, pixels."""
    rows, cols = masks.any(axis=2), masks.any(axis=1)
    boxes = np.zeros((len(masks), 4), dtype=np.float32)
    for i in range(len(masks)):
        ys, xs = np.flatnonzero(rows[i]), np.flatnonzero(cols[i])
        if ys.size:
            boxes[i] = (xs[0], ys[0], xs[-1] + 1, ys[-1] + 1)
    return boxes


def resize_nearest(array: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize of the first two axes of ``array`` (pixel centres sampled)."""
    rows = np.minimum(((np.arange(height) + 0.5) * array.shape[0] / height).astype(np.int64), array.shape[0] - 1)
    cols = np.minimum(((np.arange(width) + 0.5) * array.shape[1] / width).astype(np.int64), array.shape[1] - 1)
    return array[rows][:, cols]


def _descendants(parents: np.ndarray, root: int) -> list[int]:
    """``root`` and every element whose parent chain reaches it, in index order."""
    group = {root}
    changed = True
    while changed:
        changed = False
        for i, p in enumerate(parents):
            if p in group and i not in group:
                group.add(i)
                changed = True
    return sorted(group)


def copy_paste(rng: np.random.Generator, target: ObjectSet, source: ObjectSet, aug: Augmentation) -> ObjectSet:
    """Paste up to ``aug.max_pasted`` whole objects of ``source`` (each with its parts) onto ``target``.

    A pasted whole brings its descendants, so levels stay meaningful; it is
    scaled by a factor from ``aug.paste_scale`` (shrunk further to fit) and
    placed uniformly inside the image. Pasted pixels occlude what lies
    beneath: covered pixels leave the masks below, and targets left with less
    than ``aug.min_visible`` of their area or ``aug.min_area`` pixels are dropped.
    """
    roots = [i for i in range(len(source.masks)) if source.parents[i] < 0 and source.masks[i].any()]
    if not roots:
        return target
    height, width = target.image.shape[:2]
    chosen = rng.choice(roots, size=int(rng.integers(1, min(aug.max_pasted, len(roots)) + 1)), replace=False)
    image = target.image.copy()
    masks, levels, parents, full = [target.masks], [target.levels], [target.parents], [target.full_area]
    count = len(target.masks)
    for root in chosen:
        group = _descendants(source.parents, int(root))
        ys, xs = np.nonzero(source.masks[root])
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        scale = rng.uniform(*aug.paste_scale) * min(1.0, height / (y1 - y0), width / (x1 - x0))
        new_h, new_w = max(1, int(round((y1 - y0) * scale))), max(1, int(round((x1 - x0) * scale)))
        top, left = int(rng.integers(0, height - new_h + 1)), int(rng.integers(0, width - new_w + 1))
        crop_masks = resize_nearest(source.masks[group][:, y0:y1, x0:x1].transpose(1, 2, 0), new_h, new_w)
        pasted = np.zeros((len(group), height, width), dtype=bool)
        pasted[:, top:top + new_h, left:left + new_w] = crop_masks.transpose(2, 0, 1)
        cover = pasted.any(axis=0)
        pixels = np.zeros_like(image)
        pixels[top:top + new_h, left:left + new_w] = resize_nearest(source.image[y0:y1, x0:x1], new_h, new_w)
        image[cover] = pixels[cover]
        masks = [m & ~cover for m in masks]
        remap = {g: count + k for k, g in enumerate(group)}
        masks.append(pasted)
        levels.append(source.levels[group])
        parents.append(np.array([remap.get(int(source.parents[g]), -1) for g in group], dtype=np.int64))
        full.append(pasted.sum(axis=(1, 2)))
        count += len(group)
    merged = ObjectSet(image, np.concatenate(masks), np.concatenate(levels), np.concatenate(parents),
                       np.concatenate(full))
    return keep_visible(merged, aug.min_visible, aug.min_area)


def keep_visible(objects: ObjectSet, min_visible: float, min_area: int) -> ObjectSet:
    """Drop objects whose visible area is below ``min_visible`` × full area or ``min_area`` pixels.

    Parent links to a dropped object become -1.
    """
    area = objects.masks.sum(axis=(1, 2))
    keep = (area >= np.maximum(min_area, min_visible * objects.full_area)) & (area > 0)
    new_index = np.cumsum(keep) - 1
    parents = np.array([new_index[p] if p >= 0 and keep[p] else -1 for p in objects.parents[keep]], dtype=np.int64)
    return ObjectSet(objects.image, objects.masks[keep], objects.levels[keep], parents, objects.full_area[keep])


def hflip(objects: ObjectSet) -> ObjectSet:
    """Mirror the image and every mask left-right."""
    return ObjectSet(np.ascontiguousarray(objects.image[:, ::-1]), np.ascontiguousarray(objects.masks[:, :, ::-1]),
                     objects.levels, objects.parents, objects.full_area)


def to_target(objects: ObjectSet) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """ObjectSet -> (image (3, H, W) float32 in [0, 1], target dict of the detector contract)."""
    image = torch.from_numpy(np.ascontiguousarray(objects.image)).permute(2, 0, 1).float().div_(255.0)
    count = len(objects.masks)
    target = {
        "boxes": torch.from_numpy(masks_to_boxes_xyxy(objects.masks)).reshape(count, 4),
        "labels": torch.ones(count, dtype=torch.int64),
        "masks": torch.from_numpy(objects.masks.astype(np.uint8)),
        "levels": torch.from_numpy(objects.levels.astype(np.int64)),
    }
    return image, target


class PseudoLabelDataset(torch.utils.data.Dataset):
    """The pseudo-labels as a map-style dataset indexed by :data:`Key` ``(step, slot, index)``.

    ``dataset[(step, slot, index)]`` is a :class:`Sample` for image ``index``
    augmented with the generator of ``(seed, step, slot, index)``; an
    integer key means ``(0, 0, index)``. Unreadable images give a Sample with
    ``error`` set (never an exception); so do masks that do not match the image.
    ``missing`` lists the files not found on disk, which are left out. With
    ``strong``, each Sample also carries the image's strong view (Mean Teacher).
    """

    def __init__(self, pseudo_json: str | os.PathLike | dict, images_dir: str | os.PathLike | None = None,
                 augmentation: Augmentation | None = Augmentation(), seed: int = 0,
                 max_pixels: int = DEFAULT_MAX_PIXELS, strong: StrongAugmentation | None = None):
        self.entries, self.missing = load_pseudo_labels(pseudo_json, images_dir)
        if not self.entries:
            where = f" under {images_dir}" if images_dir is not None else ""
            raise PseudoLabelError(f"none of the images of the pseudo-label file were found{where}"
                                   if self.missing else "the pseudo-label file lists no images")
        self.augmentation = augmentation or Augmentation(flip_prob=0.0, copy_paste_prob=0.0)
        self.seed = seed
        self.max_pixels = max_pixels
        self.strong = strong

    def __len__(self) -> int:
        return len(self.entries)

    def variant(self, augmentation: Augmentation | None = None, seed: int | None = None,
                strong: StrongAugmentation | None = None) -> "PseudoLabelDataset":
        """The same images and labels with other augmentation, seed or strong view (unchanged where None)."""
        other = copy.copy(self)
        other.augmentation = augmentation or self.augmentation
        other.seed = self.seed if seed is None else seed
        other.strong = strong or self.strong
        return other

    def load(self, index: int) -> ObjectSet:
        """Image ``index`` with its pseudo-labels, scaled down to ``max_size`` if larger. Raises ImageError/ValueError."""
        entry = self.entries[index]
        image = load_rgb(entry.path, self.max_pixels)
        if image.shape[:2] != (entry.height, entry.width):
            raise ValueError(f"image is {image.shape[1]}x{image.shape[0]} but its pseudo-labels are for "
                             f"{entry.width}x{entry.height}")
        if entry.annotations:
            masks = np.stack([decode_segmentation(a, entry.height, entry.width) for a in entry.annotations])
        else:
            masks = np.zeros((0, entry.height, entry.width), dtype=bool)
        ids = {a.get("id"): i for i, a in enumerate(entry.annotations)}
        levels = np.array([int(a.get("hier_level", 0)) for a in entry.annotations], dtype=np.int64)
        parents = np.array([ids.get(a.get("parent_id"), -1) if a.get("parent_id") is not None else -1
                            for a in entry.annotations], dtype=np.int64)
        longest = max(entry.height, entry.width)
        if longest > self.augmentation.max_size:
            factor = self.augmentation.max_size / longest
            height, width = max(1, round(entry.height * factor)), max(1, round(entry.width * factor))
            image = resize_image(image, (height, width))
            masks = resize_nearest(masks.transpose(1, 2, 0), height, width).transpose(2, 0, 1)
        objects = ObjectSet(image, np.ascontiguousarray(masks), levels, parents, masks.sum(axis=(1, 2)))
        # Drop masks emptied by downscaling: the model refuses zero-size boxes.
        return keep_visible(objects, 0.0, 1)

    def rng(self, key: Key) -> np.random.Generator:
        """The generator of one item's augmentation, a pure function of (seed, key)."""
        return np.random.default_rng(np.random.SeedSequence([self.seed, *key]))

    def __getitem__(self, key: Key | int) -> Sample:
        key = (0, 0, int(key)) if isinstance(key, (int, np.integer)) else tuple(int(k) for k in key)
        index = key[2]
        entry = self.entries[index]
        try:
            objects = self.load(index)
        except (ImageError, ValueError) as exc:
            return Sample(key, entry.file_name, error=str(exc))
        rng = self.rng(key)
        aug = self.augmentation
        # Draw every random number whether or not it is used, so each decision has a fixed place in the stream.
        do_paste, do_flip = rng.random() < aug.copy_paste_prob, rng.random() < aug.flip_prob
        other = int(rng.integers(len(self.entries)))
        if do_paste:
            try:
                objects = copy_paste(rng, objects, self.load(other), aug)
            except (ImageError, ValueError):
                pass  # the other image is reported when it is sampled itself
        if do_flip:
            objects = hflip(objects)
        image, target = to_target(objects)
        strong = strong_view(image, rng, self.strong) if self.strong is not None else None
        return Sample(key, entry.file_name, image, target, strong=strong)


def collate(samples: Sequence[Sample]) -> Batch:
    """Samples -> Batch; skipped samples go to ``Batch.skipped`` as (file_name, reason)."""
    good = [s for s in samples if s.error is None]
    return Batch([s.image for s in good], [s.target for s in good], [s.key for s in good],
                 [(s.file_name, s.error) for s in samples if s.error is not None],
                 [s.strong for s in good if s.strong is not None])


class IndexStream(torch.utils.data.Sampler):
    """An endless, seeded sequence of batches of keys ``(step, slot, index)``, from any step on.

    The global order walks through seeded permutations of the dataset (a new
    one per pass), position ``step * batch_size + slot``. With ``world_size``
    > 1, rank r takes slots ``[r*b, (r+1)*b)`` of each global batch, b =
    batch_size / world_size, so the ranks together see exactly what one
    process would. Yields steps ``start_step .. stop_step - 1``.
    """

    def __init__(self, size: int, batch_size: int, seed: int = 0, start_step: int = 0,
                 stop_step: int | None = None, rank: int = 0, world_size: int = 1):
        if batch_size % world_size:
            raise ValueError(f"batch size {batch_size} is not divisible by the {world_size} processes")
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.start_step, self.stop_step = start_step, stop_step
        self.per_rank = batch_size // world_size
        self.first_slot = rank * self.per_rank
        self._epoch, self._perm = -1, np.empty(0, dtype=np.int64)

    def __len__(self) -> int:
        if self.stop_step is None:
            raise TypeError("an endless IndexStream has no length")
        return max(0, self.stop_step - self.start_step)

    def index_at(self, position: int) -> int:
        """Dataset index at a global position of the stream."""
        epoch, offset = divmod(position, self.size)
        if epoch != self._epoch:
            self._perm = np.random.default_rng(np.random.SeedSequence([self.seed, epoch])).permutation(self.size)
            self._epoch = epoch
        return int(self._perm[offset])

    def batch(self, step: int) -> list[Key]:
        """This rank's keys of one step."""
        slots = range(self.first_slot, self.first_slot + self.per_rank)
        return [(step, slot, self.index_at(step * self.batch_size + slot)) for slot in slots]

    def __iter__(self) -> Iterator[list[Key]]:
        step = self.start_step
        while self.stop_step is None or step < self.stop_step:
            yield self.batch(step)
            step += 1
