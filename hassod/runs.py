"""Run bookkeeping shared by every stage: level names, atomic writes, the progress log, resumable runs.

- :data:`LEVEL_NAMES`: the names of hierarchy levels 0, 1, 2 (docs/design.md §4).
- :func:`atomic_write`: every file a run produces is written beside its
  destination and renamed into place, so readers see the old file or the
  complete new one, never a torn one (:func:`write_json_atomic` for JSON).
- :class:`ProgressLog`: an append-only JSON-lines log of finished images
  (``<out>.progress.jsonl``); its first line holds the run's settings, and
  resuming with other settings is refused.
- :func:`run_collection`: the resumable skeleton that discovery and detection
  both run over a collection: open the log, process what it lacks, and return
  every image's record in input order with their common root.
- :func:`relative_name`, :func:`common_root`: the ``file_name`` an output gives a path;
  :func:`file_sha256`: the digest that names a file's content.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from tqdm import tqdm

from .errors import UserError
from .locks import lock_or_refuse

LEVEL_NAMES = ("whole", "part", "subpart")


# ---------------------------------------------------------------------------------------------- atomic writes


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, binary: bool = False, buffering: int = -1) -> Iterator[IO]:
    """Yield a new file open for writing beside ``path``; renamed over ``path`` when the block succeeds.

    The file is flushed and fsynced before the rename; on any failure it is
    removed and ``path`` keeps its old content. The parent folder is created.
    Text files are UTF-8. ``buffering=0`` (binary only) gives an unbuffered file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        handle = open(temp, "xb" if binary else "x", buffering=buffering, encoding=None if binary else "utf-8")
    except OSError as exc:  # name the file the caller asked for, not the temporary one
        raise OSError(exc.errno, exc.strerror, str(path)) from exc
    try:
        with handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def write_json_atomic(obj: Any, path: str | os.PathLike) -> None:
    """Write JSON to ``path`` so that readers see the old file or the complete new one."""
    with atomic_write(path) as handle:
        json.dump(obj, handle, separators=(",", ":"))


# ---------------------------------------------------------------------------------------------- paths


def file_sha256(path: str | os.PathLike) -> str:
    """The hex SHA-256 of a file's bytes, read a megabyte at a time: names weights, checkpoints and inputs."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def relative_name(path: str | os.PathLike, root: Path) -> str:
    """``path`` (resolved) relative to ``root`` as a POSIX name; the path itself when outside ``root``."""
    try:
        return Path(os.path.realpath(path)).relative_to(root).as_posix()
    except ValueError:
        return Path(path).as_posix()


def common_root(paths: Iterable[str | os.PathLike]) -> Path:
    """The deepest folder containing every path (resolved)."""
    parents = [os.path.dirname(os.path.realpath(p)) for p in paths]
    return Path(os.path.commonpath(parents)) if parents else Path.cwd()


# ---------------------------------------------------------------------------------------------- progress log


@dataclass
class ImageRecord:
    """What a run produced for one file.

    ``annotations`` hold, per mask: ``segmentation`` (COCO RLE with str
    counts), ``bbox`` (xywh, pixels), ``area`` (pixels), ``score``,
    ``hier_level`` (0 whole, 1 part, 2 subpart), ``parent`` (index into this
    list, -1 for roots) and, from discovery, ``threshold`` (the merge threshold
    it came from). ``error`` is set, and the rest empty, for a skipped file.
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
    refused rather than mixing outputs of two configurations. Each line is
    flushed at once, so a killed run loses only the images in flight. The log
    is locked (flock) while open: a second run on the same output is refused
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
        lines = valid.splitlines()
        try:
            saved = json.loads(lines[0])["settings"]
        except (IndexError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
            raise SettingsMismatchError(f"{self.path} is empty or corrupt; delete it to start over") from None
        if saved != self.settings:
            changed = sorted(k for k in set(saved or {}) | set(self.settings) if (saved or {}).get(k) != self.settings.get(k))
            raise SettingsMismatchError(
                f"{self.path} records a run with other settings ({', '.join(changed)}): rerun with those to "
                "continue it, or delete that file (or choose another --out) to start over with these"
            )
        for line in lines[1:]:
            try:
                record = ImageRecord(**json.loads(line))
            except (UnicodeDecodeError, json.JSONDecodeError, TypeError):
                continue  # a damaged line: its image is done again
            self.done[record.path] = record

    def append(self, record: ImageRecord) -> None:
        self._handle.write(json.dumps(asdict(record), separators=(",", ":")) + "\n")
        self._handle.flush()
        self.done[record.path] = record

    def close(self) -> None:
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._handle.close()


# ---------------------------------------------------------------------------------------------- resumable runs


@dataclass
class CollectionRun:
    """A finished run over a collection: one record per input path, in input order."""

    records: list[ImageRecord]
    root: Path
    resumed: int
    started: float

    @property
    def skipped(self) -> list[tuple[str, str]]:
        return [(r.path, r.error) for r in self.records if r.error is not None]

    @property
    def images(self) -> int:
        return sum(r.error is None for r in self.records)

    def per_level(self) -> list[int]:
        """How many annotations each level (whole, part, subpart) has over the readable images."""
        counts = [0] * len(LEVEL_NAMES)
        for record in self.records:
            for ann in record.annotations:
                counts[ann["hier_level"]] += 1
        return counts

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.started


def run_collection(
    paths: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    settings: dict[str, Any],
    process: Callable[[list[str]], Iterable[ImageRecord]],
    show_progress: bool = True,
) -> CollectionRun:
    """Run ``process`` over the paths that ``out``'s progress log lacks, logging each record as it comes.

    ``process(todo)`` yields one :class:`ImageRecord` per resolved path of
    ``todo``, in any order. The log is opened with ``settings`` (a run with
    other settings is refused: :class:`SettingsMismatchError`) and closed at
    the end, so a rerun after an interruption does only what is missing.
    """
    started = time.perf_counter()
    log = ProgressLog(progress_path(out), settings)
    try:
        keys = [os.path.realpath(p) for p in paths]
        todo = [k for k in keys if k not in log.done]
        with tqdm(total=len(keys), initial=len(keys) - len(todo), unit="img", disable=not show_progress) as bar:
            for record in process(todo):
                log.append(record)
                bar.update()
    finally:
        log.close()
    return CollectionRun([log.done[k] for k in keys], common_root(keys), len(keys) - len(todo), started)


def run_line(images: int, resumed: int, per_level: list[int], noun: str, seconds: float, skipped: int,
             out: str) -> str:
    """The one-line summary of a run over images that found ``noun`` at each level (whole, part, subpart)."""
    whole, part, subpart = per_level
    text = f"{images} images, {sum(per_level)} {noun} ({whole} whole, {part} part, {subpart} subpart) in {seconds:.1f} s"
    if resumed:
        text += f" ({resumed} resumed from an earlier run)"
    return text + f"; {skipped} skipped → {out}"


def numbered_images(
    records: Iterable[ImageRecord], root: Path, annotation: Callable[[dict[str, Any], int, int, int | None], dict]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, str]]]:
    """Per-image records → (images, annotations, skipped), the lists a COCO file holds.

    Records are taken in sorted path order; image ids are 1.. over the
    readable ones, annotation ids 1.. over all. ``annotation(ann, id,
    image_id, parent_id)`` makes each output annotation, ``parent_id`` being
    the parent's id (None for roots). ``file_name`` is relative to ``root``.
    """
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    for record in sorted(records, key=lambda r: r.path):
        name = relative_name(record.path, root)
        if record.error is not None:
            skipped.append({"file_name": name, "error": record.error})
            continue
        image_id = len(images) + 1
        images.append({"id": image_id, "file_name": name, "width": record.width, "height": record.height})
        first_id = len(annotations) + 1
        for ann in record.annotations:
            parent_id = first_id + ann["parent"] if ann["parent"] >= 0 else None
            annotations.append(annotation(ann, len(annotations) + 1, image_id, parent_id))
    return images, annotations, skipped
