"""Frozen feature backbones: images → patch-grid features (docs/design.md §3).

>>> backbone = build_backbone("efficientnet_lite0", device="cpu")
>>> features = backbone.extract([image])   # (1, backbone.dim, 60, 60) at 480 px

No weights are downloaded at import time; :func:`build_backbone` resolves them
(explicit path → model hub → installed package) or raises
:class:`WeightsNotFoundError`.
"""
from __future__ import annotations

import os

import torch

from hassod.device import resolve_device
from hassod.errors import UserError
from hassod.features.base import Backbone
from hassod.features.efficientnet import EfficientNetLite0, build_efficientnet_lite0
from hassod.features.vit import DINO_SPECS, DinoViT, build_dino
from hassod.features.weights import WeightsFormatError, WeightsNotFoundError

BACKBONE_NAMES: tuple[str, ...] = (*DINO_SPECS, "efficientnet_lite0")

__all__ = [
    "BACKBONE_NAMES",
    "Backbone",
    "DinoViT",
    "EfficientNetLite0",
    "UnknownBackboneError",
    "WeightsFormatError",
    "WeightsNotFoundError",
    "build_backbone",
]


class UnknownBackboneError(UserError, ValueError):
    """A backbone name that is not one of :data:`BACKBONE_NAMES`."""


def build_backbone(
    name: str,
    weights: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    random_init: bool = False,
) -> Backbone:
    """The named backbone, frozen, in eval mode, on ``device`` (``None``: CUDA if present).

    Args:
        name: one of :data:`BACKBONE_NAMES`.
        weights: explicit weight file; otherwise the hub, then an installed package.
        device: torch device or name, resolved by :func:`hassod.device.resolve_device`.
        random_init: random weights instead (tests only); excludes ``weights``.

    Raises:
        UnknownBackboneError: unknown name (a ValueError).
        ValueError: both ``weights`` and ``random_init``.
        WeightsNotFoundError: no weight source available.
        WeightsFormatError: the weight file does not fit the backbone.
    """
    if name not in BACKBONE_NAMES:
        raise UnknownBackboneError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONE_NAMES)}")
    if random_init and weights is not None:
        raise ValueError("give either weights or random_init=True, not both")
    if name == "efficientnet_lite0":
        backbone: Backbone = build_efficientnet_lite0(weights, random_init)
    else:
        backbone = build_dino(name, weights, random_init)
    backbone.requires_grad_(False)
    target = device if isinstance(device, torch.device) else resolve_device(device)
    return backbone.to(target)
