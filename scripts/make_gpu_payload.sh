#!/usr/bin/env bash
# What scripts/gpu_check.sh installs on a GPU machine without internet whose python3 is CPython 3.12 with torch,
# numpy, Pillow, SciPy, scikit-learn, tqdm, Matplotlib, pytest, PyYAML, packaging, six, typing-extensions and wheel
# already there (docs/GPU.md). Only what that machine lacks travels:
#   dali-common.tar.xz  DALI 2.4 (CUDA 13), nvImageCodec and nvJPEG as an installed tree (pip --target), trimmed to
#                       what the pipelines load, without its CPython-version-specific extension modules
#   dali-cp312.tar.xz   those extension modules, for the one CPython version PY_TAG
#   wheels/             the other missing dependencies of DALI and of this project, built for PY_TAG
#   shards.tar          the training split of the 1000 real sample images at 256 px (one copy; the machine copies
#                       it to make the validation split, then replicates both)
# It is cut into parts of at most PART_MIB MiB, $PARTS/p1, p2, ..., one per call (each call carries 64 MiB with the
# working tree). p1 holds everything but most of the DALI tree, so that the first call can already unpack the
# shards and install the wheels; each part has a SHA256SUMS of its own files, and p1's PAYLOAD lists the parts.
# Intermediate results stay in .dev/gpu/cache, so that a rerun redoes only what changed: compressing the tree
# takes about five minutes on two cores.
#
#   scripts/make_gpu_payload.sh                                           # .dev/gpu/p1.. for the GPU machine
#   PY_TAG=cp311 PARTS=.dev/gpu/rehearse/parts scripts/make_gpu_payload.sh  # the same for a local CPython 3.11
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}  # this checkout's Python: pip, the pinned versions, and `python -m shards` for the shards
PY_TAG=${PY_TAG:-cp312}     # the CPython that will import the payload (the GPU machine's)
PARTS=${PARTS:-.dev/gpu}
PART_MIB=${PART_MIB:-62}    # a call carries 64 MiB, the working tree (under 1 MiB) included
REAL_IMAGES=${REAL_IMAGES:-../shared/data/imagenet-sample}
CACHE=.dev/gpu/cache
TRIM_RULES=1  # raise when trim() changes: the cached tree is rebuilt

# Installed as a tree: the big ones. nvidia-libnvcomp is left out (DALI opens it only for its decompression
# operators), and so are nvimgcodec's JPEG 2000 and TIFF codecs (nvidia-nvjpeg2k, nvidia-nvtiff): shards hold JPEGs.
TREE=(nvidia-dali-cuda130 nvidia-nvimgcodec-cu13 nvidia-nvjpeg)
# Installed as wheels: what DALI and this project import that the GPU machine lacks (the machine has six,
# packaging, PyYAML, typing-extensions, wheel and numpy, which these need).
WHEELS=(astunparse gast optree nvtx makefun libcst webdataset braceexpand)

say() { echo "== $*"; }

# name==version as this checkout's .venv has it, so that both machines run the same versions.
pinned() {
    "$PY" - "$@" <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, version
for name in sys.argv[1:]:
    try:
        print(f"{name}=={version(name)}")
    except PackageNotFoundError:
        sys.exit(f"{name} is not installed in this checkout's .venv (make setup)")
EOF
}

# Wheels for CPython $PY_TAG on manylinux x86_64, whatever Python runs pip.
download() {
    local dest=$1
    shift
    "$PY" -m pip download --quiet --quiet --disable-pip-version-check --only-binary=:all: --no-deps \
        --python-version "${PY_TAG#cp}" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --dest "$dest" "$@"
}

# Keep only what the pipelines load: no headers, no console scripts (gpu_check.sh writes wds2idx for the machine's
# own python), no nvimgcodec tools, and of nvimgcodec's codecs only nvJPEG (GPU) and libjpeg-turbo (CPU).
trim() {
    local site=${1:?}
    rm -rf "${site:?}/bin" "$site/nvidia/dali/include" "$site/nvidia/nvimgcodec/include" "$site/nvidia/nvimgcodec/tools" \
        "$site/nvidia/cu13/include"
    find "$site/nvidia/nvimgcodec/extensions" -type f ! -name 'libnvjpeg_ext.so*' ! -name 'libjpeg_turbo_ext.so*' \
        -delete
    find "$site" -name __pycache__ -prune -exec rm -rf {} +
}

# A file's cache is fresh when its stamp holds the same key; `fresh FILE KEY || rebuild`.
fresh() { [ -e "$1" ] && [ -e "$1.key" ] && [ "$(cat "$1.key")" = "$2" ]; }
stamp() { printf '%s\n' "$2" >"$1.key"; }

mkdir -p "$CACHE"
mapfile -t tree_pins < <(pinned "${TREE[@]}")
mapfile -t wheel_pins < <(pinned "${WHEELS[@]}")

say "the DALI tree: ${tree_pins[*]}"
tree_key="${tree_pins[*]} trim $TRIM_RULES"
if ! fresh "$CACHE/site" "$tree_key"; then
    rm -rf "$CACHE/site" "$CACHE/tree-wheels"
    download "$CACHE/tree-wheels" "${tree_pins[@]}"  # py3-none wheels: the same for every CPython
    "$PY" -m pip install --quiet --disable-pip-version-check --no-index --no-deps --no-compile \
        --target "$CACHE/site" "$CACHE"/tree-wheels/*.whl
    trim "$CACHE/site"
    stamp "$CACHE/site" "$tree_key"
fi
if ! fresh "$CACHE/dali-common.tar.xz" "$tree_key"; then
    say "compressing the tree without its extension modules (minutes)"
    tar -C "$CACHE/site" --sort=name --owner=0 --group=0 --numeric-owner \
        --exclude='*.cpython-*-x86_64-linux-gnu.so' -cf - . | xz -T2 -6 >"$CACHE/dali-common.tar.xz.tmp"
    mv "$CACHE/dali-common.tar.xz.tmp" "$CACHE/dali-common.tar.xz"
    stamp "$CACHE/dali-common.tar.xz" "$tree_key"
fi
tagged="$CACHE/dali-$PY_TAG.tar.xz"
if ! fresh "$tagged" "$tree_key"; then
    (cd "$CACHE/site" && find . -name "*.cpython-${PY_TAG#cp}-x86_64-linux-gnu.so" | sort) >"$CACHE/$PY_TAG.files"
    [ -s "$CACHE/$PY_TAG.files" ] || { echo "the DALI tree has no extension modules for $PY_TAG" >&2; exit 1; }
    tar -C "$CACHE/site" --owner=0 --group=0 --numeric-owner -cf - -T "$CACHE/$PY_TAG.files" | xz -T2 -6 >"$tagged"
    stamp "$tagged" "$tree_key"
fi

say "wheels for $PY_TAG: ${wheel_pins[*]}"
wheels="$CACHE/wheels-$PY_TAG"
if ! fresh "$wheels" "${wheel_pins[*]}"; then
    rm -rf "$wheels"
    download "$wheels" "${wheel_pins[@]}"
    stamp "$wheels" "${wheel_pins[*]}"
fi

say "the real-image shards (train split, 1000 images)"
shards="$CACHE/shards"
if ! [ -f "$CACHE/shards.tar" ]; then
    [ -d "$REAL_IMAGES" ] || { echo "no $REAL_IMAGES: the 1000 real JPEGs are needed once, here" >&2; exit 1; }
    rm -rf "$shards" "$CACHE/payload-shards"
    "$PY" -m bench.folders --images="$REAL_IMAGES" --out="$CACHE/raw-links"
    "$PY" -m shards build --raw="$CACHE/raw-links" --out="$shards"
    # val holds the same 1000 images as train. Only train travels: val becomes a copy of it there (other order,
    # same images), listed in COPIES; the manifest's val entry says so already.
    mkdir -p "$CACHE/payload-shards/train"
    cp "$shards"/train/* "$CACHE/payload-shards/train/"
    cp "$shards/stats.npz" "$CACHE/payload-shards/"
    "$PY" - "$shards/manifest.json" "$CACHE/payload-shards" <<'EOF'
import json, sys
from pathlib import Path
manifest, out = json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2])
train = manifest["splits"]["train"]
copies = []
val = dict(train, shards=[])
for n, shard in enumerate(train["shards"]):
    file = f"val/val-{n:06d}.tar"
    val["shards"].append(dict(shard, file=file))
    copies.append(f"{shard['file'][:-4]} {file[:-4]}")
manifest["splits"]["val"] = val
manifest["params"]["note"] = "val is a copy of train"
(out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
(out / "COPIES").write_text("".join(line + "\n" for line in copies))
EOF
    tar -C "$CACHE/payload-shards" --sort=name --owner=0 --group=0 --numeric-owner -cf "$CACHE/shards.tar.tmp" .
    mv "$CACHE/shards.tar.tmp" "$CACHE/shards.tar"
fi

say "parts of at most $PART_MIB MiB in $PARTS"
rm -rf "$PARTS"/p[0-9]*
mkdir -p "$PARTS/p1/wheels"
cp "$CACHE/shards.tar" "$tagged" "$PARTS/p1/"
cp "$wheels"/*.whl "$PARTS/p1/wheels/"
cap=$((PART_MIB * 1024 * 1024 - 65536))  # room for SHA256SUMS and PAYLOAD
common="$CACHE/dali-common.tar.xz"
total=$(stat -c %s "$common")
room=$((cap - $(du -cb "$PARTS/p1" | tail -1 | cut -f1)))
offset=0 part=1 piece=0
while [ "$offset" -lt "$total" ]; do
    size=$((total - offset < room ? total - offset : room))
    mkdir -p "$PARTS/p$part"
    dd if="$common" of="$PARTS/p$part/dali-common.tar.xz.$(printf %02d "$piece")" bs=1M iflag=skip_bytes,count_bytes \
        skip="$offset" count="$size" status=none
    offset=$((offset + size)) part=$((part + 1)) piece=$((piece + 1)) room=$cap
done
parts=$((part - 1))
{
    echo "tag $PY_TAG"
    echo "parts $parts"
    echo "common_sha256 $(sha256sum "$common" | cut -d' ' -f1)"
    echo "built $(date -u +%FT%TZ) from $(git rev-parse --short HEAD) by $(hostname)"
} >"$PARTS/p1/PAYLOAD"
for i in $(seq 1 "$parts"); do
    (cd "$PARTS/p$i" && find . -type f | sort | xargs sha256sum >../SHA256SUMS.tmp && mv ../SHA256SUMS.tmp SHA256SUMS)
done

tree_bytes=$(git ls-files -z | du --files0-from=- -cb | tail -1 | cut -f1)
echo "$parts parts for $PY_TAG (the working tree that travels with each: $((tree_bytes / 1024)) KiB):"
du -bs "$PARTS"/p[0-9]* | awk '{printf "  %-28s %6.1f MiB\n", $2, $1 / 1048576}'
echo "carry one per call, back to back: docs/GPU.md"
