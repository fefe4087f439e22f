"""Region descriptors: one backbone forward per image, RoI pooling of every region (docs/design.md §2, §8).

>>> describer = RegionDescriber(build_backbone("efficientnet_lite0"), DescriptorSettings())
>>> fmap = describer.feature_map([image])[0]          # one forward, aspect kept
>>> vectors = describer.describe(fmap, boxes_xyxy)    # (N, describer.dim), unit length
>>> query = describer.describe_query(image, box)      # same function: same vector

Boxes are ``xyxy`` in pixels of the *original* image, measured at pixel edges,
so the whole image is ``(0, 0, W, H)``. Each box is mapped into the network
input (the image resized to ``long_side``) and RoI-aligned (``aligned=True``,
half-pixel centres) on every layer of ``DescriptorSettings.layers``; the samples
are pooled (average by default; GeM or max), L2-normalised per layer,
concatenated with equal weight and normalised again. A query box takes exactly
these steps, so :meth:`RegionDescriber.describe_query` on a box of an indexed
image reproduces its indexed vector. PCA-whitening: :mod:`indexer.whitening`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from hassod.rle import rle_to_masks
from hassod.features import Backbone, EfficientNetLite0

POOLINGS = ("gem", "avg", "max")
GRID_LAYER = "grid"


# Layer name → stride in network-input pixels. Boxes map onto a layer as
# roi_align(aligned=True) assumes: cell i centred at stride * (i + 0.5). The
# TF "same" padding of this net is asymmetric, which moves the *geometric*
# centre of a stride-s cell's receptive field by (s - 1) / 2 pixels, but the
# *effective* centre stays well within a cell, so no correction is applied
# (docs/benchmarks.md, "Feature-cell centres").
EFFICIENTNET_LAYERS = {"s8": 8, "s16": 16, "s32": 32, "head": 32}

# Masks are turned into per-bin coverage this many masks at a time: an
# (N, H, W) float copy of 30 full-size masks of a 12 MP photo would need 1.4 GB.
_MASK_CHUNK = 8
# A mask-weighted max only looks at bins at least this much inside the mask.
_MAX_POOL_COVERAGE = 0.5


@dataclass(frozen=True)
class DescriptorSettings:
    """How regions are described. The defaults are efficientnet_lite0's, chosen with
    ``benchmarks/bench_descriptors.py`` (docs/benchmarks.md, "Descriptor settings").

    Attributes:
        layers: feature layers pooled and concatenated. efficientnet_lite0 offers
            ``"s8"``, ``"s16"``, ``"s32"`` (raw outputs of its stride-8/16/32 stages:
            40/112/320 channels, signed, being linear bottlenecks) and ``"head"``
            (the 1280-channel head convolution after BatchNorm + ReLU6: stride 32,
            non-negative). Every backbone offers ``"grid"``: its ``forward`` output
            at stride ``patch_size`` (efficientnet_lite0: the 472-channel stride-8
            discovery feature). Default ``("s16", "s32")``: as good as adding the
            head, at a quarter of the dimension (432 vs 1712 floats per region,
            which is what the vector store holds).
        pooling: ``"avg"`` (default), ``"gem"`` or ``"max"`` over the RoI samples.
            Average wins: GeM clamps to positive values, discarding half of the
            signed stage outputs.
        gem_p, gem_eps: GeM exponent and clamp (``pooling="gem"`` only).
        long_side: the image is resized (aspect kept) so its longer side has
            about this many pixels, then one forward. 480: the middle of the
            accuracy plateau between 320 and 800 px.
        size_multiple: both input sides are rounded to a multiple of this, so
            every stage grid covers the input exactly (32 = the deepest stride).
        bins: RoI-align output grid per side; samples per bin adapt to the
            box size (``sampling_ratio=0``), so the pool sees the whole box.
        mask_weighting: weight each bin by the fraction of it inside the
            region's mask when masks are given. Off: the gain is within noise,
            and a query box has no mask, so a crop of an indexed region would
            no longer reproduce that region's vector.
        batch_size: images per forward when several share an input size.
        version: bumped when the computation changes, so an index built with
            another descriptor is recognised by :attr:`RegionDescriber.name`.
    """

    layers: tuple[str, ...] = ("s16", "s32")
    pooling: str = "avg"
    gem_p: float = 3.0
    gem_eps: float = 1e-6
    long_side: int = 480
    size_multiple: int = 32
    bins: int = 7
    mask_weighting: bool = False
    batch_size: int = 8
    version: int = 1

    def __post_init__(self) -> None:
        if not self.layers:
            raise ValueError("DescriptorSettings.layers must name at least one layer")
        if len(set(self.layers)) != len(self.layers):
            raise ValueError(f"repeated layer in {self.layers}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {self.pooling!r}; choose one of {', '.join(POOLINGS)}")
        if self.pooling == "gem" and not self.gem_p > 0:
            raise ValueError(f"gem_p must be positive, got {self.gem_p}")
        if self.long_side < self.size_multiple or self.size_multiple < 1 or self.bins < 1 or self.batch_size < 1:
            raise ValueError("long_side >= size_multiple >= 1, bins >= 1 and batch_size >= 1 are required")


@dataclass
class FeatureMap:
    """Feature layers of one image from one forward.

    layers: name → (C, h, w) float32 tensor on the backbone's device.
    strides: name → stride of that layer in network-input pixels.
    image_size: (H, W) of the original image in pixels.
    input_size: (h, w) of the network input in pixels (the resized image).
    """

    layers: dict[str, torch.Tensor]
    strides: dict[str, int]
    image_size: tuple[int, int]
    input_size: tuple[int, int]

    @property
    def scale(self) -> tuple[float, float]:
        """(x, y) factors from original to network-input pixels."""
        return self.input_size[1] / self.image_size[1], self.input_size[0] / self.image_size[0]

    @property
    def whole_box(self) -> np.ndarray:
        """(4,) xyxy box of the whole original image."""
        return np.array([0.0, 0.0, self.image_size[1], self.image_size[0]])


class RegionDescriber:
    """Describes regions of images by RoI pooling from one feature map per image.

    Args:
        backbone: a frozen :class:`hassod.features.Backbone`; its device is used.
        settings: :class:`DescriptorSettings`; defaults when ``None``.

    Attributes:
        name: identity of the descriptor (pooling, layers, input size,
            version), stored in an index's configuration.
        dim: length of a descriptor.
    """

    def __init__(self, backbone: Backbone, settings: DescriptorSettings | None = None) -> None:
        self.backbone = backbone
        self.settings = settings or DescriptorSettings()
        available = self.available_layers(backbone)
        unknown = [name for name in self.settings.layers if name not in available]
        if unknown:
            raise ValueError(f"backbone {backbone.name} has no layer {unknown[0]!r}; it offers {', '.join(available)}")
        self.strides = {name: available[name] for name in self.settings.layers}
        deepest = max(self.strides.values())
        if self.settings.size_multiple % deepest:
            # Otherwise the deepest grid would not cover the input exactly.
            raise ValueError(f"size_multiple must be a multiple of the deepest stride {deepest}, "
                             f"got {self.settings.size_multiple}")
        self.layer_dims = {name: self._layer_dim(name) for name in self.settings.layers}
        self.dim = sum(self.layer_dims.values())
        s = self.settings
        pooling = f"gem{s.gem_p:g}" if s.pooling == "gem" else s.pooling
        masked = "-mw" if s.mask_weighting else ""
        self.name = f"{pooling}-{'+'.join(s.layers)}-l{s.long_side}{masked}-v{s.version}"

    @staticmethod
    def available_layers(backbone: Backbone) -> dict[str, int]:
        """Layer name → stride in input pixels, for this backbone."""
        layers = {GRID_LAYER: int(backbone.patch_size)}
        if isinstance(backbone, EfficientNetLite0):
            layers.update(EFFICIENTNET_LAYERS)
        return layers

    @property
    def device(self) -> torch.device:
        return self.backbone.device

    def input_size(self, height: int, width: int) -> tuple[int, int]:
        """Network input (h, w) in pixels for an H x W image: longer side ≈ ``long_side``, aspect kept.

        Smaller images are upscaled, so a query crop is seen at the same
        input size as a whole indexed image.
        """
        s = self.settings
        factor = s.long_side / max(height, width)
        return tuple(
            max(s.size_multiple, int(round(side * factor / s.size_multiple)) * s.size_multiple)
            for side in (height, width)
        )

    def feature_map(self, images: Sequence[np.ndarray], grid: bool = False) -> list[FeatureMap]:
        """One forward per image (images of equal input size batched): the chosen layers.

        images: RGB arrays (H, W, 3) uint8, sizes may differ. Returns one
        :class:`FeatureMap` per image, in order. grid: also the ``"grid"``
        layer (the backbone's discovery features) from the same forward, for
        regions found on the descriptor's input (:class:`indexer.regions.DiscoveryRegions`).
        """
        strides = {**self.strides, **({GRID_LAYER: int(self.backbone.patch_size)} if grid else {})}
        sizes = [self.input_size(*np.shape(image)[:2]) for image in images]
        out: list[FeatureMap | None] = [None] * len(images)
        for size in dict.fromkeys(sizes):
            members = [i for i, other in enumerate(sizes) if other == size]
            for start in range(0, len(members), self.settings.batch_size):
                chunk = members[start:start + self.settings.batch_size]
                batch = self.backbone.prepare([images[i] for i in chunk], size=size)
                with torch.inference_mode():
                    layers = self._forward(batch, tuple(strides))
                for row, index in enumerate(chunk):
                    # A copy, so that one kept map does not hold its whole batch in memory.
                    out[index] = FeatureMap(
                        layers={name: value[row].clone() if len(chunk) > 1 else value[row]
                                for name, value in layers.items()},
                        strides=dict(strides),
                        image_size=tuple(int(v) for v in images[index].shape[:2]),
                        input_size=size,
                    )
        return out  # type: ignore[return-value]

    def describe(
        self,
        fmap: FeatureMap,
        boxes: np.ndarray,
        masks: np.ndarray | Sequence[dict[str, Any]] | None = None,
    ) -> np.ndarray:
        """Descriptors of regions of one image.

        Args:
            fmap: the image's :class:`FeatureMap` (from :meth:`feature_map`).
            boxes: (N, 4) xyxy in original-image pixels; parts outside the
                image are clipped.
            masks: optional (N, H, W) bool masks or N COCO RLEs of the regions,
                at the original size; used only with ``settings.mask_weighting``.

        Returns:
            (N, dim) float32, rows of unit L2 norm.

        Raises:
            ValueError: a box that is not finite, has x1 <= x0 or y1 <= y0, or
                lies entirely outside the image; masks of the wrong count or size.
        """
        clipped = self._check_boxes(boxes, fmap.image_size)
        if len(clipped) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        device = next(iter(fmap.layers.values())).device
        weights = None
        if masks is not None and self.settings.mask_weighting:
            weights = self._bin_coverage(masks, clipped, fmap.image_size, device)
        sx, sy = fmap.scale
        scaled = clipped * np.array([sx, sy, sx, sy])
        rois = torch.from_numpy(np.concatenate([np.zeros((len(scaled), 1)), scaled], axis=1)).float().to(device)
        parts = []
        with torch.inference_mode():
            for name in self.settings.layers:
                if name not in fmap.layers:
                    raise ValueError(f"feature map lacks layer {name!r} (it has {', '.join(fmap.layers)})")
                pooled = self._pool(fmap.layers[name], rois, 1.0 / fmap.strides[name], weights)
                parts.append(F.normalize(pooled, dim=1))
            vectors = F.normalize(torch.cat(parts, dim=1), dim=1)
        return vectors.cpu().numpy().astype(np.float32)

    def describe_query(self, image: np.ndarray, box: Sequence[float] | np.ndarray | None = None) -> np.ndarray:
        """(dim,) descriptor of ``box`` (xyxy original pixels; ``None`` = whole image) in ``image``."""
        if box is not None:  # a bad box fails before the forward
            self._check_boxes(np.asarray(box, dtype=np.float64).reshape(1, -1), tuple(np.shape(image)[:2]))
        fmap = self.feature_map([image])[0]
        region = fmap.whole_box if box is None else np.asarray(box, dtype=np.float64)
        return self.describe(fmap, region.reshape(1, 4))[0]

    def global_descriptor(self, fmap: FeatureMap) -> np.ndarray:
        """(dim,) descriptor of the whole image: its ``(0, 0, W, H)`` box."""
        return self.describe(fmap, fmap.whole_box.reshape(1, 4))[0]

    # -- internals ---------------------------------------------------------------

    def _layer_dim(self, name: str) -> int:
        if name == GRID_LAYER:
            return int(self.backbone.dim)
        net = self.backbone.net  # type: ignore[attr-defined]
        if name == "head":
            return int(net.conv_head.out_channels)
        return int(self.backbone.stage_dims[("s8", "s16", "s32").index(name)])  # type: ignore[attr-defined]

    def _forward(self, batch: torch.Tensor, wanted: Sequence[str]) -> dict[str, torch.Tensor]:
        """(B, 3, h, w) prepared input → name → (B, C, h/stride, w/stride) float32 for the ``wanted`` layers."""
        layers: dict[str, torch.Tensor] = {}
        if not isinstance(self.backbone, EfficientNetLite0):
            return {GRID_LAYER: self.backbone(batch).float()}
        if any(name in EFFICIENTNET_LAYERS or name == GRID_LAYER for name in wanted):
            raw = self.backbone.stage_features(batch)
            stages = dict(zip(("s8", "s16", "s32"), raw))
            if GRID_LAYER in wanted:  # the stages once for both
                layers[GRID_LAYER] = self.backbone.grid_from_stages(raw).float()
            if "head" in wanted:
                net = self.backbone.net  # type: ignore[attr-defined]
                stages["head"] = net.bn2(net.conv_head(stages["s32"]))
            layers.update({name: stages[name].float() for name in wanted if name in stages})
        return layers

    def _pool(self, feature: torch.Tensor, rois: torch.Tensor, spatial_scale: float,
              weights: torch.Tensor | None) -> torch.Tensor:
        """(C, h, w) map, (N, 5) rois in input pixels → (N, C) pooled over each box."""
        s = self.settings
        source = feature.clamp(min=s.gem_eps).pow(s.gem_p) if s.pooling == "gem" else feature
        # aligned=True: pixel centres at half-integers, no rounding of box edges,
        # so a box narrower than one cell still gets interpolated samples.
        bins = roi_align(source[None], rois, output_size=s.bins, spatial_scale=spatial_scale,
                         sampling_ratio=0, aligned=True).flatten(2)  # (N, C, bins²)
        if s.pooling == "max":
            if weights is not None:
                inside = weights >= _MAX_POOL_COVERAGE
                inside |= ~inside.any(dim=2, keepdim=True)  # a mask missing every bin: use them all
                bins = bins.masked_fill(~inside, float("-inf"))
            return bins.amax(dim=2)
        if weights is None:
            mean = bins.mean(dim=2)
        else:
            mean = (bins * weights).sum(dim=2) / weights.sum(dim=2)
        return mean.clamp(min=s.gem_eps).pow(1.0 / s.gem_p) if s.pooling == "gem" else mean

    def _bin_coverage(self, masks: np.ndarray | Sequence[dict[str, Any]], boxes: np.ndarray,
                      image_size: tuple[int, int], device: torch.device) -> torch.Tensor:
        """(N, 1, bins²) fraction of each RoI bin inside its region's mask (on the same bin grid)."""
        count = len(masks)
        if count != len(boxes):
            raise ValueError(f"{count} masks for {len(boxes)} boxes")
        chunks = []
        for start in range(0, count, _MASK_CHUNK):
            stop = min(start + _MASK_CHUNK, count)
            block = _decode_masks(masks, start, stop, image_size)
            rois = np.concatenate([np.arange(stop - start)[:, None], boxes[start:stop]], axis=1)
            coverage = roi_align(torch.from_numpy(block).to(device)[:, None].float(),
                                 torch.from_numpy(rois).float().to(device), output_size=self.settings.bins,
                                 spatial_scale=1.0, sampling_ratio=2, aligned=True)
            chunks.append(coverage.flatten(2))
        weights = torch.cat(chunks)
        # A mask that misses its box entirely would divide by zero: fall back to the plain box.
        empty = weights.sum(dim=2, keepdim=True) <= 0
        return torch.where(empty, torch.ones_like(weights), weights)

    @staticmethod
    def _check_boxes(boxes: np.ndarray, image_size: tuple[int, int]) -> np.ndarray:
        """(N, 4) xyxy validated and clipped to the image, float64."""
        array = np.asarray(boxes, dtype=np.float64)
        if array.ndim == 1 and array.size == 4:
            array = array[None]
        if array.ndim != 2 or array.shape[1] != 4:
            raise ValueError(f"boxes must be an (N, 4) xyxy array, got shape {array.shape}")
        if not np.isfinite(array).all():
            bad = int(np.flatnonzero(~np.isfinite(array).all(axis=1))[0])
            raise ValueError(f"box {bad} is not finite: {array[bad].tolist()}")
        empty = (array[:, 2] <= array[:, 0]) | (array[:, 3] <= array[:, 1])
        if empty.any():
            bad = int(np.flatnonzero(empty)[0])
            raise ValueError(f"box {bad} is empty (needs x1 > x0 and y1 > y0, xyxy): {array[bad].tolist()}")
        height, width = image_size
        clipped = np.stack([
            array[:, 0].clip(0, width), array[:, 1].clip(0, height),
            array[:, 2].clip(0, width), array[:, 3].clip(0, height),
        ], axis=1)
        outside = (clipped[:, 2] <= clipped[:, 0]) | (clipped[:, 3] <= clipped[:, 1])
        if outside.any():
            bad = int(np.flatnonzero(outside)[0])
            raise ValueError(f"box {bad} {array[bad].tolist()} lies outside the {width}x{height} image")
        return clipped


def _decode_masks(masks: np.ndarray | Sequence[dict[str, Any]], start: int, stop: int,
                  image_size: tuple[int, int]) -> np.ndarray:
    """Masks ``start:stop`` as an (n, H, W) bool array, from bool arrays or COCO RLEs."""
    if isinstance(masks, np.ndarray):
        block = masks[start:stop]
    else:
        block = rle_to_masks(list(masks[start:stop]), image_size)
    if tuple(block.shape[1:]) != tuple(image_size):
        raise ValueError(f"masks are {block.shape[1]}x{block.shape[2]}, the image is {image_size[0]}x{image_size[1]}")
    return np.ascontiguousarray(block.astype(bool))


def default_settings(backbone: Backbone) -> DescriptorSettings:
    """The measured defaults for efficientnet_lite0; other backbones pool their patch grid."""
    if isinstance(backbone, EfficientNetLite0):
        return DescriptorSettings()
    return DescriptorSettings(layers=(GRID_LAYER,))
