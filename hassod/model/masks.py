"""Binary masks at image size from the mask head's box-relative probabilities (inference).

The model returns each detection's mask as (1, M, M) probabilities over its box
(M = 28). :func:`paste_masks` resamples each mask only inside its box, thresholds
it there and writes it into one preallocated (N, H, W) bool tensor: 1 byte per
pixel per detection, plus one box-sized float32 buffer at a time (why: docs/benchmarks.md,
"Mask pasting"). The geometry and resampling are torchvision's, so the result
equals ``paste_masks_in_image(masks, boxes, (H, W)) >= threshold`` pixel for pixel:

- the M×M mask gets a border of one zero pixel and its box is scaled by
  (M + 2) / M about its centre, then truncated to integer pixels
  (x0, y0, x1, y1) (torchvision's ``expand_boxes``);
- the (M + 2)² mask is resized by ``F.interpolate`` (bilinear,
  ``align_corners=False``) to (y1 - y0 + 1) × (x1 - x0 + 1) pixels placed
  with its corner at (x0, y0), clipped to the image.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection.roi_heads import expand_boxes

# Zero border added around each mask before resampling (torchvision's padding=1).
_PADDING = 1


def paste_masks(masks: Tensor, boxes: Tensor, image_size: tuple[int, int], threshold: float = 0.5) -> Tensor:
    """Binary masks at image size, computed on the tensors' device.

    Args:
        masks: (N, 1, M, M) probabilities over each box (any float dtype).
        boxes: (N, 4) xyxy in pixels of the image the masks are pasted into.
        image_size: (H, W) of that image.
        threshold: pixels whose pasted probability is ≥ this are True; must be
            > 0, since pixels outside a box have probability 0 and stay False.
    Returns (N, H, W) torch.bool.
    """
    if threshold <= 0:
        raise ValueError(f"threshold must be > 0, got {threshold}")
    height, width = (int(v) for v in image_size)
    out = torch.zeros((len(masks), height, width), dtype=torch.bool, device=masks.device)
    if len(masks) == 0 or height * width == 0:
        return out
    padded = F.pad(masks.float(), (_PADDING,) * 4)
    # All integer geometry in one batch and one transfer: the loop below then
    # costs a resize and a thresholded copy per detection, no device syncs.
    placements = _placements(boxes, masks.shape[-1], height, width)
    for i, (x0, y0, pasted_w, pasted_h, left, top, right, bottom) in enumerate(placements):
        if right <= left or bottom <= top:
            continue  # nothing of this box inside the image
        resized = F.interpolate(padded[i:i + 1], size=(pasted_h, pasted_w), mode="bilinear", align_corners=False)
        visible = resized[0, 0, top - y0:bottom - y0, left - x0:right - x0]
        torch.ge(visible, threshold, out=out[i, top:bottom, left:right])
    return out


def _placements(boxes: Tensor, side: int, height: int, width: int) -> list[list[int]]:
    """Per box: corner (x0, y0) and size (w, h) of its pasted mask, and the part of it inside the image.

    Returns rows of ``x0, y0, w, h, left, top, right, bottom`` (the inside part
    is [left, right) × [top, bottom); empty when right ≤ left or bottom ≤ top).
    """
    corners = expand_boxes(boxes.float(), (side + 2 * _PADDING) / side).long()
    size = (corners[:, 2:] - corners[:, :2] + 1).clamp(min=1)
    first = corners[:, :2].clamp(min=0)
    end = torch.minimum(corners[:, 2:] + 1, torch.tensor([width, height], device=corners.device))
    return torch.cat([corners[:, :2], size, first, end], dim=1).tolist()


__all__ = ["paste_masks"]
