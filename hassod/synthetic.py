"""Synthetic hierarchical scenes with known wholes, parts and subparts.

Shared by tests and benchmarks. A scene is a textured background with a few
objects; each object (a *whole*) contains parts, and a part may contain a
subpart. Every element has its own colour and texture, so both a real
backbone and the hand-made feature map of :func:`scene_features` can tell
them apart, and the truth (masks, levels, parents) is known exactly.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

WHOLE, PART, SUBPART = 0, 1, 2


@dataclass(frozen=True)
class Scene:
    """One synthetic image and its ground truth.

    image: (H, W, 3) uint8. masks: (N, H, W) bool, each the full extent of an
    element (a whole includes its parts). levels: (N,) int (0 whole, 1 part,
    2 subpart). parents: (N,) int, index into ``masks`` or -1 for wholes.
    owner: (H, W) int, index of the innermost element at each pixel, -1 for
    background (what a perfect fine segmentation would give).
    """

    image: np.ndarray
    masks: np.ndarray
    levels: np.ndarray
    parents: np.ndarray
    owner: np.ndarray


def _ellipse(shape: tuple[int, int], cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return ((yy + 0.5 - cy) / ry) ** 2 + ((xx + 0.5 - cx) / rx) ** 2 <= 1.0


def _rectangle(shape: tuple[int, int], cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (np.abs(yy + 0.5 - cy) <= ry) & (np.abs(xx + 0.5 - cx) <= rx)


def _shape(rng: np.random.Generator, shape, cy, cx, ry, rx) -> np.ndarray:
    draw = _ellipse if rng.random() < 0.5 else _rectangle
    return draw(shape, cy, cx, ry, rx)


def _texture(rng: np.random.Generator, shape: tuple[int, int], colour: np.ndarray, contrast: float = 14.0) -> np.ndarray:
    """A flat colour with a stripe pattern of random orientation and period, ``contrast`` in intensity units."""
    yy, xx = np.mgrid[: shape[0], : shape[1]].astype(np.float32)
    angle = rng.uniform(0, np.pi)
    period = rng.uniform(6, 20)
    wave = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period)
    # Low contrast keeps the texture inside one region for the colour term of the CRF.
    pattern = contrast * wave[..., None] + rng.normal(0, 3.0, size=(*shape, 1))
    return np.clip(colour[None, None, :] + pattern, 0, 255)


def _distinct_colours(rng: np.random.Generator, n: int, min_distance: float = 70.0) -> np.ndarray:
    colours: list[np.ndarray] = []
    while len(colours) < n:
        candidate = rng.uniform(25, 230, size=3)
        if all(np.linalg.norm(candidate - c) >= min_distance for c in colours):
            colours.append(candidate)
    return np.stack(colours)


def make_scene(
    seed: int,
    size: tuple[int, int] = (480, 480),
    n_objects: int = 2,
    parts_per_object: int = 2,
    subpart_probability: float = 1.0,
    contrast: float = 14.0,
) -> Scene:
    """A scene of ``n_objects`` wholes laid side by side, each with parts and subparts.

    ``size`` is (H, W) in pixels. Objects do not overlap and stay clear of the
    image corners; parts are placed side by side inside their whole, subparts
    at the centre of their part. ``contrast`` is the amplitude of the stripes
    inside each element: low keeps each element one colour region for the
    CRF, high makes elements easier to tell apart by their pattern.
    """
    rng = np.random.default_rng(seed)
    height, width = size
    n_elements = n_objects * (1 + 2 * parts_per_object) + 1
    colours = _distinct_colours(rng, n_elements)
    image = _texture(rng, size, colours[-1], contrast)
    masks: list[np.ndarray] = []
    levels: list[int] = []
    parents: list[int] = []

    def add(mask: np.ndarray, level: int, parent: int) -> int:
        masks.append(mask)
        levels.append(level)
        parents.append(parent)
        image[mask] = _texture(rng, size, colours[len(masks) - 1], contrast)[mask]
        return len(masks) - 1

    cell_w = width / n_objects
    for i in range(n_objects):
        cx, cy = cell_w * (i + 0.5), height * rng.uniform(0.45, 0.55)
        ry, rx = height * rng.uniform(0.28, 0.34), cell_w * rng.uniform(0.36, 0.42)
        whole = add(_rectangle(size, cy, cx, ry, rx), WHOLE, -1)
        part_w = 2 * rx / parts_per_object
        for j in range(parts_per_object):
            pcx = cx - rx + part_w * (j + 0.5)
            pry, prx = ry * rng.uniform(0.5, 0.65), part_w * rng.uniform(0.3, 0.38)
            part = add(_shape(rng, size, cy, pcx, pry, prx) & masks[whole], PART, whole)
            if rng.random() < subpart_probability:
                add(_shape(rng, size, cy, pcx, pry * 0.5, prx * 0.5) & masks[part], SUBPART, part)
    stacked = np.stack(masks)
    owner = np.full(size, -1, dtype=np.int64)
    for index in range(len(masks)):  # later elements are nested inside earlier ones
        owner[stacked[index]] = index
    return Scene(
        image=np.round(image).astype(np.uint8),
        masks=stacked,
        levels=np.asarray(levels, dtype=np.int64),
        parents=np.asarray(parents, dtype=np.int64),
        owner=owner,
    )


def scene_features(
    scene: Scene,
    patch: int = 8,
    dim: int = 64,
    part_similarity: float = 0.15,
    subpart_similarity: float = 0.3,
    noise: float = 0.3,
    seed: int = 0,
) -> np.ndarray:
    """A hand-made (h, w, dim) patch-feature grid whose cosine structure follows the hierarchy.

    Each element gets a unit prototype: a part's prototype has cosine
    ``part_similarity`` with its whole's, a subpart's ``subpart_similarity``
    with its part's, and everything else (background, other objects) is
    orthogonal. With the paper's thresholds 0.4 / 0.2 / 0.1 this makes the
    subparts separate at 0.4, join their part at 0.2, and the part join its
    whole at 0.1. Each patch takes the prototype of the element owning most of
    its pixels, plus Gaussian noise of relative norm ``noise``. ``patch`` is in
    pixels; the image size must be a multiple of it.
    """
    rng = np.random.default_rng(seed)
    height, width = scene.owner.shape
    n = len(scene.masks)
    if dim < 2 * (n + 1):
        raise ValueError(f"dim={dim} too small for {n} elements")
    basis = np.linalg.qr(rng.normal(size=(dim, dim)))[0].T  # orthonormal rows
    prototypes = np.zeros((n + 1, dim))
    prototypes[n] = basis[2 * n]  # background
    for index in range(n):
        own = basis[2 * index]
        parent = scene.parents[index]
        if parent < 0:
            prototypes[index] = own
        else:
            cosine = part_similarity if scene.levels[index] == PART else subpart_similarity
            prototypes[index] = cosine * prototypes[parent] + np.sqrt(1 - cosine**2) * own
    h, w = height // patch, width // patch
    owner = np.where(scene.owner < 0, n, scene.owner)[: h * patch, : w * patch]
    blocks = owner.reshape(h, patch, w, patch).transpose(0, 2, 1, 3).reshape(h, w, -1)
    cell = np.arange(h * w).reshape(h, w, 1)
    counts = np.bincount((cell * (n + 1) + blocks).ravel(), minlength=h * w * (n + 1))
    majority = counts.reshape(h, w, n + 1).argmax(axis=2)
    features = prototypes[majority] + rng.normal(0, noise / np.sqrt(dim), size=(h, w, dim))
    return features.astype(np.float32)


@dataclass(frozen=True)
class InstanceScene:
    """A database or query image for instance search.

    objects: ids of the object instances pasted into the image; boxes: their
    (x0, y0, x1, y1) boxes in pixels; masks: (N, H, W) bool of each whole
    object, its parts and subparts; levels / parents as in :class:`Scene`.
    """

    image: np.ndarray
    objects: list[int]
    boxes: list[tuple[int, int, int, int]]
    masks: np.ndarray
    levels: np.ndarray
    parents: np.ndarray


def _object_library(seed: int, count: int, contrast: float) -> list[Scene]:
    """``count`` single-object scenes whose object (a whole with parts) serves as an instance."""
    return [make_scene(seed * 1000 + i, size=(240, 240), n_objects=1, parts_per_object=2, contrast=contrast)
            for i in range(count)]


def _resize_nearest(array: np.ndarray, height: int, width: int) -> np.ndarray:
    rows = (np.arange(height) * array.shape[0] / height).astype(int)
    cols = (np.arange(width) * array.shape[1] / width).astype(int)
    return array[rows][:, cols]


def make_instance_scenes(
    seed: int,
    n_objects: int = 6,
    n_images: int = 8,
    per_image: int = 2,
    size: tuple[int, int] = (320, 480),
    contrast: float = 40.0,
) -> list[InstanceScene]:
    """Images each holding ``per_image`` of ``n_objects`` object instances, pasted at random scales.

    Every object appears in at least one image; each instance keeps its
    texture and parts, so it can be found from a crop taken in another image.
    """
    rng = np.random.default_rng(seed)
    library = _object_library(seed, n_objects, contrast)
    height, width = size
    scenes = []
    for index in range(n_images):
        chosen = [index % n_objects] + list(rng.choice([o for o in range(n_objects) if o != index % n_objects],
                                                       per_image - 1, replace=False))
        image = _texture(rng, size, rng.uniform(40, 220, size=3))
        masks, levels, parents, boxes = [], [], [], []
        slot_w = width // per_image
        for slot, obj in enumerate(chosen):
            source = library[obj]
            ys, xs = np.nonzero(source.masks[0])
            y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
            scale = rng.uniform(0.55, 0.95) * min((height - 20) / (y1 - y0), (slot_w - 20) / (x1 - x0))
            new_h, new_w = max(8, int((y1 - y0) * scale)), max(8, int((x1 - x0) * scale))
            top = int(rng.integers(10, height - new_h - 9))
            left = slot * slot_w + int(rng.integers(10, slot_w - new_w - 9))
            pixels = _resize_nearest(source.image[y0:y1, x0:x1], new_h, new_w)
            element_masks = _resize_nearest(source.masks[:, y0:y1, x0:x1].transpose(1, 2, 0), new_h, new_w)
            inside = element_masks[..., 0]
            image[top:top + new_h, left:left + new_w][inside] = pixels[inside]
            offset = len(masks)
            for element in range(len(source.masks)):
                full = np.zeros(size, bool)
                full[top:top + new_h, left:left + new_w] = element_masks[..., element]
                masks.append(full)
                levels.append(int(source.levels[element]))
                parent = int(source.parents[element])
                parents.append(parent + offset if parent >= 0 else -1)
            boxes.append((left, top, left + new_w, top + new_h))
        scenes.append(InstanceScene(np.round(image).astype(np.uint8), [int(o) for o in chosen], boxes,
                                    np.stack(masks), np.asarray(levels), np.asarray(parents)))
    return scenes


def save_scenes(scenes: list[InstanceScene], folder: Path, coco_path: Path) -> Path:
    """Write scenes as ``folder/scene_NN.png`` and their true regions as a COCO file at ``coco_path``.

    The COCO file has RLE masks, ``hier_level`` and ``parent_id``, and its
    ``info.root`` points at ``folder`` (the layout `hassod discover` writes).
    """
    folder.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for index, scene in enumerate(scenes):
        name = f"scene_{index:02d}.png"
        Image.fromarray(scene.image).save(folder / name)
        height, width = scene.image.shape[:2]
        images.append({"id": index + 1, "file_name": name, "width": width, "height": height})
        first = len(annotations) + 1
        for mask, level, parent in zip(scene.masks, scene.levels, scene.parents):
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            annotations.append({
                "id": len(annotations) + 1, "image_id": index + 1, "category_id": 1,
                "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()},
                "bbox": mask_utils.toBbox(rle).tolist(), "area": int(mask.sum()), "iscrowd": 0,
                "hier_level": int(level), "parent_id": first + int(parent) if parent >= 0 else None,
            })
    coco = {"info": {"root": str(folder.resolve())}, "images": images, "annotations": annotations,
            "categories": [{"id": 1, "name": "fg"}]}
    coco_path.write_text(json.dumps(coco))
    return coco_path
