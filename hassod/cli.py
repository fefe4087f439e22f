"""The ``hassod`` command line (click). Each command is a thin layer over the library."""
from __future__ import annotations

from pathlib import Path

import click

from .console import Commands, fail, report
from .convert_cli import convert
from .detect_cli import detect, evaluate_command
from .discover import RECIPES
from .images import DEFAULT_MAX_PIXELS
from .train_cli import train


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


@click.group(cls=Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="hassod-search", message="%(package)s %(version)s")
def main() -> None:
    """Unsupervised hierarchical object discovery (HASSOD) and region search for image collections."""


@main.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="COCO JSON file to write.")
@click.option("--backbone", default="efficientnet_lite0", show_default=True, help="Feature backbone name.")
@click.option("--weights", type=click.Path(exists=True, dir_okay=False), help="Backbone weight file.")
@click.option("--thresholds", help="Merge thresholds, e.g. 0.4,0.2,0.1 (default: the backbone's, per recipe).")
@click.option("--recipe", type=click.Choice(RECIPES), default="paper", show_default=True,
              help="paper: CRF pseudo-labels for training; search: every region of the merge hierarchy, no CRF.")
@click.option("--max-regions", type=click.IntRange(min=1),
              help="search recipe: keep the best-scored N per image [200].")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--workers", default=None, type=click.IntRange(min=1), help="Post-processing processes [CPU count].")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1))
@click.option("--viz", "viz_dir", type=click.Path(file_okay=False, path_type=Path), help="Write overlay PNGs here.")
@click.option("--max-pixels", default=DEFAULT_MAX_PIXELS, show_default=True, type=click.IntRange(min=1),
              help="Refuse images larger than this.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def discover(images, out, backbone, weights, thresholds, recipe, max_regions, device, workers, batch_size, viz_dir,
             max_pixels, as_json):
    """Stage 1: discover wholes, parts and subparts in IMAGES (files or folders) without labels."""
    import os

    from .device import resolve_device
    from .runs import SettingsMismatchError, progress_path
    from .discover.collection import discover_collection
    from .discover.recipes import RecipeError, recipe_settings
    from .features import WeightsFormatError, WeightsNotFoundError, build_backbone
    from .images import list_images

    try:
        settings = recipe_settings(recipe, _thresholds(thresholds), max_regions)
    except RecipeError as exc:
        fail(str(exc))
    paths = list_images(images, exclude=[out, progress_path(out), viz_dir])
    if not paths:
        fail(f"no files found in {', '.join(map(str, images))}")
    try:
        model = build_backbone(backbone, weights=weights, device=resolve_device(device))
    except (WeightsNotFoundError, WeightsFormatError, ValueError) as exc:
        fail(str(exc))
    try:
        summary = discover_collection(
            paths, out, model, settings,
            workers=workers or os.cpu_count() or 1,
            batch_size=batch_size, viz_dir=viz_dir, max_pixels=max_pixels,
            show_progress=not as_json,
        )
    except SettingsMismatchError as exc:
        fail(str(exc))
    report(summary, summary.skipped, "skipped", as_json)


for _command in (train, detect, evaluate_command, convert):
    main.add_command(_command)

if __name__ == "__main__":
    main()
