"""Weight-source resolution and checkpoint reading (hassod.features.weights)."""
from __future__ import annotations

import argparse
import datetime
import hashlib

import huggingface_hub.constants
import pytest
import torch

from hassod.features import weights as W


@pytest.fixture
def empty_hub_cache(monkeypatch, tmp_path):
    """An empty Hugging Face cache, so results do not depend on this machine's."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))


def _no_network(*args, **kwargs):
    raise AssertionError("the network must not be touched")


def test_offline_skips_hub_and_says_how_to_supply(monkeypatch, empty_hub_cache):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(W, "_probe_host", _no_network)
    search = W.WeightSearch("toy", hub_repo="timm/toy.dino", how_to_supply="Pass --weights PATH.")
    with pytest.raises(W.WeightsNotFoundError) as info:
        W.resolve_weights(search)
    message = str(info.value)
    assert "'toy'" in message
    assert "HF_HUB_OFFLINE" in message
    assert "Pass --weights PATH." in message


def test_unreachable_hub_is_reported_without_downloading(monkeypatch, empty_hub_cache):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(W, "_probe_host", lambda url, timeout: "huggingface.co: no route")
    calls = []
    real = huggingface_hub.hf_hub_download

    def spy(*args, **kwargs):
        calls.append(kwargs.get("local_files_only", False))
        return real(*args, **kwargs)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", spy)
    search = W.WeightSearch("toy", hub_repo="timm/toy.dino")
    with pytest.raises(W.WeightsNotFoundError, match="model hub unreachable .huggingface.co: no route"):
        W.resolve_weights(search)
    # Only cache look-ups (one per candidate file name), no network download.
    assert calls == [True] * len(W.HUB_FILENAMES)


def test_unreachable_probe_fails_fast_on_closed_port():
    # Port 1 on localhost refuses connections: the probe must say so, not hang.
    reason = W._probe_host("https://127.0.0.1:1", timeout=1.0)
    assert reason.startswith("127.0.0.1:")


def test_explicit_path_wins_and_missing_one_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setattr(W, "_probe_host", _no_network)
    path = tmp_path / "w.pth"
    torch.save({"a": torch.zeros(2)}, path)
    search = W.WeightSearch("toy", hub_repo="timm/toy", package_file=lambda: path)
    assert W.resolve_weights(search, path) == W.WeightSource(path, "file")
    with pytest.raises(W.WeightsNotFoundError, match="not found: .*nope.pth"):
        W.resolve_weights(search, tmp_path / "nope.pth")


def test_package_file_is_the_last_source(monkeypatch, tmp_path, empty_hub_cache):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = tmp_path / "shipped.pth"
    path.write_bytes(b"x")
    search = W.WeightSearch("toy", hub_repo="timm/toy", package_file=lambda: path)
    assert W.resolve_weights(search) == W.WeightSource(path, "package")

    def absent():
        raise ImportError("No module named 'toy_weights'")

    search = W.WeightSearch("toy", package_file=absent, how_to_supply="pip install toy-weights")
    with pytest.raises(W.WeightsNotFoundError, match="not installed .*toy_weights.*pip install toy-weights"):
        W.resolve_weights(search)


def test_weights_id_is_sha256_prefix(tmp_path):
    path = tmp_path / "w.bin"
    path.write_bytes(b"hassod" * 1000)
    assert W.file_weights_id(path) == hashlib.sha256(b"hassod" * 1000).hexdigest()[: W.WEIGHTS_ID_LENGTH]


def test_read_state_dict_selects_checkpoint_key_and_allows_dino_args(tmp_path):
    path = tmp_path / "ckpt.pth"
    weights = {"module.backbone.w": torch.arange(3.0)}
    torch.save({"teacher": weights, "args": argparse.Namespace(arch="vit_small"), "epoch": 3}, path)
    state = W.read_state_dict(path, checkpoint_keys=("teacher",))
    assert list(state) == ["module.backbone.w"]
    assert torch.equal(state["module.backbone.w"], torch.arange(3.0))


def test_read_state_dict_rejects_non_tensor_files(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([1, 2, 3], path)
    with pytest.raises(W.WeightsFormatError, match="not a state dict"):
        W.read_state_dict(path)


def test_unreadable_weight_files_are_one_line_errors(tmp_path):
    cases = {
        "notes.pth": (b"{not weights", "not a tensor-only PyTorch file (Unsupported operand 123)"),
        "broken.safetensors": (b"x" * 16, "SafetensorError: Error while deserializing header"),
    }
    for name, (data, reason) in cases.items():
        (tmp_path / name).write_bytes(data)
    torch.save({"when": datetime.date(2024, 1, 1)}, tmp_path / "objects.pth")
    cases["objects.pth"] = (None, "not a tensor-only PyTorch file (Unsupported global: GLOBAL datetime.date "
                                  "was not an allowed global by default)")
    for name, (_, reason) in cases.items():
        with pytest.raises(W.WeightsFormatError) as refused:
            W.read_state_dict(tmp_path / name)
        message = str(refused.value)
        # torch's own text is a page of advice to turn the safety check off: only the reason is kept.
        assert message.startswith(f"cannot read weight file {tmp_path / name}: {reason}") and "\n" not in message


def test_strip_prefixes_any_order():
    state = {"module.backbone.a": 1, "backbone.module.b": 2, "c": 3, "head.module.d": 4}
    assert W.strip_prefixes(state) == {"a": 1, "b": 2, "c": 3, "head.module.d": 4}


def test_load_strict_lists_missing_unexpected_and_shapes():
    module = torch.nn.Linear(3, 2)
    with pytest.raises(W.WeightsFormatError) as info:
        W.load_strict(module, {"weight": torch.zeros(2, 4), "extra": torch.zeros(1)}, "test.pth")
    message = str(info.value)
    assert "missing keys: bias" in message
    assert "unexpected keys: extra" in message
    assert "weight (2, 4) != (2, 3)" in message
    W.load_strict(module, {"weight": torch.ones(2, 3), "bias": torch.zeros(2)}, "ok.pth")
    assert torch.equal(module.weight, torch.ones(2, 3))
