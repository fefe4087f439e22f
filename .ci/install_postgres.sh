#!/bin/sh
# Install the PostgreSQL server binaries that tests/indexer/conftest.py starts
# (initdb, pg_ctl under /usr/lib/postgresql/<version>/bin, and the `postgres`
# system user the server runs as when the tests run as root).
#
# Usage: .ci/install_postgres.sh        (as root, or a user with sudo)
# Idempotent: does nothing when the binaries and the user are already there.
# Quiet: prints nothing on success; on failure prints the apt log and exits 1.
set -eu

have_server() {
    for bin in /usr/lib/postgresql/*/bin; do
        [ -x "$bin/initdb" ] && [ -x "$bin/pg_ctl" ] && id postgres >/dev/null 2>&1 && return 0
    done
    return 1
}

have_server && exit 0

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || { echo "install_postgres.sh: needs root or sudo" >&2; exit 1; }
    SUDO="sudo"
fi

log=$(mktemp)
trap 'rm -f "$log"' EXIT
export DEBIAN_FRONTEND=noninteractive
# The tests make their own throw-away cluster; Debian's default "main" cluster
# would only be a stray server on port 5432, so ask postgresql-common not to
# create it (an existing config file is kept as it is).
if [ ! -e /etc/postgresql-common/createcluster.conf ]; then
    $SUDO mkdir -p /etc/postgresql-common
    echo "create_main_cluster = false" | $SUDO tee /etc/postgresql-common/createcluster.conf >/dev/null
fi
if ! { $SUDO apt-get update -qq &&
       $SUDO apt-get install -y -qq --no-install-recommends \
           -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold postgresql postgresql-client; } >"$log" 2>&1; then
    cat "$log" >&2
    echo "install_postgres.sh: apt-get install postgresql failed" >&2
    exit 1
fi

have_server || { echo "install_postgres.sh: postgresql installed but initdb/pg_ctl or the postgres user are missing" >&2; exit 1; }
