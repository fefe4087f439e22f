"""Choosing the torch device: CUDA when present unless the user says otherwise."""
from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import UserError

if TYPE_CHECKING:
    import torch


class DeviceError(UserError, ValueError):
    """A device that does not exist here (e.g. ``cuda`` on a machine without a GPU, or a typo)."""


def resolve_device(name: str | None = None) -> "torch.device":
    """``None`` or ``"auto"`` picks CUDA when available, else CPU; ``cpu``, ``cuda`` and ``cuda:N`` are checked.

    Raises:
        DeviceError: with a one-line reason, for a name that is not a device
            or a CUDA device this machine does not have.
    """
    import torch  # here, not at import: the CLI's error handling imports this module

    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DeviceError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise DeviceError(f"device {name!r} is not supported: use auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {name!r} requested but CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(f"device {name!r} requested but this machine has "
                              f"{torch.cuda.device_count()} CUDA device(s)")
    return device
