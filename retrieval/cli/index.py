"""`hassod index build`, `remove` and `stats`: over :mod:`indexer.build` and :class:`indexer.index.Index`."""
from __future__ import annotations

import functools
import json
from pathlib import Path

import click

from hassod.discover import RECIPES

from .console import Commands, fail, naming, report
from .options import (batch_size_option, device_option, images_argument, index_option, json_option,
                      max_pixels_option, use_option, weights_option, workers_option)


@click.group(cls=Commands)
def index() -> None:
    """Build and inspect a region index of an image collection."""


@index.command()
@images_argument
@click.option("--index", "index_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Index directory (created).")
@click.option("--detector", type=click.Path(exists=True, dir_okay=False), help="Regions from a trained detector.")
@use_option("With --detector: the checkpoint's student, or Mean Teacher's teacher.")
@click.option("--regions", "regions_json", type=click.Path(exists=True, dir_okay=False),
              help="Regions from a COCO file, e.g. the output of `hassod discover`.")
@click.option("--recipe", type=click.Choice(RECIPES),
              help="How discovery finds regions: search (every region of the merge hierarchy, no CRF) or paper "
                   "(HASSOD's CRF pseudo-labels) [the index's own; search for a new index].")
@click.option("--max-regions", type=click.IntRange(min=1),
              help="search recipe: keep the best-scored N per image [200].")
@click.option("--db", "db_url", help="SQLAlchemy URL of the catalog [sqlite file inside the index].")
@click.option("--backbone", default="efficientnet_lite0", show_default=True)
@weights_option()
@click.option("--index-type", default="auto", show_default=True,
              help="auto, flat, ivf, ivfsq, ivfpq, hnsw, pqfs (descriptors without neighbourhood structure), "
                   "ondisk (inverted lists memory-mapped: indexes larger than memory).")
@click.option("--whiten", is_flag=True,
              help="Learn a PCA-whitening of the descriptors at the first build; later builds and queries reuse it.")
@click.option("--whiten-dim", type=click.IntRange(min=1),
              help="Whiten (as --whiten) and reduce the stored vectors to this many dimensions.")
@device_option(help=None)
@workers_option("Discovery processes [CPU count].")
@batch_size_option(8)
@max_pixels_option(help=None)
@click.option("--ray", "ray_address", metavar="ADDRESS|auto",
              help="Compute regions and descriptors on this Ray cluster (pip install 'hassod[ray]'); "
                   "writes an ondisk index.")
@click.option("--actors", type=click.IntRange(min=1), help="With --ray: actors [one per GPU, else one per CPU].")
@click.option("--gpus-per-actor", type=click.FloatRange(min=0), help="With --ray: GPUs per actor [1 with GPUs, else 0].")
@click.option("--train-sample", type=click.IntRange(min=1),
              help="With --ray: vectors the IVF quantizer of a new index is trained on [50000; ~40 per list wanted].")
@click.option("--shard-images", type=click.IntRange(min=1), help="With --ray: images per vector shard [1000].")
@json_option()
def build(images, index_dir, detector, use, regions_json, recipe, max_regions, db_url, backbone, weights, index_type,
          whiten, whiten_dim, device, workers, batch_size, max_pixels, ray_address, actors, gpus_per_actor,
          train_sample, shard_images, as_json):
    """Index every whole, part and subpart region of IMAGES (files or folders); re-runs update it."""
    from hassod.discover.recipes import recipe_settings
    from hassod.images import list_images
    from hassod.model import CheckpointError
    from hassod.runs import progress_path
    from indexer.build import build_index, region_parts
    from indexer.index import Index
    from indexer.whitening import WhiteningSettings

    if detector and regions_json:
        fail("give either --detector (regions from a trained detector) or --regions (from a COCO file), not both")
    if use != "student" and not detector:
        fail("--use goes with --detector: it picks the checkpoint's weights")
    if (detector or regions_json) and (recipe or max_regions):
        fail("--recipe and --max-regions choose how discovery finds regions: not with --detector or --regions")
    # The index, and a regions file with its progress log (`hassod discover` writes them), are not images.
    regions_log = progress_path(regions_json) if regions_json else None
    paths = list_images(images, exclude=[index_dir, regions_json, regions_log])
    if not paths:
        fail(f"no files found in {', '.join(map(str, images))}")
    if ray_address is None and (actors or gpus_per_actor is not None or train_sample or shard_images):
        fail("--actors, --gpus-per-actor, --train-sample and --shard-images go with --ray ADDRESS")
    if ray_address is not None and (whiten or whiten_dim or index_type not in ("auto", "ondisk")):
        fail("a --ray build writes an ondisk index without whitening: leave out --whiten, --whiten-dim, --index-type")
    target = Index(index_dir, db_url)
    # Without --recipe an index is updated the way it was built.
    recorded = None if recipe or detector or regions_json or not target.exists() else target.config
    target.close()
    saved = recorded.discovery_recipe() if recorded else None
    settings = saved if saved is not None and max_regions is None else recipe_settings(
        recipe or (saved.recipe if saved else "search"), None, max_regions)
    parts = functools.partial(region_parts, backbone=backbone, weights=weights, device=device, detector=detector,
                              use=use, regions_json=regions_json, recipe=settings, workers=workers,
                              batch_size=batch_size, max_pixels=max_pixels)
    if ray_address is not None:
        from indexer.distributed import build_index_ray

        sizes = {"train_sample": train_sample, "shard_images": shard_images}
        summary = build_index_ray(paths, target, functools.partial(parts, workers=1), address=ray_address,
                                  actors=actors, gpus_per_actor=gpus_per_actor, roots=images,
                                  show_progress=not as_json, **{k: v for k, v in sizes.items() if v is not None})
    else:
        with naming(f"--detector {detector}", CheckpointError):
            source, describer = parts()
        whitening = WhiteningSettings(dim=whiten_dim) if whiten or whiten_dim else None
        summary = build_index(paths, target, source, describer, index_type=index_type, show_progress=not as_json,
                              whitening=whitening, roots=images)
    report(summary, summary.errors, "skipped", as_json)


@index.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@index_option("Index directory.")
@json_option()
def remove(paths, index_dir, as_json):
    """Remove the images indexed at or below PATHS (files or folders, gone or not) from the index, with
    their regions; the files are not touched."""
    from indexer.build import remove_images

    summary = remove_images(index_dir, paths)
    report(summary, [(path, "nothing indexed there") for path in summary.unmatched], "not removed", as_json)


@index.command()
@click.argument("index_dir", type=click.Path(path_type=Path))
@json_option(help=None)
def stats(index_dir, as_json):
    """Images, regions per level, vector index type and size of the index at INDEX_DIR."""
    from indexer.index import Index

    with Index.open(index_dir) as opened:
        info = opened.stats()
    if as_json:
        click.echo(json.dumps(info, default=str))
        return
    levels, vectors, config = info["regions_by_level"], info["vectors"], info["config"]
    click.echo(f"images    {info['images_ok']} indexed, {info['images_error']} skipped (unreadable or without regions)")
    waiting = info["regions_without_vectors"]
    click.echo(f"regions   {info['regions']} ({levels['whole']} whole, {levels['part']} part, {levels['subpart']} subpart)"
               + (f"; {waiting} more without vectors (an interrupted build: run it again)" if waiting else ""))
    whitened = f" (PCA-whitened from {config['descriptor_dim']})" if config["whitening"] else ""
    click.echo(f"vectors   {vectors['size']} x {vectors['dim']}{whitened}, {vectors['kind']} index, "
               f"{info['bytes_on_disk'] / 1e6:.1f} MB on disk"
               + (f" (memory-mapped), {vectors['bytes_estimate'] / 1e6:.1f} MB resident"
                  if vectors["disk_bytes_estimate"] else ""))
    click.echo(f"backbone  {config['backbone']} ({config['descriptor']}); regions from {config['region_source']}")

