"""`hassod index build --ray`: the build of ``build.py`` with regions and descriptors computed on a Ray cluster.

- Actors (Ray Data ``map_batches``; one GPU each when the cluster has GPUs) find
  the regions and describe each image. The driver keeps what a single-process
  build keeps (``build.open_build``, ``CatalogWriter``): the catalog, several
  images per transaction, whose region ids are the FAISS ids; the lock; the
  configuration check; the summary. Several nodes need a PostgreSQL catalog, and
  all must see the images under the same path (actors read files by path).
- Vectors go to an ``ondisk`` index. A new index trains its IVF quantizer on its
  first ``train_sample`` vectors and saves; then the vectors of every
  ``shard_images`` images form a shard in ``DIR/shards/``, written once all its
  images are committed; at the end the shards are merged into one new
  ``.ivfdata`` generation, the search width recalibrated and the index saved.
- A killed build duplicates no region: the next one merges the shards it finds
  first and describes again the committed images whose vectors reached no shard.
  Details and reasons: docs/distributed.md, docs/design.md §8.
"""
from __future__ import annotations

import logging
import os
import pickle
import time
import uuid
from pathlib import Path
from typing import Callable, Sequence

import faiss
import numpy as np
from tqdm import tqdm

from hassod.errors import UserError

from .build import BuildSummary, CatalogWriter, _changes, describe_image, open_build
from .descriptors import RegionDescriber
from .index import Index
from .regions import RegionSource
from .vectors import VectorStore
from .vectors.ids import index_ids

log = logging.getLogger(__name__)

Parts = Callable[[], "tuple[RegionSource, RegionDescriber]"]  # picklable: each actor calls it once


class DistributedBuildError(UserError, RuntimeError):
    """A Ray build that cannot run as asked (the message says why, in one line)."""


def build_index_ray(
    paths: Sequence[Path],
    index: Index | str | os.PathLike,
    parts: Parts,
    address: str = "auto",
    actors: int | None = None,
    gpus_per_actor: float | None = None,
    shard_images: int = 1000,
    train_sample: int = 50_000,
    batch_size: int = 4,
    roots: Sequence[str | os.PathLike] | None = None,
    show_progress: bool = True,
    commit_images: int = 32,
    commit_seconds: float = 2.0,
) -> BuildSummary:
    """Index ``paths`` into ``index`` on the Ray cluster at ``address`` (joined unless ``ray`` is already
    initialised); ``parts()`` makes the region source and describer, once in the driver (for the
    configuration) and once in each actor. ``actors`` / ``gpus_per_actor``: ``None`` = one actor per GPU,
    else one per CPU. ``commit_images`` / ``commit_seconds``: the driver's catalog transactions hold up to
    that many images, or what came in that many seconds (``build.CatalogWriter``): at scale the catalog
    is the driver's bottleneck. Other arguments as ``build.build_index``.
    """
    try:
        import ray
        import ray.data
    except ImportError:
        raise DistributedBuildError("--ray needs Ray: pip install 'hassod[ray]'") from None

    start = time.perf_counter()
    index = index if isinstance(index, Index) else Index(index)
    source, describer = parts()
    _connect(ray, address, show_progress)
    _check_cluster(ray, index.db_url)
    resources = ray.cluster_resources()
    if gpus_per_actor is None:
        gpus_per_actor = 1 if resources.get("GPU", 0) >= 1 else 0
    if gpus_per_actor > resources.get("GPU", 0):
        raise DistributedBuildError(f"--gpus-per-actor {gpus_per_actor:g}: the Ray cluster has "
                                    f"{resources.get('GPU', 0):g} GPUs")
    if actors is None:
        actors = max(1, int(resources.get("GPU", 0) // gpus_per_actor) if gpus_per_actor
                     else int(resources.get("CPU", 1)))
    summary = BuildSummary()
    with open_build(index, source, describer, "ondisk") as build:
        store = build.store
        if len(store) and store.kind != "ondisk":
            raise DistributedBuildError(f"this index is a {store.kind} index; a --ray build writes an ondisk index: "
                                        "build into a new --index directory")
        _merge_pending(store, index)
        changes = _changes(build.catalog, store, paths, roots, summary)
        states = {s.path: s for s in changes.todo}
        sink = _ShardSink(store, index, shard_images, train_sample, len(states))
        writer = CatalogWriter(build.catalog, store, sink, summary, changes, commit_images, commit_seconds)
        with tqdm(total=len(states), unit="img", disable=not show_progress) as bar:
            for described in _described(ray, list(states), parts, actors, gpus_per_actor, batch_size):
                state = states.pop(described.path, None)
                if state is None:  # a batch retried after its actor died, delivered twice
                    continue
                writer.add(state, described)
                bar.update()
        writer.commit()
        sink.close()
        build.finish()
        for shard in sink.written:
            shard.unlink(missing_ok=True)
    summary.seconds = time.perf_counter() - start
    return summary


def _connect(ray, address: str, show_progress: bool) -> None:
    if not ray.is_initialized():
        try:
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
        except ConnectionError as exc:
            raise DistributedBuildError(f"no Ray cluster at {address!r} ({exc}); start one with "
                                        "`ray start --head` or give its address") from None
    ray.data.DataContext.get_current().enable_progress_bars = show_progress
    if not show_progress:
        logging.getLogger("ray.data").setLevel(logging.WARNING)


def _check_cluster(ray, db_url: str | None) -> None:
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) > 1 and not (db_url or "").startswith("postgresql"):
        raise DistributedBuildError(f"this Ray cluster has {len(nodes)} nodes: the catalog must be PostgreSQL "
                                    "(--db postgresql://...), which every node reaches")


class _Describe:
    """A Ray actor: holds the region source and describer, turns a batch of paths into described images."""

    def __init__(self, parts: Parts):
        self.source, self.describer = parts()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        described = [pickle.dumps(describe_image(self.describer, result))
                     for result in self.source.regions([str(p) for p in batch["path"]])]
        return {"described": np.array(described, dtype=object)}


def _described(ray, paths: list[str], parts: Parts, actors: int, gpus: float, batch_size: int):
    """Described images of ``paths``, as the actor pool finishes them (any order)."""
    if not paths:
        return
    dataset = ray.data.from_items([{"path": p} for p in paths]).map_batches(
        _Describe, fn_constructor_args=(parts,), batch_size=batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=actors), num_gpus=gpus, num_cpus=1)
    for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
        for payload in batch["described"]:
            yield pickle.loads(payload)


class _ShardSink:
    """Where the driver puts vectors: held back until the quantizer is trained, then into shard files."""

    def __init__(self, store: VectorStore, index: Index, shard_images: int, train_sample: int, images: int):
        self.store, self.index = store, index
        self.shard_images, self.train_sample, self.images = shard_images, train_sample, images
        self.held: list[tuple[np.ndarray, np.ndarray]] = []
        self.held_count = self.done = 0
        self.shard = store.trained_empty() if len(store) else None
        self.shard_count = 0  # images in the current shard
        self.written: list[Path] = []

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        if self.shard is None:
            self.held.append((ids, vectors))
            self.held_count += ids.size
            if self.held_count >= self.train_sample:
                self._train()
        elif ids.size:
            self.shard.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), ids)

    def image_done(self) -> None:
        """One more image is committed with its vectors handed over: write the shard when it is full."""
        self.done += 1
        if self.shard is not None:
            self.shard_count += 1
            if self.shard_count >= self.shard_images:
                self._write_shard()

    def close(self) -> None:
        """Train on what is held (a small build), write the last shard, merge the shards, recalibrate."""
        if self.shard is None:
            self._train()
        if self.shard is not None and self.shard.ntotal:
            self._write_shard()
        if self.written:
            self.store.merge_shards(self.written, self.index.directory)
            self.store.calibrate()

    def _train(self) -> None:
        if not self.held_count:
            return
        ids = np.concatenate([i for i, _ in self.held])
        vectors = np.concatenate([v for _, v in self.held])
        per_image = ids.size / max(self.done, 1)
        self.store.expected_size = max(ids.size, round(per_image * self.images))  # nlist for the whole build
        self.store.add(ids, vectors)  # trains the quantizer on them and calibrates
        self.store.save(self.index.vectors_path)  # shards start from a saved quantizer
        self.held, self.held_count = [], 0
        self.shard, self.shard_count = self.store.trained_empty(), 0

    def _write_shard(self) -> None:
        folder = self.index.shards_dir
        folder.mkdir(exist_ok=True)
        path = folder / f"shard-{uuid.uuid4().hex[:12]}.index"
        tmp = folder / f".{path.name}.tmp"
        faiss.write_index(self.shard, str(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        self.written.append(path)
        self.shard, self.shard_count = self.store.trained_empty(), 0


def _merge_pending(store: VectorStore, index: Index) -> None:
    """Merge the shards a killed build wrote (all their images are committed) and save; shards merged and
    saved just before the kill are dropped."""
    folder = index.shards_dir
    if not folder.is_dir():
        return
    for tmp in folder.glob(".shard-*.tmp"):
        tmp.unlink()
    shards = sorted(folder.glob("shard-*.index"))
    fresh = [s for s in shards if not store.contains(index_ids(faiss.read_index(str(s), faiss.IO_FLAG_MMAP))).any()]
    if fresh:
        log.info("merging %d shards of an interrupted build", len(fresh))
        store.merge_shards(fresh, index.directory)
        store.save(index.vectors_path)
    for shard in shards:
        shard.unlink()
