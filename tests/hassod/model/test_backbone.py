"""Backbones: ResNet-50 from torchvision-layout weight files, EfficientNet-Lite0 offline, errors."""
from __future__ import annotations

import copy

import pytest
import torch
import torchvision

from hassod.features.weights import WeightsFormatError, WeightsNotFoundError
from hassod.model import DetectorSettings, build_detector
from hassod.model.backbone import build_backbone


@pytest.fixture(scope="module")
def resnet_file(tmp_path_factory):
    """A DINO-release-like file: a bare torchvision resnet50 state dict without ``fc``, random values."""
    torch.manual_seed(3)
    state = {k: v for k, v in torchvision.models.resnet50().state_dict().items() if not k.startswith("fc.")}
    for key, value in state.items():
        if value.is_floating_point():
            value.normal_()  # distinct from any fresh initialisation
    path = tmp_path_factory.mktemp("weights") / "dino_resnet50_pretrain.pth"
    torch.save(state, path)
    return path, state


def test_resnet50_loads_every_weight_from_the_file_and_runs(resnet_file):
    path, state = resnet_file
    model = build_detector(DetectorSettings(), backbone_weights=str(path))
    body = model.backbone.body.state_dict()
    assert set(body) == set(state)
    for key, value in state.items():
        assert torch.equal(body[key], value), key
    # Trainable BatchNorm in every stage (plain nn.BatchNorm2d, not frozen).
    norms = [m for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(norms) == 53 + 8 and all(p.requires_grad for m in norms for p in m.parameters())
    features = model.backbone(torch.rand(1, 3, 64, 96))
    assert {k: tuple(v.shape) for k, v in features.items()} == {
        "0": (1, 256, 16, 24), "1": (1, 256, 8, 12), "2": (1, 256, 4, 6), "3": (1, 256, 2, 3), "pool": (1, 256, 1, 2),
    }


def test_resnet50_accepts_wrapped_and_detectron2_layouts(resnet_file, tmp_path):
    path, state = resnet_file
    wrapped = {"teacher": {f"module.backbone.{k}": v for k, v in state.items()}}
    torch.save(wrapped, tmp_path / "ckpt.pth")
    body = build_backbone("resnet50", tmp_path / "ckpt.pth").body.state_dict()
    assert torch.equal(body["layer4.2.bn3.running_var"], state["layer4.2.bn3.running_var"])
    # detectron2 layout (FrozenBN: no num_batches_tracked).
    d2 = {"stem.conv1.weight": state["conv1.weight"]}
    d2.update({f"stem.conv1.norm.{f}": state[f"bn1.{f}"] for f in ("weight", "bias", "running_mean", "running_var")})
    for stage, blocks in zip(range(2, 6), (3, 4, 6, 3)):
        for b in range(blocks):
            tv = f"layer{stage - 1}.{b}"
            for i in (1, 2, 3):
                d2[f"res{stage}.{b}.conv{i}.weight"] = state[f"{tv}.conv{i}.weight"]
                for f in ("weight", "bias", "running_mean", "running_var"):
                    d2[f"res{stage}.{b}.conv{i}.norm.{f}"] = state[f"{tv}.bn{i}.{f}"]
            if b == 0:
                d2[f"res{stage}.0.shortcut.weight"] = state[f"{tv}.downsample.0.weight"]
                for f in ("weight", "bias", "running_mean", "running_var"):
                    d2[f"res{stage}.0.shortcut.norm.{f}"] = state[f"{tv}.downsample.1.{f}"]
    torch.save(d2, tmp_path / "d2.pth")
    body = build_backbone("resnet50", tmp_path / "d2.pth").body.state_dict()
    for key, value in state.items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(body[key], value), key


def test_resnet50_errors(resnet_file, tmp_path):
    with pytest.raises(ValueError, match="--backbone-weights"):
        build_detector(DetectorSettings())
    with pytest.raises(WeightsNotFoundError, match="not found"):
        build_backbone("resnet50", tmp_path / "nope.pth")
    (tmp_path / "bad.pth").write_bytes(b"garbage")
    with pytest.raises(WeightsFormatError, match="cannot read"):
        build_backbone("resnet50", tmp_path / "bad.pth")
    path, state = resnet_file
    partial = {k: v for k, v in state.items() if not k.startswith("layer4.")}
    torch.save(partial, tmp_path / "partial.pth")
    with pytest.raises(WeightsFormatError, match="missing keys: layer4"):
        build_backbone("resnet50", tmp_path / "partial.pth")
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "r18.pth")
    with pytest.raises(WeightsFormatError, match="wrong shape"):
        build_backbone("resnet50", tmp_path / "r18.pth")
    with pytest.raises(ValueError, match="always randomly"):
        build_backbone("tiny", path)


def test_efficientnet_backbone_uses_the_offline_weights():
    from hassod.features.efficientnet import build_efficientnet_lite0

    timm_net = build_efficientnet_lite0().net
    reference = timm_net.state_dict()
    model = build_detector(DetectorSettings(backbone="efficientnet_lite0"))
    trunk = model.backbone.state_dict()
    for key in ("conv_stem.weight", "blocks.6.0.conv_pwl.weight"):
        assert torch.equal(trunk[key], reference[key]), key
    # timm's fused BatchNormAct2d is split so SyncBatchNorm conversion keeps the activation.
    assert torch.equal(trunk["blocks.2.1.bn3.norm.running_mean"], reference["blocks.2.1.bn3.running_mean"])
    synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model.backbone))
    assert isinstance(synced.blocks[2][1].bn1.act[1], torch.nn.ReLU6)
    # Same trunk output as timm's network (eval mode: running statistics).
    x = torch.rand(1, 3, 64, 64)
    model.backbone.eval()
    timm_net.eval()
    with torch.no_grad():
        ours = model.backbone.blocks(model.backbone.bn1(model.backbone.conv_stem(x)))
        theirs = timm_net.blocks(timm_net.bn1(timm_net.conv_stem(x)))
    assert torch.allclose(ours, theirs, atol=1e-5)
    model.backbone.train()
    assert not any(k.startswith(("conv_head", "classifier")) for k in trunk)
    assert tuple(model.transform.image_mean) == (0.5, 0.5, 0.5)
    features = model.backbone(torch.rand(1, 3, 64, 64))
    assert [tuple(v.shape) for v in features.values()] == [(1, 256, 16, 16), (1, 256, 8, 8), (1, 256, 4, 4), (1, 256, 2, 2), (1, 256, 1, 1)]
