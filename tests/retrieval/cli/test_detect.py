"""`hassod detect` then `hassod eval` end to end with a tiny random detector on synthetic scenes."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from retrieval.cli.detect import detect, evaluate_command

METRICS = {"AP", "AP50", "AP75", "AR@10", "AR@100", "AR@1000", "AR_small", "AR_medium", "AR_large"}


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    from hassod.model import DetectorSettings, build_detector, save_checkpoint

    torch.manual_seed(0)
    settings = DetectorSettings.tiny()
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    save_checkpoint(path, build_detector(settings, random_init=True), settings)
    return path


@pytest.fixture(scope="module")
def scene_folder(tmp_path_factory) -> tuple[Path, Path]:
    """(folder with 3 synthetic scenes as PNG and one broken file, their true regions as COCO json)."""
    from hassod.synthetic import make_scene, save_scenes

    root = tmp_path_factory.mktemp("scenes")
    scenes = [make_scene(seed, size=(96, 128)) for seed in range(3)]
    truth = save_scenes(scenes, root / "images", root / "truth.json")
    (root / "images" / "zz_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    return root / "images", truth


def _invoke(command, args: list[str]):
    return CliRunner().invoke(command, [str(a) for a in args], catch_exceptions=False)


def _check_metrics(metrics: dict) -> None:
    assert set(metrics) == METRICS
    assert all(0.0 <= v <= 1.0 or v == -1.0 for v in metrics.values())


def test_detect_then_eval(tmp_path, tiny_checkpoint, scene_folder):
    folder, truth = scene_folder
    out = tmp_path / "det.json"
    done = _invoke(detect, [folder, "--checkpoint", tiny_checkpoint, "--out", out, "--device", "cpu",
                            "--max-detections", "50", "--viz", tmp_path / "viz", "--json"])
    assert done.exit_code == 0, done.output
    summary = json.loads(done.stdout)
    assert summary["images"] == 3 and summary["resumed"] == 0
    assert [Path(p).name for p, _ in summary["skipped"]] == ["zz_broken.png"]
    results = json.loads(out.read_text())
    assert 0 < len(results) <= 150 and sum(summary["detections_per_level"]) == len(results)
    assert {r["image_id"] for r in results} <= {1, 2, 3}
    assert len(list((tmp_path / "viz").glob("*.png"))) == 3

    evaluated = _invoke(evaluate_command, ["--gt", truth, "--pred", out, "--json"])
    assert evaluated.exit_code == 0, evaluated.output
    report = json.loads(evaluated.stdout)
    assert report["images"] == 3 and report["detections"] == len(results) and report["ignored_detections"] == 0
    for iou_type in ("bbox", "segm"):
        _check_metrics(report[iou_type])
        for level in ("whole", "part", "subpart"):
            _check_metrics(report["by_level"][level][iou_type])
    assert sum(report["by_level"][n]["detections"] for n in ("whole", "part", "subpart")) == len(results)

    # Detecting inside `eval` is the same path: identical figures.
    direct = _invoke(evaluate_command, ["--gt", truth, "--checkpoint", tiny_checkpoint, "--images", folder,
                                        "--max-detections", "50", "--device", "cpu", "--json"])
    assert direct.exit_code == 0, direct.output
    assert json.loads(direct.stdout) == report
    # --level, --score-thresh and --max-detections select from --pred as a detector run with them does.
    everything = tmp_path / "all.json"
    assert _invoke(detect, [folder, "--checkpoint", tiny_checkpoint, "--out", everything, "--device", "cpu"]).exit_code == 0
    count = len(json.loads(everything.read_text()))
    for options in (["--max-detections", "5"], ["--level", "part", "--level", "subpart", "--score-thresh", "0.2"]):
        selected = json.loads(_invoke(evaluate_command, ["--gt", truth, "--pred", everything, *options,
                                                         "--json"]).stdout)
        rerun = _invoke(evaluate_command, ["--gt", truth, "--checkpoint", tiny_checkpoint, "--images", folder,
                                           *options, "--device", "cpu", "--json"])
        assert 0 < selected["detections"] < count and selected == json.loads(rerun.stdout)
    # Ground truth of more images than were detected on: only the covered ones count.
    larger = json.loads(truth.read_text())
    larger["images"].append({"id": 77, "file_name": "not_detected.png", "width": 128, "height": 96})
    larger["annotations"].append({**larger["annotations"][0], "id": 10_000, "image_id": 77})
    larger_path = tmp_path / "larger_truth.json"
    larger_path.write_text(json.dumps(larger))
    covered = _invoke(evaluate_command, ["--gt", larger_path, "--pred", out, "--json"])
    assert covered.exit_code == 0, covered.output
    assert json.loads(covered.stdout) == report
    # The table names every group and level.
    table = _invoke(evaluate_command, ["--gt", truth, "--pred", out]).stdout.splitlines()
    assert [row.split()[0] for row in table[1:9]] == ["all", "all", "whole", "whole", "part", "part", "subpart",
                                                      "subpart"]


def test_eval_of_the_truth_itself_is_perfect(tiny_checkpoint, scene_folder):
    _, truth = scene_folder
    done = _invoke(evaluate_command, ["--gt", truth, "--pred", truth, "--json"])
    assert done.exit_code == 0, done.output
    report = json.loads(done.stdout)
    assert report["bbox"]["AR@100"] == pytest.approx(1.0) and report["segm"]["AR@100"] == pytest.approx(1.0)
    assert report["bbox"]["AP"] == pytest.approx(1.0)
    levels = report["by_level"]
    truth_levels = [a["hier_level"] for a in json.loads(truth.read_text())["annotations"]]
    for level, name in enumerate(("whole", "part", "subpart")):
        # Each level's subset recovers exactly its own share of the objects.
        share = truth_levels.count(level) / len(truth_levels)
        assert levels[name]["detections"] == truth_levels.count(level)
        assert levels[name]["bbox"]["AR@100"] == pytest.approx(share, abs=0.02)


def test_level_filter_and_score_threshold(tmp_path, tiny_checkpoint, scene_folder):
    folder, _ = scene_folder
    out = tmp_path / "parts.json"
    done = _invoke(detect, [folder, "--checkpoint", tiny_checkpoint, "--out", out, "--level", "part",
                            "--level", "subpart", "--score-thresh", "0.3", "--device", "cpu", "--json"])
    assert done.exit_code == 0, done.output
    results = json.loads(out.read_text())
    assert {r["hier_level"] for r in results} <= {1, 2} and all(r["score"] >= 0.3 for r in results)


def test_bad_inputs_are_one_line_errors(tmp_path, scene_folder):
    folder, truth = scene_folder
    missing = _invoke(detect, [folder, "--checkpoint", tmp_path / "nope.pt", "--out", tmp_path / "d.json"])
    assert missing.exit_code == 2
    assert missing.stderr.startswith("error: ") and len(missing.stderr.strip().splitlines()) == 1
    assert "nope.pt" in missing.stderr
    not_a_checkpoint = tmp_path / "fake.pt"
    not_a_checkpoint.write_text("hello")
    wrong = _invoke(detect, [folder, "--checkpoint", not_a_checkpoint, "--out", tmp_path / "d.json"])
    assert wrong.exit_code == 2 and len(wrong.stderr.strip().splitlines()) == 1
    empty_gt = tmp_path / "empty.json"
    empty_gt.write_text(json.dumps({"images": [], "annotations": [], "categories": []}))
    no_images = _invoke(evaluate_command, ["--gt", empty_gt, "--pred", truth])
    assert no_images.exit_code == 2 and "no images" in no_images.stderr
    both = _invoke(evaluate_command, ["--gt", truth])
    assert both.exit_code == 2 and "--pred" in both.stderr
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_text(json.dumps([{"image_id": 999, "bbox": [0, 0, 5, 5], "score": 0.5}]))
    unmatched = _invoke(evaluate_command, ["--gt", truth, "--pred", elsewhere, "--json"])
    assert unmatched.exit_code == 0 and "do the file names match" in unmatched.stderr
    assert json.loads(unmatched.stdout)["ignored_detections"] == 1
    levelless = _invoke(evaluate_command, ["--gt", truth, "--pred", elsewhere, "--level", "whole"])
    assert levelless.exit_code == 2 and "--level needs detections with 'hier_level'" in levelless.stderr
    foreign = tmp_path / "foreign_pseudo.json"
    foreign.write_text(json.dumps({"images": [{"id": 1, "file_name": "other.png"}], "annotations": []}))
    no_overlap = _invoke(evaluate_command, ["--gt", truth, "--pred", foreign])
    assert no_overlap.exit_code == 2 and "none of the images" in no_overlap.stderr


def test_eval_with_checkpoint_on_real_photos_uses_only_the_images_found(tmp_path, tiny_checkpoint, shared_data,
                                                                        coco128_images):
    import shutil

    folder = tmp_path / "photos"
    folder.mkdir()
    for photo in coco128_images[:2]:
        shutil.copy(photo, folder)
    gt = shared_data / "coco128" / "instances.json"
    done = _invoke(evaluate_command, ["--gt", gt, "--checkpoint", tiny_checkpoint, "--images", folder,
                                      "--max-detections", "30", "--device", "cpu", "--json"])
    assert done.exit_code == 0, done.output
    report = json.loads(done.stdout)
    # 2 of the 128 ground-truth images were there to detect on; polygons in the ground truth allow mask metrics.
    assert report["images"] == 2 and 0 < report["detections"] <= 60 and report["ignored_detections"] == 0
    _check_metrics(report["bbox"])
    _check_metrics(report["segm"])
    elsewhere = tmp_path / "empty"
    elsewhere.mkdir()
    (elsewhere / "x.png").write_bytes(b"nothing")
    none = _invoke(evaluate_command, ["--gt", gt, "--checkpoint", tiny_checkpoint, "--images", elsewhere])
    assert none.exit_code == 2 and "none of the images" in none.stderr
