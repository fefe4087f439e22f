"""The per-image work of stage 1, run in worker processes.

Kept apart from :mod:`hassod.discover.collection` so that a spawned worker
imports only what it needs (no backbone, no timm): worker start-up is paid
once per process and dominates small runs.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from ..runs import ImageRecord
from ..rle import RleMasks
from .recipes import RegionRecipe
from .viz import save_overlay


@dataclass
class Job:
    """One image's inputs to the post-processing."""

    path: str
    image: np.ndarray  # (S, S, 3) uint8 resized image for the paper recipe's CRF; empty for search
    features: np.ndarray  # (h, w, C) float32
    size: tuple[int, int]  # original (H, W)


def process_job(job: Job, settings: RegionRecipe, viz_dir: Path | None) -> ImageRecord:
    """One image's regions by its recipe (``settings.thresholds`` set), with its overlay when ``viz_dir`` is given."""
    found = settings.find(job.image, job.features, job.size)
    if viz_dir is not None:
        save_overlay(job.path, RleMasks(found.rles), found.levels, Path(viz_dir))
    height, width = job.size
    return ImageRecord(path=job.path, width=width, height=height, annotations=found.annotations())


def limit_threads() -> None:
    # Each worker is one of several processes: with more than one BLAS/OpenMP
    # thread each, idle threads spin against the other workers and a short
    # matrix product can take seconds (docs/benchmarks.md, "Discovery workers").
    threadpool_limits(1)
    torch.set_num_threads(1)


