"""DINO ViT backbones: keys of the last attention block as patch features.

HASSOD (like CutLER/TokenCut before it) clusters the *keys* of the last
self-attention layer of a DINO ViT: heads concatenated, CLS token dropped.
The model is timm's ViT with dynamic image size, so a 480x480 input works
with the 224-pixel checkpoints (position embeddings are resampled).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import timm
import torch

from hassod.features.base import IMAGENET_MEAN, IMAGENET_STD, PAPER_SEARCH_THRESHOLDS, PAPER_THRESHOLDS, Backbone
from hassod.features.weights import (
    WeightSearch,
    WeightsFormatError,
    file_weights_id,
    load_strict,
    read_state_dict,
    resolve_weights,
    strip_prefixes,
)

DINO_DOWNLOAD_ROOT = "https://dl.fbaipublicfiles.com/dino"


@dataclass(frozen=True)
class DinoSpec:
    """One DINO ViT variant.

    Args:
        timm_name: timm architecture, created with ``pretrained=False``.
        official_file: file name of the official DINO backbone checkpoint.
    """

    timm_name: str
    official_file: str

    @property
    def hub_repo(self) -> str:
        return f"timm/{self.timm_name}.dino"

    @property
    def official_url(self) -> str:
        stem = self.official_file.removesuffix(".pth")
        return f"{DINO_DOWNLOAD_ROOT}/{stem}/{self.official_file}"


DINO_SPECS: dict[str, DinoSpec] = {
    "dino_vitb8": DinoSpec("vit_base_patch8_224", "dino_vitbase8_pretrain.pth"),
    "dino_vits8": DinoSpec("vit_small_patch8_224", "dino_deitsmall8_pretrain.pth"),
    "dino_vitb16": DinoSpec("vit_base_patch16_224", "dino_vitbase16_pretrain.pth"),
    "dino_vits16": DinoSpec("vit_small_patch16_224", "dino_deitsmall16_pretrain.pth"),
}


class DinoViT(Backbone):
    """Last-block attention keys of a ViT, as a (B, embed_dim, H/p, W/p) grid.

    Args:
        name: one of :data:`DINO_SPECS`.
        vit: a timm ``VisionTransformer`` created with ``dynamic_img_size=True``
            and ``num_classes=0``.
        weights_id: identifier of the loaded weights (``"random"`` if none).
    """

    default_thresholds = PAPER_THRESHOLDS
    search_thresholds = PAPER_SEARCH_THRESHOLDS
    mean = IMAGENET_MEAN
    std = IMAGENET_STD

    def __init__(self, name: str, vit: torch.nn.Module, weights_id: str) -> None:
        super().__init__()
        self.name = name
        self.vit = vit
        self.dim = int(vit.embed_dim)
        self.patch_size = int(vit.patch_embed.patch_size[0])
        self.weights_id = weights_id
        self.train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Keys of the last block for (B, 3, H, W) images: (B, dim, H // p, W // p) float32."""
        vit = self.vit
        tokens = vit.patch_embed(x)  # (B, h, w, C) with dynamic_img_size
        batch, rows, cols, _ = tokens.shape
        tokens = vit.norm_pre(vit.patch_drop(vit._pos_embed(tokens)))
        for block in vit.blocks[:-1]:
            tokens = block(tokens)
        # Only the key projection of the last block is needed: its attention
        # output, MLP and the final norm would be wasted work.
        last = vit.blocks[-1]
        qkv_weight = last.attn.qkv.weight
        qkv_bias = last.attn.qkv.bias
        dim = self.dim
        key_bias = None if qkv_bias is None else qkv_bias[dim:2 * dim]
        keys = torch.nn.functional.linear(last.norm1(tokens), qkv_weight[dim:2 * dim], key_bias)
        # Channels of the qkv output are head-major, so this slice is already
        # the heads concatenated in order, as DINO's reshape would give.
        keys = keys[:, vit.num_prefix_tokens:, :]
        return keys.transpose(1, 2).reshape(batch, dim, rows, cols).float()


def build_dino(name: str, weights: str | os.PathLike | None = None, random_init: bool = False) -> DinoViT:
    """A :class:`DinoViT` with weights from ``weights``, the hub, or random when asked.

    Raises:
        WeightsNotFoundError: no weight source available (says how to supply one).
        WeightsFormatError: the file does not hold this variant's DINO weights.
    """
    spec = DINO_SPECS[name]
    if random_init:
        return DinoViT(name, _create_vit(spec), "random")
    search = WeightSearch(
        backbone=name,
        hub_repo=spec.hub_repo,
        package_file=None,
        how_to_supply=(
            f"Download the official DINO checkpoint {spec.official_file} ({spec.official_url}) "
            f"and pass it with --weights PATH, or put timm's {spec.hub_repo} in the Hugging Face "
            f"cache; the backbone efficientnet_lite0 works offline."
        ),
    )
    source = resolve_weights(search, weights)
    state = read_state_dict(source.path, checkpoint_keys=("teacher", "state_dict", "model"))
    # Built on the meta device: random initialisation of a ViT-B takes seconds
    # and would be overwritten anyway; the checkpoint's tensors are assigned.
    with torch.device("meta"):
        vit = _create_vit(spec)
    load_strict(vit, dino_to_timm(state), str(source.path), assign=True)
    return DinoViT(name, vit, file_weights_id(source.path))


def _create_vit(spec: DinoSpec) -> torch.nn.Module:
    return timm.create_model(spec.timm_name, pretrained=False, num_classes=0, dynamic_img_size=True)


def dino_to_timm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official DINO (or timm) ViT keys → timm ``VisionTransformer`` keys.

    Both share names (``cls_token``, ``blocks.N.attn.qkv.weight``, ...); what
    differs is wrapping: ``module.`` / ``backbone.`` prefixes, and in training
    checkpoints the DINO projection head (``head.*``), which is not part of the
    backbone and is dropped.
    """
    state = strip_prefixes(state)
    # float32 because half-precision checkpoints would otherwise be assigned as is.
    backbone = {k: v.float() if v.is_floating_point() else v for k, v in state.items() if not k.startswith("head.")}
    if not backbone:
        raise WeightsFormatError("the checkpoint holds only projection-head weights, no ViT backbone")
    return backbone
