"""The interface every feature backbone implements.

A backbone turns a batch of images into a grid of C-dimensional feature
vectors, one per ``patch_size`` x ``patch_size`` block of input pixels. Stage-1
discovery clusters these grids; the indexer RoI-pools region descriptors from
them (``spatial_scale = 1 / patch_size``).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import nn

from ..images import resample

ImageSize = int | tuple[int, int]

# ImageNet statistics (RGB, [0, 1] pixel scale): what DINO was trained with.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Merge thresholds of the paper (docs/design.md §4), meaningful for DINO keys.
PAPER_THRESHOLDS = (0.4, 0.2, 0.1)

# The search recipe's dense thresholds for DINO keys: the paper's range and a
# little above, in steps of 0.05 (not measured here: no DINO weights offline).
PAPER_SEARCH_THRESHOLDS = (0.5, 0.45, 0.4, 0.35, 0.3, 0.25, 0.2, 0.15, 0.1, 0.05)


class Backbone(nn.Module):
    """A frozen feature extractor producing a patch grid.

    Attributes:
        name: backbone name as accepted by :func:`hassod.features.build_backbone`.
        dim: channels C of the output feature grid.
        patch_size: stride of the output grid, in input pixels.
        default_thresholds: merge thresholds for stage-1 clustering in this
            feature space, descending.
        search_thresholds: the dense thresholds of the ``search`` region
            recipe (:mod:`hassod.discover.search`), descending.
        weights_id: sha256 hex prefix of the weight file, or ``"random"``.
        mean, std: per-channel RGB normalisation on the [0, 1] pixel scale.

    The module is always in eval mode: :meth:`train` does not switch it, so
    BatchNorm statistics never drift while it is embedded in a trained model.
    """

    name: str
    dim: int
    patch_size: int
    default_thresholds: tuple[float, ...]
    search_thresholds: tuple[float, ...]
    weights_id: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def train(self, mode: bool = True) -> "Backbone":
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def grid_shape(self, height: int, width: int) -> tuple[int, int]:
        """Output grid (rows, cols), in patches, for an input of height x width pixels."""
        return height // self.patch_size, width // self.patch_size

    def prepare(self, images: Sequence[np.ndarray], size: ImageSize = 480) -> torch.Tensor:
        """Resize and normalise images for this backbone.

        Args:
            images: RGB arrays (H, W, 3) uint8, sizes may differ.
            size: output side in pixels, or (height, width); aspect is not kept.

        Returns:
            (B, 3, height, width) float32 tensor on the module's device.
        """
        height, width = (size, size) if isinstance(size, int) else size
        device = self.device
        mean = torch.tensor(self.mean, device=device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=device).view(1, 3, 1, 1)
        batch = []
        for image in images:
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                raise ValueError(f"expected an (H, W, 3) uint8 image, got {image.shape} {image.dtype}")
            # torch refuses to wrap read-only arrays (e.g. PIL-backed ones) without a warning: copy those.
            pixels = torch.from_numpy(np.require(image, requirements=["C", "W"])).to(device)
            # Antialiasing matters when shrinking large photos to 480 px: without
            # it the patch features see aliased high frequencies.
            batch.append(resample(pixels.permute(2, 0, 1).unsqueeze(0), (height, width)))
        if not batch:
            raise ValueError("prepare() needs at least one image")
        return (torch.cat(batch).div_(255.0).clamp_(0.0, 1.0) - mean) / std

    def extract(self, images: Sequence[np.ndarray], size: ImageSize = 480) -> torch.Tensor:
        """Patch-grid features of images: (B, dim, height // patch, width // patch) float32.

        Each image's features are channels-last in memory (``[i].permute(1, 2, 0)``
        is contiguous): the merge reads them patch by patch without a copy.
        """
        with torch.inference_mode():
            return self(self.prepare(images, size))
