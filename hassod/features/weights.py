"""Finding and reading backbone weight files (docs/design.md §3).

A backbone's weights come from, in order: an explicit path given by the user;
the model hub (through ``huggingface_hub``, which is what timm uses) when the
machine can reach it; a file shipped inside an installed Python package. When
none of these yields a file, :class:`WeightsNotFoundError` says how to supply
one. Nothing here runs at import time and nothing falls back to random weights.
"""
from __future__ import annotations

import argparse
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping
from urllib.parse import urlparse

import torch

from hassod.runs import file_sha256

from ..errors import UserError

# A weights id is this many hex digits of the file's sha256: enough to tell
# checkpoints apart in an index's configuration, short enough to read.
WEIGHTS_ID_LENGTH = 16

# How long to wait for the hub's host to accept a TCP connection before
# deciding it is unreachable. huggingface_hub's own retries on a machine without
# network are far too slow for a default code path (docs/benchmarks.md,
# "Backbone weights").
HUB_PROBE_TIMEOUT_S = 3.0

# File names a timm model repository on the hub stores its weights under,
# preferred first.
HUB_FILENAMES = ("model.safetensors", "pytorch_model.bin")

# Prefixes that training wrappers put in front of backbone keys: DDP adds
# ``module.``, DINO's MultiCropWrapper adds ``backbone.``.
WRAPPER_PREFIXES = ("module.", "backbone.")


class WeightsNotFoundError(UserError, FileNotFoundError):
    """No weight source produced a file; ``str()`` says how to supply one."""


class WeightsFormatError(UserError, ValueError):
    """A weight file was found but does not fit the backbone (keys or shapes)."""


@dataclass(frozen=True)
class WeightSource:
    """Where a backbone's weights were found.

    ``origin`` is one of ``"file"`` (given explicitly), ``"hub"`` or ``"package"``.
    """

    path: Path
    origin: str


@dataclass(frozen=True)
class WeightSearch:
    """What to look for when resolving a backbone's weights.

    Args:
        backbone: backbone name, used in messages.
        hub_repo: hub repository id holding timm-layout weights, or ``None``.
        package_file: returns the path of a weight file inside an installed
            package; raises ``ImportError`` when the package is absent.
        how_to_supply: sentence(s) appended to the error telling the user what
            to download or pass.
    """

    backbone: str
    hub_repo: str | None = None
    package_file: Callable[[], str | os.PathLike] | None = None
    how_to_supply: str = ""
    hub_filenames: tuple[str, ...] = field(default=HUB_FILENAMES)


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` asks not to touch the network (read at call time)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def file_weights_id(path: str | os.PathLike) -> str:
    """The first :data:`WEIGHTS_ID_LENGTH` hex digits of the file's sha256."""
    return file_sha256(path)[:WEIGHTS_ID_LENGTH]


def resolve_weights(search: WeightSearch, explicit: str | os.PathLike | None = None) -> WeightSource:
    """Find a weight file for ``search.backbone`` or raise :class:`WeightsNotFoundError`.

    An explicit path that does not exist is an error by itself: it is never
    silently replaced by another source.
    """
    if explicit is not None:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise WeightsNotFoundError(
                f"weights file for backbone {search.backbone!r} not found: {path}"
            )
        return WeightSource(path, "file")

    reasons: list[str] = ["no --weights PATH given"]
    if search.hub_repo is not None:
        path, reason = _fetch_from_hub(search.hub_repo, search.hub_filenames)
        if path is not None:
            return WeightSource(path, "hub")
        reasons.append(reason)
    if search.package_file is not None:
        try:
            path = Path(search.package_file())
        except ImportError as exc:
            reasons.append(f"the package that ships the weights is not installed ({exc})")
        else:
            if path.is_file():
                return WeightSource(path, "package")
            reasons.append(f"the installed package's weight file is missing: {path}")
    else:
        reasons.append("no installed package ships these weights")
    raise WeightsNotFoundError(
        f"no weights for backbone {search.backbone!r}: " + "; ".join(reasons) + ". "
        + search.how_to_supply
    )


def _fetch_from_hub(repo_id: str, filenames: tuple[str, ...]) -> tuple[Path | None, str]:
    """A local path to ``repo_id``'s weights, or ``(None, reason)``.

    The hub's local cache is always consulted (that is what offline mode means
    to huggingface_hub); the network only when not offline and the host answers.
    """
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub import constants as hub_constants
    except ImportError:
        return None, "huggingface_hub is not installed"

    for filename in filenames:
        try:
            return Path(hf_hub_download(repo_id, filename, local_files_only=True)), ""
        except Exception:  # noqa: BLE001 - any cache miss just means "not cached"
            continue
    if hub_offline():
        return None, f"model hub not tried (HF_HUB_OFFLINE is set) and {repo_id} is not in its cache"

    endpoint = os.environ.get("HF_ENDPOINT") or hub_constants.ENDPOINT
    unreachable = _probe_host(endpoint, HUB_PROBE_TIMEOUT_S)
    if unreachable:
        return None, f"model hub unreachable ({unreachable})"
    errors = []
    for filename in filenames:
        try:
            return Path(hf_hub_download(repo_id, filename, etag_timeout=HUB_PROBE_TIMEOUT_S)), ""
        except Exception as exc:  # noqa: BLE001 - report every hub failure the same way
            errors.append(f"{filename}: {type(exc).__name__}")
    return None, f"model hub download of {repo_id} failed ({', '.join(errors)})"


def _probe_host(url: str, timeout: float) -> str:
    """Empty string when ``url``'s host accepts a TCP connection, else the reason."""
    parsed = urlparse(url)
    host = parsed.hostname or ""
    port = parsed.port or (80 if parsed.scheme == "http" else 443)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return ""
    except OSError as exc:
        return f"{host}: {exc}"


def _load_failure(exc: Exception) -> str:
    """One line saying why torch.load / safetensors refused a file.

    torch's refusal under ``weights_only=True`` is a page of advice to turn the
    check off; the line that matters comes after "WeightsUnpickler error:".
    """
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    marker = next((i for i, line in enumerate(lines) if "WeightsUnpickler error:" in line), None)
    if marker is not None:
        reason = lines[marker].split("WeightsUnpickler error:", 1)[1].strip()
        if not reason and marker + 1 < len(lines):
            reason = lines[marker + 1]
        # "...was not an allowed global by default. Please use add_safe_globals...": keep the fact.
        return f"not a tensor-only PyTorch file ({reason.split('. Please')[0]})"
    first = lines[0] if lines else repr(exc)
    return f"{type(exc).__name__}: {first}"


def read_state_dict(path: str | os.PathLike, checkpoint_keys: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """Tensors of a ``.pth``/``.bin``/``.safetensors`` weight file, on the CPU.

    When the file holds a training checkpoint, the first of ``checkpoint_keys``
    present (e.g. DINO's ``"teacher"``) selects the state dict inside it.
    Pickles are read with ``weights_only=True``; ``argparse.Namespace`` is
    allowed because DINO stores its command-line arguments in checkpoints.
    """
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return dict(load_file(str(path), device="cpu"))
        with torch.serialization.safe_globals([argparse.Namespace]):
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - unpickling raises many types
        raise WeightsFormatError(f"cannot read weight file {path}: {_load_failure(exc)}") from exc
    if not isinstance(loaded, Mapping):
        raise WeightsFormatError(f"{path} holds a {type(loaded).__name__}, not a state dict")
    for key in checkpoint_keys:
        if isinstance(loaded.get(key), Mapping):
            loaded = loaded[key]
            break
    tensors = {k: v for k, v in loaded.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise WeightsFormatError(
            f"{path} contains no tensors at the top level (keys: {sorted(loaded)[:8]})"
        )
    return tensors


def strip_prefixes(state: Mapping[str, torch.Tensor], prefixes: tuple[str, ...] = WRAPPER_PREFIXES) -> dict[str, torch.Tensor]:
    """Remove leading wrapper prefixes (any order, repeated) from every key."""
    out = {}
    for key, value in state.items():
        stripped = True
        while stripped:
            stripped = False
            for prefix in prefixes:
                if key.startswith(prefix):
                    key = key[len(prefix):]
                    stripped = True
        out[key] = value
    return out


def load_strict(module: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str, assign: bool = False) -> None:
    """Load ``state`` into ``module``, raising :class:`WeightsFormatError` on any mismatch.

    Mismatched keys and shapes are listed (first few of each) so a wrong file
    is recognisable from the message. ``assign=True`` adopts the given tensors
    instead of copying, which is how a module built on the meta device is filled.
    """
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(
        f"{k} {tuple(state[k].shape)} != {tuple(expected[k].shape)}"
        for k in set(expected) & set(state)
        if tuple(state[k].shape) != tuple(expected[k].shape)
    )
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)):
        if items:
            shown = ", ".join(items[:5]) + (f", ... ({len(items)} in all)" if len(items) > 5 else "")
            problems.append(f"{label} keys: {shown}")
    if problems:
        raise WeightsFormatError(f"weights from {source} do not fit {type(module).__name__}: " + "; ".join(problems))
    module.load_state_dict(dict(state), strict=True, assign=assign)
    left_empty = [name for name, tensor in (*module.named_parameters(), *module.named_buffers()) if tensor.is_meta]
    if left_empty:
        raise WeightsFormatError(f"weights from {source} leave tensors uninitialised: {', '.join(left_empty[:5])}")
