"""DINO ViT backbones: last-block keys on the patch grid, DINO checkpoint loading."""
from __future__ import annotations

import huggingface_hub.constants
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hassod.features import BACKBONE_NAMES, DinoViT, WeightsFormatError, WeightsNotFoundError, build_backbone
from hassod.features import weights as W


@pytest.fixture(scope="module")
def vits16() -> DinoViT:
    torch.manual_seed(0)
    return build_backbone("dino_vits16", device="cpu", random_init=True)


@pytest.fixture(scope="module")
def small_batch() -> torch.Tensor:
    """Non-square and small: checks the grid's row/column order and keeps tests fast."""
    generator = torch.Generator().manual_seed(1)
    return torch.randn(2, 3, 96, 160, generator=generator)


def _manual_keys(backbone: DinoViT, x: torch.Tensor) -> torch.Tensor:
    """Keys from timm's own full forward: input of the last block → norm1 → qkv weights."""
    last = backbone.vit.blocks[-1]
    captured = {}
    handle = last.register_forward_pre_hook(lambda module, args: captured.setdefault("x", args[0]))
    with torch.no_grad():
        backbone.vit.forward_features(x)
    handle.remove()
    tokens = captured["x"]
    normed = F.layer_norm(tokens, (backbone.dim,), last.norm1.weight, last.norm1.bias, last.norm1.eps)
    qkv = normed @ last.attn.qkv.weight.T + last.attn.qkv.bias
    keys = qkv[:, 1:, backbone.dim: 2 * backbone.dim]  # drop CLS; q | k | v along channels
    rows, cols = x.shape[-2] // backbone.patch_size, x.shape[-1] // backbone.patch_size
    return keys.permute(0, 2, 1).reshape(x.shape[0], backbone.dim, rows, cols)


def test_names_and_attributes(vits16):
    assert BACKBONE_NAMES[:4] == ("dino_vitb8", "dino_vits8", "dino_vitb16", "dino_vits16")
    assert (vits16.name, vits16.dim, vits16.patch_size, vits16.weights_id) == ("dino_vits16", 384, 16, "random")
    assert vits16.default_thresholds == (0.4, 0.2, 0.1)
    assert not vits16.training
    assert vits16.train().training is False  # frozen: stays in eval mode


def test_paper_input_size_gives_30x30_grid(vits16):
    x = torch.randn(2, 3, 480, 480, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = vits16(x)
    assert out.shape == (2, 384, 30, 30)
    assert out.dtype == torch.float32
    # Keys of random weights are not degenerate: patches differ from each other.
    assert out.flatten(2).std(dim=2).min() > 1e-3


def test_keys_match_manual_computation_on_non_square_grid(vits16, small_batch):
    with torch.no_grad():
        out = vits16(small_batch)
        single = vits16(small_batch[1:])
    assert out.shape == (2, 384, 6, 10)
    torch.testing.assert_close(out, _manual_keys(vits16, small_batch), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out[1:], single, rtol=1e-4, atol=1e-4)


def test_dino_checkpoint_roundtrip(vits16, small_batch, tmp_path):
    # DINO teacher checkpoint layout: DDP prefix, projection head, extra entries.
    teacher = {f"module.backbone.{k}": v.clone() for k, v in vits16.vit.state_dict().items()}
    teacher["module.head.mlp.0.weight"] = torch.zeros(8, 384)
    teacher["module.head.last_layer.weight_g"] = torch.ones(8, 1)
    path = tmp_path / "dino_teacher.pth"
    torch.save({"teacher": teacher, "student": {"x": torch.zeros(1)}, "epoch": 100}, path)

    loaded = build_backbone("dino_vits16", weights=path, device="cpu")
    assert loaded.weights_id == W.file_weights_id(path)
    assert not any(p.requires_grad for p in loaded.parameters())
    with torch.no_grad():
        torch.testing.assert_close(loaded(small_batch), vits16(small_batch), rtol=0, atol=0)


def test_official_plain_layout_loads(vits16, tmp_path):
    path = tmp_path / "dino_deitsmall16_pretrain.pth"
    torch.save(vits16.vit.state_dict(), path)
    loaded = build_backbone("dino_vits16", weights=path, device="cpu")
    assert torch.equal(loaded.vit.blocks[-1].attn.qkv.weight, vits16.vit.blocks[-1].attn.qkv.weight)


def test_wrong_variant_fails_clearly(vits16, tmp_path):
    path = tmp_path / "vits16.pth"
    state = dict(vits16.vit.state_dict())
    state["blocks.99.attn.qkv.weight"] = torch.zeros(1)
    del state["norm.bias"]
    torch.save(state, path)
    with pytest.raises(WeightsFormatError) as info:
        build_backbone("dino_vits16", weights=path, device="cpu")
    assert "missing keys: norm.bias" in str(info.value)
    assert "unexpected keys: blocks.99.attn.qkv.weight" in str(info.value)
    # A ViT-S/16 file offered as ViT-S/8: the patch embedding shapes differ.
    torch.save(vits16.vit.state_dict(), path)
    with pytest.raises(WeightsFormatError, match=r"patch_embed.proj.weight \(384, 3, 16, 16\) != \(384, 3, 8, 8\)"):
        build_backbone("dino_vits8", weights=path, device="cpu")


def test_no_weights_offline_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(W, "_probe_host", lambda *a, **k: pytest.fail("network touched while offline"))
    with pytest.raises(WeightsNotFoundError) as info:
        build_backbone("dino_vitb8", device="cpu")
    message = str(info.value)
    assert "HF_HUB_OFFLINE" in message
    assert "--weights PATH" in message
    assert "dino_vitbase8_pretrain.pth" in message
    assert "https://dl.fbaipublicfiles.com/dino/dino_vitbase8_pretrain/dino_vitbase8_pretrain.pth" in message


def test_build_argument_errors():
    with pytest.raises(ValueError, match="unknown backbone 'vit_huge'"):
        build_backbone("vit_huge")
    with pytest.raises(ValueError, match="not both"):
        build_backbone("dino_vits16", weights="x.pth", random_init=True)


def test_extract_prepares_and_runs_without_grad(vits16):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (300, 500, 3), dtype=np.uint8), rng.integers(0, 256, (480, 480, 3), dtype=np.uint8)]
    x = vits16.prepare(images, size=(64, 96))
    assert x.shape == (2, 3, 64, 96)
    # The 480x480 image is only normalised (resize to the same size is the identity).
    expected = (torch.from_numpy(images[1]).permute(2, 0, 1).float() / 255 - torch.tensor(vits16.mean)[:, None, None]) / torch.tensor(vits16.std)[:, None, None]
    torch.testing.assert_close(vits16.prepare(images[1:])[0], expected, rtol=1e-5, atol=1e-5)
    features = vits16.extract(images, size=(64, 96))
    assert features.shape == (2, 384, 4, 6)
    assert all(f.permute(1, 2, 0).is_contiguous() for f in features)  # channels-last, as the merge reads it
    assert vits16.grid_shape(64, 96) == (4, 6)
    assert not features.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(features, vits16(x), rtol=1e-5, atol=1e-5)
