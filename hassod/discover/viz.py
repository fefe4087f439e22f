"""Overlay pictures of discovered hierarchies: wholes, parts and subparts in distinct colours."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from ..images import load_rgb

# whole, part, subpart: red, green, blue families, told apart at a glance.
LEVEL_COLOURS = np.array([[230, 50, 50], [40, 200, 60], [50, 110, 240]], dtype=np.float32)


def draw_hierarchy(image: np.ndarray, masks: np.ndarray, levels: np.ndarray, alpha: float = 0.35) -> np.ndarray:
    """Blend each mask over ``image`` in its level's colour, with a solid outline.

    image: (H, W, 3) uint8; masks: (N, H, W) bool at the same size; levels: (N,).
    Wholes are drawn first so that parts and subparts stay visible on top.
    Returns (H, W, 3) uint8.
    """
    canvas = image.astype(np.float32)
    for index in np.argsort(levels, kind="stable"):
        mask, colour = masks[index], LEVEL_COLOURS[int(levels[index])]
        canvas[mask] = (1 - alpha) * canvas[mask] + alpha * colour
        outline = mask & ~ndimage.binary_erosion(mask, iterations=2)
        canvas[outline] = colour
    return np.round(canvas).astype(np.uint8)


def overlay_name(path: str | Path) -> str:
    """A PNG name unique per source path (two folders may both hold ``0001.jpg``)."""
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:8]
    return f"{Path(path).stem}_{digest}.png"


def save_overlay(path: str | Path, masks: np.ndarray, levels: np.ndarray, out_dir: Path) -> Path:
    """Write the overlay of ``masks`` on the image at ``path`` into ``out_dir``; returns the PNG path."""
    picture = draw_hierarchy(load_rgb(path), masks, levels)
    target = Path(out_dir) / overlay_name(path)
    Image.fromarray(picture).save(target)
    return target
