"""Cascade RoI heads with a level head and a class-agnostic mask head (docs/design.md §5).

torchvision has no cascade; this module follows the reference (detectron2's
``CascadeROIHeads`` as modified by CutLER/HASSOD) wherever results or the
loading of converted checkpoints depend on it: three stages relabelling the
previous stage's regressed boxes of the same 512 sampled RoIs (IoU 0.5, 0.6,
0.7), gradient into each stage scaled by 1/3, 2 logits per RoI with index 0
foreground, DropLoss, class-agnostic box deltas, a ``Linear(1024 → 3)`` level
head per stage with a sigmoid focal loss, stage-averaged scores and level
distributions at inference, and a mask head on stage 0's foreground RoIs.
The details, with the reference's names, are in docs/design.md §5.

Boxes are xyxy in pixels of the resized (model-input) image throughout.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.faster_rcnn import TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import box_iou, boxes as box_ops, roi_align, sigmoid_focal_loss
from torchvision.ops.poolers import LevelMapper

FG_INDEX, BG_INDEX = 0, 1  # detectron2's class order for one foreground class

# Largest log-scale a box delta may apply (detectron2's _DEFAULT_SCALE_CLAMP).
BBOX_XFORM_CLIP = math.log(1000.0 / 16)


class AlignedMultiScaleRoIAlign(nn.Module):
    """RoIAlign with ``aligned=True`` over FPN levels, boxes assigned as detectron2 does.

    torchvision's ``MultiScaleRoIAlign`` hard-codes ``aligned=False`` (a half
    pixel shift against detectron2-trained weights); the level assignment is
    torchvision's ``LevelMapper`` with canonical box size 224 at level 4.

    Args:
        featmap_names: keys of the feature dict to pool from, finest first.
        output_size: side of the pooled square (7 for boxes, 14 for masks).
        sampling_ratio: RoIAlign samples per bin (0 = adaptive, as detectron2).
    """

    def __init__(self, featmap_names: list[str], output_size: int, sampling_ratio: int = 0) -> None:
        super().__init__()
        self.featmap_names = list(featmap_names)
        self.output_size = output_size
        self.sampling_ratio = sampling_ratio

    def forward(self, features: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        """Pool (sum R_i, C, S, S) features for per-image boxes (R_i, 4) xyxy in input pixels."""
        maps = [features[name] for name in self.featmap_names]
        max_h = max(shape[0] for shape in image_shapes)
        # FPN strides are powers of two: infer each level's scale from its height.
        scales = [2.0 ** round(math.log2(m.shape[-2] / max_h)) for m in maps]
        k_min, k_max = int(-math.log2(scales[0])), int(-math.log2(scales[-1]))
        rois = torch.cat(
            [torch.cat([b.new_full((len(b), 1), i), b], dim=1) for i, b in enumerate(boxes)], dim=0
        )
        channels = maps[0].shape[1]
        out = maps[0].new_zeros((len(rois), channels, self.output_size, self.output_size))
        if len(rois) == 0:
            return out
        levels = LevelMapper(k_min, k_max)(boxes)
        for level, (feature, scale) in enumerate(zip(maps, scales)):
            index = torch.where(levels == level)[0]
            if len(index):
                pooled = roi_align(
                    feature, rois[index], self.output_size, spatial_scale=scale,
                    sampling_ratio=self.sampling_ratio, aligned=True,
                )
                out[index] = pooled.to(out.dtype)
        return out


class CascadeStage(nn.Module):
    """One cascade stage: 2×FC box head, fg/bg classifier, agnostic box deltas, level logits.

    Args:
        in_features: flattened pooled size (C × 7 × 7).
        representation_size: width of the two FC layers (1024).
        box_weights: (wx, wy, ww, wh) of the stage's box coder.
        num_levels: number of hierarchy levels (3).
    """

    def __init__(self, in_features: int, representation_size: int, box_weights: tuple[float, ...], num_levels: int = 3) -> None:
        super().__init__()
        self.box_head = TwoMLPHead(in_features, representation_size)
        self.cls_score = nn.Linear(representation_size, 2)
        self.bbox_pred = nn.Linear(representation_size, 4)
        self.level_predictor = nn.Linear(representation_size, num_levels)
        # detectron2's initialisation of the predictors.
        for layer, std in ((self.cls_score, 0.01), (self.bbox_pred, 0.001), (self.level_predictor, 0.01)):
            nn.init.normal_(layer.weight, std=std)
            nn.init.zeros_(layer.bias)
        self.box_coder = det_utils.BoxCoder(tuple(float(w) for w in box_weights), BBOX_XFORM_CLIP)

    def forward(self, pooled: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(R, C, 7, 7) → class logits (R, 2), box deltas (R, 4), level logits (R, L)."""
        x = self.box_head(pooled)
        return self.cls_score(x), self.bbox_pred(x), self.level_predictor(x)


@dataclass
class Labels:
    """Matching of one image's boxes (R) with its pseudo-labels (G).

    fg: (R,) bool, IoU ≥ threshold. matched: (R,) int64 index into the
    pseudo-labels (0 where G = 0). max_iou: (R,) float.
    """

    fg: Tensor
    matched: Tensor
    max_iou: Tensor


def match_boxes(boxes: Tensor, gt_boxes: Tensor, iou_threshold: float) -> Labels:
    """Label boxes (R, 4) foreground when their best IoU with ``gt_boxes`` (G, 4) is ≥ the threshold."""
    if len(gt_boxes) == 0:
        zeros = boxes.new_zeros(len(boxes))
        return Labels(zeros.bool(), zeros.long(), zeros)
    max_iou, matched = box_iou(gt_boxes, boxes).max(dim=0)
    return Labels(max_iou >= iou_threshold, matched, max_iou)


def drop_loss_weights(pred_boxes: Tensor, gt_boxes: Tensor, iou_threshold: float) -> Tensor:
    """DropLoss weights (R,): 0 for boxes whose IoU with every pseudo-label is ≤ the threshold, else 1.

    Args:
        pred_boxes: (R, 4) xyxy, the stage's regressed boxes (CutLER measures these, not the inputs).
        gt_boxes: (G, 4) xyxy pseudo-labels of the same image; G = 0 drops every box.
    """
    if len(gt_boxes) == 0 or len(pred_boxes) == 0:
        return pred_boxes.new_zeros(len(pred_boxes))
    max_iou = box_iou(pred_boxes, gt_boxes).max(dim=1).values
    return (max_iou > iou_threshold).to(pred_boxes.dtype)


def level_focal_loss(level_logits: Tensor, fg: Tensor, levels: Tensor, alpha: float, gamma: float) -> Tensor:
    """Sigmoid focal loss of the level logits (R, L) on foreground rows only.

    Args:
        fg: (R,) bool, which RoIs are foreground.
        levels: (R,) int64 matched pseudo-label level (ignored on background rows).
    Returns a scalar averaged over fg rows × L; zero (with gradient graph) when no row is fg.
    """
    logits = level_logits[fg]
    if len(logits) == 0:
        return level_logits.sum() * 0.0
    target = F.one_hot(levels[fg], num_classes=level_logits.shape[1]).to(logits.dtype)
    return sigmoid_focal_loss(logits, target, alpha=alpha, gamma=gamma, reduction="mean")


def scale_gradient(x: Tensor, scale: float) -> Tensor:
    """``x`` unchanged in the forward pass, its gradient multiplied by ``scale`` in the backward."""
    return x * scale + x.detach() * (1.0 - scale)


class CascadeRoIHeads(nn.Module):
    """Three-stage cascade box heads with level head, plus mask head; see the module docstring.

    Called by torchvision's ``GeneralizedRCNN`` as
    ``roi_heads(features, proposals, image_sizes, targets)`` and returns
    ``(detections, losses)``: in training ``([], losses)``; in eval a list of
    dicts with ``boxes`` (N, 4), ``scores`` (N,), ``labels`` (N,) ones,
    ``levels`` (N,), ``level_scores`` (N, L), ``masks`` (N, 1, 28, 28)
    float32 probabilities over each box (the model returns them so; see
    :func:`hassod.model.masks.paste_masks`).
    """

    def __init__(
        self,
        box_pool: AlignedMultiScaleRoIAlign,
        mask_pool: AlignedMultiScaleRoIAlign,
        stages: list[CascadeStage],
        mask_head: MaskRCNNHeads,
        mask_predictor: MaskRCNNPredictor,
        stage_ious: tuple[float, ...],
        batch_size_per_image: int,
        positive_fraction: float,
        score_thresh: float,
        nms_thresh: float,
        detections_per_img: int,
        drop_loss_iou: float | None,
        level_alpha: float,
        level_gamma: float,
    ) -> None:
        super().__init__()
        if len(stages) != len(stage_ious):
            raise ValueError(f"{len(stages)} stages but {len(stage_ious)} IoU thresholds")
        self.box_pool = box_pool
        self.mask_pool = mask_pool
        self.stages = nn.ModuleList(stages)
        self.mask_head = mask_head
        self.mask_predictor = mask_predictor
        # detectron2 starts the mask logits near 0 (std 0.001): torchvision's
        # Kaiming init gives initial BCE values several times log 2.
        nn.init.normal_(mask_predictor.mask_fcn_logits.weight, std=0.001)
        nn.init.zeros_(mask_predictor.mask_fcn_logits.bias)
        self.stage_ious = tuple(stage_ious)
        self.sampler = det_utils.BalancedPositiveNegativeSampler(batch_size_per_image, positive_fraction)
        self.score_thresh = score_thresh
        self.nms_thresh = nms_thresh
        self.detections_per_img = detections_per_img
        self.drop_loss_iou = drop_loss_iou
        self.level_alpha = level_alpha
        self.level_gamma = level_gamma

    # ------------------------------------------------------------------ training
    def sample_proposals(self, proposals: list[Tensor], targets: list[dict[str, Tensor]]) -> list[Tensor]:
        """Append each image's pseudo-label boxes to its proposals and sample RoIs (stage-0 labels)."""
        sampled = []
        for boxes, target in zip(proposals, targets):
            boxes = torch.cat([boxes.detach(), target["boxes"].to(boxes.dtype)], dim=0)
            labels = match_boxes(boxes, target["boxes"], self.stage_ious[0])
            positive, negative = self.sampler([labels.fg.long()])
            keep = torch.where(positive[0] | negative[0])[0]
            sampled.append(boxes[keep])
        return sampled

    def _stage_losses(
        self, stage: int, outputs: tuple[Tensor, Tensor, Tensor], boxes: list[Tensor],
        pred_boxes: list[Tensor], targets: list[dict[str, Tensor]],
    ) -> dict[str, Tensor]:
        """Classification (with DropLoss), box-regression and level losses of one stage."""
        class_logits, deltas, level_logits = outputs
        labels = [match_boxes(b, t["boxes"], self.stage_ious[stage]) for b, t in zip(boxes, targets)]
        fg = torch.cat([lab.fg for lab in labels])
        cls_target = torch.where(fg, FG_INDEX, BG_INDEX)
        if self.drop_loss_iou is None:  # DropLoss off: plain cross-entropy on every RoI
            weights = torch.ones_like(fg, dtype=class_logits.dtype)
        else:
            weights = torch.cat([
                drop_loss_weights(p.detach(), t["boxes"], self.drop_loss_iou) for p, t in zip(pred_boxes, targets)
            ])
        num_rois = max(len(fg), 1)
        loss_cls = (weights * F.cross_entropy(class_logits, cls_target, reduction="none")).sum() / num_rois

        matched_boxes = torch.cat([
            t["boxes"][lab.matched] if len(t["boxes"]) else b.new_zeros((len(b), 4))
            for lab, t, b in zip(labels, targets, boxes)
        ])
        coder = self.stages[stage].box_coder
        target_deltas = coder.encode_single(matched_boxes[fg], torch.cat(boxes)[fg])
        loss_box = F.l1_loss(deltas[fg], target_deltas, reduction="sum") / num_rois

        matched_levels = torch.cat([
            t["levels"][lab.matched] if len(t["levels"]) else lab.matched
            for lab, t in zip(labels, targets)
        ])
        loss_level = level_focal_loss(level_logits, fg, matched_levels, self.level_alpha, self.level_gamma)
        return {
            f"loss_cls_stage{stage}": loss_cls,
            f"loss_box_reg_stage{stage}": loss_box,
            f"loss_level_stage{stage}": loss_level,
        }

    def _mask_loss(
        self, features: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]],
    ) -> Tensor:
        """BCE of the mask logits on stage-0 foreground RoIs against 28×28 crops of the matched masks."""
        fg_boxes, mask_targets = [], []
        for b, t in zip(boxes, targets):
            labels = match_boxes(b, t["boxes"], self.stage_ious[0])
            chosen = b[labels.fg]
            fg_boxes.append(chosen)
            if len(chosen):
                mask_targets.append(self._crop_masks(t["masks"], chosen, labels.matched[labels.fg]))
        logits = self.mask_predictor(self.mask_head(self.mask_pool(features, fg_boxes, image_shapes)))
        if not mask_targets:
            return logits.sum() * 0.0
        return F.binary_cross_entropy_with_logits(logits[:, 0], torch.cat(mask_targets))

    def _crop_masks(self, masks: Tensor, boxes: Tensor, matched: Tensor) -> Tensor:
        """(P, M, M) binary targets: each matched mask (H, W) cut to its RoI with aligned RoIAlign."""
        side = 2 * self.mask_pool.output_size  # the deconvolution doubles the pooled side
        # Only the masks some RoI matched are converted to float: all of an
        # image's full-resolution masks can take hundreds of MB.
        used, slot = torch.unique(matched, return_inverse=True)
        rois = torch.cat([slot[:, None].to(boxes.dtype), boxes], dim=1)
        source = masks[used][:, None].to(boxes.dtype)
        crops = roi_align(source, rois, side, spatial_scale=1.0, sampling_ratio=0, aligned=True)
        return (crops[:, 0] >= 0.5).to(boxes.dtype)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        features: dict[str, Tensor],
        proposals: list[Tensor],
        image_shapes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]] | None = None,
    ) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        """Run the cascade on per-image proposals (R_i, 4); see the class docstring for outputs."""
        if self.training:
            if targets is None:
                raise ValueError("targets are required in training mode")
            boxes = self.sample_proposals(proposals, targets)
            stage0_boxes = boxes
        else:
            boxes = proposals
        losses: dict[str, Tensor] = {}
        fg_probs, level_probs = [], []
        pred_boxes: list[Tensor] = []
        for k, stage in enumerate(self.stages):
            if k > 0:
                boxes = self._next_stage_boxes(pred_boxes, image_shapes)
            pooled = self.box_pool(features, boxes, image_shapes)
            if self.training:
                pooled = scale_gradient(pooled, 1.0 / len(self.stages))
            # Box arithmetic in float32 even under autocast: fp16 coordinates
            # are only 0.5 px apart at 1000 px, which the next stage would inherit.
            outputs = tuple(o.float() for o in stage(pooled))
            counts = [len(b) for b in boxes]
            decoded = stage.box_coder.decode_single(outputs[1], torch.cat(boxes)) if sum(counts) else outputs[1]
            pred_boxes = list(decoded.split(counts))
            if self.training:
                losses.update(self._stage_losses(k, outputs, boxes, pred_boxes, targets))
            else:
                fg_probs.append(F.softmax(outputs[0], dim=1)[:, FG_INDEX].split(counts))
                level_probs.append(F.softmax(outputs[2], dim=1).split(counts))
        if self.training:
            if targets and "masks" in targets[0]:
                losses["loss_mask"] = self._mask_loss(features, stage0_boxes, image_shapes, targets)
            return [], losses
        detections = self._detections(pred_boxes, fg_probs, level_probs, image_shapes)
        self._add_masks(features, detections, image_shapes)
        return detections, losses

    def _next_stage_boxes(self, pred_boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> list[Tensor]:
        """Previous stage's regressed boxes, detached and clipped; empty ones dropped in training only.

        At inference every row is kept so the stages' scores stay row-aligned.
        """
        boxes = []
        for b, shape in zip(pred_boxes, image_shapes):
            b = box_ops.clip_boxes_to_image(b.detach(), shape)
            if self.training:
                b = b[(b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])]
            boxes.append(b)
        return boxes

    # ------------------------------------------------------------------ inference
    def _detections(
        self, pred_boxes: list[Tensor], fg_probs: list[tuple[Tensor, ...]],
        level_probs: list[tuple[Tensor, ...]], image_shapes: list[tuple[int, int]],
    ) -> list[dict[str, Tensor]]:
        """Average the stages per image and keep the best boxes after threshold and NMS."""
        results = []
        for i, shape in enumerate(image_shapes):
            scores = torch.stack([stage[i] for stage in fg_probs]).mean(dim=0)
            level_scores = torch.stack([stage[i] for stage in level_probs]).mean(dim=0)
            boxes = box_ops.clip_boxes_to_image(pred_boxes[i], shape)
            results.append(select_detections(boxes, scores, level_scores, self.score_thresh, self.nms_thresh, self.detections_per_img))
        return results

    def _add_masks(self, features: dict[str, Tensor], detections: list[dict[str, Tensor]], image_shapes: list[tuple[int, int]]) -> None:
        """Attach (N, 1, 28, 28) mask probabilities to each image's detections."""
        boxes = [d["boxes"] for d in detections]
        logits = self.mask_predictor(self.mask_head(self.mask_pool(features, boxes, image_shapes)))
        for d, probs in zip(detections, logits.float().sigmoid().split([len(b) for b in boxes])):
            d["masks"] = probs


def select_detections(
    boxes: Tensor, scores: Tensor, level_scores: Tensor, score_thresh: float, nms_thresh: float, max_detections: int,
) -> dict[str, Tensor]:
    """Score threshold, class-agnostic NMS and top-k on one image, keeping levels with their boxes.

    Args:
        boxes: (R, 4) xyxy; scores: (R,); level_scores: (R, L) — all row-aligned.
    Returns ``boxes``, ``scores``, ``labels`` (ones), ``level_scores`` and
    ``levels`` (argmax) for the kept rows, best score first.
    """
    valid = torch.isfinite(boxes).all(dim=1) & torch.isfinite(scores) & (scores > score_thresh)
    index = torch.where(valid)[0]
    keep = box_ops.nms(boxes[index], scores[index], nms_thresh)[:max_detections]
    index = index[keep]
    return {
        "boxes": boxes[index],
        "scores": scores[index],
        "labels": torch.ones(len(index), dtype=torch.int64, device=boxes.device),
        "levels": level_scores[index].argmax(dim=1) if len(index) else index.new_zeros(0),
        "level_scores": level_scores[index],
    }
