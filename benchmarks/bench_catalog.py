"""Catalog writes per image: one transaction per image vs a batch of images per transaction.

A Ray build's driver writes every image's regions into the catalog
(indexer.build.CatalogWriter); at scale that is the driver's bottleneck
(docs/distributed.md). This writes the same images (``--regions`` regions each,
with RLE masks of blobs at 640x480) into a fresh catalog one image per
transaction, then ``--batch`` images per transaction, and prints ms per image
and the ratio, on SQLite and, given ``--db URL`` of an empty database, on
PostgreSQL too.

Run: .venv/bin/python benchmarks/bench_catalog.py [--images 256] [--regions 200] [--batch 32]
     [--db postgresql+psycopg://user@/db?host=/socket/dir]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from indexer.catalog import Catalog, ImageRecord, NewRegion  # noqa: E402


def make_regions(count: int, seed: int = 0) -> list[NewRegion]:
    """``count`` elliptic blobs of random size at 640x480, nested two deep, as the catalog stores them."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:480, :640]
    regions = []
    for i in range(count):
        cx, cy = rng.uniform(0, 640), rng.uniform(0, 480)
        rx, ry = rng.uniform(8, 200), rng.uniform(8, 160)
        mask = np.asfortranarray(((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1, dtype=np.uint8)
        rle = mask_utils.encode(mask)
        x, y, w, h = mask_utils.toBbox(rle)
        parent = i - 1 if i % 3 else None
        regions.append(NewRegion((x, y, x + w, y + h), float(rng.uniform()), min(i % 3, 2), int(mask.sum()), rle,
                                 parent))
    return regions


def timed_writes(url: str, images: int, regions: list[NewRegion], batch: int, prefix: str) -> float:
    """Seconds per image to write ``images`` images of ``regions``, ``batch`` per transaction."""
    with Catalog(url) as catalog:
        entries = [(ImageRecord(f"/{prefix}/{i:06d}.jpg", f"{i:064x}", 1000 + i, 1.7e9 + i, 640, 480), regions)
                   for i in range(images)]
        start = time.perf_counter()
        for at in range(0, images, batch):
            catalog.write_images(entries[at:at + batch])
        return (time.perf_counter() - start) / images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--regions", type=int, default=200)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--db", help="SQLAlchemy URL of an empty PostgreSQL database")
    args = parser.parse_args()
    regions = make_regions(args.regions)
    rle_bytes = np.mean([len(r.mask_rle["counts"]) for r in regions])
    print(f"{args.images} images x {args.regions} regions (RLE {rle_bytes:.0f} bytes each on average)")
    with tempfile.TemporaryDirectory() as work:
        targets = [("SQLite", f"sqlite:///{work}/catalog.sqlite")] + ([("PostgreSQL", args.db)] if args.db else [])
        for name, url in targets:
            timed_writes(url, 8, regions, 8, "warm-up")  # connection, tables, first statements
            one = timed_writes(url, args.images, regions, 1, "one")
            batched = timed_writes(url, args.images, regions, args.batch, "batched")
            print(f"{name:10s}  one image per transaction {1e3 * one:6.2f} ms/image   "
                  f"{args.batch} per transaction {1e3 * batched:6.2f} ms/image   {one / batched:.2f}x")


if __name__ == "__main__":
    main()
