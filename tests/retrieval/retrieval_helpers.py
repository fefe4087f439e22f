"""Helpers of the retrieval tests."""
from __future__ import annotations

import numpy as np
from skimage import draw


def polygon_mask(outline: list, size: tuple[int, int]) -> np.ndarray:
    """An outline (rings of [x, y] points) rasterised at ``size`` (H, W) with the even-odd rule (holes stay holes)."""
    filled = np.zeros(size, dtype=bool)
    for ring in outline:
        xy = np.asarray(ring)
        rows, cols = draw.polygon(xy[:, 1], xy[:, 0], size)
        filled[rows, cols] ^= True
    return filled
