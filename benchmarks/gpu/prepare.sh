#!/usr/bin/env bash
# Prepare what benchmarks/gpu/check.sh needs on the GPU machine, on this (CPU) machine,
# from the repository root:
#   .whl/      cp312 manylinux x86_64 wheels of what the GPU image lacks (benchmarks/gpu/wheels.txt),
#              plus a cp312 wheel of pydensecrf2 built here (or its sdist, to build there);
#   .gpudata/  a copy of the first --images COCO128 photos (sorted by name) and their
#              instances.json, since ../shared does not travel to the GPU machine.
# Both are git-ignored and carried by the device call (carry: [".whl", ".gpudata"]).
# It prints the size of everything that travels (tracked and untracked-not-ignored files,
# .whl, .gpudata) and fails when that exceeds --limit-mib (the device tool's limit is 64 MiB).
# Idempotent: what is already there is kept, so a second run takes a second or two.
#
# Usage: bash benchmarks/gpu/prepare.sh [--images 64] [--limit-mib 60] [--coco128 DIR] [--force]
# Environment: PIP_PYTHON (a Python with pip, for downloads), PYTHON312 (a CPython 3.12 with pip,
# to build the pydensecrf2 wheel).
set -euo pipefail

IMAGES=64
LIMIT_MIB=60
FORCE=0
ROOT=$(git rev-parse --show-toplevel)
COCO128="$ROOT/../shared/data/coco128"
while [ $# -gt 0 ]; do
    case "$1" in
        --images) IMAGES=$2; shift 2 ;;
        --limit-mib) LIMIT_MIB=$2; shift 2 ;;
        --coco128) COCO128=$2; shift 2 ;;
        --force) FORCE=1; shift ;;
        -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
        *) echo "prepare.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
cd "$ROOT"
WHL=.whl
DATA=.gpudata/coco128
LIST=benchmarks/gpu/wheels.txt
DENSECRF=pydensecrf2==1.1
PLATFORMS="--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64"

if [ "$FORCE" = 1 ]; then rm -rf "$WHL" .gpudata; fi
mkdir -p "$WHL"

# A Python whose pip can download: the project's venv when there is one.
if [ -n "${PIP_PYTHON:-}" ]; then PYP=$PIP_PYTHON
elif [ -x .venv/bin/python ]; then PYP=.venv/bin/python
else PYP=python3; fi

# Wheel file names start with the normalised project name (PEP 427: runs of -_. become _).
wheel_prefix() {  # NAME VERSION -> name_normalised-VERSION-
    local name
    name=$(printf '%s' "$1" | tr 'A-Z' 'a-z' | sed -E 's/[-_.]+/_/g')
    printf '%s-%s-' "$name" "$2"
}
have_wheel() {  # NAME VERSION: is a wheel of exactly this version in .whl?
    ls "$WHL" | tr 'A-Z' 'a-z' | awk -v p="$(wheel_prefix "$1" "$2")" 'index($0, p) == 1 && /\.whl$/ {f = 1} END {exit !f}'
}

# 1. The listed wheels, one version each.
wanted=()
missing=()
while read -r line; do
    spec=${line%%#*}
    spec=$(printf '%s' "$spec" | tr -d '[:space:]')
    [ -z "$spec" ] && continue
    wanted+=("$spec")
    have_wheel "${spec%%==*}" "${spec##*==}" || missing+=("$spec")
done < "$LIST"
wanted+=("$DENSECRF")
if [ ${#missing[@]} -gt 0 ]; then
    echo "downloading ${#missing[@]} wheels: ${missing[*]}"
    # shellcheck disable=SC2086
    "$PYP" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        $PLATFORMS -d "$WHL" "${missing[@]}" 2>&1 | grep -v "^WARNING: Location" || true
    for spec in "${missing[@]}"; do
        have_wheel "${spec%%==*}" "${spec##*==}" || { echo "prepare.sh: no cp312 manylinux wheel of $spec" >&2; exit 1; }
    done
fi

# 2. pydensecrf2: a cp312 wheel built here (stripped: 0.5 MB instead of 3.7), else its sdist.
if ! have_wheel pydensecrf2 1.1; then
    py312=${PYTHON312:-}
    if [ -z "$py312" ]; then
        for candidate in python3.12 $(ls -d /root/.pyenv/versions/3.12*/bin/python3.12 /usr/bin/python3.12 2>/dev/null); do
            if "$candidate" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null \
                && "$candidate" -m pip --version >/dev/null 2>&1; then py312=$candidate; break; fi
        done
    fi
    scratch=$(mktemp -d)
    trap 'rm -rf "$scratch"' EXIT
    "$PYP" -m pip download -q --no-deps --no-binary=:all: -d "$scratch" "$DENSECRF" 2>&1 | grep -v "^WARNING: Location" || true
    sdist=$(ls "$scratch"/pydensecrf2-*.tar.gz)
    built=""
    if [ -n "$py312" ]; then
        echo "building the pydensecrf2 cp312 wheel with $py312 (about a minute)"
        if CFLAGS="-g0" CXXFLAGS="-g0" LDFLAGS="-Wl,--strip-all" \
            "$py312" -m pip wheel -q --no-cache-dir --no-deps -w "$scratch/built" "$sdist" >"$scratch/build.log" 2>&1; then
            built=$(ls "$scratch"/built/pydensecrf2-1.1-cp312-*.whl)
        else
            tail -5 "$scratch/build.log" >&2
        fi
    fi
    if [ -n "$built" ]; then
        cp "$built" "$WHL/"
        rm -rf "$WHL/sdist"
    else
        echo "prepare.sh: no cp312 wheel of pydensecrf2 built here (no Python 3.12 with pip, or the build failed);" \
             "carrying its sdist: check.sh builds it there with the image's Cython" >&2
        mkdir -p "$WHL/sdist" && cp "$sdist" "$WHL/sdist/"
    fi
fi

# 3. Exactly the wanted versions: anything else in .whl (an older version from an earlier
#    list) would make the install fail on two versions of one package.
for file in "$WHL"/*.whl; do
    base=$(basename "$file" | tr 'A-Z' 'a-z')
    keep=0
    for spec in "${wanted[@]}"; do
        case "$base" in "$(wheel_prefix "${spec%%==*}" "${spec##*==}")"*) keep=1 ;; esac
    done
    [ $keep = 1 ] || { echo "removing $(basename "$file") (not in $LIST)"; rm -f "$file"; }
done

# 4. The COCO128 copy: the first $IMAGES photos by name and their annotations.
if [ ! -f "$DATA/instances.json" ] || [ "$(ls "$DATA/images" 2>/dev/null | wc -l)" != "$IMAGES" ]; then
    [ -f "$COCO128/instances.json" ] || { echo "prepare.sh: no $COCO128/instances.json (give --coco128 DIR)" >&2; exit 1; }
    rm -rf "$DATA" && mkdir -p "$DATA/images"
    ls "$COCO128/images" | grep -iE '\.(jpe?g|png)$' | sort | head -n "$IMAGES" | while read -r name; do
        cp "$COCO128/images/$name" "$DATA/images/"
    done
    "$PYP" - "$COCO128/instances.json" "$DATA" <<'PY'
import json, os, sys
gt = json.load(open(sys.argv[1]))
names = set(os.listdir(os.path.join(sys.argv[2], "images")))
images = [im for im in gt["images"] if im["file_name"] in names]
ids = {im["id"] for im in images}
gt = {**gt, "images": images, "annotations": [a for a in gt["annotations"] if a["image_id"] in ids]}
json.dump(gt, open(os.path.join(sys.argv[2], "instances.json"), "w"))
print(f"copied {len(images)} COCO128 images, {len(gt['annotations'])} objects")
PY
fi

# 5. Sizes: what the device call sends is the working tree (tracked and untracked-not-ignored
#    files) plus the carried paths.
sum_sizes() { xargs -0 -r stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}'; }
tree=$(git ls-files -z --cached --others --exclude-standard | sum_sizes)
whl=$(find "$WHL" -type f -print0 | sum_sizes)
data=$(find .gpudata -type f -print0 | sum_sizes)
total=$((tree + whl + data))
echo
echo "carried wheels (.whl):"
find "$WHL" -type f -printf '%s %P\n' | sort -k2 | awk '{printf "  %7.2f MiB  %s\n", $1 / 1048576, $2}'
mib() { awk -v b="$1" 'BEGIN {printf "%.1f MiB", b / 1048576}'; }
echo "working tree $(mib "$tree") + .whl $(mib "$whl") + .gpudata $(mib "$data") ($(ls "$DATA/images" | wc -l) images)" \
     "= $(mib "$total") travels (limit ${LIMIT_MIB} MiB here; the device tool's is 64 MiB)"
if [ "$total" -gt $((LIMIT_MIB * 1048576)) ]; then
    echo "prepare.sh: $(mib "$total") is over ${LIMIT_MIB} MiB: use fewer --images, or remove untracked files" >&2
    exit 1
fi
echo "ready: run benchmarks/gpu/check.sh on the GPU machine with carry [\".whl\", \".gpudata\"] (benchmarks/gpu/README.md)"
