"""EfficientNet-Lite0: shipped ImageNet weights really load; multi-scale stride-8 features."""
from __future__ import annotations

import huggingface_hub.constants
import pytest
import skimage.data
import torch
import torch.nn.functional as F

from hassod.features import EfficientNetLite0, WeightsFormatError, build_backbone
from hassod.features import weights as W
from hassod.features.efficientnet import _package_weights_file, lukemelas_to_timm

CAT_CLASSES = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
COFFEE_CLASSES = {967, 968}  # espresso, cup


@pytest.fixture(scope="module")
def offline_lite0() -> EfficientNetLite0:
    """Built the way an offline machine builds it: hub skipped, weights from the package."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", "/nonexistent-hassod-test-cache")
        patch.setattr(W, "_probe_host", lambda *a, **k: pytest.fail("network touched while offline"))
        return build_backbone("efficientnet_lite0", device="cpu")


@pytest.fixture(scope="module")
def photos():
    return [skimage.data.chelsea(), skimage.data.coffee()]


def _passes_imagenet_check(logits: torch.Tensor) -> bool:
    top1_cat = int(logits[0].argmax()) in CAT_CLASSES
    top3_coffee = bool(COFFEE_CLASSES & set(logits[1].topk(3).indices.tolist()))
    return top1_cat and top3_coffee


def test_shipped_weights_classify_real_photos(offline_lite0, photos):
    assert offline_lite0.weights_id == W.file_weights_id(_package_weights_file())
    logits = offline_lite0.classify(photos, size=224)
    assert logits.shape == (2, 1000)
    assert int(logits[0].argmax()) in CAT_CLASSES
    assert COFFEE_CLASSES & set(logits[1].topk(3).indices.tolist())
    # Confident, not lucky: the cat classes hold most of the probability mass.
    assert logits[0].softmax(0)[sorted(CAT_CLASSES)].sum() > 0.8


def test_random_weights_fail_the_same_check(photos):
    torch.manual_seed(0)
    random = build_backbone("efficientnet_lite0", device="cpu", random_init=True)
    assert random.weights_id == "random"
    assert not _passes_imagenet_check(random.classify(photos, size=224))


def test_feature_grid_is_mean_of_per_scale_cosines(offline_lite0, photos):
    features = offline_lite0.extract(photos[:1], size=480)
    assert features.shape == (1, 472, 60, 60)
    assert offline_lite0.dim == 472 and offline_lite0.stage_dims == (40, 112, 320)
    # Channels-last memory: the merge takes each image's (h, w, C) view as is.
    assert features[0].permute(1, 2, 0).is_contiguous()
    torch.testing.assert_close(features.norm(dim=1), torch.ones(1, 60, 60), rtol=1e-5, atol=1e-5)

    with torch.inference_mode():
        stages = offline_lite0.stage_features(offline_lite0.prepare(photos[:1], size=480))
    assert [tuple(s.shape[-2:]) for s in stages] == [(60, 60), (30, 30), (15, 15)]
    per_scale = [F.normalize(F.interpolate(s, size=(60, 60), mode="bilinear", align_corners=False), dim=1) for s in stages]
    # Cosine between two grid cells (cat's face vs. a background corner).
    a, b = (20, 30), (2, 57)
    expected = sum(float((s[0, :, a[0], a[1]] * s[0, :, b[0], b[1]]).sum()) for s in per_scale) / 3
    got = float((features[0, :, a[0], a[1]] * features[0, :, b[0], b[1]]).sum())
    assert got == pytest.approx(expected, abs=1e-5)


def test_odd_sizes_round_the_grid_up(offline_lite0, photos):
    assert offline_lite0.grid_shape(100, 140) == (13, 18)
    assert offline_lite0.extract(photos[1:], size=(100, 140)).shape == (1, 472, 13, 18)


def test_timm_layout_file_loads_identically(offline_lite0, photos, tmp_path):
    path = tmp_path / "timm_layout.pth"
    torch.save({"state_dict": offline_lite0.net.state_dict()}, path)
    again = build_backbone("efficientnet_lite0", weights=path, device="cpu")
    assert again.weights_id == W.file_weights_id(path) != offline_lite0.weights_id
    x = offline_lite0.prepare(photos[1:], size=64)
    with torch.inference_mode():
        assert torch.equal(again(x), offline_lite0(x))


def test_lukemelas_key_mapping(offline_lite0):
    net = offline_lite0.net
    source = {
        "_conv_stem.weight": 0,
        "_blocks.0._depthwise_conv.weight": 1,
        "_blocks.0._project_conv.weight": 2,
        "_blocks.1._expand_conv.weight": 3,
        "_blocks.4._bn1.running_var": 4,
        "_blocks.15._project_conv.weight": 5,
        "_bn1.bias": 6,
        "_fc.weight": 7,
    }
    assert lukemelas_to_timm(source, net) == {
        "conv_stem.weight": 0,
        "blocks.0.0.conv_dw.weight": 1,
        "blocks.0.0.conv_pw.weight": 2,
        "blocks.1.0.conv_pw.weight": 3,
        "blocks.2.1.bn2.running_var": 4,
        "blocks.6.0.conv_pwl.weight": 5,
        "bn2.bias": 6,
        "classifier.weight": 7,
    }
    with pytest.raises(WeightsFormatError, match="_blocks.16._project_conv.weight"):
        lukemelas_to_timm({"_blocks.16._project_conv.weight": 0}, net)


def test_frozen_and_eval(offline_lite0):
    assert offline_lite0.train().training is False
    assert not offline_lite0.net.bn1.training
    assert not any(p.requires_grad for p in offline_lite0.parameters())
    assert offline_lite0.patch_size == 8 and offline_lite0.default_thresholds == (0.6, 0.5, 0.4)
    assert (offline_lite0.mean, offline_lite0.std) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
