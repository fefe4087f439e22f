"""`hassod index build`: bring an index up to date with a collection.

The catalog is the source of truth and is written one image per transaction;
the vectors are saved atomically every ``save_every`` images and at the end.
After a kill the two may disagree, and the next build reconciles them first:
vectors without a catalog row are dropped, and images whose regions have no
vector are described again, so a resumed build never duplicates a region.
A re-run only touches new or changed files (size and mtime, then content
hash) and drops the ones that disappeared.
"""
from __future__ import annotations

import hashlib
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from tqdm import tqdm

from .catalog import Catalog, ImageRecord, NewRegion
from .descriptors import RegionDescriber
from .layout import catalog_url, vectors_path
from .regions import ImageRegions, RegionSource
from .vectors import VectorStore


class IncompatibleSourceError(RuntimeError):
    """The index was built from another region source."""


@dataclass
class BuildSummary:
    """What one build did; ``errors`` lists (path, reason) of files that could not be indexed."""

    added: int = 0
    updated: int = 0
    removed: int = 0
    unchanged: int = 0
    regions: int = 0
    errors: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    def line(self) -> str:
        return (
            f"{self.added} added, {self.updated} updated, {self.removed} removed, {self.unchanged} unchanged; "
            f"{self.regions} regions indexed; {len(self.errors)} unreadable in {self.seconds:.1f} s"
        )


@dataclass(frozen=True)
class _FileState:
    path: str
    size: int
    mtime: float


def index_config(describer: RegionDescriber, source: RegionSource) -> dict:
    """The configuration an index records: what a query must match to be comparable."""
    backbone = describer.backbone
    return {
        "backbone": backbone.name,
        "weights": backbone.weights_id,
        "descriptor": describer.name,
        "descriptor_version": describer.settings.version,
        "descriptor_dim": describer.dim,
        "descriptor_settings": asdict(describer.settings),
        "region_source": source.identity,
    }


def build_index(
    paths: Sequence[Path],
    index_dir: Path,
    source: RegionSource,
    describer: RegionDescriber,
    db_url: str | None = None,
    index_type: str = "auto",
    save_every: int = 100,
    show_progress: bool = True,
    timings: dict[str, float] | None = None,
) -> BuildSummary:
    """Index every file of ``paths`` into ``index_dir``; see the module docstring for the guarantees.

    ``timings``, when given, receives the seconds spent waiting for regions
    ("regions"), describing them ("describe") and writing catalog and vectors
    ("store"), for benchmarks.
    """
    timings = {} if timings is None else timings
    start = time.perf_counter()
    index_dir = Path(index_dir)
    index_dir.mkdir(parents=True, exist_ok=True)
    summary = BuildSummary()
    with Catalog(catalog_url(index_dir, db_url)) as catalog:
        config = index_config(describer, source)
        _check_config(catalog, config)
        store = _open_vectors(index_dir, describer.dim, index_type)
        _reconcile(catalog, store)

        states = [_file_state(p) for p in paths]
        current = {s.path for s in states}
        known = {record.path: record for record in catalog.images()}
        gone = [path for path in known if path not in current]
        store.remove(np.asarray(catalog.delete_images(gone), dtype=np.int64))
        summary.removed = len(gone)
        by_image = catalog.region_ids_by_image()
        todo, hashes = [], {}
        for state in states:
            record = known.get(state.path)
            if record is not None and _unchanged(record, state, by_image.get(state.path), store, hashes):
                summary.unchanged += 1
            else:
                todo.append(state)

        states_by_path = {s.path: s for s in todo}
        with tqdm(total=len(todo), unit="img", disable=not show_progress) as bar:
            results = _timed(source.regions([s.path for s in todo]), timings, "regions")
            for done, result in enumerate(results, start=1):
                state = states_by_path[result.path]
                old = by_image.get(result.path, np.zeros(0, np.int64))
                content_hash = hashes.get(result.path) or _hash(result.path)
                if result.path in known:
                    summary.updated += 1
                else:
                    summary.added += 1
                if result.error is not None:
                    catalog.record_error(result.path, content_hash, state.size, state.mtime, result.error)
                    summary.errors.append((result.path, result.error))
                else:
                    summary.regions += _store_image(catalog, store, describer, result, state, content_hash, timings)
                store.remove(old)
                bar.update()
                if done % save_every == 0:
                    store.save(vectors_path(index_dir))
        if catalog.get_config() is None:
            catalog.set_config(config)
        store.save(vectors_path(index_dir))
    summary.seconds = time.perf_counter() - start
    return summary


def _check_config(catalog: Catalog, config: dict) -> None:
    saved = catalog.get_config()
    if saved is None:
        return
    catalog.check_compatible(config)
    if saved.get("region_source") != config["region_source"]:
        raise IncompatibleSourceError(
            f"this index holds regions from {saved.get('region_source')}, not {config['region_source']}; "
            "build into a new --index directory to use other regions"
        )


def _open_vectors(index_dir: Path, dim: int, index_type: str) -> VectorStore:
    path = vectors_path(index_dir)
    if path.exists():
        return VectorStore.load(path)
    return VectorStore.create(dim, index_type)


def _reconcile(catalog: Catalog, store: VectorStore) -> None:
    """Drop vectors that have no catalog row (left by a build killed before its catalog commit)."""
    orphans = np.setdiff1d(store.ids(), catalog.region_ids())
    store.remove(orphans)


def _file_state(path: Path) -> _FileState:
    stat = os.stat(path)
    return _FileState(str(Path(path).resolve()), stat.st_size, stat.st_mtime)


def _hash(path: str) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    except OSError:
        return ""
    return digest.hexdigest()


def _unchanged(
    record: ImageRecord, state: _FileState, region_ids: np.ndarray | None, store: VectorStore, hashes: dict
) -> bool:
    """True when the file is the one indexed and all its regions have vectors."""
    if region_ids is not None and len(region_ids) and not store.contains(region_ids).all():
        return False  # a killed build committed the catalog but not these vectors
    if record.size_bytes == state.size and record.mtime == state.mtime:
        return True
    hashes[state.path] = _hash(state.path)
    return hashes[state.path] == record.content_hash and record.status == "ok"


def _store_image(
    catalog: Catalog,
    store: VectorStore,
    describer: RegionDescriber,
    result: ImageRegions,
    state: _FileState,
    content_hash: str,
    timings: dict[str, float],
) -> int:
    """Describe the regions of one image, commit them to the catalog, add their vectors."""
    start = time.perf_counter()
    height, width = result.image.shape[:2]
    regions = result.regions
    record = ImageRecord(result.path, content_hash, state.size, state.mtime, width, height, n_regions=len(regions))
    vectors = np.zeros((0, describer.dim), np.float32)
    if regions:
        boxes = np.asarray([r.box for r in regions], dtype=np.float32)
        fmap = describer.feature_map([result.image])[0]
        vectors = describer.describe(fmap, boxes, masks=[r.mask_rle for r in regions])
    described = time.perf_counter()
    timings["describe"] = timings.get("describe", 0.0) + described - start
    new = [NewRegion(r.box, r.score, r.level, r.area, r.mask_rle, r.parent if r.parent >= 0 else None) for r in regions]
    ids = catalog.replace_image(record, new)
    store.add(np.asarray(ids, dtype=np.int64), vectors)
    timings["store"] = timings.get("store", 0.0) + time.perf_counter() - described
    return len(ids)


def _timed(items: Iterator[ImageRegions], timings: dict[str, float], key: str) -> Iterator[ImageRegions]:
    """Yield from ``items``, adding the time spent waiting for each to ``timings[key]``."""
    while True:
        start = time.perf_counter()
        item = next(items, None)
        timings[key] = timings.get(key, 0.0) + time.perf_counter() - start
        if item is None:
            return
        yield item
