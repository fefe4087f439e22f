"""The tiny detector end to end: losses, gradients, inference outputs, settings."""
from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from torchvision.models.detection.roi_heads import paste_masks_in_image

from hassod.model import DetectorSettings, HierarchicalDetector, build_detector, paste_masks

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
        # Masks stay box-relative; pasted, they are torchvision's pasted masks thresholded at 0.5.
        assert out["masks"].shape == (n, 1, 28, 28) and out["masks"].dtype == torch.float32
        assert out["masks"].min() >= 0.0 and out["masks"].max() <= 1.0
        pasted = paste_masks(out["masks"], out["boxes"], (height, width))
        assert pasted.shape == (n, height, width) and pasted.dtype == torch.bool
        assert torch.equal(pasted, paste_masks_in_image(out["masks"], out["boxes"], (height, width))[:, 0] >= 0.5)
        # Boxes are in the input image's pixels.
        assert out["boxes"][:, [0, 2]].max() <= width + 1e-3 and out["boxes"][:, [1, 3]].max() <= height + 1e-3
        assert out["boxes"].min() >= 0.0


def _random_boxes(generator: torch.Generator, count: int, height: int, width: int) -> torch.Tensor:
    """(count, 4) xyxy boxes that meet the image (as the model's, clipped to it), many past its borders, a quarter tiny."""
    size = torch.tensor([width, height], dtype=torch.float32)
    start = torch.rand((count, 2), generator=generator) * 1.3 * size - 0.15 * size
    extent = torch.rand((count, 2), generator=generator) ** 3 * 1.3 * size
    extent[: count // 4] = torch.rand((count // 4, 2), generator=generator) * 2  # under 2 px, down to 0
    start = torch.minimum(start, size - 1)
    return torch.cat([start, torch.maximum(start + extent, start).clamp(min=1)], dim=1)


def test_paste_masks_equals_torchvision_paste_thresholded():
    generator = torch.Generator().manual_seed(0)
    differing = true_pixels = 0
    for height, width in [(1, 1), (7, 300), (300, 5), (64, 64), (97, 131), (240, 320)]:
        probs = torch.rand((40, 1, 28, 28), generator=generator)
        boxes = _random_boxes(generator, 40, height, width)
        # Boxes on the edges and over every border; one the size of the image.
        boxes[:4] = torch.tensor([[0, 0, width, height], [0.0, 0, 3, 3], [width - 2, height - 2, width, height],
                                  [-5.0, -5, width + 5, height + 5]])
        expected = paste_masks_in_image(probs, boxes, (height, width))[:, 0] >= 0.5
        pasted = paste_masks(probs, boxes, (height, width))
        assert pasted.shape == expected.shape and pasted.dtype == torch.bool
        differing += int((pasted != expected).sum())
        true_pixels += int(expected.sum())
    # The same float32 operations as torchvision's: measured 0 differing pixels of ~150 000 True ones.
    assert true_pixels > 50_000 and differing <= 5
    # Probabilities exactly at the threshold are inside, as with ``>= 0.5``.
    half, box = torch.full((1, 1, 28, 28), 0.5), torch.tensor([[10.0, 10, 40, 40]])
    pasted = paste_masks(half, box, (50, 50))
    assert pasted.any() and torch.equal(pasted, paste_masks_in_image(half, box, (50, 50))[:, 0] >= 0.5)
    assert paste_masks(torch.zeros((0, 1, 28, 28)), torch.zeros((0, 4)), (5, 6)).shape == (0, 5, 6)
    with pytest.raises(ValueError, match="threshold"):
        paste_masks(probs, boxes, (height, width), threshold=0.0)


def test_transform_scales_boxes_leaves_masks_and_training_outputs_alone(tiny_model):
    result = [{"boxes": torch.tensor([[1.0, 2, 30, 40]]), "masks": torch.rand(1, 1, 28, 28)}]
    tiny_model.eval()
    scaled = tiny_model.transform.postprocess([dict(result[0])], [(64, 64)], [(128, 128)])
    assert torch.equal(scaled[0]["boxes"], result[0]["boxes"] * 2) and scaled[0]["masks"] is result[0]["masks"]
    tiny_model.train()
    assert tiny_model.transform.postprocess(result, [(64, 64)], [(128, 128)]) is result


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
