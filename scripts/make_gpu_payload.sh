#!/usr/bin/env bash
# What a GPU machine without internet (Python 3.12, its own torch) needs to run scripts/gpu_check.sh:
#   - the wheels (py3.12, manylinux x86_64) of DALI and everything it and this project import, torch excepted;
#   - realistic 256-px bench shards of the 1000 real ImageNet JPEGs (for when ../shared/data is absent there).
# Both go into one tar, split into 60 MB parts .dev/p1/part, .dev/p2/part, ... so that each part can travel on
# its own; .dev/p1/SHA256SUMS lets gpu_check.sh check that every part arrived before it reassembles them.
#
#   scripts/make_gpu_payload.sh              # needs internet (or a pip index) and the real images for the shards
#   PART_SIZE=40M scripts/make_gpu_payload.sh
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
DEV=.dev
PART_SIZE=${PART_SIZE:-60M}
PYTHON_VERSION=${PYTHON_VERSION:-3.12}
REAL_IMAGES=${REAL_IMAGES:-../shared/data/imagenet-sample}

# DALI and its runtime dependencies (nvcomp left out: only DALI's decompression operators use it).
DALI=(nvidia-dali-cuda130==2.4.0 nvidia-nvimgcodec-cu13 nvidia-nvjpeg makefun gast astunparse optree
      typing-extensions nvtx libcst pyyaml packaging six wheel)
# This project's own imports besides torch; gpu_check.sh installs only those the machine lacks.
PROJECT=(webdataset braceexpand numpy pillow scipy tqdm pytest iniconfig pluggy pygments
         matplotlib contourpy cycler fonttools kiwisolver pyparsing python-dateutil
         scikit-learn joblib threadpoolctl)

# The versions this checkout's .venv runs (pyproject's pins and what they resolved to), so both machines match.
pinned() {
    "$PY" - "$@" <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, version
for name in sys.argv[1:]:
    if "==" in name:
        print(name)
        continue
    try:
        print(f"{name}=={version(name)}")
    except PackageNotFoundError:
        print(name)
EOF
}

echo "== wheels for Python $PYTHON_VERSION, manylinux x86_64"
rm -rf "$DEV/wheels" "$DEV/payload" "$DEV/bench-shards" "$DEV"/p[0-9]*
mkdir -p "$DEV/wheels" "$DEV/payload"
mapfile -t wanted < <(pinned "${DALI[@]}" "${PROJECT[@]}")
"$PY" -m pip download --quiet --disable-pip-version-check --only-binary=:all: --no-deps \
    --python-version "$PYTHON_VERSION" --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_28_x86_64 --dest "$DEV/wheels" "${wanted[@]}"
for wheel in "$DEV"/wheels/*.whl; do echo "  ${wheel##*/}"; done

if [ -d "$REAL_IMAGES" ]; then
    echo "== bench shards from $REAL_IMAGES (one copy; gpu_check.sh replicates them)"
    "$PY" bench.py --make_data="$DEV/bench-shards" --raw="$REAL_IMAGES" --repeat=1
    rm -rf "$DEV/bench-shards/.raw" "$DEV/bench-shards/.build"
    contents=(wheels bench-shards)
else
    echo "== no $REAL_IMAGES: the payload carries no bench shards"
    contents=(wheels)
fi

echo "== payload: tar of ${contents[*]}, split into $PART_SIZE parts"
tar -C "$DEV" -cf "$DEV/payload/payload.tar" "${contents[@]}"
( cd "$DEV/payload" && split -b "$PART_SIZE" -d -a 3 payload.tar part. )
parts=("$DEV"/payload/part.*)
for i in "${!parts[@]}"; do
    mkdir -p "$DEV/p$((i + 1))"
    mv "${parts[$i]}" "$DEV/p$((i + 1))/part"
done
{
    echo "# parts: ${#parts[@]}"
    echo "# payload.tar $(sha256sum "$DEV/payload/payload.tar" | cut -d' ' -f1)"
    for i in "${!parts[@]}"; do
        echo "$(sha256sum "$DEV/p$((i + 1))/part" | cut -d' ' -f1)  p$((i + 1))/part"
    done
} > "$DEV/SHA256SUMS"
cp "$DEV/SHA256SUMS" "$DEV/p1/SHA256SUMS"
rm -rf "$DEV/payload"
echo "== ${#parts[@]} parts:"
du -h "$DEV"/p*/part
echo "carry them one call at a time: carry=[\".dev/p1\"], then [\".dev/p2\"], ... (64 MiB per call)"
