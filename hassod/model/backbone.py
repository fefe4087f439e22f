"""FPN backbones of the detector (docs/design.md §5): ResNet-50, EfficientNet-Lite0, tiny.

Every backbone maps a normalised (B, 3, H, W) batch, H and W multiples of 32,
to an ``OrderedDict`` of five 256-channel (``fpn_channels``) maps:
``"0".."3"`` = P2..P5 at strides 4, 8, 16, 32 and ``"pool"`` = P6 at stride
64 (max-pool of P5, as detectron2's ``LastLevelMaxPool``). The RPN uses all
five, the RoI heads P2..P5. ``out_channels`` tells torchvision the width.

BatchNorm layers are plain, trainable ``nn.BatchNorm2d`` everywhere (the
reference trains SyncBN in backbone and FPN); a distributed trainer converts
them with ``nn.SyncBatchNorm.convert_sync_batchnorm``.
"""
from __future__ import annotations

import os
from collections import OrderedDict
import torch
import torchvision
from torch import nn
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool

from hassod.features.weights import (
    WeightsFormatError,
    WeightsNotFoundError,
    load_strict,
    read_state_dict,
)

BACKBONES = ("resnet50", "efficientnet_lite0", "tiny")

# ImageNet statistics for [0, 1] RGB input: what torchvision-layout DINO
# ResNet-50 weights (and the reference's PIXEL_MEAN/STD in 0-255 units) use.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Wrapper prefixes seen in ResNet-50 checkpoints: DDP (``module.``), DINO's
# MultiCropWrapper (``backbone.``), generic trainers (``model.``).
RESNET_PREFIXES = ("module.", "backbone.", "model.")

# DINO training checkpoints hold several state dicts; the teacher is the one released.
CHECKPOINT_KEYS = ("teacher", "state_dict", "model")

# torchvision resnet stage → output name the FPN and heads use (P2..P5).
RESNET_RETURN_LAYERS = {"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"}
RESNET_STAGE_CHANNELS = [256, 512, 1024, 2048]

# timm tf_efficientnet_lite0 block stages ending at strides 4, 8, 16, 32.
EFFICIENTNET_STAGES = (1, 2, 4, 6)


def _fpn_norm(enabled: bool):
    """Norm layer for FPN convolutions: BatchNorm like the reference, or none (biased convs)."""
    return nn.BatchNorm2d if enabled else None


def build_resnet50_fpn(
    weights: str | os.PathLike | None,
    random_init: bool = False,
    fpn_channels: int = 256,
    fpn_norm: bool = True,
) -> BackboneWithFPN:
    """ResNet-50 + FPN with trainable BatchNorm, from a DINO checkpoint file or random.

    Args:
        weights: path of a ResNet-50 state dict (torchvision or detectron2 key
            layout, optionally wrapped); never downloaded.
        random_init: allow random initialisation when ``weights`` is None.

    Raises:
        ValueError: neither ``weights`` nor ``random_init`` given.
        WeightsNotFoundError / WeightsFormatError: missing or unfitting file.
    """
    if weights is None and not random_init:
        raise ValueError(
            "the resnet50 backbone needs DINO ResNet-50 weights: pass --backbone-weights PATH "
            "(e.g. dino_resnet50_pretrain.pth), use --backbone efficientnet_lite0 (offline ImageNet weights), "
            "or start from scratch with --random-init"
        )
    body = torchvision.models.resnet50(weights=None, norm_layer=nn.BatchNorm2d)
    if weights is not None:
        load_resnet50_weights(body, weights)
    return BackboneWithFPN(
        body,
        return_layers=RESNET_RETURN_LAYERS,
        in_channels_list=RESNET_STAGE_CHANNELS,
        out_channels=fpn_channels,
        extra_blocks=LastLevelMaxPool(),
        norm_layer=_fpn_norm(fpn_norm),
    )


def resnet50_state_from_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The torchvision-layout ResNet-50 trunk state (no ``fc``) stored in ``path``.

    Accepts DINO's release file (a bare torchvision state dict without ``fc``),
    DINO training checkpoints (``teacher``), wrapped keys, and detectron2-layout
    weights (``res2.0.conv1.weight``), which are converted.
    """
    from hassod.model.convert import convert_dino_resnet  # convert imports this module

    if not os.path.isfile(path):
        raise WeightsNotFoundError(f"backbone weights file not found: {path} (--backbone-weights)")
    state = read_state_dict(path, checkpoint_keys=CHECKPOINT_KEYS)
    return convert_dino_resnet(state)


def load_resnet50_weights(body: nn.Module, path: str | os.PathLike) -> None:
    """Fill a torchvision ``resnet50`` trunk from ``path``, strictly (every key and shape).

    The classifier ``fc`` is replaced by an identity first: DINO files have
    none, and the FPN wrapper drops it anyway.
    """
    state = resnet50_state_from_file(path)
    body.fc = nn.Identity()
    load_strict(body, state, str(path))


class NormAct(nn.Module):
    """BatchNorm followed by an activation, as two modules.

    timm fuses them in ``BatchNormAct2d``, a BatchNorm subclass; torch's
    ``SyncBatchNorm.convert_sync_batchnorm`` would replace it by a plain
    SyncBatchNorm and silently drop the activation. Kept apart, the norm
    converts and the activation stays.
    """

    def __init__(self, norm: nn.BatchNorm2d, act: nn.Module) -> None:
        super().__init__()
        self.norm = norm
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(x))


def split_norm_act(module: nn.Module) -> nn.Module:
    """Replace every timm ``BatchNormAct2d`` inside ``module`` by an equivalent :class:`NormAct` (in place)."""
    from timm.layers import BatchNormAct2d

    for name, child in module.named_children():
        if isinstance(child, BatchNormAct2d):
            norm = nn.BatchNorm2d(child.num_features, eps=child.eps, momentum=child.momentum)
            norm.load_state_dict(child.state_dict())
            # drop is an Identity in EfficientNet-Lite0 (no DropBlock).
            setattr(module, name, NormAct(norm, nn.Sequential(child.drop, child.act)))
        else:
            split_norm_act(child)
    return module


class EfficientNetFPN(nn.Module):
    """EfficientNet-Lite0 trunk (stem + block stages 0..6) with an FPN on strides 4..32."""

    def __init__(self, net: nn.Module, fpn_channels: int, fpn_norm: bool) -> None:
        super().__init__()
        # Only the trunk is kept: the unused classifier head would get no
        # gradient, which DDP treats as an error.
        split_norm_act(net)
        self.conv_stem = net.conv_stem
        self.bn1 = net.bn1
        self.blocks = nn.Sequential(*list(net.blocks)[: EFFICIENTNET_STAGES[-1] + 1])
        channels = [int(net.blocks[s][-1].conv_pwl.out_channels) for s in EFFICIENTNET_STAGES]
        self.fpn = FeaturePyramidNetwork(channels, fpn_channels, LastLevelMaxPool(), _fpn_norm(fpn_norm))
        self.out_channels = fpn_channels

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        """(B, 3, H, W) → P2..P6 maps, each (B, fpn_channels, H/s, W/s)."""
        x = self.bn1(self.conv_stem(x))
        stages: OrderedDict[str, torch.Tensor] = OrderedDict()
        for index, stage in enumerate(self.blocks):
            x = stage(x)
            if index in EFFICIENTNET_STAGES:
                stages[str(len(stages))] = x
        return self.fpn(stages)


def build_efficientnet_fpn(
    weights: str | os.PathLike | None, random_init: bool, fpn_channels: int, fpn_norm: bool
) -> EfficientNetFPN:
    """EfficientNet-Lite0 + FPN with the offline ImageNet weights (or ``weights``, or random)."""
    from hassod.features.efficientnet import build_efficientnet_lite0

    backbone = build_efficientnet_lite0(weights=weights, random_init=random_init)
    return EfficientNetFPN(backbone.net, fpn_channels, fpn_norm)


class TinyBackbone(nn.Module):
    """A few strided convolutions (strides 4..32, ≤16 channels) + FPN: random, for tests."""

    def __init__(self, fpn_channels: int, widths: tuple[int, ...] = (8, 16, 16, 16)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_ch = 3
        for index, width in enumerate(widths):
            stride = 4 if index == 0 else 2
            layers.append(
                nn.Sequential(
                    nn.Conv2d(in_ch, width, 3, stride=stride, padding=1, bias=False),
                    nn.BatchNorm2d(width),
                    nn.ReLU(inplace=True),
                )
            )
            in_ch = width
        self.stages = nn.ModuleList(layers)
        self.fpn = FeaturePyramidNetwork(list(widths), fpn_channels, LastLevelMaxPool())
        self.out_channels = fpn_channels

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        """(B, 3, H, W) → P2..P6 maps, each (B, fpn_channels, H/s, W/s)."""
        stages: OrderedDict[str, torch.Tensor] = OrderedDict()
        for index, stage in enumerate(self.stages):
            x = stage(x)
            stages[str(index)] = x
        return self.fpn(stages)


def build_backbone(
    name: str,
    weights: str | os.PathLike | None = None,
    random_init: bool = False,
    fpn_channels: int = 256,
    fpn_norm: bool = True,
) -> nn.Module:
    """The named FPN backbone (one of :data:`BACKBONES`)."""
    if name == "resnet50":
        return build_resnet50_fpn(weights, random_init, fpn_channels, fpn_norm)
    if name == "efficientnet_lite0":
        return build_efficientnet_fpn(weights, random_init, fpn_channels, fpn_norm)
    if name == "tiny":
        if weights is not None:
            raise ValueError("the tiny backbone is always randomly initialised; do not pass --backbone-weights")
        return TinyBackbone(fpn_channels)
    raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")


def backbone_normalisation(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) for [0, 1] RGB input that the named backbone's weights expect."""
    if name == "efficientnet_lite0":
        from hassod.features.efficientnet import EfficientNetLite0

        return tuple(EfficientNetLite0.mean), tuple(EfficientNetLite0.std)
    return IMAGENET_MEAN, IMAGENET_STD


__all__ = [
    "BACKBONES",
    "WeightsFormatError",
    "WeightsNotFoundError",
    "build_backbone",
    "backbone_normalisation",
    "resnet50_state_from_file",
]
