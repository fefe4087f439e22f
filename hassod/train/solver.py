"""Optimiser, learning-rate schedule and gradient clipping for detector training (docs/design.md §6).

SGD with momentum 0.9; the reference learning rate is 0.01 at a batch of 16
images, scaled linearly with the batch; weight decay 5e-5 except on the
parameters of normalisation layers; a linear warm-up followed by a cosine or
step decay; the global gradient norm clipped before each step.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn

REFERENCE_LR = 0.01
REFERENCE_BATCH = 16

# Layers whose affine parameters get no weight decay: shrinking a norm's scale
# towards 0 only fights the normalisation, it does not regularise.
NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm,
    nn.LocalResponseNorm,
)


def scaled_lr(batch_size: int, reference_lr: float = REFERENCE_LR, reference_batch: int = REFERENCE_BATCH) -> float:
    """The linear scaling rule: ``reference_lr`` × batch_size / ``reference_batch``."""
    return reference_lr * batch_size / reference_batch


def param_groups(model: nn.Module, weight_decay: float, norm_weight_decay: float = 0.0) -> list[dict]:
    """Trainable parameters split in two SGD groups: norm-layer parameters and the rest.

    Every parameter of a normalisation layer (weight and bias) goes to the group
    with ``norm_weight_decay``; all others (convolution/linear weights and their
    biases) get ``weight_decay``. Frozen parameters are left out.
    """
    norm_params, other_params, seen = [], [], set()
    for module in model.modules():
        is_norm = isinstance(module, NORM_TYPES)
        for param in module.parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            (norm_params if is_norm else other_params).append(param)
    groups = [{"params": other_params, "weight_decay": weight_decay, "name": "default"}]
    if norm_params:
        groups.append({"params": norm_params, "weight_decay": norm_weight_decay, "name": "norm"})
    return groups


def build_optimizer(model: nn.Module, lr: float, weight_decay: float = 5e-5, momentum: float = 0.9) -> torch.optim.SGD:
    """SGD with momentum over :func:`param_groups` (no decay on norms)."""
    return torch.optim.SGD(param_groups(model, weight_decay), lr=lr, momentum=momentum)


class WarmupSchedule:
    """LR multiplier per iteration: linear warm-up, then cosine or step decay.

    During the first ``warmup_iters`` iterations the factor rises linearly from
    ``warmup_factor`` to 1 (detectron2's rule: ``warmup_factor·(1-a) + a`` with
    a = it / warmup_iters). After it, ``decay="cosine"`` goes from 1 to 0 over
    the remaining iterations; ``decay="step"`` multiplies by ``gamma`` at each
    fraction of ``iterations`` in ``steps``; ``"constant"`` stays at 1. An
    object, not a closure, so LambdaLR can save it.
    """

    def __init__(self, iterations: int, warmup_iters: int = 1000, warmup_factor: float = 0.001,
                 decay: str = "cosine", steps: Iterable[float] = (0.75, 0.92), gamma: float = 0.1):
        if decay not in ("cosine", "step", "constant"):
            raise ValueError(f"unknown LR decay {decay!r}: use cosine, step or constant")
        self.iterations, self.warmup_iters, self.warmup_factor = iterations, warmup_iters, warmup_factor
        self.decay, self.steps, self.gamma = decay, tuple(steps), gamma

    def __call__(self, iteration: int) -> float:
        warm = 1.0
        if iteration < self.warmup_iters:
            alpha = iteration / self.warmup_iters
            warm = self.warmup_factor * (1 - alpha) + alpha
        if self.decay == "cosine":
            span = max(1, self.iterations - self.warmup_iters)
            progress = min(1.0, max(0.0, (iteration - self.warmup_iters) / span))
            return warm * 0.5 * (1.0 + math.cos(math.pi * progress))
        if self.decay == "step":
            return warm * self.gamma ** sum(iteration >= f * self.iterations for f in self.steps)
        return warm


class TwoPhaseSchedule:
    """LR multiplier of a run in two phases: ``first`` over iterations [0, switch), then
    ``second`` restarted at 0 from ``switch`` on (Mean Teacher's own warm-up and decay)."""

    def __init__(self, first: WarmupSchedule, second: WarmupSchedule, switch: int):
        self.first, self.second, self.switch = first, second, switch

    def __call__(self, iteration: int) -> float:
        return self.first(iteration) if iteration < self.switch else self.second(iteration - self.switch)


def build_scheduler(optimizer: torch.optim.Optimizer, schedule: WarmupSchedule | TwoPhaseSchedule
                    ) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-iteration LambdaLR over ``schedule`` (call ``.step()`` after each optimiser step)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def clip_gradients(parameters: Iterable[torch.Tensor], max_norm: float | None) -> float:
    """Clip the global L2 norm of the gradients to ``max_norm`` (None or ≤ 0: no clipping); returns the norm before."""
    params = [p for p in parameters if p.grad is not None]
    if not params:
        return 0.0
    if max_norm is None or max_norm <= 0:
        return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params])))
    return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
