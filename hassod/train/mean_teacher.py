"""Mean Teacher with adaptive targets (docs/design.md §6): the teacher's EMA, its targets, the loss weights.

The teacher is a copy of the student taken at the first Mean Teacher
iteration, then ``t = k·t + (1-k)·s`` over the whole state dict before each
later iteration's forward (:func:`ema_update`). On an unlabelled image (3, H, W)
it sees the weak view; its detections scoring above a threshold become the
student's targets (:func:`teacher_targets`): boxes xyxy in that image's
pixels, levels recomputed from the masks pasted at 0.5 by the coverage rule
(τ = 0.75), no masks (the unlabelled branch has no mask loss). Teacher and
student share the step's input size (:func:`fixed_input_size`), so both see
the same geometry.
"""
from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import nn

from ..discover.levels import assign_levels
from ..model.masks import paste_masks

MASK_THRESHOLD = 0.5


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, keep: float) -> None:
    """``teacher = keep·teacher + (1 - keep)·student`` for every float tensor of the state dict,
    BatchNorm's running statistics included; integer buffers (batch counters) are copied."""
    student_state = student.state_dict()
    floats, sources = [], []
    for name, value in teacher.state_dict().items():
        if value.is_floating_point():
            floats.append(value)
            sources.append(student_state[name].detach())
        else:
            value.copy_(student_state[name])
    if floats:
        torch._foreach_mul_(floats, keep)
        torch._foreach_add_(floats, sources, alpha=1.0 - keep)


def loss_weights(step: int, steps: int) -> tuple[float, float]:
    """(α_label, α_teacher) at Mean Teacher step ``step`` of ``steps``: α_label = ½(1 + cos(π·step/steps))
    goes 1 → 0, α_teacher = 3 − α_label goes 2 → 3."""
    alpha_label = 0.5 * (1.0 + math.cos(math.pi * step / max(1, steps)))
    return alpha_label, 3.0 - alpha_label


@contextmanager
def fixed_input_size(models: Sequence[nn.Module], size: int) -> Iterator[None]:
    """Within the block, each detector resizes its inputs to shortest edge ``size`` (pixels), in training and eval."""
    saved = [model.transform.min_size for model in models]
    for model in models:
        model.transform.min_size = (int(size),)
    try:
        yield
    finally:
        for model, min_size in zip(models, saved):
            model.transform.min_size = min_size


@torch.no_grad()
def teacher_detections(teacher: nn.Module, images: list[torch.Tensor], score_thresh: float, amp: bool
                       ) -> list[dict[str, torch.Tensor]]:
    """The teacher's inference on the weak views (eval mode, no gradients).

    Boxes scoring at most ``score_thresh`` are dropped before NMS and the mask
    head, which leaves the ones above it unchanged (only higher-scoring boxes
    suppress others) and spares the mask head the rest.
    """
    heads = teacher.roi_heads
    saved = heads.score_thresh
    heads.score_thresh = max(saved, score_thresh)
    context = torch.autocast("cuda", dtype=torch.float16) if amp else nullcontext()
    try:
        with context:
            return teacher(images)
    finally:
        heads.score_thresh = saved


def teacher_targets(detections: dict[str, torch.Tensor], image_size: tuple[int, int], score_thresh: float,
                    tau: float) -> dict[str, torch.Tensor]:
    """One image's teacher detections → student targets: ``boxes`` (K, 4) float32 xyxy, ``labels`` ones,
    ``levels`` (K,) int64 from the coverage tree of the masks pasted at 0.5 (τ = ``tau``).

    Kept: score > ``score_thresh`` and a box of positive width and height.
    """
    boxes = detections["boxes"].detach().float()
    keep = (detections["scores"].detach() > score_thresh) & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    boxes = boxes[keep]
    masks = paste_masks(detections["masks"].detach()[keep], boxes, image_size, MASK_THRESHOLD)
    levels, _ = assign_levels(masks.cpu().numpy(), tau)
    return {
        "boxes": boxes,
        "labels": torch.ones(len(boxes), dtype=torch.int64, device=boxes.device),
        "levels": torch.from_numpy(levels.astype(np.int64)).to(boxes.device),
    }
