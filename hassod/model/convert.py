"""Converting reference checkpoints into this model's key layout (the library behind ``hassod convert``).

Two sources:

- the reference release's detectron2 checkpoint of Cascade Mask R-CNN R50-FPN
  with the level head (:func:`convert_detectron2`), and
- DINO ResNet-50 weights, in torchvision layout (``layer1.0.conv1.weight``) or
  detectron2 layout (``res2.0.conv1.weight``, ``stem.conv1.norm.weight``)
  (:func:`convert_dino_resnet`).

The facts of both layouts the mapping relies on (strides, norm names, the
class order, input colour, what is not converted) are in docs/design.md §5.
"""
from __future__ import annotations

import os
import pickle
import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from hassod.features.weights import WeightsFormatError, strip_prefixes
from hassod.model.backbone import IMAGENET_MEAN, IMAGENET_STD, RESNET_PREFIXES
from hassod.model.checkpoint import CHECKPOINT_FORMAT

# Mean Teacher checkpoints of the reference hold both models; the teacher is the one evaluated.
TEACHER_PREFIX = "modelTeacher."
STUDENT_PREFIX = "modelStudent."

_BN_FIELDS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _as_tensors(state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Tensors of ``state`` (detectron2 .pkl files store numpy arrays); other values are dropped."""
    out = {}
    for key, value in state.items():
        if isinstance(value, np.ndarray):
            value = torch.from_numpy(np.ascontiguousarray(value))
        if isinstance(value, torch.Tensor):
            out[key] = value
    return out


def _resnet_key_d2_to_tv(key: str) -> str:
    """One detectron2 ResNet key (no ``backbone.bottom_up.``) → torchvision resnet key."""
    match = re.fullmatch(r"stem\.conv1\.(weight)", key)
    if match:
        return "conv1.weight"
    match = re.fullmatch(r"stem\.conv1\.norm\.(\w+)", key)
    if match:
        return f"bn1.{match[1]}"
    match = re.fullmatch(r"res([2-5])\.(\d+)\.(conv[123]|shortcut)(\.norm)?\.(\w+)", key)
    if not match:
        raise WeightsFormatError(f"unexpected key in a detectron2 ResNet state dict: {key}")
    stage, block, conv, norm, field = match.groups()
    prefix = f"layer{int(stage) - 1}.{block}"
    if conv == "shortcut":
        return f"{prefix}.downsample.{1 if norm else 0}.{field}"
    return f"{prefix}.{conv.replace('conv', 'bn') if norm else conv}.{field}"


def _fill_batch_counts(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Add ``num_batches_tracked`` = 0 beside every ``running_mean`` lacking one (FrozenBN has none)."""
    for key in [k for k in state if k.endswith(".running_mean")]:
        count = key[: -len("running_mean")] + "num_batches_tracked"
        state.setdefault(count, torch.tensor(0, dtype=torch.long))
    return state


def convert_dino_resnet(state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """DINO ResNet-50 weights (torchvision or detectron2 layout, possibly wrapped) → torchvision trunk keys.

    Wrapper prefixes (``module.``, ``backbone.``, ``model.``, ``bottom_up.``)
    are stripped; the classifier ``fc.*`` and DINO's projection ``head.*`` are
    dropped. Values are unchanged.
    """
    state = strip_prefixes(_as_tensors(state), RESNET_PREFIXES + ("bottom_up.",))
    state = {k: v for k, v in state.items() if not k.startswith(("fc.", "head."))}
    if not state:
        raise WeightsFormatError("no ResNet weights found in the given state dict")
    if "stem.conv1.weight" in state:
        state = {_resnet_key_d2_to_tv(k): v for k, v in state.items()}
    return _fill_batch_counts(state)


def _conv_norm_key(prefix: str, rest: str) -> str:
    """``weight``/``bias`` of a conv → ``prefix.0.*``; ``norm.<f>`` → ``prefix.1.<f>`` (Conv2dNormActivation)."""
    if rest.startswith("norm."):
        return f"{prefix}.1.{rest[len('norm.'):]}"
    return f"{prefix}.0.{rest}"


_RPN = {"conv": "conv.0.0", "objectness_logits": "cls_logits", "anchor_deltas": "bbox_pred"}
_PREDICTOR = {"cls_score": "cls_score", "bbox_pred": "bbox_pred", "level_predictor": "level_predictor"}


def _detectron2_key(key: str) -> str | None:
    """One detectron2 model key → this model's key; ``None`` for buffers that are not converted."""
    if key in ("pixel_mean", "pixel_std") or "anchor_generator" in key:
        return None
    if key.startswith("backbone.bottom_up."):
        return "backbone.body." + _resnet_key_d2_to_tv(key[len("backbone.bottom_up."):])
    rules = (
        (r"backbone\.fpn_lateral([2-5])\.(.+)", lambda m: _conv_norm_key(f"backbone.fpn.inner_blocks.{int(m[1]) - 2}", m[2])),
        (r"backbone\.fpn_output([2-5])\.(.+)", lambda m: _conv_norm_key(f"backbone.fpn.layer_blocks.{int(m[1]) - 2}", m[2])),
        (r"proposal_generator\.rpn_head\.(conv|objectness_logits|anchor_deltas)\.(weight|bias)",
         lambda m: f"rpn.head.{_RPN[m[1]]}.{m[2]}"),
        (r"roi_heads\.box_head\.(\d+)\.fc([12])\.(weight|bias)",
         lambda m: f"roi_heads.stages.{m[1]}.box_head.fc{5 + int(m[2])}.{m[3]}"),
        (r"roi_heads\.box_predictor\.(\d+)\.(cls_score|bbox_pred|level_predictor)\.(weight|bias)",
         lambda m: f"roi_heads.stages.{m[1]}.{_PREDICTOR[m[2]]}.{m[3]}"),
        (r"roi_heads\.mask_head\.mask_fcn([1-4])\.(weight|bias)", lambda m: f"roi_heads.mask_head.{int(m[1]) - 1}.0.{m[2]}"),
        (r"roi_heads\.mask_head\.deconv\.(weight|bias)", lambda m: f"roi_heads.mask_predictor.conv5_mask.{m[1]}"),
        (r"roi_heads\.mask_head\.predictor\.(weight|bias)", lambda m: f"roi_heads.mask_predictor.mask_fcn_logits.{m[1]}"),
    )
    for pattern, target in rules:
        match = re.fullmatch(pattern, key)
        if match:
            return target(match)
    raise WeightsFormatError(f"no mapping for detectron2 key {key!r}")


def _select_model(state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The model state inside a detectron2 checkpoint dict; the teacher of a Mean Teacher pair."""
    if isinstance(state.get("model"), Mapping):
        state = state["model"]
    state = _as_tensors(state)
    if any(k.startswith(TEACHER_PREFIX) for k in state):
        state = {k[len(TEACHER_PREFIX):]: v for k, v in state.items() if k.startswith(TEACHER_PREFIX)}
    state = {k: v for k, v in state.items() if not k.startswith(STUDENT_PREFIX)}
    return strip_prefixes(state, ("module.",))


def _match_input_normalisation(conv1: torch.Tensor, mean: torch.Tensor | None, std: torch.Tensor | None) -> torch.Tensor:
    """First-conv weights (64, 3, 7, 7) adapted from detectron2's input scaling to this model's.

    detectron2 feeds (255·x − M)/S per channel in the checkpoint's channel
    order; this model feeds (x − m)/s in RGB. With M = 255·m the two differ
    by the factor 255·s/S per channel (and the order).
    """
    if mean is None:
        return conv1  # the reference's own release: RGB, ImageNet mean/std
    mean = mean.flatten().double()
    std = (std.flatten().double() if std is not None else torch.ones(3, dtype=torch.double))
    ours_mean = torch.tensor(IMAGENET_MEAN, dtype=torch.double) * 255
    ours_std = torch.tensor(IMAGENET_STD, dtype=torch.double) * 255
    if torch.allclose(mean, ours_mean, atol=0.5):
        order = [0, 1, 2]
    elif torch.allclose(mean, ours_mean.flip(0), atol=0.5):
        order = [2, 1, 0]  # BGR checkpoint: its channel 0 is blue
        std = std.flip(0)
    else:
        raise WeightsFormatError(
            f"checkpoint pixel_mean {mean.tolist()} is not the ImageNet mean in RGB or BGR order; "
            "it cannot be folded into this model's normalisation"
        )
    weight = conv1[:, order]
    scale = (ours_std / std).to(conv1.dtype)
    return weight * scale[None, :, None, None]


def convert_detectron2(state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """A detectron2 state dict of the reference release → this model's state dict.

    ``state`` may be the bare model state or a checkpoint with a ``"model"``
    entry (``.pth`` or detectron2 ``.pkl``, numpy values allowed). Every key is
    mapped or refused; the result has ``num_batches_tracked`` filled in.
    """
    model = _select_model(state)
    out: dict[str, torch.Tensor] = {}
    for key, value in model.items():
        target = _detectron2_key(key)
        if target is None:
            continue
        if target in out:
            raise WeightsFormatError(f"two detectron2 keys map onto {target}")
        out[target] = value
    conv1 = "backbone.body.conv1.weight"
    if conv1 in out:
        out[conv1] = _match_input_normalisation(out[conv1], model.get("pixel_mean"), model.get("pixel_std"))
    return _fill_batch_counts(out)


def settings_for(state: Mapping[str, torch.Tensor]):
    """Default :class:`DetectorSettings` adjusted to a converted state (FPN with or without norms)."""
    from hassod.model.detector import DetectorSettings

    has_fpn_norm = any(k.startswith("backbone.fpn.inner_blocks.0.1.") for k in state)
    return DetectorSettings(fpn_norm=has_fpn_norm)


def read_detectron2_file(path: str | os.PathLike) -> dict[str, Any]:
    """The dict stored in a detectron2 ``.pkl`` (pickle of numpy arrays) or ``.pth`` file."""
    path = Path(path)
    if not path.is_file():
        raise WeightsFormatError(f"checkpoint file not found: {path}")
    try:
        if path.suffix == ".pkl":
            with open(path, "rb") as handle:
                data = pickle.load(handle, encoding="latin1")
        else:
            data = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - many unpickling errors
        raise WeightsFormatError(f"cannot read {path}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(data, Mapping):
        raise WeightsFormatError(f"{path} holds a {type(data).__name__}, not a state dict")
    if data.get("format") == CHECKPOINT_FORMAT:
        raise WeightsFormatError(f"{path} is already a hassod detector checkpoint: use it as it is")
    return dict(data)


def convert_checkpoint(path: str | os.PathLike) -> tuple[torch.nn.Module, Any, int]:
    """The hassod detector a detectron2 checkpoint file holds: (model, its settings, tensors converted).

    Raises:
        WeightsFormatError: the file cannot be read, or its weights do not fit the detector.
    """
    from hassod.model.detector import build_detector

    state = convert_detectron2(read_detectron2_file(path))
    settings = settings_for(state)
    model = build_detector(settings, random_init=True)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise WeightsFormatError(str(exc)) from exc
    return model, settings, len(state)
