"""COCO-format pseudo-labels, written through a resumable progress log.

A discovery run appends one JSON line per finished image to
``<out>.progress.jsonl`` (flushed at once), so an interrupted run loses at
most the images in flight. The final COCO file is assembled from that log
and written atomically; image and annotation ids are given in sorted path
order, so the same inputs always give the same ids.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

from ..errors import UserError
from ..locks import lock_or_refuse

LEVEL_NAMES = ("whole", "part", "subpart")


@dataclass
class ImageRecord:
    """What discovery produced for one file.

    ``annotations`` hold, per mask: ``segmentation`` (COCO RLE with str
    counts), ``bbox`` (xywh, pixels), ``area`` (pixels), ``score``,
    ``hier_level`` (0 whole, 1 part, 2 subpart), ``parent`` (index into this
    list, -1 for roots) and ``threshold`` (the merge threshold it came from).
    ``error`` is set, and the rest empty, for a skipped file.
    """

    path: str
    width: int = 0
    height: int = 0
    annotations: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None


class SettingsMismatchError(UserError, RuntimeError):
    """The progress log on disk was made with other settings."""


def progress_path(out: str | os.PathLike) -> Path:
    """The progress log of the results file ``out``: ``pseudo.json`` → ``pseudo.json.progress.jsonl``."""
    return Path(str(out) + ".progress.jsonl")


class ProgressLog:
    """Append-only JSON-lines log of finished images, keyed by path.

    The first line records the settings; resuming with different settings is
    refused rather than mixing pseudo-labels of two configurations. The log is
    locked (flock) while open: a second run on the same output is refused
    rather than doing every image twice and interleaving their lines.
    """

    def __init__(self, path: Path, settings: dict[str, Any]):
        self.path = Path(path)
        self.settings = json.loads(json.dumps(settings))
        self.done: dict[str, ImageRecord] = {}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = open(self.path, "a", encoding="utf-8")
        try:
            lock_or_refuse(self._handle, f"another run is writing {self.path}; run this one when it has finished")
            if self.path.stat().st_size:
                self._load()
            else:
                self._handle.write(json.dumps({"settings": self.settings}) + "\n")
                self._handle.flush()
        except BaseException:
            self._handle.close()
            raise

    def _load(self) -> None:
        raw = self.path.read_bytes()
        # A killed run may leave half a line at the end: cut back to the last newline.
        valid = raw[: raw.rfind(b"\n") + 1]
        if len(valid) != len(raw):
            with open(self.path, "r+b") as handle:
                handle.truncate(len(valid))
        lines = valid.decode("utf-8").splitlines()
        if not lines:
            raise SettingsMismatchError(f"{self.path} is empty or corrupt; delete it to start over")
        saved = json.loads(lines[0]).get("settings")
        if saved != self.settings:
            changed = sorted(k for k in set(saved or {}) | set(self.settings) if (saved or {}).get(k) != self.settings.get(k))
            raise SettingsMismatchError(
                f"{self.path} records a run with other settings ({', '.join(changed)}): rerun with those to "
                "continue it, or delete that file (or choose another --out) to start over with these"
            )
        for line in lines[1:]:
            record = ImageRecord(**json.loads(line))
            self.done[record.path] = record

    def append(self, record: ImageRecord) -> None:
        self._handle.write(json.dumps(asdict(record), separators=(",", ":")) + "\n")
        self._handle.flush()
        self.done[record.path] = record

    def close(self) -> None:
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._handle.close()


def build_coco(records: Iterable[ImageRecord], root: Path, info: dict[str, Any]) -> dict[str, Any]:
    """Assemble a COCO dataset dict with one category "fg" from per-image records.

    ``file_name`` is each path relative to ``root``. Annotations gain
    ``hier_level`` and ``parent_id`` (a global annotation id or None). Skipped
    files are listed under the extra key ``skipped`` with their reasons.
    """
    images, annotations, skipped = [], [], []
    for record in sorted(records, key=lambda r: r.path):
        if record.error is not None:
            skipped.append({"file_name": _relative(record.path, root), "error": record.error})
            continue
        image_id = len(images) + 1
        images.append(
            {"id": image_id, "file_name": _relative(record.path, root), "width": record.width, "height": record.height}
        )
        first_id = len(annotations) + 1
        for ann in record.annotations:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": 1,
                    "segmentation": ann["segmentation"],
                    "bbox": ann["bbox"],
                    "area": ann["area"],
                    "score": ann["score"],
                    "iscrowd": 0,
                    "hier_level": ann["hier_level"],
                    "parent_id": first_id + ann["parent"] if ann["parent"] >= 0 else None,
                    "threshold": ann["threshold"],
                }
            )
    return {
        "info": {**info, "root": str(root)},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": 1, "name": "fg", "supercategory": "object"}],
        "skipped": skipped,
    }


def _relative(path: str, root: Path) -> str:
    try:
        return Path(os.path.realpath(path)).relative_to(root).as_posix()
    except ValueError:
        return Path(path).as_posix()


def common_root(paths: Iterable[Path]) -> Path:
    """The deepest folder containing every path (resolved)."""
    parents = [os.path.dirname(os.path.realpath(p)) for p in paths]
    return Path(os.path.commonpath(parents)) if parents else Path.cwd()


def write_json_atomic(obj: Any, path: Path) -> None:
    """Write JSON to ``path`` so that readers see the old file or the complete new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(obj, handle, separators=(",", ":"))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
