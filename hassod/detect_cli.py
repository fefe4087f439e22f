"""`hassod detect` and `hassod eval`: thin click layers over :mod:`hassod.detect` and :mod:`hassod.evaluation`."""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from .console import fail, report
from .images import DEFAULT_MAX_PIXELS

if TYPE_CHECKING:
    from .detect import DetectOptions

LEVEL_CHOICES = ("whole", "part", "subpart")


def _options(levels: tuple[str, ...], score_thresh: float, max_detections: int) -> DetectOptions:
    from .detect import DetectOptions

    chosen = tuple(LEVEL_CHOICES.index(name) for name in levels) or (0, 1, 2)
    return DetectOptions(levels=chosen, score_thresh=score_thresh, max_detections=max_detections)


def _load_detector(checkpoint: Path, device: str, options, amp: bool, use: str):
    """The :class:`hassod.detect.Detector`, or a one-line error (exit 2) for a bad checkpoint or device."""
    from .detect import Detector
    from .model import CheckpointError

    try:
        return Detector(checkpoint, device=device, options=options, amp=amp, use=use)
    except (CheckpointError, FileNotFoundError, IsADirectoryError) as exc:
        fail(f"checkpoint {checkpoint}: {exc}")
    except ValueError as exc:  # unknown or unavailable device
        fail(str(exc))


USE_OPTION = click.option(
    "--use", default="student", show_default=True, type=click.Choice(["student", "teacher"]),
    help="The checkpoint's weights: the student, or Mean Teacher's teacher.")


def _detection_options(command):
    """The options shared by `detect` and `eval --checkpoint`."""
    for option in reversed([
        click.option("--level", "levels", multiple=True, type=click.Choice(LEVEL_CHOICES),
                     help="Keep only detections of this predicted level (repeatable) [all]."),
        click.option("--score-thresh", default=0.0, show_default=True, type=click.FloatRange(0.0, 1.0),
                     help="Drop detections scoring below this."),
        click.option("--max-detections", default=1000, show_default=True, type=click.IntRange(min=1),
                     help="At most this many detections per image, best first."),
        USE_OPTION,
        click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N."),
        click.option("--batch-size", default=2, show_default=True, type=click.IntRange(min=1)),
        click.option("--amp/--no-amp", default=True, show_default=True, help="float16 autocast on CUDA."),
        click.option("--max-pixels", default=DEFAULT_MAX_PIXELS, show_default=True, type=click.IntRange(min=1),
                     help="Refuse images larger than this."),
    ]):
        command = option(command)
    return command


@click.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--checkpoint", required=True, type=click.Path(path_type=Path), help="Detector checkpoint file.")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="COCO results JSON to write (images list beside it, as <name>.images.json).")
@_detection_options
@click.option("--viz", "viz_dir", type=click.Path(file_okay=False, path_type=Path), help="Write overlay PNGs here.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def detect(images, checkpoint, out, levels, score_thresh, max_detections, use, device, batch_size, amp, max_pixels,
           viz_dir, as_json):
    """Detect wholes, parts and subparts in IMAGES (files or folders) with a trained detector."""
    from .detect import detect_collection, images_file
    from .runs import SettingsMismatchError, progress_path
    from .images import list_images

    paths = list_images(images, exclude=[out, progress_path(out), images_file(out), viz_dir])
    if not paths:
        fail(f"no files found in {', '.join(map(str, images))}")
    detector = _load_detector(checkpoint, device, _options(levels, score_thresh, max_detections), amp, use)
    try:
        summary = detect_collection(paths, out, detector, batch_size=batch_size, viz_dir=viz_dir,
                                    max_pixels=max_pixels, show_progress=not as_json)
    except SettingsMismatchError as exc:
        fail(str(exc))
    report(summary, summary.skipped, "skipped", as_json)


@click.command("eval")
@click.option("--gt", "gt_path", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Ground truth, a COCO dataset JSON (categories are ignored).")
@click.option("--pred", "pred_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Detections: `hassod detect` results, any COCO results list, or a COCO dataset "
                   "(e.g. `hassod discover` pseudo-labels).")
@click.option("--checkpoint", type=click.Path(path_type=Path), help="Detect with this checkpoint instead of --pred.")
@click.option("--images", "images_path", type=click.Path(exists=True, path_type=Path),
              help="With --checkpoint: the ground truth's images (file names relative to this folder).")
@_detection_options
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON.")
def evaluate_command(gt_path, pred_path, checkpoint, images_path, levels, score_thresh, max_detections, use,
                     device, batch_size, amp, max_pixels, as_json):
    """Class-agnostic box and mask AR / AP of detections against ground truth, overall and per predicted level.

    Detections come from --pred, or from running --checkpoint on --images.
    --level, --score-thresh and --max-detections select from either the same
    way; the other detection options apply to a --checkpoint run. Detections
    on images the ground truth does not hold are ignored.
    """
    from .evaluation import GroundTruthError, check_ground_truth, evaluate_report, format_report, subset_images

    if (pred_path is None) == (checkpoint is None):
        fail("give either --pred, or --checkpoint with --images")
    if checkpoint is not None and images_path is None:
        fail("--checkpoint needs --images, the folder of the ground truth's images")
    if pred_path is not None and use != "student":
        fail("--use goes with --checkpoint: it picks the weights to detect with")
    gt = _read_json(gt_path)
    try:
        check_ground_truth(gt)
    except GroundTruthError as exc:
        fail(f"{gt_path}: {exc}")
    options = _options(levels, score_thresh, max_detections)
    if pred_path is not None:
        detections, image_ids = _read_predictions(pred_path, gt)
        detections = _selected(detections, options)
        if image_ids is not None:
            if not image_ids:
                fail(f"none of the images of {pred_path} is in {gt_path}; do the file names match?")
            # Evaluate on the images the predictions cover: the others were never looked at.
            gt = subset_images(gt, image_ids)
    else:
        detector = _load_detector(checkpoint, device, options, amp, use)
        detections, image_ids = _detect_for_gt(detector, images_path, gt, batch_size, max_pixels)
        if not image_ids:
            fail(f"none of the images of {gt_path} was found (and readable) in {images_path}")
        # Ground-truth images that were not there to detect on are left out, not counted as misses.
        gt = subset_images(gt, image_ids)
    metrics = evaluate_report(gt, detections)
    if metrics["detections"] == 0 and metrics["ignored_detections"] > 0:
        click.echo("warning: no detection is on an image of the ground truth; do the file names match?", err=True)
    click.echo(json.dumps(metrics) if as_json else format_report(metrics))


def _read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        fail(f"{path}: not a readable JSON file ({exc})")


def _read_predictions(path: Path, gt: dict[str, Any]) -> tuple[list[dict[str, Any]], set[int] | None]:
    """Detections with the ground truth's image ids, and the ground-truth ids of the images they cover.

    A results list keeps its ids unless ``<name>.images.json`` (written by
    `hassod detect`) lies beside it; a COCO dataset dict brings its own images.
    Either way images are then matched to the ground truth by file name, and
    the covered images are those listed (an image with no detection counts).
    A bare results list lists no images: covered is then None (all of them).
    """
    from .detect import images_file

    data = _read_json(path)
    if isinstance(data, dict) and isinstance(data.get("annotations"), list):
        detections = [{"score": 1.0, **ann} for ann in data["annotations"]]  # pseudo-labels may lack scores
        return _matched(detections, data.get("images", []), gt)
    if not isinstance(data, list):
        fail(f"{path}: expected a COCO results list or a COCO dataset with 'annotations'")
    if any(not isinstance(d, dict) or "image_id" not in d or "score" not in d or "bbox" not in d for d in data):
        fail(f"{path}: every detection needs 'image_id', 'bbox' and 'score'")
    sidecar = images_file(path)
    if sidecar.exists():
        return _matched(data, _read_json(sidecar).get("images", []), gt)
    return data, None


def _selected(detections: list[dict[str, Any]], options: DetectOptions) -> list[dict[str, Any]]:
    """The detections that a detector run with ``options`` keeps: score and level filters,
    then the best ``max_detections`` per image (a stable sort, as the detector's)."""
    if len(options.levels) < 3 and any("hier_level" not in d for d in detections):
        fail("--level needs detections with 'hier_level' (as `hassod detect` and `hassod discover` write)")
    kept = [d for d in detections
            if d["score"] >= options.score_thresh and (len(options.levels) == 3 or d["hier_level"] in options.levels)]
    per_image: dict[Any, int] = {}
    selected = []
    for d in sorted(kept, key=lambda d: -d["score"]):
        per_image[d["image_id"]] = per_image.get(d["image_id"], 0) + 1
        if per_image[d["image_id"]] <= options.max_detections:
            selected.append(d)
    return selected


def _matched(
    detections: list[dict[str, Any]], images: list[dict[str, Any]], gt: dict[str, Any]
) -> tuple[list[dict[str, Any]], set[int]]:
    """``detections`` with the ground truth's image ids, and the ground-truth ids of ``images``."""
    from .evaluation import match_image_ids

    placeholders = [{"image_id": image["id"]} for image in images]
    covered = {d["image_id"] for d in match_image_ids(placeholders, images, gt)} - {None}
    return match_image_ids(detections, images, gt), covered


def _detect_for_gt(
    detector, images_path: Path, gt: dict[str, Any], batch_size: int, max_pixels: int
) -> tuple[list[dict[str, Any]], set[int]]:
    """Run the detector on the ground truth's files under ``images_path``.

    Returns the results with the ground truth's image ids, and the ids of the
    ground-truth images that were found and readable.
    """
    from .detect import build_results, image_record
    from .images import list_images

    root = Path(images_path).resolve() if Path(images_path).is_dir() else Path(images_path).resolve().parent
    # Only the ground truth's images: a folder may hold many more, and their detections would be ignored.
    names = {image.get("file_name", "") for image in gt["images"]}
    bases = {name.rsplit("/", 1)[-1] for name in names}
    paths = [p for p in list_images([images_path])
             if _relative_name(p, root) in names or Path(p).name in bases]
    records = [image_record(p, image, found, error)
               for p, image, found, error in detector.detect_paths(paths, batch_size, max_pixels)]
    for record in records:
        if record.error is not None:
            click.echo(f"skipped {record.path}: {record.error}", err=True)
    results, images, _ = build_results(records, root)
    return _matched(results, images, gt)  # every readable image is covered, detections or not


def _relative_name(path: Path, root: Path) -> str:
    try:
        return Path(path).resolve().relative_to(root).as_posix()
    except ValueError:
        return Path(path).name
