"""One-line messages for writes the storage refuses (full disk, no permission)."""
from __future__ import annotations

import errno

import pytest
import sqlalchemy as sa

from retrieval.cli.console import storage_error


def test_os_errors_by_kind():
    full = storage_error(OSError(errno.ENOSPC, "No space left on device", "/data/out.json"))
    assert full == ("no space left on device: /data/out.json; "
                    "finished work is saved: make room and run the same command again to continue")
    assert storage_error(PermissionError(errno.EACCES, "Permission denied", "/data")) == "permission denied: /data"
    # Not a storage refusal: the caller shows it as it is.
    assert storage_error(FileNotFoundError(errno.ENOENT, "No such file or directory", "x")) is None
    assert storage_error(ValueError("bad box")) is None


def test_wrapped_causes_are_found():
    try:
        try:
            raise OSError(errno.EDQUOT, "Disk quota exceeded")
        except OSError as exc:
            raise RuntimeError("worker failed") from exc
    except RuntimeError as wrapped:
        assert storage_error(wrapped).startswith("disk quota exceeded; finished work is saved")


def test_a_full_sqlite_catalog(tmp_path):
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'catalog.sqlite'}")
    with engine.connect() as connection:
        connection.exec_driver_sql("CREATE TABLE regions (blob TEXT)")
        connection.exec_driver_sql("PRAGMA max_page_count = 3")  # a real SQLITE_FULL, as on a full disk
        with pytest.raises(sa.exc.OperationalError) as full:
            connection.exec_driver_sql("INSERT INTO regions VALUES (?)", ("x" * 20000,))
    engine.dispose()
    assert storage_error(full.value) == (
        "the index catalog cannot be written (database or disk is full); "
        "finished work is saved: make room and run the same command again to continue"
    )
