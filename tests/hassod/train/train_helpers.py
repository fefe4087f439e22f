"""Synthetic pseudo-label sets for the training tests, in the exact format `hassod discover` writes."""
from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from hassod.discover.coco import build_coco
from hassod.runs import ImageRecord
from hassod.discover.masks import mask_areas, masks_to_boxes_xywh
from hassod.rle import masks_to_rle
from hassod.synthetic import Scene, make_scene


def scene_record(path: Path, scene: Scene) -> ImageRecord:
    """The ImageRecord discovery would produce if it found the scene's true elements."""
    rles = masks_to_rle(scene.masks)
    boxes = masks_to_boxes_xywh(scene.masks)
    areas = mask_areas(scene.masks)
    annotations = [
        {"segmentation": rle, "bbox": [float(v) for v in box], "area": int(area), "score": 1.0,
         "hier_level": int(level), "parent": int(parent), "threshold": 0.5}
        for rle, box, area, level, parent in zip(rles, boxes, areas, scene.levels, scene.parents)
    ]
    height, width = scene.image.shape[:2]
    return ImageRecord(str(path.resolve()), width, height, annotations)


def write_scenes(folder: Path, seeds: list[int], size: tuple[int, int] = (96, 128), **scene_args
                 ) -> tuple[Path, list[Scene]]:
    """Save make_scene images as PNGs under ``folder/images`` and their truth as ``folder/pseudo.json``."""
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    scenes, records = [], []
    for seed in seeds:
        scene = make_scene(seed, size=size, **scene_args)
        path = images / f"scene_{seed:03d}.png"
        Image.fromarray(scene.image).save(path)
        scenes.append(scene)
        records.append(scene_record(path, scene))
    coco = build_coco(records, images.resolve(), {"source": "test"})
    pseudo = folder / "pseudo.json"
    pseudo.write_text(json.dumps(coco))
    return pseudo, scenes


def boxes_xyxy(masks: np.ndarray) -> np.ndarray:
    """Tight xyxy boxes (exclusive right/bottom) from (N, H, W) masks, via the discover helper."""
    xywh = masks_to_boxes_xywh(masks)
    return np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1).astype(np.float32)


@contextmanager
def one_thread():
    """Run torch on one thread (the tests' time budget is per core; two threads on a shared box oversubscribe)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def read_log(run: Path) -> list[dict]:
    """The run's ``log.jsonl``, one dict per iteration."""
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
