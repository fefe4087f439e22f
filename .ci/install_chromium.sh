#!/bin/sh
# Install the headless browser that tests/retrieval/test_web_page.py drives:
# Debian's chromium and its chromedriver (/usr/bin/chromium, /usr/bin/chromedriver).
# selenium itself is a Python dependency of the project's `dev` extra.
#
# Usage: .ci/install_chromium.sh        (as root, or a user with sudo)
# Idempotent: does nothing when both binaries are already there.
# Quiet: prints nothing on success; on failure prints the apt log and exits 1.
set -eu

have_browser() {
    [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]
}

have_browser && exit 0

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || { echo "install_chromium.sh: needs root or sudo" >&2; exit 1; }
    SUDO="sudo"
fi

log=$(mktemp)
trap 'rm -f "$log"' EXIT
export DEBIAN_FRONTEND=noninteractive
if ! { $SUDO apt-get update -qq &&
       $SUDO apt-get install -y -qq --no-install-recommends chromium chromium-driver fonts-dejavu-core; } >"$log" 2>&1; then
    cat "$log" >&2
    echo "install_chromium.sh: apt-get install chromium chromium-driver failed" >&2
    exit 1
fi

have_browser || { echo "install_chromium.sh: chromium installed but /usr/bin/chromium or /usr/bin/chromedriver is missing" >&2; exit 1; }
