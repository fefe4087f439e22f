"""Fixtures for catalog tests on SQLite and on a real PostgreSQL server.

The server is a throw-away cluster in a temporary directory, started once per
test session (per xdist worker) from Debian's binaries and reached only
through a unix socket in that directory, so it cannot clash with another
server or port. Each test gets a fresh database.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    import psycopg

INSTALL_HINT = "run .ci/install_postgres.sh (as root) to install Debian's postgresql package"


@dataclass(frozen=True)
class PostgresServer:
    """A running server: ``socket_dir`` is its unix-socket directory, superuser 'postgres'."""

    socket_dir: str

    def admin(self) -> psycopg.Connection:
        """Autocommit psycopg connection to the server's 'postgres' database."""
        import psycopg

        return psycopg.connect(host=self.socket_dir, user="postgres", dbname="postgres", autocommit=True)

    def url(self, database: str) -> str:
        """SQLAlchemy URL (psycopg 3) of ``database`` on this server."""
        return f"postgresql+psycopg://postgres@/{database}?host={self.socket_dir}"


def _pg_bin_dir() -> Path:
    """Newest /usr/lib/postgresql/<version>/bin holding initdb and pg_ctl."""
    found = [
        Path(d) for d in glob.glob("/usr/lib/postgresql/*/bin")
        if os.access(Path(d) / "initdb", os.X_OK) and os.access(Path(d) / "pg_ctl", os.X_OK)
    ]
    if not found:
        pytest.fail(
            f"PostgreSQL server binaries not found (/usr/lib/postgresql/*/bin/initdb, pg_ctl); {INSTALL_HINT}"
        )
    return max(found, key=lambda d: int(d.parent.name) if d.parent.name.isdigit() else -1)


def _run_as_server_user(root_dir: str) -> list[str]:
    """Command prefix running the server unprivileged: initdb and postgres refuse root."""
    if os.geteuid() != 0:
        return []
    try:
        user = pwd.getpwnam("postgres")
    except KeyError:
        pytest.fail(f"running as root but there is no 'postgres' system user to run the server; {INSTALL_HINT}")
    if shutil.which("runuser") is None:
        pytest.fail("running as root but `runuser` (util-linux) is missing to drop privileges for the server")
    os.chown(root_dir, user.pw_uid, user.pw_gid)
    return ["runuser", "-u", "postgres", "--"]


def _check(cmd: list[str], what: str, cwd: str, log: Path | None = None) -> None:
    # cwd: the server user may not be allowed into the caller's working directory.
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd)
    if done.returncode != 0:
        tail = log.read_text()[-2000:] if log is not None and log.exists() else ""
        pytest.fail(f"{what} failed ({done.returncode}): {done.stdout}{done.stderr}{tail}")


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """Start a PostgreSQL cluster for the session; stop and delete it afterwards."""
    bin_dir = _pg_bin_dir()
    # Not pytest's tmp_path: its parents are private to the current user, out of the server user's reach.
    root = tempfile.mkdtemp(prefix="hassod-pg-")
    try:
        as_user = _run_as_server_user(root)
        data, log = Path(root) / "data", Path(root) / "server.log"
        _check(
            as_user + [str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust",
                       "-E", "UTF8", "--locale=C", "--no-sync"],
            "initdb", root,
        )
        # No TCP at all; durability off because the cluster is thrown away.
        options = (
            f"-k {shlex.quote(root)} -c listen_addresses='' "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        )
        pg_ctl = as_user + [str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(log)]
        _check(pg_ctl + ["-w", "-t", "30", "-o", options, "start"], "pg_ctl start", root, log)
        try:
            yield PostgresServer(socket_dir=root)
        finally:
            subprocess.run(pg_ctl + ["-m", "immediate", "-w", "stop"], capture_output=True, cwd=root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


_database_numbers = itertools.count()


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    """URL of a fresh, empty database on the session's server, dropped after the test."""
    name = f"test_{os.getpid()}_{next(_database_numbers)}"
    with postgres_server.admin() as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield postgres_server.url(name)
    with postgres_server.admin() as conn:
        # FORCE: a catalog the test left open must not keep the database alive.
        conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgresql"])
def catalog_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A catalog URL on each backend: a SQLite file, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'catalog.sqlite'}"
    return request.getfixturevalue("postgres_url")
