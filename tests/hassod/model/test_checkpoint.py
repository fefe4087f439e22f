"""Checkpoint round trip and clear errors for wrong files."""
from __future__ import annotations

import errno

import pytest
import torch

from retrieval.cli.console import storage_error
from hassod.model import CheckpointError, DetectorSettings, load_detector, read_checkpoint, save_checkpoint

from tests.conftest import file_size_limit
from .conftest import scene_sample


def test_round_trip_gives_identical_outputs(tiny_model, tiny_settings, tmp_path):
    image, target = scene_sample(5)
    # One training step so BatchNorm statistics and weights differ from initialisation.
    optimiser = torch.optim.SGD(tiny_model.parameters(), lr=0.01)
    sum(tiny_model([image], [target]).values()).backward()
    optimiser.step()
    tiny_model.eval()
    with torch.no_grad():
        before = tiny_model([image])[0]
    path = save_checkpoint(tmp_path / "run" / "ckpt.pth", tiny_model, tiny_settings, iteration=7, note="x")
    assert [p.name for p in path.parent.iterdir()] == ["ckpt.pth"]  # no temp file left behind
    data = read_checkpoint(path)
    assert data["format"] == "hassod-detector-v1" and data["iteration"] == 7 and data["note"] == "x"
    assert DetectorSettings.from_dict(data["settings"]) == tiny_settings
    model, settings = load_detector(path)
    assert settings == tiny_settings and not model.training
    with torch.no_grad():
        after = model([image])[0]
    assert len(before["boxes"]) > 0
    for key in before:
        assert torch.equal(before[key], after[key]), key


def test_checkpoint_errors(tmp_path, tiny_model, tiny_settings):
    with pytest.raises(CheckpointError, match="not found"):
        read_checkpoint(tmp_path / "missing.pth")
    (tmp_path / "text.pth").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        read_checkpoint(tmp_path / "text.pth")
    torch.save({"model": {}}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="not a hassod detector checkpoint"):
        load_detector(tmp_path / "other.pth")
    with pytest.raises(ValueError, match="clash"):
        save_checkpoint(tmp_path / "c.pth", tiny_model, tiny_settings, format="x")
    path = save_checkpoint(tmp_path / "c.pth", tiny_model, tiny_settings)
    data = torch.load(path, weights_only=False)
    data["model"].pop("roi_heads.stages.0.level_predictor.weight")
    torch.save(data, path)
    with pytest.raises(CheckpointError, match="level_predictor"):
        load_detector(path)


def test_a_refused_write_names_the_file_and_keeps_the_old_checkpoint(tmp_path, tiny_model, tiny_settings):
    path = save_checkpoint(tmp_path / "ckpt.pth", tiny_model, tiny_settings, iteration=1)
    size = path.stat().st_size
    with file_size_limit(size // 2), pytest.raises(OSError) as refused:
        save_checkpoint(path, tiny_model, tiny_settings, iteration=2)
    # torch alone reports only "unexpected pos ..."; the cause and the destination are kept.
    assert refused.value.errno == errno.EFBIG and refused.value.filename == str(path)
    assert storage_error(refused.value).startswith(f"file too large: {path}; finished work is saved")
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pth"]  # no temp file left behind
    assert path.stat().st_size == size and read_checkpoint(path)["iteration"] == 1
