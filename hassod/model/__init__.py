"""Stage 2: the hierarchical detector (Cascade Mask R-CNN with a level head), docs/design.md §5."""
from hassod.model.checkpoint import CheckpointError, load_detector, read_checkpoint, save_checkpoint
from hassod.model.detector import DetectorSettings, HierarchicalDetector, build_detector
from hassod.model.masks import paste_masks

__all__ = [
    "CheckpointError",
    "DetectorSettings",
    "HierarchicalDetector",
    "build_detector",
    "load_detector",
    "paste_masks",
    "read_checkpoint",
    "save_checkpoint",
]
