"""`hassod detect` and `hassod eval`: over :mod:`hassod.detect` and :mod:`hassod.evaluation`."""
from __future__ import annotations

import json
from pathlib import Path

import click

from .console import Command, fail, naming, report
from .options import (LEVEL_CHOICES, batch_size_option, device_option, images_argument, json_option,
                      max_pixels_option, options, use_option, viz_option)

# The options shared by `detect` and `eval --checkpoint`.
detection_options = options(
    click.option("--level", "levels", multiple=True, type=click.Choice(LEVEL_CHOICES),
                 help="Keep only detections of this predicted level (repeatable) [all]."),
    click.option("--score-thresh", default=0.0, show_default=True, type=click.FloatRange(0.0, 1.0),
                 help="Drop detections scoring below this."),
    click.option("--max-detections", default=1000, show_default=True, type=click.IntRange(min=1),
                 help="At most this many detections per image, best first."),
    use_option(),
    device_option(),
    batch_size_option(2),
    click.option("--amp/--no-amp", default=True, show_default=True, help="float16 autocast on CUDA."),
    max_pixels_option(),
)


def _options(levels: tuple[str, ...], score_thresh: float, max_detections: int):
    from hassod.detect import DetectOptions

    chosen = tuple(LEVEL_CHOICES.index(name) for name in levels) or (0, 1, 2)
    return DetectOptions(levels=chosen, score_thresh=score_thresh, max_detections=max_detections)


def _load_detector(checkpoint: Path, device: str, detect_options, amp: bool, use: str):
    """The :class:`hassod.detect.Detector`; a bad checkpoint's error names it."""
    from hassod.detect import Detector
    from hassod.model import CheckpointError

    with naming(f"checkpoint {checkpoint}", CheckpointError):
        return Detector(checkpoint, device=device, options=detect_options, amp=amp, use=use)


@click.command(cls=Command)
@images_argument
@click.option("--checkpoint", required=True, type=click.Path(path_type=Path), help="Detector checkpoint file.")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="COCO results JSON to write (images list beside it, as <name>.images.json).")
@detection_options
@viz_option()
@json_option()
def detect(images, checkpoint, out, levels, score_thresh, max_detections, use, device, batch_size, amp, max_pixels,
           viz_dir, as_json):
    """Detect wholes, parts and subparts in IMAGES (files or folders) with a trained detector."""
    from hassod.detect import detect_collection, images_file
    from hassod.runs import progress_path
    from hassod.images import list_images

    paths = list_images(images, exclude=[out, progress_path(out), images_file(out), viz_dir])
    if not paths:
        fail(f"no files found in {', '.join(map(str, images))}")
    detector = _load_detector(checkpoint, device, _options(levels, score_thresh, max_detections), amp, use)
    summary = detect_collection(paths, out, detector, batch_size=batch_size, viz_dir=viz_dir,
                                max_pixels=max_pixels, show_progress=not as_json)
    report(summary, summary.skipped, "skipped", as_json)


@click.command("eval", cls=Command)
@click.option("--gt", "gt_path", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Ground truth, a COCO dataset JSON (categories are ignored).")
@click.option("--pred", "pred_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Detections: `hassod detect` results, any COCO results list, or a COCO dataset "
                   "(e.g. `hassod discover` pseudo-labels).")
@click.option("--checkpoint", type=click.Path(path_type=Path), help="Detect with this checkpoint instead of --pred.")
@click.option("--images", "images_path", type=click.Path(exists=True, path_type=Path),
              help="With --checkpoint: the ground truth's images (file names relative to this folder).")
@detection_options
@json_option("Print the metrics as JSON.")
def evaluate_command(gt_path, pred_path, checkpoint, images_path, levels, score_thresh, max_detections, use,
                     device, batch_size, amp, max_pixels, as_json):
    """Class-agnostic box and mask AR / AP of detections against ground truth, overall and per predicted level.

    Detections come from --pred, or from running --checkpoint on --images.
    --level, --score-thresh and --max-detections select from either the same
    way; the other detection options apply to a --checkpoint run. Detections
    on images the ground truth does not hold are ignored.
    """
    from hassod.evaluation import detections_for, evaluate_report, format_report, predictions_for, read_ground_truth

    if (pred_path is None) == (checkpoint is None):
        fail("give either --pred, or --checkpoint with --images")
    if checkpoint is not None and images_path is None:
        fail("--checkpoint needs --images, the folder of the ground truth's images")
    if pred_path is not None and use != "student":
        fail("--use goes with --checkpoint: it picks the weights to detect with")
    gt = read_ground_truth(gt_path)
    selection = _options(levels, score_thresh, max_detections)
    if pred_path is not None:
        detections, gt = predictions_for(gt, gt_path, pred_path, selection)
    else:
        detector = _load_detector(checkpoint, device, selection, amp, use)
        detections, gt = detections_for(gt, gt_path, detector, images_path, batch_size, max_pixels,
                                        on_skip=lambda path, reason: click.echo(f"skipped {path}: {reason}", err=True))
    metrics = evaluate_report(gt, detections)
    if metrics["detections"] == 0 and metrics["ignored_detections"] > 0:
        click.echo("warning: no detection is on an image of the ground truth; do the file names match?", err=True)
    click.echo(json.dumps(metrics) if as_json else format_report(metrics))
