"""`hassod discover`: stage 1 over :func:`hassod.discover.collection.discover_collection`."""
from __future__ import annotations

import os
from pathlib import Path

import click

from hassod.discover import RECIPES

from .console import Command, fail, report
from .options import (batch_size_option, device_option, images_argument, json_option, max_pixels_option, viz_option,
                      weights_option, workers_option)


def _thresholds(value: str | None) -> tuple[float, ...] | None:
    if not value:
        return None
    try:
        parsed = tuple(float(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {value!r}") from None
    if any(not -1.0 <= t <= 1.0 for t in parsed):
        raise click.BadParameter("thresholds are cosine similarities, between -1 and 1")
    return parsed


@click.command(cls=Command)
@images_argument
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="COCO JSON file to write.")
@click.option("--backbone", default="efficientnet_lite0", show_default=True, help="Feature backbone name.")
@weights_option()
@click.option("--thresholds", help="Merge thresholds, e.g. 0.4,0.2,0.1 (default: the backbone's, per recipe).")
@click.option("--recipe", type=click.Choice(RECIPES), default="paper", show_default=True,
              help="paper: CRF pseudo-labels for training; search: every region of the merge hierarchy, no CRF.")
@click.option("--max-regions", type=click.IntRange(min=1),
              help="search recipe: keep the best-scored N per image [200].")
@device_option()
@workers_option("Post-processing processes [CPU count].")
@batch_size_option(8)
@viz_option()
@max_pixels_option()
@json_option()
def discover(images, out, backbone, weights, thresholds, recipe, max_regions, device, workers, batch_size, viz_dir,
             max_pixels, as_json):
    """Stage 1: discover wholes, parts and subparts in IMAGES (files or folders) without labels."""
    from hassod.device import resolve_device
    from hassod.runs import progress_path
    from hassod.discover.collection import discover_collection
    from hassod.discover.recipes import recipe_settings
    from hassod.features import build_backbone
    from hassod.images import list_images

    settings = recipe_settings(recipe, _thresholds(thresholds), max_regions)
    paths = list_images(images, exclude=[out, progress_path(out), viz_dir])
    if not paths:
        fail(f"no files found in {', '.join(map(str, images))}")
    model = build_backbone(backbone, weights=weights, device=resolve_device(device))
    summary = discover_collection(paths, out, model, settings, workers=workers or os.cpu_count() or 1,
                                  batch_size=batch_size, viz_dir=viz_dir, max_pixels=max_pixels,
                                  show_progress=not as_json)
    report(summary, summary.skipped, "skipped", as_json)
