#!/usr/bin/env bash
# The GPU readiness check (issue 13) in one command, from the repository root of the GPU machine:
#   bash benchmarks/gpu/check.sh            # the full check, target under 8 minutes on one H100
#   bash benchmarks/gpu/check.sh --cpu-smoke  # the same steps at tiny sizes on a CPU (no install)
# It installs the wheels that benchmarks/gpu/prepare.sh put in .whl/ into /tmp/site (PYTHONPATH,
# nothing else of the image changes), prints the environment, then runs benchmarks/gpu/check.py:
# every step with its own time limit, a table printed at the end and written (after every step)
# to $OUT/gpu_check.md, gpu_check.json and gpu_check.log ($OUT unset: ./gpu_check_out).
# Arguments go to check.py (python3 benchmarks/gpu/check.py --help). Environment: PYTHON (the
# interpreter, python3 by default), GPU_CHECK_INSTALL=0|1 (install the wheels: 1 unless --cpu-smoke).
set -uo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}
SITE=${GPU_CHECK_SITE:-/tmp/site}
OUTDIR=${OUT:-$PWD/gpu_check_out}
WORK=$PWD/gpu_check_work
for arg in "$@"; do
    case "$arg" in --cpu-smoke) SMOKE=1 ;; esac
done
INSTALL=${GPU_CHECK_INSTALL:-$([ -n "${SMOKE:-}" ] && echo 0 || echo 1)}
prev=""
for arg in "$@"; do  # check.py's --out / --work, when given, are used here too
    case "$prev" in --out) OUTDIR=$arg ;; --work) WORK=$arg ;; esac
    prev=$arg
done
mkdir -p "$OUTDIR" "$WORK/logs"
export PYTHONUNBUFFERED=1

# 1. The carried wheels (and pydensecrf2 from its sdist when no wheel was carried).
install_log="$WORK/logs/install.log"
: >"$install_log"
start=$(date +%s)
if [ "$INSTALL" = 1 ]; then
    status=ok
    if compgen -G ".whl/*.whl" >/dev/null; then
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
            .whl/*.whl >>"$install_log" 2>&1 || status=failed
    else
        echo "no .whl/*.whl: run benchmarks/gpu/prepare.sh here first and carry .whl" >>"$install_log"; status=failed
    fi
    if ! compgen -G ".whl/pydensecrf2-*.whl" >/dev/null && compgen -G ".whl/sdist/pydensecrf2-*.tar.gz" >/dev/null; then
        echo "building pydensecrf2 from its sdist (no wheel carried)" >>"$install_log"
        "$PYTHON" -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --target "$SITE" \
            .whl/sdist/pydensecrf2-*.tar.gz >>"$install_log" 2>&1 || status=failed
    fi
    export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
    count=$(ls .whl/*.whl 2>/dev/null | wc -l)
    export GPU_CHECK_INSTALL_STATUS="$status"
    export GPU_CHECK_INSTALL_RESULT="$count wheels from .whl into $SITE"
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    export GPU_CHECK_INSTALL_STATUS=skipped
    export GPU_CHECK_INSTALL_RESULT="not installed (--cpu-smoke or GPU_CHECK_INSTALL=0: the environment's own packages)"
fi
export GPU_CHECK_INSTALL_SECONDS=$(($(date +%s) - start))
export GPU_CHECK_INSTALL_LOG="$install_log"
grep -v "Running pip as the 'root' user" "$install_log" | tail -5

# 2. The environment, as the machine reports it.
echo "== $(date -u '+%F %T') UTC on $(hostname); $("$PYTHON" --version 2>&1) at $(command -v "$PYTHON")"
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -4
fi
echo "install: $GPU_CHECK_INSTALL_STATUS ($GPU_CHECK_INSTALL_RESULT, ${GPU_CHECK_INSTALL_SECONDS} s)"

# 3. The steps.
exec "$PYTHON" benchmarks/gpu/check.py --out "$OUTDIR" --work "$WORK" "$@"
