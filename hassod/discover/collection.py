"""Stage 1 over a collection: batching, parallel post-processing, resume, output.

The backbone runs batched in this process; the per-image work that follows
(merge, CRF, filters, levels) runs in ``workers`` processes, since the CRF is
single-threaded C++. Every finished image goes to the progress log at once,
so an interrupted run resumes where it stopped.
"""
from __future__ import annotations

from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, as_completed, wait
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from ..features import Backbone
from ..images import DEFAULT_MAX_PIXELS, ImageError, load_rgb
from ..runs import ImageRecord, run_collection, run_line, write_json_atomic
from .coco import build_coco
from .recipes import RegionRecipe
from .work import Job, limit_threads, process_job


@dataclass
class DiscoverySummary:
    """What a run did: counts by level, skipped files with reasons, wall time."""

    images: int = 0
    resumed: int = 0
    masks_per_level: list[int] = field(default_factory=lambda: [0, 0, 0])
    skipped: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    out: str = ""

    def line(self) -> str:
        return run_line(self.images, self.resumed, self.masks_per_level, "masks", self.seconds,
                        len(self.skipped), self.out)


def discover_collection(
    paths: Sequence[Path],
    out: Path,
    backbone: Backbone,
    settings: RegionRecipe,
    workers: int = 1,
    batch_size: int = 8,
    viz_dir: Path | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    show_progress: bool = True,
) -> DiscoverySummary:
    """Discover masks in every file of ``paths`` and write COCO pseudo-labels to ``out``.

    Finished images go to ``<out>.progress.jsonl`` at once, so an interrupted
    run resumes where it stopped (with the same backbone and settings only).
    """
    settings = settings.for_backbone(backbone)
    run_settings = {"backbone": backbone.name, "weights": backbone.weights_id, "discovery": settings.as_dict()}
    if viz_dir is not None:
        Path(viz_dir).mkdir(parents=True, exist_ok=True)

    def process(todo: list[str]) -> Iterator[ImageRecord]:
        for record, _ in discover_records(todo, backbone, settings, workers, batch_size, viz_dir, max_pixels):
            yield record

    run = run_collection(paths, out, run_settings, process, show_progress)
    coco = build_coco(run.records, run.root, {"description": "hassod discover pseudo-labels", **run_settings})
    write_json_atomic(coco, Path(out))
    return DiscoverySummary(images=run.images, resumed=run.resumed, masks_per_level=run.per_level(),
                            skipped=run.skipped, seconds=run.seconds, out=str(out))


def discover_records(
    paths: Sequence[str],
    backbone: Backbone,
    settings: RegionRecipe,
    workers: int = 1,
    batch_size: int = 8,
    viz_dir: Path | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Iterator[tuple[ImageRecord, np.ndarray | None]]:
    """Yield ``(record, image)`` for every path, in order of completion.

    ``image`` is the decoded (H, W, 3) uint8 original (``None`` for a skipped
    file), so callers that need the pixels again do not decode twice. Records
    are yielded as soon as they finish, so a caller that persists each one
    loses only the images in flight when it is killed.
    """
    settings = settings.for_backbone(backbone)
    decoded: dict[str, np.ndarray] = {}
    with _postprocessor(min(workers, len(paths))) as submit:
        pending: set[Future] = set()
        limit = 2 * max(workers, 1) + batch_size  # features are megabytes per image
        for batch in _batches(list(paths), batch_size):
            jobs, images, errors = _prepare(batch, backbone, settings, max_pixels)
            for record in errors:
                yield record, None
            decoded.update((job.path, image) for job, image in zip(jobs, images))
            pending.update(submit(process_job, job, settings, viz_dir) for job in jobs)
            done, pending = wait(pending, timeout=0 if len(pending) <= limit else None,
                                 return_when=FIRST_COMPLETED)
            for future in done:
                record = future.result()
                yield record, decoded.pop(record.path)
        for future in as_completed(pending):
            record = future.result()
            yield record, decoded.pop(record.path)


def _batches(items: list[str], size: int) -> Iterator[list[str]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _prepare(
    batch: list[str], backbone: Backbone, settings: RegionRecipe, max_pixels: int
) -> tuple[list[Job], list[np.ndarray], list[ImageRecord]]:
    """Decode a batch, run the backbone once on it, and split into per-image jobs."""
    images, loaded, errors = [], [], []
    for path in batch:
        try:
            images.append(load_rgb(path, max_pixels))
            loaded.append(path)
        except ImageError as exc:
            errors.append(ImageRecord(path=path, error=str(exc)))
    if not images:
        return [], [], errors
    small, grid = settings.grid(backbone, images)
    jobs = [
        Job(path, np.ascontiguousarray(small[i]), np.ascontiguousarray(grid[i]), images[i].shape[:2])
        for i, path in enumerate(loaded)
    ]
    return jobs, images, errors


class _Inline:
    """Runs submitted work at once in this process, with the Future interface."""

    def __call__(self, fn, *args) -> Future:
        future: Future = Future()
        future.set_result(fn(*args))
        return future


class _postprocessor:
    """Context manager yielding ``submit(fn, *args) -> Future``, in processes when workers > 1."""

    def __init__(self, workers: int):
        self.workers = workers
        self.pool: ProcessPoolExecutor | None = None

    def __enter__(self) -> Any:
        if self.workers <= 1:
            return _Inline()
        # spawn, not fork: the parent holds torch's thread pools, which fork would corrupt.
        self.pool = ProcessPoolExecutor(self.workers, mp_context=get_context("spawn"), initializer=limit_threads)
        return self.pool.submit

    def __exit__(self, *exc: object) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=exc[0] is None, cancel_futures=exc[0] is not None)
