from __future__ import annotations

import json

import pytest

from hassod.runs import ImageRecord, ProgressLog, SettingsMismatchError, write_json_atomic


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


def test_atomic_write_replaces_on_success_and_names_the_destination_when_it_cannot_start(tmp_path):
    from hassod.runs import atomic_write

    path = tmp_path / "deep" / "x.bin"
    with atomic_write(path, binary=True) as handle:
        handle.write(b"new")
    assert path.read_bytes() == b"new"
    with pytest.raises(RuntimeError):
        with atomic_write(path, binary=True) as handle:
            handle.write(b"torn")
            raise RuntimeError("killed")
    assert path.read_bytes() == b"new" and [p.name for p in path.parent.iterdir()] == ["x.bin"]
    long = tmp_path / ("n" * 250)  # a legal name whose temporary sibling's name is too long
    with pytest.raises(OSError) as caught:
        with atomic_write(long):
            pass
    assert caught.value.filename == str(long)


def test_a_damaged_progress_log_line_is_redone_and_a_damaged_header_refused(tmp_path):
    log_path = tmp_path / "p.jsonl"
    log = ProgressLog(log_path, {"backbone": "x"})
    for name in ("a", "b", "c"):
        log.append(ImageRecord(path=f"/{name}.jpg", width=1, height=1))
    log.close()
    lines = log_path.read_bytes().splitlines(keepends=True)
    log_path.write_bytes(b"".join([lines[0], lines[1], b"\xff\xfe{garbage\n", b"[1, 2]\n", lines[3]]))
    assert sorted(ProgressLog(log_path, {"backbone": "x"}).done) == ["/a.jpg", "/c.jpg"]  # /b.jpg is done again

    for header in (b"\xff\xfe not json\n", b"{}\n", b"[]\n", b""):
        log_path.write_bytes(header + lines[1])
        with pytest.raises(SettingsMismatchError, match="is empty or corrupt; delete it to start over"):
            ProgressLog(log_path, {"backbone": "x"})
