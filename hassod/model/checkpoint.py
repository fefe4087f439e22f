"""Detector checkpoints: one torch file holding weights, settings and the trainer's state.

Layout: ``{"format": "hassod-detector-v1", "model": state_dict, "settings":
asdict(settings), **extra}``; the trainer adds optimiser, scheduler,
iteration and RNG state as ``extra``, and after Mean Teacher the teacher's
weights as ``teacher`` (``model`` is always the student). Checkpoints are pickles: load only
files you trust (they may hold arbitrary trainer state, so they are read
with ``weights_only=False``).
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch

from hassod.errors import UserError
from hassod.runs import atomic_write
from hassod.model.detector import DetectorSettings, HierarchicalDetector, build_detector

CHECKPOINT_FORMAT = "hassod-detector-v1"


class CheckpointError(UserError, ValueError):
    """A checkpoint path is missing, unreadable, or not a hassod detector checkpoint."""


def save_checkpoint(path: str | os.PathLike, model: torch.nn.Module, settings: DetectorSettings, **extra: Any) -> Path:
    """Write ``model``'s weights, ``settings`` and ``extra`` to ``path`` atomically; returns the path.

    The file is written beside its destination and renamed into place, so an
    interrupted save never leaves a truncated checkpoint. A DDP-wrapped model
    is unwrapped (its ``module.`` prefix would break loading).
    """
    reserved = {"format", "model", "settings"} & set(extra)
    if reserved:
        raise ValueError(f"extra keys clash with the checkpoint layout: {', '.join(sorted(reserved))}")
    model = getattr(model, "module", model)
    path = Path(path)
    payload = {"format": CHECKPOINT_FORMAT, "model": model.state_dict(),
               "settings": dataclasses.asdict(settings), **extra}
    # Unbuffered: a buffered file would fail again on close, hiding the path.
    with atomic_write(path, binary=True, buffering=0) as file:
        sink = _WriteErrorKeeper(file, str(path))
        try:
            torch.save(payload, sink)
        except RuntimeError as exc:
            raise (sink.error or exc) from exc
    return path


class _WriteErrorKeeper:
    """A binary file for ``torch.save`` that keeps the OSError of a failed write.

    torch reports a failed write (a full disk) only as a RuntimeError such as
    "unexpected pos 704 vs 598"; the OSError kept here says what happened.
    """

    def __init__(self, file: Any, name: str):
        self.file, self.name, self.error = file, name, None

    def write(self, data: bytes) -> int:
        try:
            return self.file.write(data)
        except OSError as exc:
            self.error = OSError(exc.errno, exc.strerror, self.name)
            raise

    def flush(self) -> None:
        self.file.flush()


def read_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The checkpoint dict stored at ``path`` (tensors on ``map_location``).

    Raises:
        CheckpointError: the file is missing, unreadable, or not in the hassod detector format.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        data = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # noqa: BLE001 - unpickling raises many types
        raise CheckpointError(f"cannot read checkpoint {path}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != CHECKPOINT_FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise CheckpointError(
            f"{path} is not a hassod detector checkpoint (format {found!r}, expected {CHECKPOINT_FORMAT!r}); "
            "a detectron2 checkpoint of the reference release can be converted with `hassod convert`"
        )
    for key in ("model", "settings"):
        if not isinstance(data.get(key), dict):
            raise CheckpointError(f"{path} has no {key!r} dict")
    return data


WEIGHTS = ("student", "teacher")


def load_detector(path: str | os.PathLike, device: str | torch.device = "cpu", use: str = "student",
                  ) -> tuple[HierarchicalDetector, DetectorSettings]:
    """The detector saved at ``path``, weights loaded strictly, in eval mode on ``device``.

    use: "student" (the ``model`` weights, what training releases) or
    "teacher" (Mean Teacher's EMA, in checkpoints of runs that had that phase).
    """
    if use not in WEIGHTS:
        raise ValueError(f"use must be one of {', '.join(WEIGHTS)}, got {use!r}")
    data = read_checkpoint(path)
    weights = data["model"] if use == "student" else data.get("teacher")
    if not isinstance(weights, dict):
        raise CheckpointError(f"{path} holds no teacher: its run had no Mean Teacher phase (train with --burn-in "
                              "below --iterations); use the student")
    try:
        settings = DetectorSettings.from_dict(data["settings"])
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path} holds invalid detector settings: {exc}") from exc
    # Random init: every backbone weight is overwritten by the checkpoint's.
    model = build_detector(settings, random_init=True)
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit the model its settings describe: {exc}") from exc
    return model.to(device).eval(), settings
