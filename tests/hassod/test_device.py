"""Device names: auto picks what is there, a device that is not there is a one-line error in every command."""
from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from hassod.device import DeviceError, resolve_device
from retrieval.cli import app


def test_names_are_checked():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device(None) == resolve_device("")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(DeviceError, match="unknown device 'gpu': use auto, cpu, cuda or cuda:N"):
        resolve_device("gpu")
    with pytest.raises(DeviceError, match="device 'mps' is not supported"):
        resolve_device("mps")
    # No machine has 99 GPUs: without CUDA or with fewer devices, the reason is given either way.
    with pytest.raises(DeviceError, match="'cuda:99' requested but (CUDA is not available|this machine has)"):
        resolve_device("cuda:99")


@pytest.mark.parametrize("command", [
    ["search", "--index", "{index}", "--query", "{image}"],
    ["serve", "--index", "{index}"],
    ["index", "build", "{image}", "--index", "{index}"],
    ["discover", "{image}", "--out", "{out}"],
])
def test_every_command_refuses_a_missing_device_in_one_line(command, tmp_path):
    image = tmp_path / "p.png"
    image.write_bytes(b"")  # never read: the device is checked first
    args = [a.format(index=tmp_path, image=image, out=tmp_path / "o.json") for a in command]
    result = CliRunner().invoke(app, [*args, "--device", "cuda:99"])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and result.output.startswith("error: device 'cuda:99' requested but")
