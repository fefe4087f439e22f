"""hassod.locks: one writer at a time, and no stale lock after the holder is gone."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from hassod.locks import BusyError, exclusive


def test_a_second_holder_is_refused_with_the_first_ones_pid(tmp_path):
    lock = tmp_path / "job.lock"
    with exclusive(lock, "busy: pid {pid}"):
        assert lock.read_text() == str(os.getpid())
        with pytest.raises(BusyError, match=f"^busy: pid {os.getpid()}$"):
            with exclusive(lock, "busy: pid {pid}"):
                pass
    with exclusive(lock, "busy: pid {pid}"):  # released at the end of the block
        pass


def test_a_killed_holder_leaves_no_lock(tmp_path):
    lock = tmp_path / "job.lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from hassod.locks import exclusive\n"
         "with exclusive(Path(sys.argv[1]), 'busy'):\n    print('held', flush=True); time.sleep(60)", str(lock)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(BusyError, match="^busy$"):
            with exclusive(lock, "busy"):
                pass
    finally:
        holder.kill()
        holder.wait()
    with exclusive(lock, "busy"):  # SIGKILL released it: nothing to clean up by hand
        assert lock.read_text() == str(os.getpid())
