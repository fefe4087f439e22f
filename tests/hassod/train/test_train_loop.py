"""The training loop on a tiny model: exact resume, the log, evaluation, refusals, the CLI."""
from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from hassod.model import DetectorSettings, read_checkpoint
from hassod.train.data import Augmentation
from hassod.train.loop import TrainError, train
from hassod.train.settings import TrainSettings
from retrieval.cli.train import train as train_command
from tests.hassod.train.train_helpers import read_log, write_scenes

SETTINGS = TrainSettings(batch_size=2, iterations=8, warmup_iters=2, checkpoint_period=3, device="cpu",
                         workers=0, lr=0.01, augmentation=Augmentation(copy_paste_prob=0.5), eval_period=4)


@pytest.fixture(scope="module")
def pseudo(tmp_path_factory) -> Path:
    path, _ = write_scenes(tmp_path_factory.mktemp("scenes"), [11, 12, 13], size=(96, 128))
    return path


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(pseudo, tmp_path):
    detector = DetectorSettings.tiny()
    whole = train(SETTINGS, detector, pseudo, None, tmp_path / "whole", eval_gt=pseudo, progress=False)
    assert whole.finished and whole.iteration == 8
    first = train(SETTINGS, detector, pseudo, None, tmp_path / "split", stop_after=4, progress=False)
    assert not first.finished and first.iteration == 4 and first.final_checkpoint is None
    assert read_checkpoint(tmp_path / "split" / "last.pth")["iteration"] == 4
    second = train(SETTINGS, detector, pseudo, None, tmp_path / "split", resume=True, progress=False)
    assert second.finished and second.iteration == 8

    a = read_checkpoint(tmp_path / "whole" / "last.pth")
    b = read_checkpoint(tmp_path / "split" / "last.pth")
    assert a["model"].keys() == b["model"].keys()
    differing = [k for k in a["model"] if not torch.equal(a["model"][k], b["model"][k])]
    assert differing == []
    # Momentum buffers too, and the final model file holds the same weights.
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    final = read_checkpoint(tmp_path / "whole" / "model_final.pth")
    assert all(torch.equal(final["model"][k], a["model"][k]) for k in a["model"])

    log_a, log_b = read_log(tmp_path / "whole"), read_log(tmp_path / "split")
    assert [r["iteration"] for r in log_a] == list(range(1, 9)) == [r["iteration"] for r in log_b]
    for ra, rb in zip(log_a, log_b):
        losses = {k: v for k, v in ra.items() if k.startswith("loss")}
        assert losses and all(math.isfinite(v) for v in losses.values())
        assert ra["total_loss"] == pytest.approx(sum(losses.values()), rel=1e-5)
        assert ra["total_loss"] == rb["total_loss"] and ra["lr"] == rb["lr"]
    assert log_a[0]["lr"] == pytest.approx(0.01 * 0.001)
    assert log_a[3]["lr"] == pytest.approx(0.01 * 0.5 * (1 + math.cos(math.pi * 1 / 6)))
    # Evaluation on the held-out file every 4 iterations, in that iteration's line.
    evals = {r["iteration"]: r["eval"] for r in log_a if "eval" in r}
    assert sorted(evals) == [4, 8]
    assert all(0.0 <= e["AR@100"] <= 1.0 and "AP" in e for e in evals.values())
    assert [e["iteration"] for e in whole.evaluations] == [4, 8]


def test_refusals_are_one_line_errors(pseudo, tmp_path):
    detector = DetectorSettings.tiny()
    short = replace(SETTINGS, iterations=2, eval_period=0)
    train(short, detector, pseudo, None, tmp_path / "run", progress=False)
    with pytest.raises(TrainError, match="already holds a run"):
        train(short, detector, pseudo, None, tmp_path / "run", progress=False)
    with pytest.raises(TrainError, match=r"other settings \(batch_size, lr\)"):
        train(replace(short, batch_size=4, lr=0.02), detector, pseudo, None, tmp_path / "run", resume=True)
    with pytest.raises(TrainError, match="nothing to resume"):
        train(short, detector, pseudo, None, tmp_path / "empty", resume=True)
    # Settings that only say how to run (workers, periods, device) may change on resume.
    done = train(replace(short, workers=1, checkpoint_period=7), detector, pseudo, None, tmp_path / "run",
                 resume=True, progress=False)
    assert done.iteration == 2 and done.finished


def test_cli_trains_and_reports(pseudo, tmp_path):
    runner = CliRunner()
    out = tmp_path / "cli"
    args = ["--pseudo", str(pseudo), "--out", str(out), "--backbone", "tiny", "--random-init", "--batch-size", "2",
            "--iterations", "2", "--warmup", "1", "--device", "cpu", "--workers", "0", "--json"]
    result = runner.invoke(train_command, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert summary["iteration"] == 2 and summary["finished"] and summary["skipped"] == 0
    assert (out / "model_final.pth").exists() and len(read_log(out)) == 2
    again = runner.invoke(train_command, args)
    assert again.exit_code == 2 and again.output.count("\n") == 1 and "--resume" in again.output
    missing = runner.invoke(train_command, ["--pseudo", str(tmp_path / "nope.json"), "--out", str(tmp_path / "x"),
                                            "--backbone", "tiny", "--device", "cpu"])
    assert missing.exit_code == 2 and "no such pseudo-label file" in missing.output
    no_gt = runner.invoke(train_command, [*args, "--out", str(tmp_path / "y"), "--eval-period", "1"])
    assert no_gt.exit_code == 2 and "--eval-period go with --eval-gt" in no_gt.output
    assert not (tmp_path / "y").exists()


def test_a_second_training_into_the_same_folder_is_refused_while_one_runs(pseudo, tmp_path):
    import fcntl

    from retrieval.cli import main

    out = tmp_path / "run"
    out.mkdir()
    args = ["train", "--pseudo", str(pseudo), "--out", str(out), "--backbone", "tiny", "--random-init",
            "--batch-size", "2", "--iterations", "1", "--warmup", "0", "--device", "cpu", "--workers", "0"]
    with open(out / "train.lock", "w") as running:  # held the way a running training holds it
        fcntl.flock(running, fcntl.LOCK_EX | fcntl.LOCK_NB)
        running.write("4242")
        running.flush()
        refused = CliRunner().invoke(main, args)
    assert refused.exit_code == 2, refused.output
    assert refused.output == f"error: another `hassod train` (pid 4242) is writing {out}; run this one when it has finished\n"
    assert sorted(p.name for p in out.iterdir()) == ["train.lock"]
    assert CliRunner().invoke(main, args).exit_code == 0 and (out / "model_final.pth").exists()


def test_cli_image_sizes_reach_the_saved_model(pseudo, tmp_path):
    out = tmp_path / "sized"
    args = ["--pseudo", str(pseudo), "--out", str(out), "--backbone", "tiny", "--batch-size", "2", "--iterations", "1",
            "--warmup", "0", "--device", "cpu", "--workers", "0", "--json",
            "--sizes", "96,112", "--test-size", "100", "--max-size", "160"]
    result = CliRunner().invoke(train_command, args)
    assert result.exit_code == 0, result.output
    settings = read_checkpoint(out / "model_final.pth")["settings"]
    assert (tuple(settings["min_size_train"]), settings["min_size_test"], settings["max_size"]) == ((96, 112), 100, 160)
    bad = CliRunner().invoke(train_command, [*args[:-6], "--sizes", "96,big"])
    assert bad.exit_code == 2 and "--sizes" in bad.output
