"""Tiny-model fixtures for the detector tests: settings and synthetic hierarchical scenes."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from hassod.model import DetectorSettings, build_detector
from hassod.synthetic import make_scene


def scene_sample(seed: int, size: tuple[int, int] = (128, 160)) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One synthetic scene as (image (3, H, W) float in [0, 1], target dict with boxes/labels/masks/levels)."""
    scene = make_scene(seed, size=size)
    masks = torch.from_numpy(scene.masks.astype(np.uint8))
    boxes = []
    for mask in scene.masks:
        ys, xs = np.nonzero(mask)
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    target = {
        "boxes": torch.tensor(boxes, dtype=torch.float32),
        "labels": torch.ones(len(boxes), dtype=torch.int64),
        "masks": masks,
        "levels": torch.from_numpy(scene.levels),
    }
    image = torch.from_numpy(scene.image).permute(2, 0, 1).float() / 255
    return image, target


def empty_sample(size: tuple[int, int] = (96, 112)) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """An image without any pseudo-label (N = 0)."""
    height, width = size
    target = {
        "boxes": torch.zeros((0, 4)),
        "labels": torch.zeros(0, dtype=torch.int64),
        "masks": torch.zeros((0, height, width), dtype=torch.uint8),
        "levels": torch.zeros(0, dtype=torch.int64),
    }
    return torch.rand(3, height, width, generator=torch.Generator().manual_seed(1)), target


@pytest.fixture
def tiny_settings() -> DetectorSettings:
    return DetectorSettings.tiny()


@pytest.fixture
def tiny_model(tiny_settings):
    torch.manual_seed(0)
    return build_detector(tiny_settings)


@pytest.fixture
def batch():
    """Two scenes with wholes/parts/subparts and one image without targets."""
    samples = [scene_sample(0), scene_sample(1, size=(144, 128)), empty_sample()]
    return [s[0] for s in samples], [s[1] for s in samples]
