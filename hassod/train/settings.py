"""How a detector is trained: :class:`TrainSettings`, saved in every checkpoint and compared on resume.

Iterations ``0 .. burn_in - 1`` train on the stage-1 pseudo-labels alone
(docs/design.md §6); iterations ``burn_in .. iterations - 1`` are the Mean Teacher
phase (docs/design.md §6). ``burn_in = iterations`` (the default) is plain training.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from ..images import DEFAULT_MAX_PIXELS
from .data import Augmentation
from .solver import scaled_lr
from .views import StrongAugmentation


@dataclass(frozen=True)
class TrainSettings:
    """How to train. Defaults follow the paper's recipe (CutLER/HASSOD, detectron2 conventions).

    batch_size: images per iteration over all processes (reference 16); in
        Mean Teacher each step draws this many labelled and as many unlabelled images.
    iterations: total optimiser steps, burn-in and Mean Teacher together. A
        budget, not the paper's figure (reference: 40k burn-in + 2k Mean Teacher).
    burn_in: iterations trained on the pseudo-labels alone before Mean Teacher
        starts; None means ``iterations`` (Mean Teacher off).
    lr: base learning rate; None means 0.01 × batch_size / 16 (linear scaling
        of the reference 0.01 at batch 16).
    momentum, weight_decay: SGD's (0.9, 5e-5; no decay on norm layers).
    warmup_iters, warmup_factor: linear warm-up from lr × factor (detectron2: 1000, 0.001).
    lr_decay: the burn-in's decay after warm-up, over the burn-in iterations:
        "cosine" (default: to 0 at the last burn-in iteration, no step points
        to tune when the schedule is shortened), "step" (× lr_gamma at each
        fraction ``lr_steps`` of the burn-in) or "constant" (the reference's burn-in).
    clip_norm: the global gradient L2 norm is clipped to this (≤ 0: off).
        A guard against the spikes that noisy pseudo-labels cause, set above
        the norms of ordinary steps, since a tight clip slows learning
        (docs/benchmarks.md, "Training settings").
    amp: mixed precision with a GradScaler; CUDA only, CPU always runs fp32.
    seed: every random choice (init, order, augmentation, RoI sampling) derives from it.
    augmentation: flip and copy-paste, see :class:`~hassod.train.data.Augmentation`;
        its ``max_size`` is replaced by the detector's. Mean Teacher keeps the
        flip and turns copy-paste off.
    ema_keep: Mean Teacher's keep rate k: teacher = k·teacher + (1-k)·student
        every iteration (reference 0.9996).
    teacher_thresh: teacher detections scoring above this become targets (0.7).
    teacher_tau: coverage threshold of the levels recomputed on the teacher's
        masks (0.75; stage-1 labels use 0.9).
    mt_warmup_iters: the Mean Teacher phase's own LR warm-up (from lr ×
        warmup_factor) before its cosine decay to 0; not a reference figure.
    strong: the student's photometric view in Mean Teacher, see
        :class:`~hassod.train.views.StrongAugmentation`.
    checkpoint_period: write ``last.pth`` every this many iterations.
    eval_period: evaluate on the held-out set every this many iterations
        (0: only at the end); needs ``eval_gt``.
    device: "auto", "cpu", "cuda" or "cuda:N"; workers: data-loading processes (0: in the main process).
    max_pixels: images above this many pixels are skipped unread.
    """

    batch_size: int = 16
    iterations: int = 40_000
    burn_in: int | None = None
    lr: float | None = None
    momentum: float = 0.9
    weight_decay: float = 5e-5
    warmup_iters: int = 1000
    warmup_factor: float = 0.001
    lr_decay: str = "cosine"
    lr_steps: tuple[float, ...] = (0.75, 0.92)
    lr_gamma: float = 0.1
    clip_norm: float = 10.0
    amp: bool = True
    seed: int = 0
    augmentation: Augmentation = field(default_factory=Augmentation)
    ema_keep: float = 0.9996
    teacher_thresh: float = 0.7
    teacher_tau: float = 0.75
    mt_warmup_iters: int = 100
    strong: StrongAugmentation = field(default_factory=StrongAugmentation)
    checkpoint_period: int = 1000
    eval_period: int = 0
    device: str = "auto"
    workers: int = 2
    max_pixels: int = DEFAULT_MAX_PIXELS

    def __post_init__(self) -> None:
        if self.burn_in is not None and not 0 <= self.burn_in <= self.iterations:
            raise ValueError(f"burn_in must be between 0 and iterations ({self.iterations}), got {self.burn_in}")
        if not 0.0 <= self.ema_keep <= 1.0:
            raise ValueError(f"ema_keep must be in [0, 1], got {self.ema_keep}")

    @property
    def burn_in_iters(self) -> int:
        """B: the first Mean Teacher iteration (``iterations`` when Mean Teacher is off)."""
        return self.iterations if self.burn_in is None else self.burn_in

    @property
    def teacher_iters(self) -> int:
        """T: how many Mean Teacher iterations the run has."""
        return self.iterations - self.burn_in_iters

    def base_lr(self) -> float:
        """The learning rate after warm-up: ``lr`` or the linearly scaled reference."""
        return self.lr if self.lr is not None else scaled_lr(self.batch_size)


# Settings that only say how a run is carried out, not what it computes: they may change on resume.
RESUME_FREE = frozenset({"checkpoint_period", "eval_period", "device", "workers"})


def _jsonable(obj: Any) -> Any:
    """asdict output as JSON would give it back (tuples become lists), for comparisons."""
    return json.loads(json.dumps(obj))


def settings_differences(saved: dict[str, Any], current: dict[str, Any], free: frozenset = frozenset()) -> list[str]:
    """Names of the fields that differ between two settings dicts, ignoring ``free``."""
    saved, current = _jsonable(saved), _jsonable(current)
    return sorted(k for k in set(saved) | set(current) if k not in free and saved.get(k) != current.get(k))
