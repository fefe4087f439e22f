"""Choosing the torch device: CUDA when present unless the user says otherwise."""
from __future__ import annotations

import torch


def resolve_device(name: str | None = None) -> torch.device:
    """``None`` or ``"auto"`` picks CUDA when available, else CPU; other names are checked."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available on this machine")
    return device
