from __future__ import annotations

import json

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from hassod.discover.coco import (
    ImageRecord,
    ProgressLog,
    SettingsMismatchError,
    build_coco,
    write_json_atomic,
)


def _rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode()
    return rle


def _record(path: str, masks: list[np.ndarray], parents: list[int], levels: list[int]) -> ImageRecord:
    anns = []
    for mask, parent, level in zip(masks, parents, levels):
        rle = _rle(mask)
        anns.append({"segmentation": rle, "bbox": mask_utils.toBbox(rle).tolist(), "area": int(mask.sum()),
                     "score": 0.9, "hier_level": level, "parent": parent, "threshold": 0.4})
    h, w = masks[0].shape if masks else (10, 10)
    return ImageRecord(path=path, width=w, height=h, annotations=anns)


def test_build_coco_ids_parents_and_pycocotools_round_trip(tmp_path):
    whole = np.zeros((30, 40), bool); whole[5:25, 5:35] = True
    part = np.zeros((30, 40), bool); part[10:20, 10:20] = True
    records = [
        _record(str(tmp_path / "b.jpg"), [whole, part], [-1, 0], [0, 1]),
        _record(str(tmp_path / "a.jpg"), [part], [-1], [0]),
        ImageRecord(path=str(tmp_path / "c.txt"), error="not an image"),
    ]
    coco = build_coco(records, tmp_path, {"backbone": "x"})
    assert [im["file_name"] for im in coco["images"]] == ["a.jpg", "b.jpg"]  # sorted, ids 1..n
    assert [a["id"] for a in coco["annotations"]] == [1, 2, 3]
    b_whole, b_part = coco["annotations"][1], coco["annotations"][2]
    assert b_whole["image_id"] == 2 and b_whole["parent_id"] is None
    assert b_part["parent_id"] == b_whole["id"] and b_part["hier_level"] == 1
    assert coco["skipped"] == [{"file_name": "c.txt", "error": "not an image"}]

    path = tmp_path / "pseudo.json"
    write_json_atomic(coco, path)
    api = COCO(str(path))
    assert len(api.getAnnIds()) == 3
    decoded = api.annToMask(api.loadAnns([b_part["id"]])[0]).astype(bool)
    np.testing.assert_array_equal(decoded, part)
    assert api.loadAnns([b_whole["id"]])[0]["bbox"] == [5.0, 5.0, 30.0, 20.0]


def test_progress_log_resumes_and_cuts_a_torn_last_line(tmp_path):
    log_path = tmp_path / "out.json.progress.jsonl"
    log = ProgressLog(log_path, {"backbone": "x", "thresholds": [0.4]})
    log.append(ImageRecord(path="/a.jpg", width=3, height=2))
    log.append(ImageRecord(path="/b.jpg", error="not an image"))
    log.close()
    with open(log_path, "a") as handle:  # a kill -9 in the middle of a write
        handle.write('{"path": "/c.jpg", "wid')

    again = ProgressLog(log_path, {"backbone": "x", "thresholds": [0.4]})
    assert sorted(again.done) == ["/a.jpg", "/b.jpg"]
    assert again.done["/b.jpg"].error == "not an image"
    again.append(ImageRecord(path="/c.jpg", width=1, height=1))
    again.close()
    lines = log_path.read_text().splitlines()
    assert len(lines) == 4 and all(json.loads(line) for line in lines)


def test_progress_log_refuses_other_settings(tmp_path):
    log_path = tmp_path / "p.jsonl"
    ProgressLog(log_path, {"backbone": "x", "thresholds": [0.4]}).close()
    with pytest.raises(SettingsMismatchError, match="thresholds"):
        ProgressLog(log_path, {"backbone": "x", "thresholds": [0.3]})


def test_atomic_write_keeps_old_file_when_serialisation_fails(tmp_path):
    path = tmp_path / "x.json"
    write_json_atomic({"ok": 1}, path)
    with pytest.raises(TypeError):
        write_json_atomic({"bad": object()}, path)
    assert json.loads(path.read_text()) == {"ok": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]
