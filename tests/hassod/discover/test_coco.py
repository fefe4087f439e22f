from __future__ import annotations

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from hassod.discover.coco import build_coco
from hassod.runs import ImageRecord, write_json_atomic


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
