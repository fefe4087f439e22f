"""Ray build overhead, and the on-disk index against the in-memory IVF at 1M vectors.

Part 1 (build): the same synthetic scenes (hassod.synthetic) indexed with
stage-1 discovery by the single-process build (discovery workers = CPU count)
and by a local Ray cluster of 2 actors (`--ray`, one discovery process each):
images/s, regions/image, and the per-image seconds the 100M-region paper
estimate in docs/distributed.md starts from.

Part 2 (search): ``--vectors`` unit vectors of the descriptor's dimension
(432), bench_search_scaling's "hierarchical" collection (queries are fresh
draws). The on-disk store is built the way a Ray build builds it:
quantizer trained on a sample, the rest written as shards and merged into
the memory-mapped lists; the in-memory IVF holds the same lists (same
quantizer) in RAM. Single-query latency p50 / p95 at the calibrated nprobe,
the on-disk index cold (its file's pages dropped from the page cache with
posix_fadvise before it is loaded) and warm; recall@10 against exact search; resident memory of
a process that loads each index and runs the queries (anonymous vs
file-backed RSS).

Run: .venv/bin/python benchmarks/bench_distributed.py [--images 12] [--vectors 1000000] [--skip-build]
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import faiss  # noqa: E402

from bench_search_scaling import Collection  # noqa: E402  (hierarchical clusters, as real descriptors)
from indexer.vectors import ExactTopK, VectorStore, VectorStoreSettings  # noqa: E402
from indexer.vectors.ivf import ivf_params  # noqa: E402

DIM = 432  # efficientnet_lite0 region descriptor


def discovery_parts(workers: int):
    from hassod.features import build_backbone
    from indexer.descriptors import RegionDescriber, default_settings
    from indexer.regions import DiscoveryRegions

    model = build_backbone("efficientnet_lite0", device="cpu")
    return DiscoveryRegions(model, workers=workers), RegionDescriber(model, default_settings(model))


def bench_build(n_images: int, work: Path) -> None:
    import ray

    from hassod.synthetic import make_instance_scenes, save_scenes
    from indexer.build import CatalogWriter, build_index
    from indexer.distributed import build_index_ray

    scenes = make_instance_scenes(seed=0, n_objects=6, n_images=n_images)
    folder = work / "scenes"
    save_scenes(scenes, folder, work / "truth.json")
    paths = sorted(folder.glob("*.png"))
    cpus = os.cpu_count() or 1

    source, describer = discovery_parts(cpus)
    list(source.regions(paths[:1]))  # warm-up: worker start-up and first-call costs out of the timing
    start = time.perf_counter()
    single = build_index(paths, work / "single", source, describer, index_type="flat", show_progress=False)
    single_s = time.perf_counter() - start
    print(f"single-process build ({cpus} discovery workers): {n_images} images, {single.regions} regions in "
          f"{single_s:.1f} s = {n_images / single_s:.2f} images/s ({single.regions / n_images:.1f} regions/image)")

    start = time.perf_counter()
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # bind to 127.0.0.1, not the machine's address
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    started = time.perf_counter() - start
    committing = []  # the driver's share per image: catalog transaction + vectors to the shard
    real_commit = CatalogWriter.commit

    def timed_commit(writer):
        began, images = time.perf_counter(), len(writer.pending)
        real_commit(writer)
        if images:
            committing.extend([(time.perf_counter() - began) / images] * images)

    CatalogWriter.commit = timed_commit
    start = time.perf_counter()
    summary = build_index_ray(paths, work / "ray", functools.partial(discovery_parts, 1), actors=2,
                              show_progress=False)
    ray_s = time.perf_counter() - start
    ray.shutdown()
    CatalogWriter.commit = real_commit
    print(f"Ray build (local cluster, 2 actors x 1 discovery process): {summary.regions} regions in {ray_s:.1f} s "
          f"= {n_images / ray_s:.2f} images/s (+ {started:.1f} s cluster start, not counted); "
          f"per image {ray_s / n_images:.2f} s wall on 2 CPUs = {2 * ray_s / n_images:.2f} CPU-s; "
          f"driver commit {1e3 * np.mean(committing):.1f} ms per image (SQLite)")


def bench_search(n: int, work: Path) -> None:
    data = Collection("hierarchical", n, DIM)
    queries = data.queries(200)
    truth = ExactTopK(queries, 10)
    settings = VectorStoreSettings(lists_per_sqrt_n=1.0, kmeans_iters=8)  # nlist = √n: training time on 2 CPUs
    store = VectorStore.create(DIM, "ondisk", expected_size=n, settings=settings)
    start = time.perf_counter()
    shards, memory = [], None
    pieces = ((ids[i:i + 200_000], x[i:i + 200_000]) for ids, x, _ in data.chunks() for i in range(0, ids.size, 200_000))
    for number, (ids, x) in enumerate(pieces):
        truth.update(ids, x)
        if number == 0:
            store.add(ids, x)  # trains the quantizer on this sample
            store.save(work / "vectors.faiss")
            memory = store.trained_empty()
            memory.add_with_ids(x, ids)
            continue
        shard = store.trained_empty()
        shard.add_with_ids(x, ids)
        memory.add_with_ids(x, ids)
        shards.append(work / f"shard{number}.index")
        faiss.write_index(shard, str(shards[-1]))
        del shard
    merge_start = time.perf_counter()
    store.merge_shards(shards, work)
    merge_s = time.perf_counter() - merge_start
    store.calibrate()
    store.save(work / "vectors.faiss")
    build_s = time.perf_counter() - start
    for shard in shards:
        shard.unlink()
    nprobe = store.info()["nprobe"]
    faiss.extract_index_ivf(memory).nprobe = nprobe
    faiss.write_index(memory, str(work / "memory.index"))
    del memory, store
    size = sum(f.stat().st_size for f in work.glob("vectors.*.ivfdata"))
    print(f"{n} vectors x {DIM}: ondisk built from shards in {build_s:.0f} s (merge of {len(shards)} shards into "
          f"{size / 1e9:.2f} GB: {merge_s:.1f} s = {size / 1e6 / merge_s:.0f} MB/s written); nlist "
          f"{int(round(np.sqrt(n)))}, calibrated nprobe {nprobe}")
    np.save(work / "queries.npy", queries)
    np.save(work / "truth.npy", truth.ids)
    for kind in ("memory", "ondisk"):
        done = subprocess.run([sys.executable, __file__, "--measure", kind, "--work", str(work)],
                              capture_output=True, text=True, check=True)
        result = json.loads(done.stdout.strip().splitlines()[-1])
        for phase in ("cold", "warm"):
            if phase in result:
                r = result[phase]
                print(f"{kind:7s} {phase}: p50 {r['p50']:.2f} ms  p95 {r['p95']:.2f} ms  recall@10 {r['recall']:.3f}")
        print(f"{kind:7s} loaded in {result['load_s']:.2f} s; resident: {result['anon_mb']:.0f} MB anonymous + {result['file_mb']:.0f} MB file-backed "
              f"after the queries (estimate {result['estimate_mb']:.0f} MB resident, "
              f"{result['disk_mb']:.0f} MB on disk)")


def measure(kind: str, work: Path) -> None:
    """In a fresh process: load one index, time single queries, report RSS (one JSON line)."""
    queries, truth = np.load(work / "queries.npy"), np.load(work / "truth.npy")
    faiss.omp_set_num_threads(1)
    for data in work.glob("vectors.*.ivfdata"):  # mapped by nobody yet: its pages leave the page cache
        fd = os.open(data, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
    start = time.perf_counter()
    if kind == "memory":
        index = faiss.read_index(str(work / "memory.index"))
        estimate = index.ntotal * (4 * DIM + 8) / 1e6
        disk = 0.0
    else:
        store = VectorStore.load(work / "vectors.faiss")
        index = store._index
        info = store.info()
        estimate, disk = info["bytes_estimate"] / 1e6, info["disk_bytes_estimate"] / 1e6
    load_s = time.perf_counter() - start
    ivf = faiss.extract_index_ivf(index)
    params = ivf_params(ivf, ivf.nprobe)

    def run():
        times, found = [], []
        for q in queries:
            start = time.perf_counter()
            _, ids = index.search(q[None], 10, params=params)
            times.append(time.perf_counter() - start)
            found.append(ids[0])
        recall = np.mean([np.intersect1d(f, t).size / 10 for f, t in zip(found, truth)])
        return {"p50": 1e3 * np.percentile(times, 50), "p95": 1e3 * np.percentile(times, 95), "recall": recall}

    result = {}
    if kind == "ondisk":
        result["cold"] = run()
    result["warm"] = run()
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    kb = lambda key: int(status[key].split()[0]) / 1024  # noqa: E731
    result.update(anon_mb=kb("RssAnon"), file_mb=kb("RssFile"), estimate_mb=estimate, disk_mb=disk, load_s=load_s)
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=12)
    parser.add_argument("--vectors", type=int, default=1_000_000)
    parser.add_argument("--skip-build", action="store_true")
    parser.add_argument("--skip-search", action="store_true")
    parser.add_argument("--measure", choices=["memory", "ondisk"], help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        measure(args.measure, args.work)
        return
    with tempfile.TemporaryDirectory(prefix="bench-distributed-") as tmp:
        if not args.skip_build:
            bench_build(args.images, Path(tmp))
        if not args.skip_search:
            (Path(tmp) / "search").mkdir()
            bench_search(args.vectors, Path(tmp) / "search")


if __name__ == "__main__":
    main()
