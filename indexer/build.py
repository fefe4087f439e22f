"""`hassod index build`: bring an index up to date with a collection.

The catalog is the source of truth, written one image per transaction (or a
batch: :class:`CatalogWriter`); the vectors are saved atomically every
``save_every`` images and at the end.
After a kill the two may disagree, and the next build reconciles them first:
vectors without a catalog row are dropped, and images whose regions have no
vector are described again, so a resumed build never duplicates a region.
A re-run only touches new or changed files (size and mtime, then content
hash) and drops the ones that disappeared from the folders it was given;
images indexed from other folders stay, so a build of one more folder adds it.

With whitening (``WhiteningSettings``), the first build holds its first
``sample`` vectors back, learns the PCA-whitening from them, saves it, and from
then on stores whitened vectors; later builds reuse the saved whitening, so
every vector of an index lives in the same space as the queries.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
from tqdm import tqdm

from hassod.discover.recipes import RegionRecipe
from hassod.errors import UserError
from hassod.runs import file_sha256

from .catalog import Catalog, ImageRecord, NewRegion
from .descriptors import RegionDescriber
from .index import Index, IncompatibleIndexError, IndexConfig
from .regions import ImageRegions, RegionSource
from .vectors import VectorStore, validate_index_type
from .whitening import PCAWhitening, WhiteningSettings


class WhiteningError(UserError, ValueError):
    """The collection's vectors cannot give the requested whitening."""


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
    rebuilt_vectors: bool = False  # the vectors file was damaged: set aside as vectors.faiss.damaged, rebuilt

    def line(self) -> str:
        rebuilt = "; the damaged vectors file was rebuilt" if self.rebuilt_vectors else ""
        return (
            f"{self.added} added, {self.updated} updated, {self.removed} removed, {self.unchanged} unchanged; "
            f"{self.regions} regions indexed; {len(self.errors)} skipped in {self.seconds:.1f} s{rebuilt}"
        )


@dataclass(frozen=True)
class _FileState:
    path: str
    size: int
    mtime: float


def build_index(
    paths: Sequence[Path],
    index: Index | str | os.PathLike,
    source: RegionSource,
    describer: RegionDescriber,
    index_type: str = "auto",
    save_every: int = 100,
    show_progress: bool = True,
    timings: dict[str, float] | None = None,
    whitening: WhiteningSettings | None = None,
    roots: Sequence[str | os.PathLike] | None = None,
    commit_images: int = 1,
) -> BuildSummary:
    """Index every file of ``paths`` into ``index`` (an :class:`Index`, or its directory with the catalog
    inside); see the module docstring for the guarantees.

    ``roots``: the files and folders ``paths`` were listed from. An indexed
    image under one of them that ``paths`` no longer holds was deleted and is
    removed; indexed images elsewhere are kept. ``None``: ``paths`` is the
    whole collection, and every indexed image not in it is removed.

    ``whitening``: learn a PCA-whitening at the first build; ``None`` keeps
    what the index already has (none for a new index). Asking an existing
    index for another whitening raises :class:`IncompatibleIndexError`.

    ``commit_images``: images per catalog transaction, at most (:class:`CatalogWriter`); one by default,
    so that whatever was described is saved at once (the catalog is a small share of a build here).

    ``timings``, when given, receives the seconds spent waiting for regions
    ("regions"), describing them ("describe") and writing catalog and vectors
    ("store"), for benchmarks.
    """
    timings = {} if timings is None else timings
    start = time.perf_counter()
    validate_index_type(index_type, describer.dim)  # before anything is written
    if whitening is not None and whitening.dim is not None and whitening.dim > describer.dim:
        raise WhiteningError(f"cannot whiten to {whitening.dim} dimensions: the descriptor has {describer.dim}")
    summary = BuildSummary()
    index = index if isinstance(index, Index) else Index(index)
    with open_build(index, source, describer, index_type, whitening) as build:
        catalog, store = build.catalog, build.store
        summary.rebuilt_vectors = build.rebuilt_vectors
        sink = _VectorSink(store, build.whitening, build.learned, index.whitening_path)
        changes = _changes(catalog, store, paths, roots, summary)
        writer = CatalogWriter(catalog, store, sink, summary, changes, batch_images=commit_images)
        states_by_path = {s.path: s for s in changes.todo}
        with tqdm(total=len(changes.todo), unit="img", disable=not show_progress) as bar:
            results = _timed(source.regions(list(states_by_path)), timings, "regions")
            for done, result in enumerate(results, start=1):
                began = time.perf_counter()
                described = describe_image(describer, result)
                described_at = time.perf_counter()
                timings["describe"] = timings.get("describe", 0.0) + described_at - began
                writer.add(states_by_path[result.path], described)
                timings["store"] = timings.get("store", 0.0) + time.perf_counter() - described_at
                bar.update()
                if done % save_every == 0:
                    writer.commit()
                    store.save(index.vectors_path)
        writer.commit()
        sink.flush()
        build.finish()
    summary.seconds = time.perf_counter() - start
    return summary


@dataclass
class RemoveSummary:
    """What :func:`remove_images` did; ``unmatched``: the paths under which nothing was indexed."""

    removed: int = 0
    regions: int = 0
    unmatched: list[str] = field(default_factory=list)

    def line(self) -> str:
        return f"{self.removed} image{'' if self.removed == 1 else 's'} removed with {self.regions} regions"


def remove_images(index: Index | str | os.PathLike, paths: Sequence[str | os.PathLike]) -> RemoveSummary:
    """Remove from ``index`` every image indexed at or below ``paths`` (files or folders, which need not
    exist any more), with its regions and vectors; the files themselves are not touched (a later build
    of a folder holding them indexes them again).

    Catalog rows go first: after a kill in between, the vectors left without a row are never returned
    by a search and the next build drops them.
    """
    index = index if isinstance(index, Index) else Index(index)
    with index:
        index.check_built()
        with index.lock():
            listed = _within(paths)
            gone = [record.path for record in index.catalog.images() if listed(record.path)]
            region_ids = index.catalog.delete_images(gone)
            index.vectors.remove(np.asarray(region_ids, dtype=np.int64))
            index.vectors.save(index.vectors_path)
    unmatched = [str(path) for path in paths if not any(map(_within([path]), gone))]
    return RemoveSummary(len(gone), len(region_ids), unmatched)


@dataclass
class OpenBuild:
    """An index opened for a build (``open_build``): its catalog, vectors and configuration."""

    index: Index
    store: VectorStore
    config: IndexConfig
    whitening: WhiteningSettings | None
    learned: PCAWhitening | None
    rebuilt_vectors: bool = False  # the vectors file was damaged: set aside, the store starts empty

    @property
    def catalog(self) -> Catalog:
        return self.index.catalog

    def finish(self) -> None:
        """Record the configuration (first build) and save the vectors."""
        self.index.record_config(self.config)
        self.store.save(self.index.vectors_path)


@contextlib.contextmanager
def open_build(index: Index, source: RegionSource, describer: RegionDescriber, index_type: str,
               whitening: WhiteningSettings | None = None) -> Iterator[OpenBuild]:
    """Open the index for a build: catalog claimed, build lock held, configuration checked, vectors loaded
    and reconciled with the catalog."""
    if not index.db_url:
        index.directory.mkdir(parents=True, exist_ok=True)  # the SQLite catalog lives inside
    with index:
        owner = index.claim()
        with index.lock():  # one build at a time: see Index.lock
            learned = index.learned_whitening()
            whitening = _resolve_whitening(whitening, learned)
            config = dataclasses.replace(IndexConfig.of_build(describer, source, whitening), index_id=owner)
            if index.config is not None:
                index.config.check_update(config)
            store, rebuilt = index.open_vectors(config.dim, index_type)
            _reconcile(index.catalog, store)
            yield OpenBuild(index, store, config, whitening, learned, rebuilt)


@dataclass
class _Changes:
    """What a build must do: the files to (re)index; the indexed images and their region ids by path; the
    content hashes computed on the way."""

    todo: list[_FileState]
    known: dict[str, ImageRecord]
    by_image: dict[str, np.ndarray]
    hashes: dict[str, str]


def _changes(catalog: Catalog, store: VectorStore, paths: Sequence[Path], roots, summary: BuildSummary) -> _Changes:
    """Drop the images that vanished from ``roots`` and list what is left to do."""
    states, unusable = _file_states(paths)
    summary.errors += unusable
    current = {s.path for s in states}
    known = {record.path: record for record in catalog.images()}
    listed = _within(roots)
    gone = [path for path in known if path not in current and listed(path)]
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
    return _Changes(todo, known, by_image, hashes)


def _resolve_whitening(requested: WhiteningSettings | None, learned: PCAWhitening | None) -> WhiteningSettings | None:
    """The whitening this build uses: the index's own when one was learned (a request must match it)."""
    if learned is None:
        return requested
    if requested is not None and (
        (requested.dim is not None and requested.dim != learned.dim_out) or requested.shrinkage != learned.shrinkage
    ):
        raise IncompatibleIndexError(
            f"this index was whitened to {learned.dim_out} dimensions with shrinkage {learned.shrinkage}; "
            "build into a new --index directory to change that"
        )
    return WhiteningSettings(dim=learned.dim_out, shrinkage=learned.shrinkage)


class _VectorSink:
    """Where described vectors go: into the store, whitened when the index has a whitening.

    Until the whitening is learned (first build with whitening), vectors are
    held back; once ``sample`` of them have arrived, or at :meth:`flush`, it
    is learned from them, saved, and they are stored. Held vectors' images are
    already in the catalog: if the build dies first, the next build finds
    those regions without vectors and describes the images again.
    """

    def __init__(self, store: VectorStore, settings: WhiteningSettings | None, learned: PCAWhitening | None,
                 path: Path):
        self.store, self.settings, self.learned, self.path = store, settings, learned, path
        self.held: list[tuple[np.ndarray, np.ndarray]] = []
        self.held_count = 0

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        if self.settings is None:
            self.store.add(ids, vectors)
        elif self.learned is not None:
            self.store.add(ids, self.learned.transform(vectors))
        else:
            self.held.append((ids, vectors))
            self.held_count += len(ids)
            if self.held_count >= self.settings.sample:
                self.flush()

    def image_done(self) -> None:
        """One more image's vectors were handed over (nothing to do here: the Ray build's sink cuts shards)."""

    def flush(self) -> None:
        """Learn the whitening from the held vectors (if it is still to be learned) and store them."""
        if not self.held:
            return
        ids = np.concatenate([i for i, _ in self.held])
        vectors = np.concatenate([v for _, v in self.held])
        dim = self.store.dim
        try:
            learned = PCAWhitening.fit(vectors, dim_out=dim, shrinkage=self.settings.shrinkage)
        except ValueError as exc:
            raise WhiteningError(f"cannot learn the whitening: {exc}") from None
        if learned.dim_out < dim:
            raise WhiteningError(
                f"the {len(vectors)} region vectors seen span only {learned.dim_out} dimensions, fewer than the "
                f"{dim} asked for: whiten to fewer dimensions (--whiten-dim) or index more images"
            )
        learned.save(self.path)
        self.learned, self.held, self.held_count = learned, [], 0
        self.store.add(ids, learned.transform(vectors))


def _reconcile(catalog: Catalog, store: VectorStore) -> None:
    """Drop vectors that have no catalog row (left by a build killed before its catalog commit)."""
    orphans = np.setdiff1d(store.ids(), catalog.region_ids())
    store.remove(orphans)


def _within(roots: Sequence[str | os.PathLike] | None) -> Callable[[str], bool]:
    """Whether a resolved path is one of ``roots`` or lies below one (any path when ``roots`` is None)."""
    if roots is None:
        return lambda path: True
    exact = {os.path.realpath(root) for root in roots}
    below = tuple(root.rstrip(os.sep) + os.sep for root in exact)
    return lambda path: path in exact or path.startswith(below)


def _file_states(paths: Sequence[Path]) -> tuple[list[_FileState], list[tuple[str, str]]]:
    """The state of every file that can be indexed, and (printable path, reason) for the others:
    broken symbolic links, link loops, and names that are not UTF-8 (no catalog can store them)."""
    states, unusable = [], []
    for path in paths:
        try:
            state = _file_state(path)
            state.path.encode("utf-8")
        except UnicodeEncodeError:
            unusable.append((_printable(path), "its name is not valid UTF-8, which the catalog cannot store; "
                                               "rename the file to index it"))
        except OSError as exc:
            broken = exc.errno == errno.ENOENT and os.path.islink(path)
            unusable.append((_printable(path), "broken symbolic link: its target does not exist" if broken
                             else "symbolic link loop" if exc.errno == errno.ELOOP else str(exc.strerror).lower()))
        else:
            states.append(state)
    return states, unusable


def _printable(path: Path) -> str:
    """The path with bytes that are not UTF-8 shown as U+FFFD, safe to print and to store as text."""
    return os.fsencode(path).decode("utf-8", "replace")


def _file_state(path: Path) -> _FileState:
    stat = os.stat(path)
    # realpath, not Path.resolve(): that raises on a symbolic link loop (Python < 3.13).
    return _FileState(os.path.realpath(path), stat.st_size, stat.st_mtime)


def _hash(path: str) -> str:
    try:
        return file_sha256(path)
    except OSError:
        return ""


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


@dataclass
class DescribedImage:
    """One file's regions and their descriptors (``vectors`` (n, dim) float32), or why it has none."""

    path: str
    error: str | None
    width: int = 0
    height: int = 0
    regions: list = field(default_factory=list)
    vectors: np.ndarray | None = None


def describe_image(describer: RegionDescriber, result: ImageRegions) -> DescribedImage:
    """The descriptors of the regions of one image (the step a Ray actor runs too)."""
    if result.error is not None:
        return DescribedImage(result.path, result.error)
    height, width = result.image.shape[:2]
    vectors = np.zeros((0, describer.dim), np.float32)
    if result.regions:
        boxes = np.asarray([r.box for r in result.regions], dtype=np.float32)
        # The search recipe's regions come with the feature map they were found on: one forward per image.
        shared = result.feature_map is not None and result.described_by == describer.name
        fmap = result.feature_map if shared else describer.feature_map([result.image])[0]
        vectors = describer.describe(fmap, boxes, masks=[r.mask_rle for r in result.regions])
    return DescribedImage(result.path, None, width, height, result.regions, vectors)


class CatalogWriter:
    """Described images on their way into the catalog, several per transaction.

    Images wait until ``batch_images`` have come or ``batch_seconds`` have passed since the first
    (a killed build redoes at most that much), then :meth:`commit` writes them in one transaction
    (``Catalog.write_images``): at scale the catalog writes are what bounds a build's driver.
    Once committed, each image's vectors go to ``sink`` (``add(ids, vectors)``, then
    ``image_done()``) and the vectors of its previous version leave ``store``.
    """

    def __init__(self, catalog: Catalog, store: VectorStore, sink, summary: BuildSummary, changes: _Changes,
                 batch_images: int = 32, batch_seconds: float = 2.0):
        self.catalog, self.store, self.sink, self.summary, self.changes = catalog, store, sink, summary, changes
        self.batch_images, self.batch_seconds = batch_images, batch_seconds
        self.pending: list[tuple[ImageRecord, list[NewRegion], DescribedImage]] = []
        self.since = 0.0

    def add(self, state: _FileState, described: DescribedImage) -> None:
        """Queue one described image of ``state``'s file; commit when the batch is due."""
        content_hash = self.changes.hashes.get(state.path) or _hash(state.path)
        if state.path in self.changes.known:
            self.summary.updated += 1
        else:
            self.summary.added += 1
        if described.error is not None:
            self.summary.errors.append((state.path, described.error))
            record = ImageRecord(state.path, content_hash, state.size, state.mtime, 0, 0, status="error",
                                 error=described.error)
        else:
            record = ImageRecord(state.path, content_hash, state.size, state.mtime, described.width,
                                 described.height)
        regions = [NewRegion(r.box, r.score, r.level, r.area, r.mask_rle, r.parent if r.parent >= 0 else None)
                   for r in described.regions]
        if not self.pending:
            self.since = time.monotonic()
        self.pending.append((record, regions, described))
        if len(self.pending) >= self.batch_images or time.monotonic() - self.since >= self.batch_seconds:
            self.commit()

    def commit(self) -> None:
        """Write the waiting images (their regions get their ids), then hand their vectors on."""
        if not self.pending:
            return
        written = self.catalog.write_images([(record, regions) for record, regions, _ in self.pending])
        for (record, _, described), ids in zip(self.pending, written):
            if ids:
                self.sink.add(np.asarray(ids, dtype=np.int64), described.vectors)
                self.summary.regions += len(ids)
            self.store.remove(self.changes.by_image.get(record.path, np.zeros(0, np.int64)))
            self.sink.image_done()
        self.pending = []


def _timed(items: Iterator[ImageRegions], timings: dict[str, float], key: str) -> Iterator[ImageRegions]:
    """Yield from ``items``, adding the time spent waiting for each to ``timings[key]``."""
    while True:
        start = time.perf_counter()
        item = next(items, None)
        timings[key] = timings.get(key, 0.0) + time.perf_counter() - start
        if item is None:
            return
        yield item


def region_parts(backbone: str, weights: str | None, device: str, detector: str | None, use: str,
                 regions_json: str | None, recipe: RegionRecipe, workers: int | None, batch_size: int,
                 max_pixels: int) -> tuple[RegionSource, RegionDescriber]:
    """The region source and describer a build asks for, made where they run (the driver, or each Ray actor):
    regions from a detector checkpoint, a COCO file, or discovery with ``recipe``."""
    from hassod.device import resolve_device
    from hassod.features import build_backbone

    from .descriptors import default_settings
    from .regions import CocoRegions, DiscoveryRegions, detector_regions

    model = build_backbone(backbone, weights=weights, device=resolve_device(device))
    if detector:
        # --batch-size is discovery's: a detected image holds its masks at full size, so the detector
        # keeps its own (smaller) default.
        source = detector_regions(detector, device=device, max_pixels=max_pixels, use=use)
    elif regions_json:
        source = CocoRegions(regions_json, max_pixels=max_pixels, backbone=model)
    else:
        source = DiscoveryRegions(model, recipe, workers=workers or os.cpu_count() or 1, batch_size=batch_size,
                                  max_pixels=max_pixels)
    return source, RegionDescriber(model, default_settings(model))
