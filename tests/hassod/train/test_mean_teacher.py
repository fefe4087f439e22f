"""Mean Teacher: the EMA, the strong view, the loss weights, the teacher's targets, and the phase in a run."""
from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from hassod.model import DetectorSettings, build_detector, read_checkpoint
from hassod.train.data import Augmentation, PseudoLabelDataset
from hassod.train.hooks import CheckpointHook, Hook, TeacherHook
from hassod.train.loop import Trainer, train
from hassod.train.mean_teacher import ema_update, loss_weights, teacher_targets
from hassod.train.settings import TrainSettings
from hassod.train.views import StrongAugmentation, strong_view
from tests.hassod.train.train_helpers import read_log, write_scenes

MT = TrainSettings(batch_size=2, iterations=6, burn_in=3, warmup_iters=1, mt_warmup_iters=1, checkpoint_period=2,
                   device="cpu", workers=0, lr=0.01, augmentation=Augmentation(copy_paste_prob=0.5),
                   teacher_thresh=0.05)


@pytest.fixture(scope="module")
def pseudo(tmp_path_factory) -> Path:
    path, _ = write_scenes(tmp_path_factory.mktemp("scenes"), [21, 22, 23], size=(96, 128))
    return path


def test_ema_update_follows_the_formula_on_every_entry_of_the_state_dict():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(6, 2))
    teacher = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(6, 2))
    student.train()(torch.randn(2, 3, 8, 8))  # moves the student's running statistics and batch counter
    with torch.no_grad():
        for param in teacher.parameters():  # BatchNorm's weights start equal (ones) in both
            param.add_(torch.randn_like(param))
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    ema_update(teacher, student, 0.9)
    after, source = teacher.state_dict(), student.state_dict()
    for name, value in after.items():
        if value.is_floating_point():
            expected = 0.9 * before[name] + 0.1 * source[name]
            torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-7)
            assert not torch.equal(value, before[name]), name  # running_mean/var moved too
        else:
            assert torch.equal(value, source[name]) and int(value) == 1, name  # num_batches_tracked copied
    assert {n for n in after if "running" in n} == {"1.running_mean", "1.running_var"}


def test_loss_weights_go_from_1_2_to_0_3():
    assert loss_weights(0, 100) == (1.0, 2.0)
    assert loss_weights(50, 100) == pytest.approx((0.5, 2.5))
    assert loss_weights(100, 100) == pytest.approx((0.0, 3.0))
    label, teacher = loss_weights(25, 100)
    assert label == pytest.approx(0.5 * (1 + math.cos(math.pi / 4))) and label + teacher == pytest.approx(3.0)


def test_strong_view_changes_pixels_and_keeps_boxes_and_masks(pseudo):
    weak = PseudoLabelDataset(pseudo, augmentation=Augmentation(copy_paste_prob=0.0), seed=3)
    strong = weak.variant(strong=StrongAugmentation())
    changed = 0
    for key in [(0, 0, 0), (1, 1, 1), (2, 0, 2), (3, 1, 0), (4, 0, 1), (5, 1, 2)]:
        a, b = weak[key], strong[key]
        assert torch.equal(a.image, b.image) and b.strong.shape == b.image.shape
        for name in ("boxes", "masks", "levels", "labels"):
            assert torch.equal(a.target[name], b.target[name]), name
        assert 0.0 <= float(b.strong.min()) and float(b.strong.max()) <= 1.0
        changed += float((b.strong - b.image).abs().mean()) > 0.01
        again = strong[key]  # a pure function of the key: a resumed run sees the same pixels
        assert torch.equal(again.strong, b.strong)
    assert changed >= 5


def test_strong_view_draws_each_change_with_its_probability():
    image = torch.rand(3, 40, 50)
    never = StrongAugmentation(jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, erasings=())
    assert torch.equal(strong_view(image, np.random.default_rng(0), never), image)
    gray = strong_view(image, np.random.default_rng(0), replace(never, grayscale_p=1.0))
    assert torch.allclose(gray[0], gray[1]) and torch.allclose(gray[1], gray[2])
    one_erasing = replace(never, erasings=(replace(StrongAugmentation().erasings[0], p=1.0),))
    erased = strong_view(image, np.random.default_rng(1), one_erasing)
    share = float((erased != image).any(dim=0).float().mean())
    assert 0.04 <= share <= 0.21  # one rectangle of 5-20% of the area


def _nested_detections() -> dict[str, torch.Tensor]:
    """Four boxes on a 100x100 image, masks filling their boxes: A ⊃ B ⊃ C, D 80% inside A, E below threshold."""
    boxes = torch.tensor([[0, 0, 80, 80], [0, 0, 40, 80], [0, 0, 20, 80], [60, 0, 85, 80], [0, 0, 50, 50]],
                         dtype=torch.float32)
    scores = torch.tensor([0.95, 0.9, 0.8, 0.85, 0.6])
    masks = torch.ones(5, 1, 28, 28)
    return {"boxes": boxes, "scores": scores, "masks": masks, "levels": torch.zeros(5, dtype=torch.int64)}


def test_teacher_targets_filter_scores_paste_masks_and_recompute_levels():
    targets = teacher_targets(_nested_detections(), (100, 100), score_thresh=0.7, tau=0.75)
    assert set(targets) == {"boxes", "labels", "levels"}  # no masks: the unlabelled branch has no mask loss
    assert targets["boxes"].tolist() == _nested_detections()["boxes"][:4].tolist()  # E (0.6) dropped
    # D lies 20/25 = 80% inside A: a part of A at tau 0.75 (it would be a whole at stage 1's 0.9).
    assert targets["levels"].tolist() == [0, 1, 2, 1]
    assert teacher_targets(_nested_detections(), (100, 100), 0.7, tau=0.9)["levels"].tolist() == [0, 1, 2, 0]
    # Masks are binarised at 0.5 before the coverage tree: C's mask below 0.5 is empty, a root covering nothing.
    faint = _nested_detections()
    faint["masks"][2] = 0.4
    assert teacher_targets(faint, (100, 100), 0.7, 0.75)["levels"].tolist() == [0, 1, 0, 1]
    assert teacher_targets(_nested_detections(), (100, 100), 0.99, 0.75)["boxes"].shape == (0, 4)


def test_targets_without_masks_give_no_mask_loss():
    torch.manual_seed(0)
    model = build_detector(DetectorSettings.tiny(), random_init=True).train()
    image = torch.rand(3, 96, 128)
    target = {"boxes": torch.tensor([[10.0, 10.0, 60.0, 50.0]]), "labels": torch.ones(1, dtype=torch.int64),
              "levels": torch.zeros(1, dtype=torch.int64)}
    masks = torch.zeros(1, 96, 128, dtype=torch.uint8)
    masks[:, 10:50, 10:60] = 1
    assert "loss_mask" not in model([image], [target])
    assert "loss_mask" in model([image], [{**target, "masks": masks}])
    with pytest.raises(ValueError, match="all have masks or all lack them"):
        model([image, image], [target, {**target, "masks": masks}])


class _Watch(Hook):
    """Copies of the teacher and student states as the step sees them (after the teacher hook)."""

    def __init__(self):
        self.seen: dict[int, tuple[dict, dict]] = {}

    def before_step(self, trainer):
        if trainer.teacher is not None:
            self.seen[trainer.iteration] = ({k: v.clone() for k, v in trainer.teacher.state_dict().items()},
                                            {k: v.clone() for k, v in trainer.core.state_dict().items()})


def test_teacher_starts_as_the_student_and_moves_only_by_its_ema(pseudo, tmp_path):
    trainer = Trainer(MT, DetectorSettings.tiny(), pseudo, None, tmp_path / "run", random_init=True)
    watch = _Watch()
    trainer.run([TeacherHook(), watch, CheckpointHook(100)])
    assert sorted(watch.seen) == [3, 4, 5]
    teacher, student = watch.seen[3]
    assert all(torch.equal(teacher[k], student[k]) for k in student)  # an exact copy at B
    previous, _ = watch.seen[3]
    teacher, student = watch.seen[4]
    for name, value in teacher.items():  # then k·t + (1-k)·s, and nothing else touched it
        if value.is_floating_point():
            torch.testing.assert_close(value, MT.ema_keep * previous[name] + (1 - MT.ema_keep) * student[name],
                                       rtol=1e-6, atol=1e-7)
    optimised = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert not optimised & {id(p) for p in trainer.teacher.parameters()}
    assert not any(p.requires_grad for p in trainer.teacher.parameters()) and not trainer.teacher.training


def test_mean_teacher_log_and_checkpoints(pseudo, tmp_path):
    result = train(MT, DetectorSettings.tiny(), pseudo, None, tmp_path / "run", random_init=True, progress=False,
                   eval_gt=pseudo)
    log = read_log(tmp_path / "run")
    assert [("alpha_label" in r) for r in log] == [False] * 3 + [True] * 3
    assert [r["alpha_label"] for r in log[3:]] == pytest.approx([1.0, 0.75, 0.25])
    assert [r["alpha_teacher"] for r in log[3:]] == pytest.approx([2.0, 2.25, 2.75])
    for r in log[3:]:
        assert r["teacher_targets"] > 0 and "loss_mask" in r and "teacher_loss_mask" not in r
        label = sum(v for k, v in r.items() if k.startswith("loss_"))
        teacher = sum(v for k, v in r.items() if k.startswith("teacher_loss_"))
        assert r["total_loss"] == pytest.approx(r["alpha_label"] * label + r["alpha_teacher"] * teacher, rel=1e-5)
    # The phase's own warm-up restarts the LR at lr × warmup_factor.
    assert log[3]["lr"] == pytest.approx(0.01 * 0.001) and log[4]["lr"] == pytest.approx(0.01)
    final = read_checkpoint(result.final_checkpoint)
    assert final["teacher"].keys() == final["model"].keys()
    assert not all(torch.equal(final["teacher"][k], final["model"][k]) for k in final["model"])
    assert "eval" in log[-1] and "eval_teacher" in log[-1]
    assert result.evaluations[-1]["teacher"] == log[-1]["eval_teacher"]


def test_resume_in_the_middle_of_mean_teacher_is_exact(pseudo, tmp_path):
    detector = DetectorSettings.tiny()
    whole = train(MT, detector, pseudo, None, tmp_path / "whole", random_init=True, progress=False)
    first = train(MT, detector, pseudo, None, tmp_path / "split", random_init=True, stop_after=4, progress=False)
    assert first.iteration == 4 and read_checkpoint(tmp_path / "split" / "last.pth")["teacher"] is not None
    second = train(MT, detector, pseudo, None, tmp_path / "split", random_init=True, resume=True, progress=False)
    assert whole.finished and second.finished
    a, b = read_checkpoint(tmp_path / "whole" / "last.pth"), read_checkpoint(tmp_path / "split" / "last.pth")
    for part in ("model", "teacher"):
        assert [k for k in a[part] if not torch.equal(a[part][k], b[part][k])] == [], part
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    assert a["samplers"] == b["samplers"] == {"labelled": 6, "unlabelled": 6}
    log_a, log_b = read_log(tmp_path / "whole"), read_log(tmp_path / "split")
    assert [r["iteration"] for r in log_b] == list(range(1, 7))
    assert [(r["total_loss"], r.get("teacher_targets")) for r in log_a] == \
           [(r["total_loss"], r.get("teacher_targets")) for r in log_b]


def test_burn_in_equal_to_iterations_is_the_plain_training_loop(pseudo, tmp_path):
    """An oracle: the plain loop written out with the library's parts gives the same weights, bit for bit."""
    from hassod.train.data import IndexStream, collate
    from hassod.train.solver import WarmupSchedule, build_optimizer, build_scheduler, clip_gradients

    settings = replace(MT, burn_in=MT.iterations)
    detector = DetectorSettings.tiny()
    result = train(settings, detector, pseudo, None, tmp_path / "run", random_init=True, progress=False)
    assert "alpha_label" not in read_log(tmp_path / "run")[-1]
    assert read_checkpoint(result.final_checkpoint)["teacher"] is None

    torch.manual_seed(settings.seed)
    model = build_detector(detector, random_init=True).train()
    dataset = PseudoLabelDataset(pseudo, None, replace(settings.augmentation, max_size=detector.max_size),
                                 settings.seed)
    optimizer = build_optimizer(model, settings.base_lr(), settings.weight_decay, settings.momentum)
    scheduler = build_scheduler(optimizer, WarmupSchedule(settings.iterations, settings.warmup_iters,
                                                          settings.warmup_factor))
    for keys in IndexStream(len(dataset), settings.batch_size, settings.seed, 0, settings.iterations):
        batch = collate([dataset[key] for key in keys])
        losses = model(batch.images, batch.targets)
        optimizer.zero_grad()
        sum(losses.values()).backward()
        clip_gradients(model.parameters(), settings.clip_norm)
        optimizer.step()
        scheduler.step()
    trained = read_checkpoint(result.final_checkpoint)["model"]
    assert [k for k, v in model.state_dict().items() if not torch.equal(v, trained[k])] == []


def test_commands_train_with_burn_in_and_use_the_teacher(pseudo, tmp_path, offline_backbone):
    from click.testing import CliRunner

    from hassod.detect import Detector
    from retrieval.cli import app

    runner = CliRunner()
    run = tmp_path / "run"
    base = ["train", "--pseudo", str(pseudo), "--backbone", "tiny", "--random-init", "--batch-size", "2",
            "--iterations", "3", "--warmup", "1", "--device", "cpu", "--workers", "0", "--json"]
    too_long = runner.invoke(app, [*base, "--out", str(tmp_path / "x"), "--burn-in", "4"])
    assert too_long.exit_code == 2 and too_long.output.count("\n") == 1 and "--burn-in (4)" in too_long.output
    plain = runner.invoke(app, [*base, "--out", str(tmp_path / "plain")])
    trained = runner.invoke(app, [*base, "--out", str(run), "--burn-in", "2", "--teacher-thresh", "0.05",
                                  "--ema-keep", "0.5", "--mt-warmup", "1"])
    assert plain.exit_code == 0 and trained.exit_code == 0, trained.output
    assert [("alpha_label" in r) for r in read_log(run)] == [False, False, True]
    saved = read_checkpoint(run / "last.pth")["train_settings"]
    assert (saved["burn_in"], saved["ema_keep"], saved["teacher_thresh"], saved["mt_warmup_iters"]) == (2, 0.5, 0.05, 1)

    images = str(pseudo.parent / "images")
    outputs = {}
    for use in ("student", "teacher"):
        out = tmp_path / f"{use}.json"
        done = runner.invoke(app, ["detect", images, "--checkpoint", str(run / "model_final.pth"), "--use", use,
                                   "--out", str(out), "--device", "cpu", "--json"])
        assert done.exit_code == 0, done.output
        outputs[use] = json.loads(out.read_text())
    assert outputs["student"] != outputs["teacher"]  # other weights, other detections
    student = Detector(run / "model_final.pth", device="cpu")
    teacher = Detector(run / "model_final.pth", device="cpu", use="teacher")
    assert teacher.identity != student.identity and teacher.digest == student.digest

    no_teacher = runner.invoke(app, ["detect", images, "--checkpoint", str(tmp_path / "plain" / "model_final.pth"),
                                     "--use", "teacher", "--out", str(tmp_path / "d.json"), "--device", "cpu"])
    assert no_teacher.exit_code == 2 and no_teacher.output.count("\n") == 1 and "holds no teacher" in no_teacher.output
    refused = runner.invoke(app, ["eval", "--gt", str(pseudo), "--pred", str(tmp_path / "teacher.json"),
                                  "--use", "teacher"])
    assert refused.exit_code == 2 and "--use goes with --checkpoint" in refused.output
    evaluated = runner.invoke(app, ["eval", "--gt", str(pseudo), "--checkpoint", str(run / "model_final.pth"),
                                    "--use", "teacher", "--images", images, "--device", "cpu", "--json"])
    assert evaluated.exit_code == 0, evaluated.output
    assert 0.0 <= json.loads(evaluated.output.strip().splitlines()[-1])["bbox"]["AR@100"] <= 1.0

    index = tmp_path / "index"
    built = runner.invoke(app, ["index", "build", images, "--index", str(index), "--detector",
                                str(run / "model_final.pth"), "--use", "teacher", "--device", "cpu", "--json"])
    assert built.exit_code == 0, built.output
    from indexer.catalog import Catalog
    from indexer.index import Index

    with Catalog(Index(index).catalog_url) as catalog:
        assert catalog.get_config()["region_source"] == teacher.identity
    wrong = runner.invoke(app, ["index", "build", images, "--index", str(tmp_path / "i2"), "--use", "teacher"])
    assert wrong.exit_code == 2 and "--use goes with --detector" in wrong.output
