"""`hassod train`: stage 2 over :func:`hassod.train.loop.train`, on one process or each of a torchrun launch."""
from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path

import click

from hassod.locks import exclusive

from .console import Command, fail
from .options import device_option, json_option


@click.command(cls=Command)
@click.option("--pseudo", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Pseudo-labels (COCO JSON written by `hassod discover`).")
@click.option("--images", "images_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Folder the pseudo-labels' file names are relative to [the file's info.root].")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Run folder: last.pth, model_final.pth, log.jsonl.")
@click.option("--backbone", default="resnet50", show_default=True,
              type=click.Choice(["resnet50", "efficientnet_lite0", "tiny"]),
              help="Detector backbone (tiny: a very small model for smoke tests).")
@click.option("--backbone-weights", type=click.Path(exists=True, dir_okay=False),
              help="Backbone initialisation (a DINO ResNet-50 checkpoint for resnet50).")
@click.option("--random-init", is_flag=True, help="Initialise the backbone randomly.")
@click.option("--sizes", help="Shortest edges (px) drawn per image in training, e.g. 240,320,480 "
                              "[the paper's 240..1024; smaller is much faster on a CPU].")
@click.option("--test-size", type=click.IntRange(min=32), help="Shortest edge (px) at inference [800].")
@click.option("--max-size", type=click.IntRange(min=32), help="Longest edge cap (px), training and inference [1333].")
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(min=1),
              help="Images per iteration over all GPUs (paper: 16).")
@click.option("--iterations", default=40_000, show_default=True, type=click.IntRange(min=1),
              help="Optimiser steps (CutLER: 160k at batch 16); lower it for small collections.")
@click.option("--burn-in", type=click.IntRange(min=0),
              help="Iterations on the pseudo-labels alone; the rest up to --iterations are Mean Teacher "
                   "[--iterations: no Mean Teacher]. Reference: 40000 of 42000 at batch 16.")
@click.option("--ema-keep", default=0.9996, show_default=True, type=click.FloatRange(0, 1),
              help="Mean Teacher: the teacher keeps this share of itself at each iteration.")
@click.option("--teacher-thresh", default=0.7, show_default=True, type=click.FloatRange(0, 1),
              help="Mean Teacher: teacher detections scoring above this become targets.")
@click.option("--mt-warmup", "mt_warmup_iters", default=100, show_default=True, type=click.IntRange(min=0),
              help="Mean Teacher: LR warm-up iterations before its cosine decay to 0.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True),
              help="Base learning rate [0.01 x batch-size / 16].")
@click.option("--warmup", "warmup_iters", default=1000, show_default=True, type=click.IntRange(min=0),
              help="Linear warm-up iterations.")
@click.option("--lr-decay", default="cosine", show_default=True, type=click.Choice(["cosine", "step", "constant"]))
@click.option("--checkpoint-period", default=1000, show_default=True, type=click.IntRange(min=1))
@click.option("--eval-gt", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Held-out COCO file to evaluate (box AR/AP) during training.")
@click.option("--eval-images", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Folder of the --eval-gt images [its info.root, else its folder].")
@click.option("--eval-period", default=0, show_default=True, type=click.IntRange(min=0),
              help="Evaluate every N iterations (0: only at the end).")
@device_option()
@click.option("--no-amp", is_flag=True, help="Train in fp32 on CUDA too.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from last.pth (same options as the first call).")
@click.option("--seed", default=0, show_default=True, type=int,
              help="Seeds initialisation, data order and augmentation.")
@click.option("--workers", default=2, show_default=True, type=click.IntRange(min=0),
              help="Data-loading processes (0: in the main process).")
@json_option()
def train(pseudo, images_dir, out, backbone, backbone_weights, random_init, sizes, test_size, max_size,
          batch_size, iterations, burn_in, ema_keep, teacher_thresh, mt_warmup_iters, lr, warmup_iters, lr_decay, checkpoint_period, eval_gt, eval_images, eval_period, device, no_amp, resume,
          seed, workers, as_json):
    """Stage 2: train the hierarchical detector on stage-1 pseudo-labels (SGD, warm-up, copy-paste, flip),
    then, with --burn-in, Mean Teacher with adaptive targets.

    Multi-GPU: launch with `torchrun --nproc_per_node N -m retrieval.cli train ...`.
    """
    from hassod.device import resolve_device
    from hassod.model import DetectorSettings
    from hassod.train.distributed import launch_rank
    from hassod.train.loop import train as run_training
    from hassod.train.settings import TrainSettings

    if backbone_weights and random_init:
        fail("--backbone-weights and --random-init exclude each other")
    if burn_in is not None and burn_in > iterations:
        fail(f"--burn-in ({burn_in}) is at most --iterations ({iterations}); the Mean Teacher phase is the rest")
    if (eval_images or eval_period) and not eval_gt:
        fail("--eval-images and --eval-period go with --eval-gt, the held-out ground truth to evaluate on")
    resolve_device(device)  # a device that is not there is said before any work
    detector = DetectorSettings.tiny() if backbone == "tiny" else dataclasses.replace(DetectorSettings(),
                                                                                        backbone=backbone)
    detector = dataclasses.replace(detector, **_image_sizes(sizes, test_size, max_size))
    settings = TrainSettings(batch_size=batch_size, iterations=iterations, burn_in=burn_in, ema_keep=ema_keep,
                             teacher_thresh=teacher_thresh, mt_warmup_iters=mt_warmup_iters, lr=lr,
                             warmup_iters=warmup_iters,
                             lr_decay=lr_decay, checkpoint_period=checkpoint_period, eval_period=eval_period,
                             device=device, amp=not no_amp, seed=seed, workers=workers)
    with _one_run_per_folder(out, main_process=launch_rank() == 0):
        result = run_training(settings, detector, pseudo, images_dir, out, backbone_weights=backbone_weights,
                              resume=resume, eval_gt=eval_gt, eval_images=eval_images, random_init=random_init,
                              progress=not as_json)
    summary = {
        "iteration": result.iteration, "finished": result.finished, "seconds": round(result.seconds, 1),
        "last_checkpoint": str(result.last_checkpoint),
        "final_checkpoint": str(result.final_checkpoint) if result.final_checkpoint else None,
        "losses": result.losses, "skipped": len(result.skipped),
        "evaluation": result.evaluations[-1] if result.evaluations else None,
    }
    if as_json:
        click.echo(json.dumps(summary))
        return
    for name, reason in sorted(result.skipped.items()):
        click.echo(f"skipped {name}: {reason}", err=True)
    line = (f"trained {result.iteration} iterations in {result.seconds:.0f} s; "
            f"model {summary['final_checkpoint'] or summary['last_checkpoint']}; skipped {len(result.skipped)} images")
    if result.evaluations:
        ev = result.evaluations[-1]
        line += f"; box AR@100 {ev.get('AR@100', float('nan')):.3f} AP {ev.get('AP', float('nan')):.3f}"
        if "teacher" in ev:
            line += f" (teacher: AR@100 {ev['teacher']['AR@100']:.3f} AP {ev['teacher']['AP']:.3f})"
    click.echo(line)


def _one_run_per_folder(out: Path, main_process: bool) -> contextlib.AbstractContextManager[None]:
    """The run folder's lock, held by the process that writes it (rank 0 of a torchrun launch).

    Without it a second `hassod train` into the same folder would write its
    checkpoints over the first's until the first had saved ``last.pth``.
    """
    if not main_process:
        return contextlib.nullcontext()
    Path(out).mkdir(parents=True, exist_ok=True)
    return exclusive(Path(out) / "train.lock",
                     f"another `hassod train` (pid {{pid}}) is writing {out}; run this one when it has finished")


def _image_sizes(sizes: str | None, test_size: int | None, max_size: int | None) -> dict[str, object]:
    """The DetectorSettings fields the size options override (pixels)."""
    fields: dict[str, object] = {}
    if sizes:
        try:
            fields["min_size_train"] = tuple(int(v) for v in sizes.split(","))
        except ValueError:
            raise click.BadParameter(f"expected comma-separated pixel sizes, got {sizes!r}", param_hint="--sizes")
        if min(fields["min_size_train"]) < 32:
            raise click.BadParameter("sizes are shortest edges in pixels, at least 32", param_hint="--sizes")
    if test_size:
        fields["min_size_test"] = test_size
    if max_size:
        fields["max_size"] = max_size
    return fields
