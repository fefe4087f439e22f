"""The training loop of the hierarchical detector on stage-1 pseudo-labels (DESIGN §5).

Iteration-based: step k trains on the batch :class:`~hassod.train.data.IndexStream`
gives for k, so a run resumed from ``last.pth`` sees exactly the data, random
numbers and optimiser state the uninterrupted run would have (bit-exact on the
CPU; CUDA kernels may differ in the last bits). A run directory holds:

- ``last.pth``: the latest checkpoint (model, optimiser, scheduler, AMP scaler,
  iteration, RNG state, both settings), written atomically every
  ``checkpoint_period`` iterations and when the run stops;
- ``model_final.pth``: the model after the last iteration;
- ``log.jsonl``: one JSON object per iteration (``iteration``, ``lr``, each
  loss, ``total_loss``, ``grad_norm``, ``images``, ``seconds``; ``eval`` with box
  metrics on the iterations where the held-out set was evaluated).

Multi-GPU: launched by ``torchrun`` (WORLD_SIZE > 1) each process takes its
share of every global batch, BatchNorm becomes SyncBatchNorm, gradients are
averaged by DDP, and only rank 0 writes files.
"""
from __future__ import annotations

import json
import math
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from ..device import resolve_device
from ..evaluation import evaluate
from ..images import DEFAULT_MAX_PIXELS, ImageError, load_rgb, resize_image
from ..model import CheckpointError, DetectorSettings, build_detector, read_checkpoint, save_checkpoint
from .data import Augmentation, IndexStream, PseudoLabelDataset, collate
from .solver import WarmupSchedule, build_optimizer, build_scheduler, clip_gradients, scaled_lr

LAST = "last.pth"
FINAL = "model_final.pth"
LOG = "log.jsonl"


class TrainError(RuntimeError):
    """A run that cannot start or go on; ``str()`` is a one-line reason for the user."""


@dataclass(frozen=True)
class TrainSettings:
    """How to train. Defaults follow the paper's recipe (CutLER/HASSOD, detectron2 conventions).

    batch_size: images per iteration over all processes (reference 16).
    iterations: total optimiser steps. A budget, not the paper's figure:
        CutLER trains 160k iterations at batch 16; lower it for small collections.
    lr: base learning rate; None means 0.01 × batch_size / 16 (linear scaling
        of the reference 0.01 at batch 16).
    momentum, weight_decay: SGD's (0.9, 5e-5; no decay on norm layers).
    warmup_iters, warmup_factor: linear warm-up from lr × factor (detectron2: 1000, 0.001).
    lr_decay: "cosine" (default: to 0 at the last iteration, no step points
        to tune when the schedule is shortened), "step" (× lr_gamma at each
        fraction ``lr_steps`` of the run) or "constant".
    clip_norm: the global gradient L2 norm is clipped to this (≤ 0: off).
        A guard against the spikes that noisy pseudo-labels cause, set above
        the norms of ordinary steps (2–6 on the tiny model): on the synthetic
        learning test a clip of 1.0 halved the AR reached in 200 iterations.
    amp: mixed precision with a GradScaler; CUDA only, CPU always runs fp32.
    seed: every random choice (init, order, augmentation, RoI sampling) derives from it.
    augmentation: flip and copy-paste, see :class:`~hassod.train.data.Augmentation`;
        its ``max_size`` is replaced by the detector's.
    checkpoint_period: write ``last.pth`` every this many iterations.
    eval_period: evaluate on the held-out set every this many iterations
        (0: only at the end); needs ``eval_gt``.
    device: "auto", "cpu", "cuda" or "cuda:N"; workers: data-loading processes (0: in the main process).
    max_pixels: images above this many pixels are skipped unread.
    """

    batch_size: int = 16
    iterations: int = 40_000
    lr: float | None = None
    momentum: float = 0.9
    weight_decay: float = 5e-5
    warmup_iters: int = 1000
    warmup_factor: float = 0.001
    lr_decay: str = "cosine"
    lr_steps: tuple[float, ...] = (0.75, 0.92)
    lr_gamma: float = 0.1
    clip_norm: float = 10.0
    amp: bool = True
    seed: int = 0
    augmentation: Augmentation = field(default_factory=Augmentation)
    checkpoint_period: int = 1000
    eval_period: int = 0
    device: str = "auto"
    workers: int = 2
    max_pixels: int = DEFAULT_MAX_PIXELS

    def base_lr(self) -> float:
        """The learning rate after warm-up: ``lr`` or the linearly scaled reference."""
        return self.lr if self.lr is not None else scaled_lr(self.batch_size)


# Settings that only say how a run is carried out, not what it computes: they may change on resume.
RESUME_FREE = frozenset({"checkpoint_period", "eval_period", "device", "workers"})


@dataclass
class TrainResult:
    """What a call of :func:`train` did."""

    iteration: int
    finished: bool
    last_checkpoint: Path
    final_checkpoint: Path | None
    losses: dict[str, float]
    skipped: dict[str, str] = field(default_factory=dict)
    evaluations: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def _jsonable(obj: Any) -> Any:
    """asdict output as JSON would give it back (tuples become lists), for comparisons."""
    return json.loads(json.dumps(obj))


def settings_differences(saved: dict[str, Any], current: dict[str, Any], free: frozenset = frozenset()) -> list[str]:
    """Names of the fields that differ between two settings dicts, ignoring ``free``."""
    saved, current = _jsonable(saved), _jsonable(current)
    return sorted(k for k in set(saved) | set(current) if k not in free and saved.get(k) != current.get(k))


def launch_rank() -> int:
    """This process's rank in a torchrun launch (WORLD_SIZE > 1), 0 without one: rank 0 writes the run folder."""
    return int(os.environ["RANK"]) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0


def setup_distributed(device_name: str) -> tuple[DistInfo, torch.device]:
    """Join the torchrun process group when WORLD_SIZE > 1; returns (rank info, this process's device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(), resolve_device(device_name)
    rank, local = launch_rank(), int(os.environ.get("LOCAL_RANK", "0"))
    base = resolve_device(device_name)
    if base.type == "cuda":
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = base
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank, world, local), device


def _rng_state(device: torch.device) -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _truncate_log(path: Path, iteration: int) -> None:
    """Keep the log lines of iterations ≤ ``iteration`` (those after the checkpoint are redone)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("iteration", 0) <= iteration:
                kept.append(line)
        except json.JSONDecodeError:
            break  # a half-written last line from a killed run
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(k + "\n" for k in kept), encoding="utf-8")
    os.replace(tmp, path)


def _load_resume(out_dir: Path, settings: TrainSettings, detector_settings: DetectorSettings) -> dict[str, Any]:
    path = out_dir / LAST
    if not path.exists():
        raise TrainError(f"nothing to resume: {path} does not exist")
    try:
        ckpt = read_checkpoint(path)
    except CheckpointError as exc:
        raise TrainError(str(exc)) from None
    if "train_settings" not in ckpt or "iteration" not in ckpt:
        raise TrainError(f"{path} is a model checkpoint without training state; it cannot be resumed")
    changed = settings_differences(ckpt["train_settings"], asdict(settings), RESUME_FREE)
    changed += [f"model.{k}" for k in settings_differences(ckpt["settings"], asdict(detector_settings))]
    if changed:
        raise TrainError(f"{path} was made with other settings ({', '.join(changed)}); "
                         "rerun with the same settings to resume, or use another --out")
    return ckpt


def predict_coco(model: torch.nn.Module, gt: dict[str, Any], images_dir: Path, device: torch.device,
                 max_size: int = 1333, max_pixels: int = DEFAULT_MAX_PIXELS) -> list[dict[str, Any]]:
    """Box detections of ``model`` on every image of COCO dataset ``gt`` as COCO results.

    Each result: ``image_id``, ``category_id`` 1, ``bbox`` xywh in the original
    image's pixels, ``score``, ``level``. Images longer than ``max_size`` are
    scaled down first and the boxes scaled back; unreadable images are left out.
    """
    was_training = model.training
    model.eval()
    results: list[dict[str, Any]] = []
    with torch.no_grad():
        for img in gt["images"]:
            try:
                image = load_rgb(images_dir / img["file_name"], max_pixels)
            except (ImageError, FileNotFoundError):
                continue
            height, width = image.shape[:2]
            factor = min(1.0, max_size / max(height, width))
            if factor < 1.0:
                image = resize_image(image, (max(1, round(height * factor)), max(1, round(width * factor))))
            tensor = torch.from_numpy(image).permute(2, 0, 1).float().div_(255.0).to(device)
            out = model([tensor])[0]
            boxes = out["boxes"].float().cpu().numpy() / factor
            scores = out["scores"].float().cpu().numpy()
            levels = out.get("levels", torch.zeros(len(boxes), dtype=torch.int64)).cpu().numpy()
            for box, score, level in zip(boxes, scores, levels):
                x0, y0, x1, y1 = (float(v) for v in box)
                results.append({"image_id": img["id"], "category_id": 1, "bbox": [x0, y0, x1 - x0, y1 - y0],
                                "score": float(score), "level": int(level)})
    model.train(was_training)
    return results


def _eval_images_dir(gt: dict[str, Any], gt_path: Path, eval_images: Path | None) -> Path:
    if eval_images is not None:
        return Path(eval_images)
    root = (gt.get("info") or {}).get("root")
    return Path(root) if root else gt_path.resolve().parent


def _read_gt(path: Path) -> dict[str, Any]:
    try:
        gt = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TrainError(f"no such evaluation file: {path}") from None
    except json.JSONDecodeError as exc:
        raise TrainError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(gt, dict) or "images" not in gt or "annotations" not in gt:
        raise TrainError(f"{path} is not a COCO dataset (needs 'images' and 'annotations')")
    return gt


def _to_device(targets: list[dict[str, torch.Tensor]], device: torch.device) -> list[dict[str, torch.Tensor]]:
    return [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]


def train(
    settings: TrainSettings,
    detector_settings: DetectorSettings,
    pseudo_json: str | os.PathLike,
    images_dir: str | os.PathLike | None,
    out_dir: str | os.PathLike,
    backbone_weights: str | None = None,
    resume: bool = False,
    eval_gt: str | os.PathLike | None = None,
    eval_images: str | os.PathLike | None = None,
    random_init: bool = False,
    stop_after: int | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train a detector on pseudo-labels; write checkpoints and the log into ``out_dir``.

    detector_settings: the model to build. images_dir:
    the folder the pseudo-labels' file names are relative to (None: the
    file's ``info.root``). resume: continue from ``out_dir/last.pth`` (refused
    when the settings differ); without it an existing ``last.pth`` is refused
    too, so a run is never overwritten by accident. eval_gt: a COCO file
    evaluated (box metrics) every ``settings.eval_period`` iterations and at the
    end, images under ``eval_images`` (default its ``info.root`` or its folder).
    stop_after: stop (with a checkpoint) once this iteration is done, as an
    interruption would. Raises :class:`TrainError` for unusable inputs.
    """
    started = time.perf_counter()
    info, device = setup_distributed(settings.device)
    out = Path(out_dir)
    if info.main:
        out.mkdir(parents=True, exist_ok=True)
    if not resume and (out / LAST).exists():
        raise TrainError(f"{out} already holds a run ({LAST}); pass --resume to continue it or choose another --out")
    ckpt = _load_resume(out, settings, detector_settings) if resume else None
    max_size = detector_settings.max_size
    augmentation = replace(settings.augmentation, max_size=max_size)
    try:
        dataset = PseudoLabelDataset(pseudo_json, images_dir, augmentation, settings.seed, settings.max_pixels)
    except ValueError as exc:
        raise TrainError(str(exc)) from None
    gt = _read_gt(Path(eval_gt)) if eval_gt is not None else None
    gt_images = _eval_images_dir(gt, Path(eval_gt), Path(eval_images) if eval_images else None) if gt else None

    # Seed before building so a fresh run's random initialisation is reproducible too.
    torch.manual_seed(settings.seed + info.rank)
    try:
        model = build_detector(detector_settings, backbone_weights=backbone_weights, random_init=random_init)
    except (FileNotFoundError, ValueError) as exc:
        raise TrainError(str(exc)) from None
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
    model.to(device).train()
    core = model
    if info.world_size > 1:
        if device.type == "cuda":
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
            core = model
        # Some heads see no foreground RoI on some batches: let DDP tolerate unused parameters.
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True)

    use_amp = settings.amp and device.type == "cuda"
    optimizer = build_optimizer(core, settings.base_lr(), settings.weight_decay, settings.momentum)
    schedule = WarmupSchedule(settings.iterations, settings.warmup_iters, settings.warmup_factor,
                              settings.lr_decay, settings.lr_steps, settings.lr_gamma)
    scheduler = build_scheduler(optimizer, schedule)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    skipped: dict[str, str] = {name: reason for name, reason in dataset.missing}
    start = 0
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        start = int(ckpt["iteration"])
        skipped.update(ckpt.get("skipped", {}))
        if info.main:
            _set_rng_state(ckpt["rng"], device)
        else:
            torch.manual_seed(settings.seed + info.rank + 7919 * start)
    if info.main:
        if ckpt is not None:
            _truncate_log(out / LOG, start)
        else:
            (out / LOG).unlink(missing_ok=True)

    stop = settings.iterations if stop_after is None else min(settings.iterations, stop_after)
    sampler = IndexStream(len(dataset), settings.batch_size, settings.seed, start, stop, info.rank, info.world_size)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, collate_fn=collate, num_workers=settings.workers,
        pin_memory=device.type == "cuda",
        # Our own generator: the loader must not draw from the global RNG, whose state is checkpointed.
        generator=torch.Generator().manual_seed(settings.seed),
    )

    def save_last(iteration: int) -> None:
        if info.main:
            save_checkpoint(out / LAST, core, detector_settings, optimizer=optimizer.state_dict(),
                  scheduler=scheduler.state_dict(), scaler=scaler.state_dict(), iteration=iteration,
                  rng=_rng_state(device), train_settings=asdict(settings), skipped=dict(skipped))

    def run_eval() -> dict[str, float] | None:
        if gt is None:
            return None
        metrics = None
        if info.main:
            results = predict_coco(core, gt, gt_images, device, max_size, settings.max_pixels)
            metrics = evaluate(gt, results, "bbox")
        if info.world_size > 1:
            dist.barrier()
        return metrics

    evaluations: list[dict[str, Any]] = []
    losses_out: dict[str, float] = {}
    log = open(out / LOG, "a", encoding="utf-8") if info.main else None
    bar = tqdm(total=settings.iterations, initial=start, disable=not (progress and info.main),
               desc="train", unit="it", dynamic_ncols=True)
    iteration = start
    try:
        for batch in loader:
            tick = time.perf_counter()
            for name, reason in batch.skipped:
                skipped.setdefault(name, reason)
            if len(skipped) >= len(dataset) + len(dataset.missing):
                raise TrainError("every training image was skipped: " + next(iter(skipped.values())))
            lr = optimizer.param_groups[0]["lr"]
            record: dict[str, Any] = {"iteration": iteration + 1, "lr": lr, "images": len(batch.images)}
            if batch.images:
                losses = _step(model, core, batch, device, optimizer, scaler, use_amp, settings.clip_norm)
                record.update(losses)
                losses_out = losses
            scheduler.step()
            iteration += 1
            if settings.eval_period and iteration % settings.eval_period == 0 and iteration < settings.iterations:
                metrics = run_eval()
                if metrics is not None:
                    record["eval"] = metrics
                    evaluations.append({"iteration": iteration, **metrics})
            if iteration == settings.iterations and gt is not None:
                metrics = run_eval()
                if metrics is not None:
                    record["eval"] = metrics
                    evaluations.append({"iteration": iteration, **metrics})
            record["seconds"] = round(time.perf_counter() - tick, 4)
            if log is not None:
                log.write(json.dumps(record) + "\n")
                log.flush()
            bar.update(1)
            if "total_loss" in record:
                bar.set_postfix(loss=f"{record['total_loss']:.3f}", lr=f"{lr:.2e}")
            if iteration % settings.checkpoint_period == 0 and iteration < stop:
                save_last(iteration)
    finally:
        bar.close()
        if log is not None:
            log.close()
    save_last(iteration)
    finished = iteration >= settings.iterations
    final = None
    if finished and info.main:
        final = out / FINAL
        save_checkpoint(final, core, detector_settings, iteration=iteration, train_settings=asdict(settings))
    if info.world_size > 1:
        dist.barrier()
    return TrainResult(iteration, finished, out / LAST, final, losses_out, skipped, evaluations,
                       time.perf_counter() - started)


def _step(model: torch.nn.Module, core: torch.nn.Module, batch: Any, device: torch.device,
          optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, use_amp: bool,
          clip_norm: float) -> dict[str, float]:
    """One optimiser step on a batch; returns each loss, ``total_loss`` and ``grad_norm`` as floats."""
    images = [img.to(device, non_blocking=True) for img in batch.images]
    targets = _to_device(batch.targets, device)
    context = torch.autocast("cuda", dtype=torch.float16) if use_amp else nullcontext()
    with context:
        loss_dict = model(images, targets)
    total = sum(loss_dict.values())
    if not use_amp and not torch.isfinite(total):
        bad = ", ".join(f"{k}={float(v):.3g}" for k, v in loss_dict.items())
        raise TrainError(f"the loss is no longer finite ({bad}); lower --lr or raise the warm-up")
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(total).backward()
    # Unscale first so the clipping threshold is in real gradient units under AMP.
    scaler.unscale_(optimizer)
    grad_norm = clip_gradients(core.parameters(), clip_norm)
    scaler.step(optimizer)
    scaler.update()
    names = sorted(loss_dict)
    values = torch.stack([loss_dict[k].detach().float() for k in names] + [total.detach().float()])
    if dist.is_initialized() and dist.get_world_size() > 1:
        # Log the mean over processes, the loss of the whole global batch.
        dist.all_reduce(values)
        values /= dist.get_world_size()
    out = dict(zip(names + ["total_loss"], values.tolist()))
    out["grad_norm"] = grad_norm if math.isfinite(grad_norm) else None
    return out
