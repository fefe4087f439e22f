"""What happens around each training step: the teacher's EMA, evaluation, the log, checkpoints.

A hook sees the :class:`~hassod.train.loop.Trainer` before the run, before
and after each step (``trainer.iteration`` is the step's index before it and
the number of steps done after it), and after the run. ``after_step`` gets
the step's log record (a dict) and may add to it; hooks run in list order,
so evaluation comes before the log line that carries its figures.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm import tqdm

from ..evaluation import evaluate
from ..images import DEFAULT_MAX_PIXELS, ImageError, load_rgb, resize_image
from ..model import save_checkpoint
from ..runs import atomic_write
from .distributed import barrier
from .mean_teacher import ema_update

if TYPE_CHECKING:
    from .loop import Trainer

LAST = "last.pth"
FINAL = "model_final.pth"
LOG = "log.jsonl"


class Hook:
    """Does nothing at every point of a run; subclasses override what they need."""

    def before_train(self, trainer: "Trainer") -> None:
        pass

    def before_step(self, trainer: "Trainer") -> None:
        pass

    def after_step(self, trainer: "Trainer", record: dict[str, Any]) -> None:
        pass

    def after_train(self, trainer: "Trainer") -> None:
        pass


class TeacherHook(Hook):
    """Mean Teacher's teacher: an exact copy of the student at the first Mean Teacher iteration,
    then its EMA (keep rate ``ema_keep``) before every later iteration's forward."""

    def before_step(self, trainer: "Trainer") -> None:
        first = trainer.settings.burn_in_iters
        if trainer.iteration == first:
            trainer.teacher = copy_as_teacher(trainer.core)
        elif trainer.iteration > first:  # a run resumed after ``first`` has its teacher from the checkpoint
            ema_update(trainer.teacher, trainer.core, trainer.settings.ema_keep)


def copy_as_teacher(student: torch.nn.Module) -> torch.nn.Module:
    """A frozen copy of ``student`` in eval mode: no gradients, never given to an optimiser."""
    teacher = copy.deepcopy(student).eval()
    teacher.requires_grad_(False)
    return teacher


class EvalHook(Hook):
    """Box metrics of the student (``eval``) and, once there is one, the teacher (``eval_teacher``)
    on a held-out COCO file, every ``period`` iterations (0: never in between) and after the last."""

    def __init__(self, gt: dict[str, Any], images_dir: Path, period: int):
        self.gt, self.images_dir, self.period = gt, images_dir, period

    def after_step(self, trainer: "Trainer", record: dict[str, Any]) -> None:
        done, total = trainer.iteration, trainer.settings.iterations
        if not (done == total or (self.period and done % self.period == 0 and done < total)):
            return
        if trainer.info.main:
            models = {"eval": trainer.core, "eval_teacher": trainer.teacher}
            for key, model in models.items():
                if model is not None:
                    record[key] = self.metrics(trainer, model)
            trainer.evaluations.append({"iteration": done, **record["eval"],
                                        **({"teacher": record["eval_teacher"]} if "eval_teacher" in record else {})})
        barrier()

    def metrics(self, trainer: "Trainer", model: torch.nn.Module) -> dict[str, float]:
        results = predict_coco(model, self.gt, self.images_dir, trainer.device, trainer.detector_settings.max_size,
                               trainer.settings.max_pixels)
        return evaluate(self.gt, results, "bbox")


class LogHook(Hook):
    """One JSON line per iteration in ``log.jsonl`` (rank 0), and the progress bar."""

    def __init__(self, path: Path, progress: bool):
        self.path, self.progress = path, progress
        self.file = None
        self.bar = None

    def before_train(self, trainer: "Trainer") -> None:
        if trainer.info.main:
            self.file = open(self.path, "a", encoding="utf-8")
        self.bar = tqdm(total=trainer.settings.iterations, initial=trainer.iteration, unit="it", desc="train",
                        disable=not (self.progress and trainer.info.main), dynamic_ncols=True)

    def after_step(self, trainer: "Trainer", record: dict[str, Any]) -> None:
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        self.bar.update(1)
        if "total_loss" in record:
            self.bar.set_postfix(loss=f"{record['total_loss']:.3f}", lr=f"{record['lr']:.2e}")

    def after_train(self, trainer: "Trainer") -> None:
        self.bar.close()
        if self.file is not None:
            self.file.close()


class CheckpointHook(Hook):
    """``last.pth`` every ``period`` iterations and when the run stops; ``model_final.pth`` once finished."""

    def __init__(self, period: int):
        self.period = period

    def after_step(self, trainer: "Trainer", record: dict[str, Any]) -> None:
        if trainer.iteration % self.period == 0 and trainer.iteration < trainer.stop:
            trainer.save_last()

    def after_train(self, trainer: "Trainer") -> None:
        if trainer.failed:
            return
        trainer.save_last()
        if trainer.finished and trainer.info.main:
            teacher = trainer.teacher.state_dict() if trainer.teacher is not None else None
            save_checkpoint(trainer.out / FINAL, trainer.core, trainer.detector_settings, teacher=teacher,
                            iteration=trainer.iteration, train_settings=trainer.settings_dict())


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


def truncate_log(path: Path, iteration: int) -> None:
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
    with atomic_write(path) as handle:
        handle.write("".join(k + "\n" for k in kept))
