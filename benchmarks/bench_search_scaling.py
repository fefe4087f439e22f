"""Query latency and recall of the vector store as the collection grows (issue 3, Benchmark: speed).

    .venv/bin/python benchmarks/bench_search_scaling.py [--sizes 10k,100k,1M,10M] [--dim 432]
        [--data hierarchical,clustered,random] [--queries 300] [--index-type auto]
        [--pqfs-m M] [--max-k-factor F]

For each data kind and size it builds a ``VectorStore`` with ``--index-type``
(default ``auto``; ``pqfs`` is the kind for data without neighbourhood
structure, e.g. ``--data random --index-type pqfs --sizes 100k,1M``; vectors
generated and added in chunks of 1M, so the full collection exists only
inside the index; ~5 GB of RSS at 10M x 432 as SQ8), then reports:

- build time (s) and the index's resident memory (RSS growth, and the store's estimate);
- single-query latency p50 / p95 (ms) over ``--queries`` queries, k = 10;
- recall@10 against exact search, the ground truth computed in the same script
  by brute force over the regenerated chunks;
- the same for restricted searches (``allowed_ids``): ``r_*`` allows a random
  third of the ids (a filter independent of the descriptor); ``c_*`` (clustered
  and hierarchical data) allows a third of the *clusters* — a filter correlated with the
  descriptor, like a hierarchy level, where two thirds of the queries have no
  allowed neighbour nearby and the search must widen to (near) exhaustive.

Data kinds:
- ``random``: uniform unit vectors. Neighbours are barely nearer than any other
  vector (top-1 cosine 0.28 vs top-10 0.24 at 200k, d = 256), so no index beats
  a near-exhaustive scan at recall 0.95: the worst case, not a realistic one.
- ``clustered``: n/100 Gaussian clusters on the sphere, members at cosine ~0.7
  to their centre. The centres are random, hence nearly orthogonal: at 10M
  there are 100k unrelated clusters for ~12k IVF lists, so a list cannot hold a
  cluster and a member's list is decided by noise — hard for IVF at scale.
- ``hierarchical``: the same clusters, but their centres scattered (cosine
  ~0.7) around n/10^4 category centres — neighbourhood structure at several
  scales (category → instance → view), as real region descriptors have.
Queries are fresh draws from the same distribution, never stored vectors.

A 10M row takes about an hour per data kind on two shared cores (IVF training
and list assignment dominate); run big sizes in the background.
Timings are single-threaded per query (the store never runs more OpenMP threads
than queries), except pqfs scans of many lists, which use every core; other
processes on the machine make them noisy: the load average is printed with
each row.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from indexer.vectors import ExactTopK, VectorStore, VectorStoreSettings  # noqa: E402

CHUNK = 1_000_000
K = 10


def parse_size(text: str) -> int:
    text = text.strip().lower()
    scale = {"k": 1_000, "m": 1_000_000}.get(text[-1], 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


def _unit(x: np.ndarray) -> np.ndarray:
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


class Collection:
    """Deterministic synthetic collection, regenerated chunk by chunk (never held whole)."""

    def __init__(self, kind: str, n: int, dim: int, seed: int = 0):
        self.kind, self.n, self.dim, self.seed = kind, n, dim, seed
        # per-dimension noise giving member·centre cosine ≈ 0.7 whatever the dimension
        self.sigma = float(np.sqrt(1.0 / dim))
        if kind in ("clustered", "hierarchical"):
            rng = np.random.default_rng(seed + 1)
            n_clusters = max(10, n // 100)
            if kind == "clustered":
                self.centres = _unit(rng.standard_normal((n_clusters, dim), dtype=np.float32))
            else:  # cluster centres themselves scattered around n/10^4 category centres
                categories = _unit(rng.standard_normal((max(2, n // 10_000), dim), dtype=np.float32))
                parents = rng.integers(0, len(categories), n_clusters)
                noise = rng.standard_normal((n_clusters, dim), dtype=np.float32) * self.sigma
                self.centres = _unit(categories[parents] + noise)

    def _draw(self, rng: np.random.Generator, m: int) -> tuple[np.ndarray, np.ndarray]:
        if self.kind == "random":
            return _unit(rng.standard_normal((m, self.dim), dtype=np.float32)), np.zeros(m, dtype=np.int64)
        labels = rng.integers(0, len(self.centres), m)
        noise = rng.standard_normal((m, self.dim), dtype=np.float32) * self.sigma
        return _unit(self.centres[labels] + noise), labels

    def chunks(self):
        """(ids, vectors, labels) per chunk; ids are 0..n-1 (catalog-style autoincrement)."""
        for start in range(0, self.n, CHUNK):
            m = min(CHUNK, self.n - start)
            vectors, labels = self._draw(np.random.default_rng([self.seed, start]), m)
            yield np.arange(start, start + m, dtype=np.int64), vectors, labels

    def queries(self, m: int) -> np.ndarray:
        return self._draw(np.random.default_rng([self.seed, 2**62]), m)[0]


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def latencies(store: VectorStore, queries: np.ndarray, allowed=None) -> tuple[np.ndarray, np.ndarray]:
    """Per-query seconds and the (q, K) ids found, one query per call."""
    times, found = [], []
    for q in queries:
        t0 = time.perf_counter()
        _, ids = store.search(q[None], K, allowed_ids=allowed)
        times.append(time.perf_counter() - t0)
        found.append(ids[0])
    return np.array(times), np.stack(found)


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([np.intersect1d(f[f >= 0], t).size / t.size for f, t in zip(found, truth)]))


def run(kind: str, n: int, dim: int, n_queries: int, n_restricted: int, index_type: str = "auto",
        settings: VectorStoreSettings | None = None) -> dict:
    data = Collection(kind, n, dim)
    rss0 = rss_bytes()
    t0 = time.perf_counter()
    store = VectorStore.create(dim, index_type, expected_size=n, settings=settings)
    for ids, vectors, _ in data.chunks():
        store.add(ids, vectors)
        del vectors
    if n > CHUNK:  # built (and calibrated) on the first chunk: re-tune on everything
        store.calibrate()
    build_s = time.perf_counter() - t0
    index_bytes = rss_bytes() - rss0

    queries = data.queries(n_queries)
    filters = {"r": lambda ids, labels: ids % 3 == 0}
    if kind != "random":
        filters["c"] = lambda ids, labels: labels % 3 == 0
    truth = ExactTopK(queries, K)
    truth_restricted = {name: ExactTopK(queries[:n_restricted], K) for name in filters}
    allowed_ids = {name: [] for name in filters}
    for ids, vectors, labels in data.chunks():  # exact ground truth, batched over the same data
        truth.update(ids, vectors)
        for name, rule in filters.items():
            allowed = rule(ids, labels)
            truth_restricted[name].update(ids[allowed], vectors[allowed])
            allowed_ids[name].append(ids[allowed])
        del vectors

    store.search(queries[:5], K)  # warm-up (page-in, OpenMP pool)
    times, found = latencies(store, queries)
    info = store.info()
    row = {
        "data": kind, "n": n, "kind": info["kind"], "nlist": info["nlist"],
        "nprobe": info.get("nprobe", info.get("ef_search", "-")), "kf": info.get("k_factor", "-"),
        "build_s": build_s,
        "rss_gb": index_bytes / 2**30, "est_gb": (info["bytes_estimate"] or 0) / 2**30,
        "p50": 1e3 * np.median(times), "p95": 1e3 * np.percentile(times, 95),
        "recall": recall(found, truth.ids), "load": os.getloadavg()[0],
    }
    for name in ("r", "c"):
        if name not in filters:
            row.update({f"{name}_p50": "-", f"{name}_p95": "-", f"{name}_recall": "-", f"{name}_all_k": "-"})
            continue
        t0 = time.perf_counter()
        filt = store.make_filter(np.concatenate(allowed_ids[name]))
        row["filter_ms"] = 1e3 * (time.perf_counter() - t0)
        r_times, r_found = latencies(store, queries[:n_restricted], filt)
        row.update({f"{name}_p50": 1e3 * np.median(r_times), f"{name}_p95": 1e3 * np.percentile(r_times, 95),
                    f"{name}_recall": recall(r_found, truth_restricted[name].ids),
                    f"{name}_all_k": bool((r_found >= 0).all())})
    return row


COLUMNS = [("data", "{:>12}"), ("n", "{:>10,}"), ("kind", "{:>5}"), ("nlist", "{:>6}"), ("nprobe", "{:>6}"),
           ("kf", "{:>4}"),
           ("build_s", "{:>8.1f}"), ("rss_gb", "{:>6.2f}"), ("est_gb", "{:>6.2f}"),
           ("p50", "{:>7.2f}"), ("p95", "{:>7.2f}"), ("recall", "{:>6.3f}"),
           ("r_p50", "{:>7.2f}"), ("r_p95", "{:>7.2f}"), ("r_recall", "{:>8.3f}"), ("r_all_k", "{!s:>7}"),
           ("c_p50", "{:>7.2f}"), ("c_p95", "{:>7.2f}"), ("c_recall", "{:>8.3f}"), ("c_all_k", "{!s:>7}"),
           ("filter_ms", "{:>9.1f}"), ("load", "{:>5.1f}")]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10k,100k,1M,10M")
    parser.add_argument("--dim", type=int, default=432, help="the default descriptor's (efficientnet_lite0 s16+s32)")
    parser.add_argument("--data", default="hierarchical,clustered,random")
    parser.add_argument("--queries", type=int, default=300, help="single queries timed per size")
    parser.add_argument("--restricted-queries", type=int, default=100)
    parser.add_argument("--index-type", default="auto", help="auto, flat, ivf, ivfsq, ivfpq, hnsw, pqfs")
    parser.add_argument("--pqfs-m", type=int, default=None, help="4-bit sub-quantizers of pqfs [dim/2]")
    parser.add_argument("--max-k-factor", type=int, default=None, help="largest k_factor pqfs may calibrate to")
    args = parser.parse_args(argv)
    overrides = {"pqfs_m": args.pqfs_m, "pqfs_max_k_factor": args.max_k_factor}
    settings = VectorStoreSettings(**{key: value for key, value in overrides.items() if value is not None})
    print("columns: ms = single-query latency, k = 10; recall@10 vs exact brute force; kf = pqfs k_factor; "
          "r_* = restricted to a random third of the ids, c_* = to a third of the clusters; "
          "all_k = every row got k results; "
          "rss_gb = RSS growth while building; filter_ms = make_filter time; load = 1-min load average")
    print(" ".join(f"{name:>{len(fmt.format(_sample(name)))}}" for name, fmt in COLUMNS))
    for size in (parse_size(s) for s in args.sizes.split(",")):
        for kind in args.data.split(","):
            row = run(kind, size, args.dim, args.queries, min(args.restricted_queries, args.queries),
                      args.index_type, settings)
            print(" ".join(_cell(fmt, row[name]) for name, fmt in COLUMNS), flush=True)


def _cell(fmt: str, value) -> str:
    if value == "-":  # not measured for this row: keep the column's width
        return f"{'-':>{len(fmt.format(0.0 if '.' in fmt else 0))}}"
    return fmt.format(value)


def _sample(name: str):
    """A representative value, only to size the header to the column."""
    return {"data": "x", "n": 0, "kind": "x", "nlist": 0, "nprobe": 0, "kf": 0, "r_all_k": True}.get(name, 0.0)


if __name__ == "__main__":
    main()
