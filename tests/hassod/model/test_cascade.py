"""Unit tests of the cascade head's parts: DropLoss, level focal loss, NMS bookkeeping, pooling, masks."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import roi_align, sigmoid_focal_loss

from hassod.model.cascade import (
    AlignedMultiScaleRoIAlign,
    drop_loss_weights,
    level_focal_loss,
    match_boxes,
    scale_gradient,
    select_detections,
)
from hassod.model.detector import build_roi_heads


def test_drop_loss_zeroes_boxes_that_overlap_no_pseudo_label():
    gt = torch.tensor([[0.0, 0, 10, 10], [50, 50, 70, 70]])
    boxes = torch.tensor([
        [0.0, 0, 10, 10],      # IoU 1 with gt 0
        [9.0, 9, 19, 19],      # IoU 1/199 ≈ 0.005 with gt 0: at or below 0.01 → dropped
        [8.0, 8, 18, 18],      # IoU 4/196 ≈ 0.020 → kept
        [100.0, 100, 120, 120],  # overlaps nothing
        [55.0, 55, 65, 65],    # inside gt 1
    ])
    weights = drop_loss_weights(boxes, gt, 0.01)
    assert weights.tolist() == [1.0, 0.0, 1.0, 0.0, 1.0]
    assert drop_loss_weights(boxes, torch.zeros((0, 4)), 0.01).tolist() == [0.0] * 5


def test_level_focal_loss_counts_only_foreground_rois():
    torch.manual_seed(0)
    logits = torch.randn(6, 3)
    fg = torch.tensor([True, False, True, False, False, True])
    levels = torch.tensor([0, 2, 1, 0, 1, 2])
    loss = level_focal_loss(logits, fg, levels, 0.25, 2.0)
    expected = sigmoid_focal_loss(logits[fg], F.one_hot(levels[fg], 3).float(), alpha=0.25, gamma=2.0).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    # Changing background rows (logits or levels) changes nothing.
    changed = logits.clone()
    changed[~fg] = 50.0
    assert level_focal_loss(changed, fg, torch.tensor([0, 0, 1, 2, 2, 2]), 0.25, 2.0).item() == pytest.approx(loss.item(), rel=1e-6)
    # A wrong level on a foreground row raises it.
    assert level_focal_loss(logits, fg, torch.tensor([1, 2, 1, 0, 1, 2]), 0.25, 2.0).item() != pytest.approx(loss.item())
    none = level_focal_loss(logits.requires_grad_(), torch.zeros(6, dtype=torch.bool), levels, 0.25, 2.0)
    assert none.item() == 0.0 and none.requires_grad


def test_match_boxes_threshold_and_empty_targets():
    gt = torch.tensor([[0.0, 0, 10, 10], [20, 0, 30, 10]])
    boxes = torch.tensor([[0.0, 0, 10, 10], [21, 0, 31, 10], [0, 0, 10, 20], [40, 40, 50, 50]])
    labels = match_boxes(boxes, gt, 0.6)
    assert labels.fg.tolist() == [True, True, False, False]  # IoUs 1, 9/11, 0.5, 0
    assert labels.matched[:2].tolist() == [0, 1]
    assert labels.max_iou[2].item() == pytest.approx(0.5)
    empty = match_boxes(boxes, torch.zeros((0, 4)), 0.5)
    assert not empty.fg.any() and empty.matched.tolist() == [0, 0, 0, 0]


def test_levels_stay_with_their_boxes_through_nms():
    boxes = torch.tensor([
        [0.0, 0, 10, 10],
        [0.5, 0, 10.5, 10],   # overlaps box 0 (IoU ≈ 0.9), lower score → suppressed
        [50.0, 50, 60, 60],
        [80.0, 80, 90, 90],   # below the score threshold
        [20.0, 20, 40, 40],
    ])
    scores = torch.tensor([0.6, 0.5, 0.9, 0.01, 0.7])
    level_scores = torch.tensor([
        [0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [0.2, 0.6, 0.2], [0.3, 0.3, 0.4], [0.1, 0.2, 0.7],
    ])
    out = select_detections(boxes, scores, level_scores, score_thresh=0.05, nms_thresh=0.5, max_detections=10)
    order = [2, 4, 0]  # by score, box 1 suppressed, box 3 thresholded
    assert torch.equal(out["boxes"], boxes[order])
    assert torch.equal(out["scores"], scores[order])
    assert torch.equal(out["level_scores"], level_scores[order])
    assert out["levels"].tolist() == [1, 2, 0]
    assert out["labels"].tolist() == [1, 1, 1] and out["labels"].dtype == torch.int64
    capped = select_detections(boxes, scores, level_scores, 0.0, 0.5, 2)
    assert capped["boxes"].shape == (2, 4) and torch.equal(capped["level_scores"], level_scores[[2, 4]])


def test_pooler_is_aligned_and_assigns_levels_like_detectron2():
    torch.manual_seed(0)
    image = (256, 256)
    features = {str(i): torch.randn(1, 2, 256 // s, 256 // s) for i, s in enumerate((4, 8, 16, 32))}
    pool = AlignedMultiScaleRoIAlign(["0", "1", "2", "3"], 7)
    # sqrt(area) 224 → level 4 (P4, "2"); 112 → P3; 20 → P2 (clamped); 480 → P5.
    boxes = torch.tensor([[10.0, 10, 234, 234], [5, 5, 117, 117], [3, 3, 23, 23], [0, 0, 480, 480]])
    pooled = pool(features, [boxes], [image])
    for row, (name, stride) in enumerate((("2", 16), ("1", 8), ("0", 4), ("3", 32))):
        rois = torch.cat([torch.zeros(1, 1), boxes[row : row + 1]], dim=1)
        direct = roi_align(features[name], rois, 7, spatial_scale=1 / stride, sampling_ratio=0, aligned=True)
        assert torch.allclose(pooled[row], direct[0])
        unaligned = roi_align(features[name], rois, 7, spatial_scale=1 / stride, sampling_ratio=0, aligned=False)
        assert not torch.allclose(pooled[row], unaligned[0])
    assert pool(features, [torch.zeros((0, 4))], [image]).shape == (0, 2, 7, 7)


def test_scale_gradient_keeps_values_and_scales_gradients():
    x = torch.tensor([1.0, -2.0, 3.0], requires_grad=True)
    y = scale_gradient(x, 1 / 3)
    assert torch.equal(y, x.detach())
    (y * torch.tensor([3.0, 6.0, 9.0])).sum().backward()
    assert torch.allclose(x.grad, torch.tensor([1.0, 2.0, 3.0]))


def test_mask_targets_are_crops_of_the_matched_mask(tiny_settings):
    heads = build_roi_heads(tiny_settings)
    masks = torch.zeros(2, 64, 64, dtype=torch.uint8)
    masks[0, 8:40, 8:24] = 1      # a 16×32 rectangle
    masks[1, 30:50, 30:60] = 1
    boxes = torch.tensor([[8.0, 8, 24, 40], [8.0, 8, 40, 40]])
    crops = heads._crop_masks(masks, boxes, torch.tensor([0, 0]))
    assert torch.equal(heads._crop_masks(masks, boxes[[0, 0]], torch.tensor([1, 0]))[1], crops[0])
    assert crops.shape == (2, 28, 28)
    assert crops[0].sum().item() == 28 * 28  # box equals the mask: all ones
    # The second box is twice as wide as mask 0: its left half is mask, the right half empty.
    assert crops[1, :, :14].sum().item() == 28 * 14 and crops[1, :, 14:].sum().item() == 0
