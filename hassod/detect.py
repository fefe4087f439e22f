"""Stage-2 inference: a trained detector checkpoint → detections with masks, levels and their hierarchy.

The one inference path (``hassod detect``, ``hassod eval --checkpoint``, the
index's detector region source): :class:`Detector`. Per image the model gives
boxes, scores, levels (0 whole, 1 part, 2 subpart, from the level head) and
28×28 mask probabilities per box; they are filtered (score, levels, at most
``max_detections`` by score), only the kept masks are pasted at image size,
binarised at 0.5 and kept as COCO RLEs (:mod:`hassod.rle`). A detection's
parent is the smallest returned detection covering at least τ = 0.9 of its
mask without being covered back (stage 1's rule, docs/design.md §4); level and
parent are independent outputs (a part whose whole was filtered out has no parent).

:func:`detect_collection` (resumable: :func:`hassod.runs.run_collection`) writes
COCO results as a JSON *list* (what ``COCO.loadRes`` reads): ``id`` is the 1-based
position, as ``loadRes`` assigns it, ``parent_id`` the parent's ``id`` (``None``
for roots); the images they refer to go to ``<out stem>.images.json``.
"""
from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from .device import resolve_device
from .discover.levels import find_parents, intersection_matrix, rle_intersections
from .discover.viz import save_overlay
from .images import DEFAULT_MAX_PIXELS, ImageError, load_rgb
from .rle import RleMasks, masks_to_rle, rle_to_masks
from .runs import (LEVEL_NAMES, ImageRecord, file_sha256, numbered_images, run_collection, run_line,
                   write_json_atomic)

MASK_THRESHOLD = 0.5
# Coverage threshold of the hierarchy among detections: stage 1's value.
HIERARCHY_TAU = 0.9
# Masks are pasted (1 byte per pixel) at most this many bytes at a time, then run-length encoded.
_PASTE_BYTES = 1 << 28


@dataclass(frozen=True)
class DetectOptions:
    """What to keep of the detector's output.

    Attributes:
        levels: predicted levels to keep (0 whole, 1 part, 2 subpart).
        score_thresh: detections scoring below this are dropped (the model's
            own ``settings.score_thresh`` applies before).
        max_detections: at most this many per image, highest scores first,
            counted after the level filter.
    """

    levels: tuple[int, ...] = (0, 1, 2)
    score_thresh: float = 0.0
    max_detections: int = 1000

    def __post_init__(self) -> None:
        if not self.levels or any(level not in (0, 1, 2) for level in self.levels):
            raise ValueError(f"levels must be a non-empty subset of (0, 1, 2), got {self.levels}")
        if self.max_detections < 1:
            raise ValueError(f"max_detections must be at least 1, got {self.max_detections}")
        object.__setattr__(self, "levels", tuple(sorted(set(int(v) for v in self.levels))))

    def key(self) -> str:
        """Short text naming these options, part of an index's region-source identity."""
        levels = ",".join(LEVEL_NAMES[v] for v in self.levels)
        return f"{levels}:s{self.score_thresh:g}:n{self.max_detections}"


@dataclass
class Detections:
    """The detections of one image, sorted by decreasing score; N may be 0.

    boxes: (N, 4) float32 xyxy in original image pixels. scores: (N,) float32
    in [0, 1]. levels: (N,) int64 predicted level. rles: N COCO RLEs (str
    counts) of the masks at the original image size (H, W) = ``image_size``.
    areas: (N,) int64 mask pixels. parents: (N,) int64 index of the parent
    detection in this list, -1 for roots.
    """

    boxes: np.ndarray
    scores: np.ndarray
    levels: np.ndarray
    rles: list[dict]
    areas: np.ndarray
    parents: np.ndarray
    image_size: tuple[int, int]

    def __len__(self) -> int:
        return len(self.scores)

    @property
    def masks(self) -> np.ndarray:
        """(N, H, W) bool, decoded on every access: N·H·W bytes (use :meth:`mask` for one)."""
        return rle_to_masks(self.rles, self.image_size)

    def mask(self, index: int) -> np.ndarray:
        """(H, W) bool mask of detection ``index``."""
        return rle_to_masks([self.rles[index]])[0]

    def annotations(self) -> list[dict[str, Any]]:
        """Per detection: ``bbox`` (xywh pixels, from the box head), ``segmentation`` (RLE, str counts),
        ``area`` (mask pixels), ``score``, ``hier_level`` and ``parent`` (index in this list, -1 for roots)."""
        out = []
        for i in range(len(self)):
            x0, y0, x1, y1 = (float(v) for v in self.boxes[i])
            out.append({
                "bbox": [x0, y0, x1 - x0, y1 - y0],
                "segmentation": self.rles[i],
                "area": int(self.areas[i]),
                "score": float(self.scores[i]),
                "hier_level": int(self.levels[i]),
                "parent": int(self.parents[i]),
            })
        return out


def detection_parents(masks: np.ndarray, tau: float = HIERARCHY_TAU) -> np.ndarray:
    """(N, H, W) bool masks → (N,) int64 parent indices (-1 for roots) by the coverage rule
    (:func:`hassod.discover.levels.find_parents`), computed as :func:`postprocess` does: from RLEs."""
    return find_parents(intersection_matrix(np.asarray(masks, dtype=bool)), tau)


def postprocess(
    output: dict[str, torch.Tensor], options: DetectOptions, tau: float = HIERARCHY_TAU,
    image_size: tuple[int, int] | None = None,
) -> Detections:
    """One image's raw model output → filtered, binarised :class:`Detections` with parent links.

    output: an inference dict for one image (any device): ``boxes`` (N, 4)
    xyxy input-image pixels, ``scores`` (N,), ``levels`` (N,) int, ``masks``
    probabilities (any float dtype), in one of two forms:

    - with ``image_size`` (H, W): the model's own (N, 1, M, M) box-relative
      masks; only the kept detections' are pasted, straight to bool;
    - without: (N, 1, H, W) masks already at the image size (torchvision's
      pasted form; bool is accepted too).
    """
    scores = output["scores"].detach().float()
    levels = output["levels"].detach().long()
    keep = scores >= options.score_thresh
    keep &= torch.isin(levels, torch.tensor(options.levels, device=levels.device))
    index = torch.nonzero(keep).flatten()
    # stable sort: equal scores keep the model's order, so results are reproducible.
    order = torch.sort(scores[index], descending=True, stable=True).indices
    index = index[order][: options.max_detections]
    size = tuple(image_size) if image_size is not None else tuple(output["masks"].shape[-2:])
    rles = _encoded_masks(output, index, image_size, size)
    inter = rle_intersections(rles)
    return Detections(
        boxes=output["boxes"].detach()[index].float().cpu().numpy(),
        scores=scores[index].cpu().numpy(),
        levels=levels[index].cpu().numpy(),
        rles=rles,
        areas=np.diagonal(inter).astype(np.int64),
        parents=find_parents(inter, tau),
        image_size=(int(size[0]), int(size[1])),
    )


def _encoded_masks(output: dict[str, torch.Tensor], index: torch.Tensor, image_size: tuple[int, int] | None,
                   size: tuple[int, ...]) -> list[dict]:
    """RLEs of the selected detections' binary masks, pasted at most ``_PASTE_BYTES`` at a time."""
    batch = max(1, _PASTE_BYTES // max(1, int(size[0]) * int(size[1])))
    rles: list[dict] = []
    for start in range(0, len(index), batch):
        rles += masks_to_rle(_binary_masks(output, index[start:start + batch], image_size).cpu().numpy())
    return rles


def _binary_masks(output: dict[str, torch.Tensor], index: torch.Tensor, image_size: tuple[int, int] | None) -> torch.Tensor:
    """(K, H, W) bool masks of the detections ``index`` selects (see :func:`postprocess` for the two forms)."""
    masks = output["masks"].detach()
    if image_size is None:
        return masks[index, 0] >= MASK_THRESHOLD
    from .model.masks import paste_masks  # lazy, as the model: keeps `import hassod.detect` light

    return paste_masks(masks[index], output["boxes"].detach()[index], image_size, MASK_THRESHOLD)


def _limit_model_output(model: torch.nn.Module, settings: Any, options: DetectOptions) -> None:
    """Let the model drop what :func:`postprocess` would drop anyway, before its mask head runs.

    The mask head runs per detection the model returns, so a cap of 100
    instead of the model's 1000 saves inference time. The
    result is unchanged: removing boxes under the threshold before NMS never
    frees a higher box (only higher-scoring boxes suppress), and NMS output
    is in score order, so the model's top k are ours. The cap only applies
    when every level is kept (a level filter needs the full list). The
    model's threshold is strict (``>``) and may compare in float16, so it is
    set a little below ours; :func:`postprocess` applies ours exactly.
    """
    heads = model.roi_heads
    heads.score_thresh = max(settings.score_thresh, options.score_thresh - 1e-3)
    if len(options.levels) == 3:
        heads.detections_per_img = min(settings.detections_per_img, options.max_detections)


def checkpoint_digest(path: str | os.PathLike) -> str:
    """First 16 hex digits of the SHA-256 of a checkpoint file: names the weights in logs and indexes."""
    return file_sha256(path)[:16]


class Detector:
    """A trained detector checkpoint ready for inference.

    Args:
        checkpoint: file written by ``hassod train`` (:func:`hassod.model.save_checkpoint`).
        device: ``"auto"`` (CUDA when present), ``"cpu"``, ``"cuda"``, ``"cuda:N"``.
        options: what to keep of the output (:class:`DetectOptions`).
        amp: run the model in float16 autocast on CUDA (ignored on CPU, where
            autocast brings no speed-up for these ops).
        use: the checkpoint's "student" (default) or Mean Teacher's "teacher" weights.

    Raises ``hassod.model.CheckpointError`` for a missing or foreign file, or a teacher it does not hold.
    """

    def __init__(
        self,
        checkpoint: str | os.PathLike,
        device: str | torch.device | None = "auto",
        options: DetectOptions | None = None,
        amp: bool = True,
        use: str = "student",
    ):
        from .model import load_detector

        self.device = device if isinstance(device, torch.device) else resolve_device(device)
        self.model, self.settings = load_detector(str(checkpoint), device=str(self.device), use=use)
        self.use = use
        self.options = options or DetectOptions()
        _limit_model_output(self.model, self.settings, self.options)
        self.amp = amp and self.device.type == "cuda"
        self.checkpoint = str(checkpoint)
        self.digest = checkpoint_digest(checkpoint)

    @property
    def identity(self) -> str:
        """Names the weights and the options: two runs with the same identity give the same detections."""
        return f"detector:{self.digest}{self._weights_suffix}:{self.options.key()}"

    @property
    def _weights_suffix(self) -> str:
        # The student is what a checkpoint has always meant: identities from before the teacher stay valid.
        return "" if self.use == "student" else f"+{self.use}"

    def run_settings(self) -> dict[str, Any]:
        """JSON-ready description of this run (checkpoint hash and weights, model settings, options)."""
        return {"checkpoint": self.digest + self._weights_suffix, "model": asdict(self.settings),
                "options": asdict(self.options)}

    @torch.inference_mode()
    def forward(self, images: Sequence[np.ndarray]) -> list[dict[str, torch.Tensor]]:
        """The model's raw outputs for (H, W, 3) uint8 RGB images, one batch; masks box-relative (see :func:`postprocess`)."""
        if not images:
            return []
        tensors = [
            torch.from_numpy(np.ascontiguousarray(image)).to(self.device).permute(2, 0, 1).float().div_(255.0)
            for image in images
        ]
        autocast = torch.autocast("cuda", dtype=torch.float16) if self.amp else nullcontext()
        with autocast:
            return self.model(tensors)

    def detect(self, images: Sequence[np.ndarray]) -> list[Detections]:
        """Detections of (H, W, 3) uint8 RGB images, run as one batch on the device."""
        return [postprocess(output, self.options, image_size=image.shape[:2])
                for output, image in zip(self.forward(images), images)]

    def detect_paths(
        self, paths: Sequence[str | os.PathLike], batch_size: int = 2, max_pixels: int = DEFAULT_MAX_PIXELS
    ) -> Iterator[tuple[str, np.ndarray | None, Detections | None, str | None]]:
        """Yield ``(path, image, detections, error)`` per path, ``batch_size`` images per forward.

        Paths come back in input order, except that an unreadable file is
        reported ahead of the readable rest of its batch.

        ``image`` is the decoded (H, W, 3) uint8 original. Files that cannot be
        decoded come back with ``image`` and ``detections`` ``None`` and the
        reason in ``error``; they never stop the run.
        """
        paths = [str(p) for p in paths]
        for start in range(0, len(paths), batch_size):
            loaded: list[tuple[str, np.ndarray]] = []
            for path in paths[start:start + batch_size]:
                try:
                    loaded.append((path, load_rgb(path, max_pixels)))
                except ImageError as exc:
                    yield path, None, None, str(exc)
            found = self.detect([image for _, image in loaded])
            for (path, image), detections in zip(loaded, found):
                yield path, image, detections, None


# ---------------------------------------------------------------------------------------------- collection


@dataclass
class DetectSummary:
    """What a ``hassod detect`` run did: counts per predicted level, skipped files with reasons."""

    images: int = 0
    resumed: int = 0
    detections_per_level: list[int] = field(default_factory=lambda: [0, 0, 0])
    skipped: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    out: str = ""
    images_file: str = ""

    def line(self) -> str:
        return run_line(self.images, self.resumed, self.detections_per_level, "detections", self.seconds,
                        len(self.skipped), self.out)


def images_file(out: str | os.PathLike) -> Path:
    """Where the images list of the results file ``out`` goes: ``det.json`` → ``det.images.json``."""
    out = Path(out)
    return out.with_name(out.stem + ".images.json")


def detect_collection(
    paths: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    detector: Detector,
    batch_size: int = 2,
    viz_dir: str | os.PathLike | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    show_progress: bool = True,
) -> DetectSummary:
    """Detect in every file of ``paths``; write COCO results to ``out`` and the images to :func:`images_file`.

    Finished images go to ``<out>.progress.jsonl`` at once, so an interrupted
    run resumes where it stopped (with the same checkpoint and options only).
    Image ids are 1.. in sorted path order over the readable files.
    """
    if viz_dir is not None:
        Path(viz_dir).mkdir(parents=True, exist_ok=True)

    def process(todo: list[str]) -> Iterator[ImageRecord]:
        for path, image, found, error in detector.detect_paths(todo, batch_size, max_pixels):
            if found is not None and viz_dir is not None:
                save_overlay(path, RleMasks(found.rles), found.levels, Path(viz_dir))
            yield image_record(path, image, found, error)

    run = run_collection(paths, out, detector.run_settings(), process, show_progress)
    results, images, skipped = build_results(run.records, run.root)
    write_json_atomic(results, Path(out))
    info = {"description": "hassod detect results", "root": str(run.root), "results": Path(out).name,
            **detector.run_settings()}
    write_json_atomic({"info": info, "images": images, "skipped": skipped}, images_file(out))
    return DetectSummary(images=run.images, resumed=run.resumed, detections_per_level=run.per_level(),
                         skipped=run.skipped, seconds=run.seconds, out=str(out), images_file=str(images_file(out)))


def image_record(path: str, image: np.ndarray | None, found: Detections | None, error: str | None) -> ImageRecord:
    """One :meth:`Detector.detect_paths` item as an :class:`ImageRecord` (what the progress log stores)."""
    if found is None or image is None:
        return ImageRecord(path=path, error=error or "no detections")
    height, width = image.shape[:2]
    return ImageRecord(path=path, width=width, height=height, annotations=found.annotations())


def build_results(
    records: Sequence[ImageRecord], root: Path
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, str]]]:
    """Per-image records → (COCO results list, images list, skipped list).

    Records are taken in sorted path order; image ids are 1.. over the
    readable ones; result ``id`` is the 1-based list position and
    ``parent_id`` the parent's ``id`` (None for roots). ``file_name`` is
    relative to ``root``.
    """
    images, results, skipped = numbered_images(records, root, _result)
    return results, images, skipped


def _result(ann: dict[str, Any], result_id: int, image_id: int, parent_id: int | None) -> dict[str, Any]:
    return {
        "id": result_id,
        "image_id": image_id,
        "category_id": 1,
        "bbox": ann["bbox"],
        "score": ann["score"],
        "segmentation": ann["segmentation"],
        "area": ann["area"],
        "hier_level": ann["hier_level"],
        "parent_id": parent_id,
    }
