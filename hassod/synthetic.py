"""Synthetic hierarchical scenes with known wholes, parts and subparts.

Shared by tests and benchmarks. A scene is a textured background with a few
objects; each object (a *whole*) contains parts, and a part may contain a
subpart. Every element has its own colour and texture, so both a real
backbone and the hand-made feature map of :func:`scene_features` can tell
them apart, and the truth (masks, levels, parents) is known exactly.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

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


def _texture(rng: np.random.Generator, shape: tuple[int, int], colour: np.ndarray) -> np.ndarray:
    """A flat colour with a low-contrast stripe pattern of random orientation and period."""
    yy, xx = np.mgrid[: shape[0], : shape[1]].astype(np.float32)
    angle = rng.uniform(0, np.pi)
    period = rng.uniform(6, 20)
    wave = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period)
    # Low contrast keeps the texture inside one region for the colour term of the CRF.
    pattern = 14.0 * wave[..., None] + rng.normal(0, 3.0, size=(*shape, 1))
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
) -> Scene:
    """A scene of ``n_objects`` wholes laid side by side, each with parts and subparts.

    ``size`` is (H, W) in pixels. Objects do not overlap and stay clear of the
    image corners; parts are placed side by side inside their whole, subparts
    at the centre of their part.
    """
    rng = np.random.default_rng(seed)
    height, width = size
    n_elements = n_objects * (1 + 2 * parts_per_object) + 1
    colours = _distinct_colours(rng, n_elements)
    image = _texture(rng, size, colours[-1])
    masks: list[np.ndarray] = []
    levels: list[int] = []
    parents: list[int] = []

    def add(mask: np.ndarray, level: int, parent: int) -> int:
        masks.append(mask)
        levels.append(level)
        parents.append(parent)
        image[mask] = _texture(rng, size, colours[len(masks) - 1])[mask]
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
