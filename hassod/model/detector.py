"""The hierarchical detector: settings, construction, and the GeneralizedRCNN subclass (docs/design.md §5).

Input images are (3, H, W) float32 RGB in [0, 1]; the model's transform
normalises them, resizes the shortest edge (a random choice of
``min_size_train`` in training, ``min_size_test`` at inference, longest edge
≤ ``max_size``) and pads the batch to a multiple of 32. Output boxes are
mapped back to the input image's pixel coordinates; masks stay relative to
their boxes (:func:`hassod.model.masks.paste_masks` puts them at image size).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Mapping

from torch import Tensor, nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform, resize_boxes

from hassod.model.backbone import BACKBONES, backbone_normalisation, build_backbone
from hassod.model.cascade import AlignedMultiScaleRoIAlign, CascadeRoIHeads, CascadeStage

# FPN maps the RoI heads pool from (P2..P5); the RPN also uses P6 ("pool").
ROI_FEATURES = ["0", "1", "2", "3"]


@dataclass(frozen=True)
class DetectorSettings:
    """Every hyper-parameter that shapes the model; defaults are the reference's (HASSOD/CutLER configs).

    Sizes are in pixels of the resized image. ``dataclasses.asdict`` gives a
    JSON-serialisable dict; :meth:`from_dict` reads one back.
    """

    backbone: str = "resnet50"  # "resnet50" | "efficientnet_lite0" | "tiny"
    fpn_channels: int = 256
    fpn_norm: bool = True  # BatchNorm in the FPN convs, as the reference's FPN.NORM "SyncBN"
    box_head_dim: int = 1024  # width of each stage's two FC layers
    mask_head_dim: int = 256  # channels of the mask head's 4 convs and deconv
    # Multi-scale training: shortest edge drawn from these (the reference's list, 240..1024).
    min_size_train: tuple[int, ...] = (240, 320, 480, 640, 672, 704, 736, 768, 800, 1024)
    min_size_test: int = 800
    max_size: int = 1333
    # RPN: one anchor size per level P2..P6, three aspect ratios (h/w).
    anchor_sizes: tuple[int, ...] = (32, 64, 128, 256, 512)
    anchor_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    rpn_fg_iou: float = 0.7
    rpn_bg_iou: float = 0.3
    rpn_batch_size_per_image: int = 256
    rpn_positive_fraction: float = 0.5
    rpn_pre_nms_top_n_train: int = 2000  # per FPN level
    rpn_pre_nms_top_n_test: int = 1000  # per FPN level
    rpn_post_nms_top_n_train: int = 4000  # per image (the reference's POST_NMS_TOPK_TRAIN)
    rpn_post_nms_top_n_test: int = 1000
    rpn_nms_thresh: float = 0.65
    # Cascade RoI heads.
    cascade_ious: tuple[float, ...] = (0.5, 0.6, 0.7)
    cascade_box_weights: tuple[tuple[float, ...], ...] = ((10.0, 10.0, 5.0, 5.0), (20.0, 20.0, 10.0, 10.0), (30.0, 30.0, 15.0, 15.0))
    roi_batch_size_per_image: int = 512
    roi_positive_fraction: float = 0.5
    box_pool_size: int = 7
    mask_pool_size: int = 14
    # Inference: 0.0 keeps every box NMS leaves, up to detections_per_img (AR@1000 needs them).
    score_thresh: float = 0.0
    nms_thresh: float = 0.5
    detections_per_img: int = 1000
    # Level head and training tricks.
    num_levels: int = 3
    level_focal_alpha: float = 0.25
    level_focal_gamma: float = 2.0
    drop_loss_iou: float | None = 0.01  # None turns DropLoss off

    @classmethod
    def tiny(cls) -> "DetectorSettings":
        """A very small random model on ~128 px images, for tests (seconds per step on a CPU)."""
        return cls(
            backbone="tiny",
            fpn_channels=32,
            fpn_norm=False,
            box_head_dim=64,
            mask_head_dim=16,
            min_size_train=(112, 128, 144),
            min_size_test=128,
            max_size=192,
            anchor_sizes=(16, 32, 64, 128, 256),
            rpn_batch_size_per_image=64,
            rpn_pre_nms_top_n_train=200,
            rpn_pre_nms_top_n_test=100,
            rpn_post_nms_top_n_train=200,
            rpn_post_nms_top_n_test=100,
            roi_batch_size_per_image=64,
            detections_per_img=100,
        )

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "DetectorSettings":
        """Settings from ``asdict`` output (lists back to tuples); unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown detector settings: {', '.join(unknown)}")

        def as_tuple(value: Any) -> Any:
            return tuple(as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value

        return cls(**{k: as_tuple(v) for k, v in values.items()})

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {self.backbone!r}; choose one of {', '.join(BACKBONES)}")
        if len(self.cascade_ious) != len(self.cascade_box_weights):
            raise ValueError("cascade_ious and cascade_box_weights must have one entry per stage")
        if len(self.anchor_sizes) != 5:
            raise ValueError("anchor_sizes needs one size per FPN level P2..P6 (5 values)")


class DetectorTransform(GeneralizedRCNNTransform):
    """torchvision's transform with a separate inference size, and no mask pasting at inference.

    torchvision uses the last of ``min_size`` at inference; here training
    draws from ``min_size_train`` and evaluation uses ``min_size_test``.
    """

    def __init__(self, settings: DetectorSettings, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__(settings.min_size_train, settings.max_size, list(mean), list(std), size_divisible=32)
        self.min_size_train = tuple(settings.min_size_train)
        self.min_size_test = int(settings.min_size_test)

    def train(self, mode: bool = True) -> "DetectorTransform":
        super().train(mode)
        self.min_size = self.min_size_train if mode else (self.min_size_test,)
        return self

    def postprocess(
        self, result: list[dict[str, Tensor]], image_shapes: list[tuple[int, int]],
        original_image_sizes: list[tuple[int, int]],
    ) -> list[dict[str, Tensor]]:
        """Eval outputs: boxes back to input-image pixels; masks left as the head's box-relative probabilities.

        torchvision would also paste every mask here as a float32 image
        (4 bytes per pixel per detection, plus a stacked copy), although
        callers threshold them and often keep a few; they paste what they
        keep with :func:`hassod.model.masks.paste_masks` instead.
        """
        if self.training:
            return result
        for pred, resized, original in zip(result, image_shapes, original_image_sizes):
            pred["boxes"] = resize_boxes(pred["boxes"], resized, original)
        return result


class HierarchicalDetector(GeneralizedRCNN):
    """Cascade Mask R-CNN with a level head; ``settings`` records how it was built.

    Training: ``model(images, targets)`` → dict of scalar losses (sum them; ``loss_mask`` only
    when the targets have masks).
    Inference (eval mode): ``model(images)`` → per image ``boxes`` (N, 4) xyxy
    input pixels, ``scores`` (N,), ``labels`` (N,) ones, ``levels`` (N,)
    0/1/2 = whole/part/subpart, ``level_scores`` (N, 3), ``masks``
    (N, 1, 28, 28) float32 probabilities over each box (not pasted:
    ``paste_masks(out["masks"], out["boxes"], (H, W))`` from
    :mod:`hassod.model.masks` gives the (N, H, W) bool masks at the input
    image size, the same as torchvision's pasting thresholded at 0.5).
    """

    def __init__(self, backbone: nn.Module, rpn: RegionProposalNetwork, roi_heads: CascadeRoIHeads,
                 transform: DetectorTransform, settings: DetectorSettings) -> None:
        super().__init__(backbone, rpn, roi_heads, transform)
        self.settings = settings

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None):
        """See the class docstring; targets need ``boxes``, ``labels``, ``levels`` and, for the
        mask loss, ``masks`` (a batch whose targets all lack masks has no mask loss: Mean Teacher's
        unlabelled branch)."""
        if self.training and targets is not None:
            for target in targets:
                missing = {"boxes", "labels", "levels"} - set(target)
                if missing:
                    raise ValueError(f"training targets lack {', '.join(sorted(missing))}")
            if len({"masks" in target for target in targets}) > 1:
                raise ValueError("training targets must all have masks or all lack them")
        return super().forward(images, targets)


def build_rpn(settings: DetectorSettings) -> RegionProposalNetwork:
    """RPN over P2..P6 with one anchor size per level and three aspect ratios."""
    anchors = AnchorGenerator(
        sizes=tuple((size,) for size in settings.anchor_sizes),
        aspect_ratios=(tuple(settings.anchor_ratios),) * len(settings.anchor_sizes),
    )
    head = RPNHead(settings.fpn_channels, len(settings.anchor_ratios))
    return RegionProposalNetwork(
        anchors,
        head,
        fg_iou_thresh=settings.rpn_fg_iou,
        bg_iou_thresh=settings.rpn_bg_iou,
        batch_size_per_image=settings.rpn_batch_size_per_image,
        positive_fraction=settings.rpn_positive_fraction,
        pre_nms_top_n={"training": settings.rpn_pre_nms_top_n_train, "testing": settings.rpn_pre_nms_top_n_test},
        post_nms_top_n={"training": settings.rpn_post_nms_top_n_train, "testing": settings.rpn_post_nms_top_n_test},
        nms_thresh=settings.rpn_nms_thresh,
    )


def build_roi_heads(settings: DetectorSettings) -> CascadeRoIHeads:
    """The cascade box/level heads and the class-agnostic mask head."""
    channels = settings.fpn_channels
    stages = [
        CascadeStage(channels * settings.box_pool_size**2, settings.box_head_dim, weights, settings.num_levels)
        for weights in settings.cascade_box_weights
    ]
    return CascadeRoIHeads(
        box_pool=AlignedMultiScaleRoIAlign(ROI_FEATURES, settings.box_pool_size),
        mask_pool=AlignedMultiScaleRoIAlign(ROI_FEATURES, settings.mask_pool_size),
        stages=stages,
        mask_head=MaskRCNNHeads(channels, (settings.mask_head_dim,) * 4, 1),
        mask_predictor=MaskRCNNPredictor(settings.mask_head_dim, settings.mask_head_dim, 1),
        stage_ious=settings.cascade_ious,
        batch_size_per_image=settings.roi_batch_size_per_image,
        positive_fraction=settings.roi_positive_fraction,
        score_thresh=settings.score_thresh,
        nms_thresh=settings.nms_thresh,
        detections_per_img=settings.detections_per_img,
        drop_loss_iou=settings.drop_loss_iou,
        level_alpha=settings.level_focal_alpha,
        level_gamma=settings.level_focal_gamma,
    )


def build_detector(
    settings: DetectorSettings | None = None,
    backbone_weights: str | os.PathLike | None = None,
    random_init: bool = False,
) -> HierarchicalDetector:
    """A :class:`HierarchicalDetector` in training mode.

    Args:
        settings: model hyper-parameters (default: the reference's ResNet-50 model).
        backbone_weights: ResNet-50 DINO weights file (required for ``resnet50``
            unless ``random_init``), or an EfficientNet-Lite0 weights file
            (default: the installed package's). Never downloaded.
        random_init: initialise the backbone randomly instead.
    """
    settings = settings or DetectorSettings()
    backbone = build_backbone(settings.backbone, backbone_weights, random_init, settings.fpn_channels, settings.fpn_norm)
    mean, std = backbone_normalisation(settings.backbone)
    model = HierarchicalDetector(backbone, build_rpn(settings), build_roi_heads(settings),
                                 DetectorTransform(settings, mean, std), settings)
    return model.train()


__all__ = ["DetectorSettings", "DetectorTransform", "HierarchicalDetector", "build_detector"]
