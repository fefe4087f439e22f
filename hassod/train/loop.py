"""The detector's training run: set-up, then a step loop in two phases (docs/design.md §6).

:class:`Trainer` builds the model, data, optimiser and LR schedule (or takes them back
from ``last.pth``); :meth:`Trainer.run` steps through burn-in (iterations ``0 .. B-1``,
pseudo-labels) and Mean Teacher (``B .. N-1``, a labelled and an unlabelled batch per
step), with hooks (:mod:`hassod.train.hooks`) keeping the teacher's EMA, evaluating,
logging and checkpointing. Step k trains on the batches
:class:`~hassod.train.data.IndexStream` gives for k, so a run resumed from ``last.pth``
matches the uninterrupted run bit for bit on the CPU (CUDA kernels may differ in the last bits).

A run directory holds ``last.pth`` (student, teacher, optimiser, scheduler, AMP scaler,
iteration, both samplers' positions, RNG state, both settings), ``model_final.pth``
(student and teacher after the last iteration) and ``log.jsonl`` (one JSON object per
iteration: :meth:`Trainer.burn_in_step`, :meth:`Trainer.mean_teacher_step`). Under
``torchrun`` each process takes its share of every global batch; only rank 0 writes files.
"""
from __future__ import annotations

import math
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from ..errors import UserError
from ..evaluation import read_ground_truth
from ..model import CheckpointError, DetectorSettings, build_detector, read_checkpoint, save_checkpoint
from .data import Batch, IndexStream, PseudoLabelDataset, collate
from .distributed import mean_over_processes, setup_distributed
from .hooks import FINAL, LAST, LOG, CheckpointHook, EvalHook, Hook, LogHook, TeacherHook, copy_as_teacher, truncate_log
from .mean_teacher import fixed_input_size, loss_weights, teacher_detections, teacher_targets
from .settings import RESUME_FREE, TrainSettings, settings_differences
from .solver import TwoPhaseSchedule, WarmupSchedule, build_optimizer, build_scheduler, clip_gradients


class TrainError(UserError, RuntimeError):
    """A run that cannot start or go on; ``str()`` is a one-line reason for the user."""


@dataclass
class TrainResult:
    """What a call of :func:`train` did. ``evaluations``: per evaluated iteration, the student's
    box metrics and, under ``teacher``, the teacher's."""

    iteration: int
    finished: bool
    last_checkpoint: Path
    final_checkpoint: Path | None
    losses: dict[str, float]
    skipped: dict[str, str] = field(default_factory=dict)
    evaluations: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


def _rng_state(device: torch.device) -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _to_device(targets: list[dict[str, torch.Tensor]], device: torch.device) -> list[dict[str, torch.Tensor]]:
    return [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]


class Trainer:
    """One training run into ``out_dir``; see the module docstring.

    Args:
        settings, detector_settings: how to train, and the model to build.
        pseudo_json: the pseudo-labels; images_dir: the folder their file
            names are relative to (None: the file's ``info.root``).
        backbone_weights, random_init: the backbone's initialisation (see
            :func:`hassod.model.build_detector`).
        resume: continue from ``out_dir/last.pth`` (refused when the settings
            differ); without it an existing ``last.pth`` is refused, so a run
            is never overwritten by accident.
    Raises :class:`TrainError` for unusable inputs.
    """

    def __init__(self, settings: TrainSettings, detector_settings: DetectorSettings,
                 pseudo_json: str | os.PathLike, images_dir: str | os.PathLike | None, out_dir: str | os.PathLike,
                 backbone_weights: str | None = None, random_init: bool = False, resume: bool = False):
        self.settings, self.detector_settings = settings, detector_settings
        self.info, self.device = setup_distributed(settings.device)
        self.out = Path(out_dir)
        if self.info.main:
            self.out.mkdir(parents=True, exist_ok=True)
        if not resume and (self.out / LAST).exists():
            raise TrainError(f"{self.out} already holds a run ({LAST}); pass --resume to continue it "
                             "or choose another --out")
        ckpt = self._load_resume() if resume else None
        self.dataset = self._dataset(pseudo_json, images_dir)
        self.skipped: dict[str, str] = dict(self.dataset.missing)
        self._build_model(backbone_weights, random_init)
        self._build_solver()
        self.iteration = 0
        self.stop = settings.iterations
        self.teacher: torch.nn.Module | None = None
        self.evaluations: list[dict[str, Any]] = []
        self.losses: dict[str, float] = {}
        self.failed = False
        if ckpt is not None:
            self._restore(ckpt)
        if self.info.main:
            if ckpt is not None:
                truncate_log(self.out / LOG, self.iteration)
            else:
                (self.out / LOG).unlink(missing_ok=True)

    # ------------------------------------------------------------------ set-up
    def _load_resume(self) -> dict[str, Any]:
        path = self.out / LAST
        if not path.exists():
            raise TrainError(f"nothing to resume: {path} does not exist")
        try:
            ckpt = read_checkpoint(path)
        except CheckpointError as exc:
            raise TrainError(str(exc)) from None
        if "train_settings" not in ckpt or "iteration" not in ckpt:
            raise TrainError(f"{path} is a model checkpoint without training state; it cannot be resumed")
        # A run saved before a setting existed was made with its default.
        saved = {**asdict(TrainSettings()), **ckpt["train_settings"]}
        changed = settings_differences(saved, self.settings_dict(), RESUME_FREE)
        changed += [f"model.{k}" for k in settings_differences(ckpt["settings"], asdict(self.detector_settings))]
        if changed:
            raise TrainError(f"{path} was made with other settings ({', '.join(changed)}); "
                             "rerun with the same settings to resume, or use another --out")
        return ckpt

    def _dataset(self, pseudo_json: str | os.PathLike, images_dir: str | os.PathLike | None) -> PseudoLabelDataset:
        augmentation = replace(self.settings.augmentation, max_size=self.detector_settings.max_size)
        try:
            return PseudoLabelDataset(pseudo_json, images_dir, augmentation, self.settings.seed,
                                      self.settings.max_pixels)
        except ValueError as exc:
            raise TrainError(str(exc)) from None

    def _build_model(self, backbone_weights: str | None, random_init: bool) -> None:
        # Seed before building so a fresh run's random initialisation is reproducible too.
        torch.manual_seed(self.settings.seed + self.info.rank)
        try:
            model = build_detector(self.detector_settings, backbone_weights=backbone_weights, random_init=random_init)
        except (FileNotFoundError, ValueError) as exc:
            raise TrainError(str(exc)) from None
        model.to(self.device).train()
        self.core = self.model = model
        if self.info.world_size > 1:
            if self.device.type == "cuda":
                self.core = self.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
            # Some heads see no foreground RoI on some batches: let DDP tolerate unused parameters.
            self.model = torch.nn.parallel.DistributedDataParallel(
                self.core, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=True)

    def _build_solver(self) -> None:
        settings = self.settings
        self.use_amp = settings.amp and self.device.type == "cuda"
        self.optimizer = build_optimizer(self.core, settings.base_lr(), settings.weight_decay, settings.momentum)
        burn_in = WarmupSchedule(settings.burn_in_iters, settings.warmup_iters, settings.warmup_factor,
                                 settings.lr_decay, settings.lr_steps, settings.lr_gamma)
        mean_teacher = WarmupSchedule(settings.teacher_iters, settings.mt_warmup_iters, settings.warmup_factor)
        self.scheduler = build_scheduler(self.optimizer, TwoPhaseSchedule(burn_in, mean_teacher, settings.burn_in_iters))
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)

    def _restore(self, ckpt: dict[str, Any]) -> None:
        self.core.load_state_dict(ckpt["model"])
        if ckpt.get("teacher") is not None:
            self.teacher = copy_as_teacher(self.core)
            self.teacher.load_state_dict(ckpt["teacher"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.iteration = int(ckpt["iteration"])
        self.skipped.update(ckpt.get("skipped", {}))
        if self.info.main:
            _set_rng_state(ckpt["rng"], self.device)
        else:
            torch.manual_seed(self.settings.seed + self.info.rank + 7919 * self.iteration)

    def settings_dict(self) -> dict[str, Any]:
        return asdict(self.settings)

    @property
    def finished(self) -> bool:
        return self.iteration >= self.settings.iterations

    def save_last(self) -> None:
        """``last.pth`` with everything an exact resume needs (rank 0 only)."""
        if not self.info.main:
            return
        save_checkpoint(self.out / LAST, self.core, self.detector_settings, optimizer=self.optimizer.state_dict(),
                        scheduler=self.scheduler.state_dict(), scaler=self.scaler.state_dict(),
                        iteration=self.iteration, rng=_rng_state(self.device), train_settings=self.settings_dict(),
                        skipped=dict(self.skipped), samplers={"labelled": self.iteration, "unlabelled": self.iteration},
                        teacher=self.teacher.state_dict() if self.teacher is not None else None)

    # ------------------------------------------------------------------ data
    def _loader(self, dataset: PseudoLabelDataset, seed: int, start: int, stop: int) -> Iterator[Batch]:
        """Batches of steps ``start .. stop-1`` from a seeded :class:`IndexStream` over ``dataset``."""
        if stop <= start:
            return iter(())
        sampler = IndexStream(len(dataset), self.settings.batch_size, seed, start, stop, self.info.rank,
                              self.info.world_size)
        return iter(torch.utils.data.DataLoader(
            dataset, batch_sampler=sampler, collate_fn=collate, num_workers=self.settings.workers,
            pin_memory=self.device.type == "cuda",
            # Our own generator: the loader must not draw from the global RNG, whose state is checkpointed.
            generator=torch.Generator().manual_seed(seed),
        ))

    def burn_in_batches(self) -> Iterator[Batch]:
        return self._loader(self.dataset, self.settings.seed, self.iteration,
                            min(self.stop, self.settings.burn_in_iters))

    def mean_teacher_batches(self) -> Iterator[tuple[Batch, Batch]]:
        """(labelled, unlabelled) per Mean Teacher step: two streams of their own order, flip only,
        each sample with its strong view; the unlabelled batch's labels are never read."""
        settings = self.settings
        start = max(self.iteration, settings.burn_in_iters)
        views = self.dataset.variant(replace(self.dataset.augmentation, copy_paste_prob=0.0), strong=settings.strong)
        labelled = self._loader(views, settings.seed, start, self.stop)
        unlabelled = self._loader(views.variant(seed=settings.seed + 1), settings.seed + 1, start, self.stop)
        return zip(labelled, unlabelled)

    def _note_skipped(self, *batches: Batch) -> None:
        for batch in batches:
            for name, reason in batch.skipped:
                self.skipped.setdefault(name, reason)
        if len(self.skipped) >= len(self.dataset) + len(self.dataset.missing):
            raise TrainError("every training image was skipped: " + next(iter(self.skipped.values())))

    # ------------------------------------------------------------------ steps
    def run(self, hooks: list[Hook], stop_after: int | None = None) -> TrainResult:
        """Step until ``stop_after`` (or the end), calling ``hooks`` around every step."""
        started = time.perf_counter()
        self.stop = self.settings.iterations if stop_after is None else min(self.settings.iterations, stop_after)
        for hook in hooks:
            hook.before_train(self)
        try:
            for batch in self.burn_in_batches():
                self._step(hooks, self.burn_in_step, batch)
            for labelled, unlabelled in self.mean_teacher_batches():
                self._step(hooks, self.mean_teacher_step, labelled, unlabelled)
        except BaseException:
            self.failed = True  # hooks close what they opened; the last checkpoint stays the last good one
            raise
        finally:
            for hook in hooks:
                hook.after_train(self)
        final = self.out / FINAL if self.finished and self.info.main else None
        return TrainResult(self.iteration, self.finished, self.out / LAST, final, self.losses, self.skipped,
                           self.evaluations, time.perf_counter() - started)

    def _step(self, hooks: list[Hook], step: Callable[..., dict[str, Any]], *batches: Batch) -> None:
        tick = time.perf_counter()
        self._note_skipped(*batches)
        for hook in hooks:
            hook.before_step(self)
        record: dict[str, Any] = {"iteration": self.iteration + 1, "lr": self.optimizer.param_groups[0]["lr"],
                                  "images": sum(len(b.images) for b in batches)}
        record.update(step(*batches))
        self.scheduler.step()
        self.iteration += 1
        record["seconds"] = round(time.perf_counter() - tick, 4)
        for hook in hooks:
            hook.after_step(self, record)

    def burn_in_step(self, batch: Batch) -> dict[str, float]:
        """One optimiser step on pseudo-labels; logs each loss, ``total_loss`` and ``grad_norm``."""
        if not batch.images:
            return {}
        self.optimizer.zero_grad(set_to_none=True)
        losses = self._backward(batch.images, batch.targets, 1.0)
        out = self._logged(losses)
        out["grad_norm"] = self._optimizer_step()
        self.losses = out
        return out

    def mean_teacher_step(self, labelled: Batch, unlabelled: Batch) -> dict[str, Any]:
        """One Mean Teacher step; logs the labelled losses (``loss_*``), the losses on the teacher's
        targets (``teacher_loss_*``), ``alpha_label``, ``alpha_teacher``, ``teacher_targets`` (kept
        targets in the step), ``total_loss`` (the weighted sum) and ``grad_norm``."""
        settings = self.settings
        alpha_label, alpha_teacher = loss_weights(self.iteration - settings.burn_in_iters, settings.teacher_iters)
        # Teacher and student see one geometry: the step's shortest edge, drawn from the training sizes.
        sizes = self.detector_settings.min_size_train
        size = sizes[int(torch.randint(len(sizes), ()))]
        record: dict[str, Any] = {"alpha_label": alpha_label, "alpha_teacher": alpha_teacher, "teacher_targets": 0}
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        with fixed_input_size([self.core, self.teacher], size):
            if labelled.images:
                # Both views of the labelled images, as the reference does: the strong one alone shifts
                # what the student learnt in burn-in.
                label_losses = self._backward(labelled.images + labelled.strong_images, labelled.targets * 2,
                                              alpha_label, last=not unlabelled.images)
                logged = self._logged(label_losses)
                total += alpha_label * logged.pop("total_loss")
                record.update(logged)
            if unlabelled.images:
                targets = self._teacher_targets(unlabelled.images)
                record["teacher_targets"] = sum(len(t["boxes"]) for t in targets)
                teacher_losses = self._backward(unlabelled.strong_images, targets, alpha_teacher)
                logged = self._logged(teacher_losses)
                total += alpha_teacher * logged.pop("total_loss")
                record.update({f"teacher_{k}": v for k, v in logged.items()})
        record["total_loss"] = total
        record["grad_norm"] = self._optimizer_step()
        self.losses = {k: v for k, v in record.items() if "loss" in k}
        return record

    def _teacher_targets(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        images = [img.to(self.device, non_blocking=True) for img in images]
        thresh = self.settings.teacher_thresh
        detections = teacher_detections(self.teacher, images, thresh, self.use_amp)
        return [teacher_targets(d, img.shape[-2:], thresh, self.settings.teacher_tau)
                for d, img in zip(detections, images)]

    def _backward(self, images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]], weight: float,
                  last: bool = True) -> dict[str, torch.Tensor]:
        """Forward, then backward of ``weight`` × the summed losses into the accumulated gradients.

        ``last=False`` keeps DDP from averaging the gradients yet (a later backward of the same step will).
        """
        images = [img.to(self.device, non_blocking=True) for img in images]
        targets = _to_device(targets, self.device)
        autocast = torch.autocast("cuda", dtype=torch.float16) if self.use_amp else nullcontext()
        sync = nullcontext() if last or self.model is self.core else self.model.no_sync()
        with sync:
            with autocast:
                loss_dict = self.model(images, targets)
            total = sum(loss_dict.values())
            if not self.use_amp and not torch.isfinite(total):
                bad = ", ".join(f"{k}={float(v):.3g}" for k, v in loss_dict.items())
                raise TrainError(f"the loss is no longer finite ({bad}); lower --lr or raise the warm-up")
            self.scaler.scale(total if weight == 1.0 else total * weight).backward()
        return {**loss_dict, "total_loss": total}

    def _optimizer_step(self) -> float | None:
        """Unscale, clip and apply the accumulated gradients; returns their norm before clipping."""
        # Unscale first so the clipping threshold is in real gradient units under AMP.
        self.scaler.unscale_(self.optimizer)
        grad_norm = clip_gradients(self.core.parameters(), self.settings.clip_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return grad_norm if math.isfinite(grad_norm) else None

    @staticmethod
    def _logged(losses: dict[str, torch.Tensor]) -> dict[str, float]:
        """The losses as floats, each the mean over the processes of a launch (the whole global batch's)."""
        names = sorted(losses)
        values = mean_over_processes(torch.stack([losses[k].detach().float() for k in names]))
        return dict(zip(names, values.tolist()))


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
    """Train a detector on pseudo-labels (burn-in, then Mean Teacher if ``settings.burn_in`` says so);
    write checkpoints and the log into ``out_dir``.

    eval_gt: a COCO file evaluated (box metrics, student and teacher) every
    ``settings.eval_period`` iterations and at the end, images under
    ``eval_images`` (default its ``info.root`` or its folder). stop_after:
    stop (with a checkpoint) once this iteration is done, as an interruption
    would. See :class:`Trainer` for the other arguments.
    """
    gt = read_ground_truth(eval_gt) if eval_gt is not None else None
    trainer = Trainer(settings, detector_settings, pseudo_json, images_dir, out_dir, backbone_weights,
                      random_init, resume)
    hooks: list[Hook] = [TeacherHook()]
    if gt is not None:
        hooks.append(EvalHook(gt, _eval_images_dir(gt, Path(eval_gt), eval_images), settings.eval_period))
    hooks += [LogHook(trainer.out / LOG, progress), CheckpointHook(settings.checkpoint_period)]
    return trainer.run(hooks, stop_after)


def _eval_images_dir(gt: dict[str, Any], gt_path: Path, eval_images: str | os.PathLike | None) -> Path:
    if eval_images is not None:
        return Path(eval_images)
    root = (gt.get("info") or {}).get("root")
    return Path(root) if root else gt_path.resolve().parent
