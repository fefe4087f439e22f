"""Stage 2 training: the hierarchical detector on the stage-1 pseudo-labels (`hassod train`).

- :mod:`.data`: the pseudo-label dataset, seeded augmentation (flip, copy-paste), the index stream.
- :mod:`.solver`: SGD without decay on norms, warm-up + cosine/step schedule, gradient clipping.
- :mod:`.loop`: :class:`TrainSettings` and :func:`train` (checkpoints, exact resume, log, evaluation, DDP).
"""
from .data import Augmentation, Batch, IndexStream, PseudoLabelDataset, PseudoLabelError, Sample, collate
from .loop import TrainError, TrainResult, TrainSettings, predict_coco, train
from .solver import WarmupSchedule, build_optimizer, build_scheduler, clip_gradients, param_groups, scaled_lr

__all__ = [
    "Augmentation", "Batch", "IndexStream", "PseudoLabelDataset", "PseudoLabelError", "Sample", "collate",
    "TrainError", "TrainResult", "TrainSettings", "predict_coco", "train",
    "WarmupSchedule", "build_optimizer", "build_scheduler", "clip_gradients", "param_groups", "scaled_lr",
]
