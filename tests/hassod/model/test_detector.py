"""The tiny detector end to end: losses, gradients, inference outputs, settings."""
from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from hassod.model import DetectorSettings, HierarchicalDetector, build_detector

from .conftest import empty_sample, scene_sample

STAGE_LOSSES = [f"loss_{name}_stage{k}" for k in range(3) for name in ("cls", "box_reg", "level")]
EXPECTED_LOSSES = set(STAGE_LOSSES) | {"loss_mask", "loss_objectness", "loss_rpn_box_reg"}


def test_training_returns_every_finite_loss_and_gradients_reach_every_head(tiny_model, batch):
    images, targets = batch
    losses = tiny_model(images, targets)
    assert set(losses) == EXPECTED_LOSSES
    for name, value in losses.items():
        assert value.dim() == 0 and math.isfinite(value.item()), name
        assert value.item() >= 0.0, name
    # Untrained: the fg/bg classifier starts at log 2, the mask BCE near log 2.
    for k in range(3):
        assert 0.1 < losses[f"loss_cls_stage{k}"].item() < 0.8
        assert losses[f"loss_level_stage{k}"].item() > 0.0  # fg RoIs exist in every stage (gt boxes are RoIs)
        assert losses[f"loss_box_reg_stage{k}"].item() > 0.0
    assert losses["loss_mask"].item() == pytest.approx(math.log(2), abs=0.05)
    sum(losses.values()).backward()
    parts = ["backbone.", "rpn.head.", "roi_heads.mask_head.", "roi_heads.mask_predictor."]
    for k in range(3):
        parts += [f"roi_heads.stages.{k}.{m}." for m in ("box_head", "cls_score", "bbox_pred", "level_predictor")]
    grads = {p: 0.0 for p in parts}
    for name, param in tiny_model.named_parameters():
        for prefix in parts:
            if name.startswith(prefix) and param.grad is not None:
                grads[prefix] += param.grad.abs().sum().item()
    assert all(value > 0 for value in grads.values()), grads


def test_images_without_pseudo_labels_train(tiny_model):
    image, target = empty_sample()
    losses = tiny_model([image], [target])
    assert set(losses) == EXPECTED_LOSSES
    # No pseudo-label: nothing is foreground and DropLoss drops every RoI's classification loss.
    for k in range(3):
        assert losses[f"loss_cls_stage{k}"].item() == 0.0
        assert losses[f"loss_box_reg_stage{k}"].item() == 0.0
        assert losses[f"loss_level_stage{k}"].item() == 0.0
    assert losses["loss_mask"].item() == 0.0
    assert losses["loss_objectness"].item() > 0.0  # the RPN still learns background
    sum(losses.values()).backward()
    # Without DropLoss every RoI is a background example with a classification loss.
    torch.manual_seed(0)
    plain = build_detector(dataclasses.replace(DetectorSettings.tiny(), drop_loss_iou=None))
    assert all(plain([image], [target])[f"loss_cls_stage{k}"].item() > 0.1 for k in range(3))


def test_training_needs_levels(tiny_model):
    image, target = scene_sample(0)
    del target["levels"]
    with pytest.raises(ValueError, match="levels"):
        tiny_model([image], [target])


def test_inference_outputs(tiny_model, tiny_settings):
    images = [scene_sample(3)[0], empty_sample((90, 70))[0]]
    tiny_model.eval()
    with torch.no_grad():
        outputs = tiny_model(images)
    assert len(outputs) == 2
    for image, out in zip(images, outputs):
        height, width = image.shape[-2:]
        n = len(out["boxes"])
        assert 0 < n <= tiny_settings.detections_per_img
        assert set(out) == {"boxes", "scores", "labels", "levels", "level_scores", "masks"}
        assert out["boxes"].shape == (n, 4) and out["boxes"].dtype == torch.float32
        assert out["scores"].shape == (n,) and bool((out["scores"][:-1] >= out["scores"][1:]).all())
        assert out["labels"].dtype == torch.int64 and bool((out["labels"] == 1).all())
        assert out["levels"].dtype == torch.int64 and set(out["levels"].tolist()) <= {0, 1, 2}
        assert out["level_scores"].shape == (n, 3) and out["level_scores"].dtype == torch.float32
        assert torch.allclose(out["level_scores"].sum(dim=1), torch.ones(n), atol=1e-5)
        assert torch.equal(out["levels"], out["level_scores"].argmax(dim=1))
        assert out["masks"].shape == (n, 1, height, width) and out["masks"].dtype == torch.float32
        assert out["masks"].min() >= 0.0 and out["masks"].max() <= 1.0
        # Boxes are in the input image's pixels.
        assert out["boxes"][:, [0, 2]].max() <= width + 1e-3 and out["boxes"][:, [1, 3]].max() <= height + 1e-3
        assert out["boxes"].min() >= 0.0


def test_detections_per_image_caps_the_output():
    torch.manual_seed(0)
    settings = dataclasses.replace(DetectorSettings.tiny(), detections_per_img=7)
    model = build_detector(settings).eval()
    with torch.no_grad():
        out = model([scene_sample(4)[0]])[0]
    assert len(out["boxes"]) == 7 and out["masks"].shape[0] == 7


def test_transform_uses_test_size_in_eval_and_train_sizes_in_training(tiny_model, tiny_settings):
    image = torch.rand(3, 100, 120)
    tiny_model.eval()
    images, _ = tiny_model.transform([image])
    assert images.image_sizes[0] == (128, 153)  # shortest edge → min_size_test (128)
    assert images.tensors.shape[-2:] == (128, 160)  # padded to a multiple of 32
    tiny_model.train()
    torch.manual_seed(0)
    heights = {tiny_model.transform([image])[0].image_sizes[0][0] for _ in range(30)}
    assert heights == set(tiny_settings.min_size_train)


def test_settings_are_json_serialisable_and_round_trip():
    for settings in (DetectorSettings(), DetectorSettings.tiny()):
        text = json.dumps(dataclasses.asdict(settings))
        assert DetectorSettings.from_dict(json.loads(text)) == settings
    defaults = DetectorSettings()
    assert defaults.cascade_ious == (0.5, 0.6, 0.7)
    assert defaults.cascade_box_weights[2] == (30.0, 30.0, 15.0, 15.0)
    assert (defaults.nms_thresh, defaults.detections_per_img, defaults.drop_loss_iou) == (0.5, 1000, 0.01)
    with pytest.raises(ValueError, match="unknown detector settings"):
        DetectorSettings.from_dict({"backbone": "tiny", "colour": 3})
    with pytest.raises(ValueError, match="unknown backbone"):
        DetectorSettings(backbone="vgg")


def test_model_is_a_generalized_rcnn_with_three_stages(tiny_model):
    from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN

    assert isinstance(tiny_model, HierarchicalDetector) and isinstance(tiny_model, GeneralizedRCNN)
    stages = tiny_model.roi_heads.stages
    assert len(stages) == 3
    assert [s.box_coder.weights for s in stages] == [(10.0, 10.0, 5.0, 5.0), (20.0, 20.0, 10.0, 10.0), (30.0, 30.0, 15.0, 15.0)]
    assert all(s.cls_score.out_features == 2 and s.bbox_pred.out_features == 4 and s.level_predictor.out_features == 3 for s in stages)
    assert tiny_model.rpn.head.cls_logits.out_channels == 3  # one size × three ratios per level
