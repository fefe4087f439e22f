"""Stage 2 training: the hierarchical detector on the stage-1 pseudo-labels (`hassod train`).

- :mod:`.data`: the pseudo-label dataset, seeded augmentation (flip, copy-paste), the index stream.
- :mod:`.solver`: SGD without decay on norms, warm-up + cosine/step schedule, gradient clipping.
- :mod:`.views`: the student's strong photometric view in Mean Teacher.
- :mod:`.settings`: :class:`TrainSettings`, compared on resume.
- :mod:`.mean_teacher`: the teacher's EMA, its targets, the loss weights.
- :mod:`.hooks`: teacher EMA, evaluation, log and checkpoints around each step.
- :mod:`.distributed`: torchrun ranks and devices.
- :mod:`.loop`: :class:`Trainer` (set-up and the step loop: burn-in, then Mean Teacher) and :func:`train`.
"""
from .data import Augmentation, Batch, IndexStream, PseudoLabelDataset, PseudoLabelError, Sample, collate
from .hooks import predict_coco
from .loop import TrainError, TrainResult, Trainer, train
from .settings import TrainSettings
from .solver import WarmupSchedule, build_optimizer, build_scheduler, clip_gradients, param_groups, scaled_lr

__all__ = [
    "Augmentation", "Batch", "IndexStream", "PseudoLabelDataset", "PseudoLabelError", "Sample", "collate",
    "TrainError", "TrainResult", "TrainSettings", "Trainer", "predict_coco", "train",
    "WarmupSchedule", "build_optimizer", "build_scheduler", "clip_gradients", "param_groups", "scaled_lr",
]
