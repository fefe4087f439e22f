"""`hassod discover` end to end on real photos and every kind of bad input."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from pycocotools.coco import COCO

from retrieval.cli import main
from hassod.discover.levels import coverage_matrix
from tests.conftest import limit_file_size


def _odd_images(folder: Path, photo: Path) -> None:
    """Grayscale 16-bit, RGBA and a 6x5 image made from a real photo."""
    rgb = np.asarray(Image.open(photo).convert("RGB").resize((320, 240)))
    gray16 = (rgb.mean(axis=2) * 257).astype(np.uint16)
    Image.fromarray(gray16).save(folder / "gray16.png")
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 200, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(folder / "rgba.png")
    Image.fromarray(rgb[:5, :6]).save(folder / "tiny.png")


def _check_hierarchy(api: COCO) -> None:
    for image_id in api.getImgIds():
        anns = api.loadAnns(api.getAnnIds(imgIds=[image_id]))
        by_id = {a["id"]: a for a in anns}
        for ann in anns:
            assert ann["hier_level"] in (0, 1, 2)
            mask = api.annToMask(ann)
            assert int(mask.sum()) == ann["area"] >= 100
            if ann["parent_id"] is None:
                assert ann["hier_level"] == 0
                continue
            parent = by_id[ann["parent_id"]]  # parent in the same image
            assert ann["hier_level"] == min(parent["hier_level"] + 1, 2)
            pair = np.stack([mask, api.annToMask(parent)]).astype(bool)
            assert coverage_matrix(pair)[0, 1] >= 0.9


def test_discover_end_to_end_with_odd_and_bad_inputs(tmp_path, coco128_images, bad_inputs):
    folder = tmp_path / "photos"
    folder.mkdir()
    for photo in coco128_images[:2]:
        shutil.copy(photo, folder)
    _odd_images(folder, coco128_images[2])
    for path in bad_inputs.values():
        shutil.copy(path, folder)
    out, viz = tmp_path / "pseudo.json", tmp_path / "viz"

    result = CliRunner().invoke(
        main, ["discover", str(folder), "--out", str(out), "--viz", str(viz), "--workers", "1",
               "--max-pixels", "50000000", "--json"],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert summary["images"] == 5
    reasons = dict((Path(p).name, r) for p, r in summary["skipped"])
    assert set(reasons) == {"notes.txt", "empty.jpg", "truncated.jpg", "huge.png"}
    assert "too large" in reasons["huge.png"] and "not an image" in reasons["notes.txt"]

    api = COCO(str(out))
    names = {img["file_name"]: img for img in api.dataset["images"]}
    assert set(names) == {p.name for p in coco128_images[:2]} | {"gray16.png", "rgba.png", "tiny.png"}
    assert (names["tiny.png"]["width"], names["tiny.png"]["height"]) == (6, 5)
    assert not api.getAnnIds(imgIds=[names["tiny.png"]["id"]])  # 30 px: nothing reaches 100 px
    for photo in coco128_images[:2]:
        assert len(api.getAnnIds(imgIds=[names[photo.name]["id"]])) >= 3
    assert len(api.dataset["skipped"]) == 4
    _check_hierarchy(api)
    assert sum(summary["masks_per_level"]) == len(api.getAnnIds())
    overlays = sorted(viz.glob("*.png"))
    assert len(overlays) == 5
    assert Image.open(next(p for p in overlays if p.name.startswith("tiny"))).size == (6, 5)


def test_outputs_written_inside_the_folder_are_not_taken_for_images(tmp_path, coco128_images):
    folder = tmp_path / "photos"
    folder.mkdir()
    shutil.copy(coco128_images[0], folder)
    args = ["discover", str(folder), "--out", str(folder / "pseudo.json"), "--viz", str(folder / "viz"),
            "--workers", "1", "--json"]
    for _ in range(2):  # the second run sees the first's JSON, progress log and overlays in the folder
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, result.output
        summary = json.loads(result.output.strip().splitlines()[-1])
        assert summary["images"] == 1 and summary["skipped"] == []
    assert [img["file_name"] for img in json.loads((folder / "pseudo.json").read_text())["images"]] == \
        [coco128_images[0].name]


def _run_cli(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "retrieval.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_killed_run_resumes_to_the_same_result(tmp_path, coco128_images):
    folder = tmp_path / "photos"
    folder.mkdir()
    for photo in coco128_images[3:6]:
        shutil.copy(photo, folder)
    reference = tmp_path / "reference.json"
    done = CliRunner().invoke(main, ["discover", str(folder), "--out", str(reference), "--workers", "1"])
    assert done.exit_code == 0, done.output

    out = tmp_path / "pseudo.json"
    progress = Path(str(out) + ".progress.jsonl")
    args = ["discover", str(folder), "--out", str(out), "--batch-size", "1"]
    process = _run_cli([*args, "--workers", "1"])
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None:
        if progress.exists() and len(progress.read_text().splitlines()) >= 2:  # settings + 1 image
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not out.exists()
    finished_before = len(progress.read_text().splitlines()) - 1
    assert 1 <= finished_before < 3

    process = _run_cli([*args, "--workers", "2"])  # parallel workers must give the same masks
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    assert "resumed" in stdout
    resumed, fresh = json.loads(out.read_text()), json.loads(reference.read_text())
    assert [im["file_name"] for im in resumed["images"]] == [im["file_name"] for im in fresh["images"]]
    keys = ("image_id", "segmentation", "bbox", "hier_level", "parent_id", "score")
    assert [[a[k] for k in keys] for a in resumed["annotations"]] == [[a[k] for k in keys] for a in fresh["annotations"]]


def test_a_refused_write_is_one_line_and_the_run_continues(tmp_path, coco128_images):
    folder = tmp_path / "photos"
    folder.mkdir()
    for photo in coco128_images[6:8]:
        shutil.copy(photo, folder)
    args = ["discover", str(folder), "--workers", "1", "--batch-size", "1"]
    reference = tmp_path / "reference.json"
    assert CliRunner().invoke(main, [*args, "--out", str(reference)]).exit_code == 0
    # Room for the settings line and the first image's record, not the second's.
    lines = Path(str(reference) + ".progress.jsonl").read_bytes().splitlines(keepends=True)
    room = len(lines[0]) + len(lines[1]) + len(lines[2]) // 2

    out = tmp_path / "pseudo.json"
    refused = subprocess.run([sys.executable, "-m", "retrieval.cli", *args, "--out", str(out)], capture_output=True,
                             text=True, timeout=300, preexec_fn=lambda: limit_file_size(room))
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
    assert refused.stderr.strip().splitlines()[-1] == (
        "error: file too large; finished work is saved: make room and run the same command again to continue")
    assert not out.exists()

    resumed = CliRunner().invoke(main, [*args, "--out", str(out)])
    assert resumed.exit_code == 0, resumed.output
    assert "(1 resumed from an earlier run)" in resumed.output
    keys = ("image_id", "segmentation", "bbox", "hier_level", "parent_id")
    assert [[a[k] for k in keys] for a in json.loads(out.read_text())["annotations"]] == [
        [a[k] for k in keys] for a in json.loads(reference.read_text())["annotations"]]


def test_clear_errors(tmp_path):
    runner = CliRunner()
    empty = tmp_path / "empty"
    empty.mkdir()
    result = runner.invoke(main, ["discover", str(empty), "--out", str(tmp_path / "o.json")])
    assert result.exit_code == 2 and "no files found" in result.output

    photo = tmp_path / "p.png"
    Image.new("RGB", (64, 64)).save(photo)
    result = runner.invoke(main, ["discover", str(photo), "--out", str(tmp_path / "o.json"), "--backbone", "nope"])
    assert result.exit_code == 2 and "unknown backbone 'nope'" in result.output

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = runner.invoke(main, ["discover", str(photo), "--out", str(tmp_path / "o.json"),
                                  "--backbone", "dino_vits16"], env=env)
    assert result.exit_code == 2 and "--weights" in result.output

    result = runner.invoke(main, ["discover", str(photo), "--out", str(tmp_path / "o.json"), "--thresholds", "2,1"])
    assert result.exit_code == 2 and "between -1 and 1" in result.output

    # Checked before any work, not when the finished results are written.
    result = runner.invoke(main, ["discover", str(photo), "--out", str(tmp_path)])
    assert result.exit_code == 2 and "is a directory" in result.output


def test_a_second_run_on_the_same_output_is_refused_while_one_runs(tmp_path):
    import fcntl

    photo = tmp_path / "p.png"
    Image.new("RGB", (64, 64), (90, 20, 200)).save(photo)
    out = tmp_path / "o.json"
    progress = Path(str(out) + ".progress.jsonl")
    with open(progress, "a") as running:  # held the way a running discover holds it
        fcntl.flock(running, fcntl.LOCK_EX | fcntl.LOCK_NB)
        result = CliRunner().invoke(main, ["discover", str(photo), "--out", str(out), "--workers", "1"])
    assert result.exit_code == 2 and result.output == f"error: another run is writing {progress}; run this one when it has finished\n"
    assert progress.read_text() == "" and not out.exists()  # the running one's log is untouched
    result = CliRunner().invoke(main, ["discover", str(photo), "--out", str(out), "--workers", "1"])
    assert result.exit_code == 0 and len(json.loads(out.read_text())["images"]) == 1


@pytest.mark.parametrize("change", [["--thresholds", "0.7,0.5"]])
def test_resume_with_other_settings_is_refused(tmp_path, change):
    photo = tmp_path / "p.png"
    Image.new("RGB", (64, 64), (90, 20, 200)).save(photo)
    out = tmp_path / "o.json"
    runner = CliRunner()
    assert runner.invoke(main, ["discover", str(photo), "--out", str(out), "--workers", "1"]).exit_code == 0
    result = runner.invoke(main, ["discover", str(photo), "--out", str(out), *change])
    assert result.exit_code == 2 and "other settings" in result.output
