"""The issue's learning test: a few hundred CPU iterations on synthetic hierarchical scenes.

The tiny detector, trained from scratch on the true masks of small
make_scene images written as pseudo-labels, must find the objects again
(box AR@100 on the training set) and tell wholes, parts and subparts apart
better than chance. Measured values are stated next to each threshold.
"""
from __future__ import annotations

import json
import math

import numpy as np
import torch
from torchvision.ops import box_iou

from hassod.model import DetectorSettings, load_detector
from hassod.train.data import Augmentation
from hassod.train.loop import train
from hassod.train.settings import TrainSettings
from tests.hassod.train.train_helpers import boxes_xyxy, write_scenes

SCENES = list(range(200, 206))
SIZE = (128, 128)
ITERATIONS = 200


def level_accuracy(model, scenes) -> tuple[float, int]:
    """Share of true objects whose best-overlapping detection (IoU ≥ 0.5) has the true level; and how many matched."""
    correct, matched = 0, 0
    model.eval()
    with torch.no_grad():
        for scene in scenes:
            out = model([torch.from_numpy(scene.image).permute(2, 0, 1).float() / 255])[0]
            if len(out["boxes"]) == 0:
                continue
            iou = box_iou(torch.from_numpy(boxes_xyxy(scene.masks)), out["boxes"])
            best_iou, best = iou.max(dim=1)
            for obj in np.flatnonzero(best_iou.numpy() >= 0.5):
                matched += 1
                correct += int(out["levels"][best[obj]]) == int(scene.levels[obj])
    return correct / max(1, matched), matched


def test_tiny_detector_learns_boxes_and_levels(tmp_path):
    pseudo, scenes = write_scenes(tmp_path, SCENES, size=SIZE)
    settings = TrainSettings(batch_size=2, iterations=ITERATIONS, lr=0.03, warmup_iters=30, device="cpu",
                             workers=0, augmentation=Augmentation(copy_paste_prob=0.0), checkpoint_period=ITERATIONS)
    result = train(settings, DetectorSettings.tiny(), pseudo, None, tmp_path / "run", eval_gt=pseudo,
                   random_init=True, progress=False)
    assert result.finished and result.skipped == {}

    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert len(log) == ITERATIONS and all(math.isfinite(r["total_loss"]) for r in log)
    # The total rises while the RPN improves (more foreground RoIs carry box losses), so
    # check the losses that must fall: objectness (0.69 -> ~0.1 measured) and classification.
    for name, ratio in (("loss_objectness", 0.5), ("loss_cls_stage0", 0.9)):
        first = np.mean([r[name] for r in log[:20]])
        last = np.mean([r[name] for r in log[-20:]])
        assert last < ratio * first, (name, first, last)

    # Measured AR@100 0.65 with seed 0 (0.56-0.65 over training seeds 0-2); IoU 0.5:0.95 like COCO.
    assert result.evaluations[-1]["AR@100"] >= 0.45

    model, _ = load_detector(result.final_checkpoint)
    accuracy, matched = level_accuracy(model, scenes)
    # 6 scenes x 10 objects (2 wholes, 4 parts, 4 subparts): chance is 1/3, always "part" 0.4.
    # Measured 0.85 on 58 matched objects with seed 0 (0.67-0.85 over training seeds 0-2).
    assert matched >= 40
    assert accuracy >= 0.55


def test_mean_teacher_keeps_the_burn_in_recall(tmp_path):
    """Burn-in as above, then 40 Mean Teacher iterations on the same scenes, against the burn-in
    detector (evaluated at iteration 200, the same 200 iterations as the test above).

    The pseudo-labels here are the scenes' exact masks, which no teacher can improve on: from then on
    the student trains mostly (α_teacher 2 → 3) on the teacher's less precise boxes, so its AR@100
    (IoU 0.5:0.95) drops, while the teacher, the EMA of those students, keeps the burn-in's recall.
    Measured with seed 0: burn-in 0.652, teacher 0.612, student 0.477.
    """
    pseudo, _ = write_scenes(tmp_path, SCENES, size=SIZE)
    settings = TrainSettings(batch_size=2, iterations=ITERATIONS + 40, burn_in=ITERATIONS, lr=0.03, warmup_iters=30,
                             mt_warmup_iters=10, ema_keep=0.99, device="cpu", workers=0,
                             augmentation=Augmentation(copy_paste_prob=0.0), checkpoint_period=ITERATIONS,
                             eval_period=ITERATIONS)
    result = train(settings, DetectorSettings.tiny(), pseudo, None, tmp_path / "run", eval_gt=pseudo,
                   random_init=True, progress=False)
    burn_in, final = result.evaluations
    assert burn_in["iteration"] == ITERATIONS and "teacher" not in burn_in
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert sum(r["teacher_targets"] for r in log[ITERATIONS:]) > 0
    assert final["teacher"]["AR@100"] >= burn_in["AR@100"] - 0.06
    assert final["AR@100"] >= burn_in["AR@100"] - 0.25
