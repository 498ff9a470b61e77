#!/usr/bin/env bash
# What scripts/gpu_check.sh installs on a GPU machine without internet whose python3 is CPython 3.12 with torch,
# numpy, Pillow, SciPy, scikit-learn, tqdm, Matplotlib, pytest, PyYAML, packaging, six, typing-extensions and wheel
# already there (docs/GPU.md). Only what that machine lacks travels:
#   dali-tree.NNN.xz    DALI 2.4 (CUDA 13), nvImageCodec and nvJPEG as an installed tree (pip --target), trimmed to
#                       what the pipelines load, without its CPython-version-specific extension modules: one tar
#                       cut into CHUNK_MIB pieces, each compressed alone, so that every call can decompress the
#                       pieces it carries and the last one only joins and unpacks them (seconds)
#   dali-cp312.tar.xz   those extension modules, for the one CPython version PY_TAG
#   wheels/             the other missing dependencies of DALI and of this project, built for PY_TAG
#   shards.tar          the training split of the 1000 real sample images at 256 px in shards of SHARD_SIZE (one
#                       copy; the machine copies it to make the validation split, then replicates both)
# It is cut into parts of at most PART_MIB MiB, $PARTS/p1, p2, ..., one per call (each call carries 64 MiB with the
# working tree). p1 holds the shards, the wheels, the extension modules and the first pieces of the tree; each part
# has a SHA256SUMS of its own files, and p1's PAYLOAD lists the parts, the pieces and the tree's checksum.
# Intermediate results stay in .dev/gpu/cache, so that a rerun redoes only what changed: compressing the tree
# takes a few minutes on two cores.
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
# Shards of 100 images: a copy of the split is 10 shards (50 copies, 500: full ImageNet has about 300 per split), and
# a rehearsal can validate on one shard rather than the whole split.
SHARD_SIZE=100
CHUNK_MIB=8   # tree bytes per compressed piece: xz -6's whole dictionary, so cutting costs almost no ratio
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
chunks="$CACHE/tree-chunks"
if ! fresh "$chunks" "$tree_key $CHUNK_MIB"; then
    say "the tree without its extension modules, in compressed pieces of $CHUNK_MIB MiB (minutes)"
    rm -rf "$chunks" && mkdir -p "$chunks"
    tar -C "$CACHE/site" --sort=name --owner=0 --group=0 --numeric-owner \
        --exclude='*.cpython-*-x86_64-linux-gnu.so' -cf "$CACHE/tree.tar" .
    sha256sum "$CACHE/tree.tar" | cut -d' ' -f1 >"$chunks/TREE_SHA256"
    split -a 3 -d -b "${CHUNK_MIB}M" "$CACHE/tree.tar" "$chunks/dali-tree."
    rm "$CACHE/tree.tar"
    find "$chunks" -name 'dali-tree.[0-9][0-9][0-9]' -print0 | xargs -0 -n 1 -P 2 xz -6
    stamp "$chunks" "$tree_key $CHUNK_MIB"
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

say "the real-image shards (train split, 1000 images in shards of $SHARD_SIZE)"
shards="$CACHE/shards"
if ! fresh "$CACHE/shards.tar" "shard_size $SHARD_SIZE"; then
    [ -d "$REAL_IMAGES" ] || { echo "no $REAL_IMAGES: the 1000 real JPEGs are needed once, here" >&2; exit 1; }
    rm -rf "$shards" "$CACHE/payload-shards" "$CACHE/raw-links"
    "$PY" -m bench.folders --images="$REAL_IMAGES" --out="$CACHE/raw-links"
    "$PY" -m shards build --raw="$CACHE/raw-links" --out="$shards" --shard_size="$SHARD_SIZE"
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
    stamp "$CACHE/shards.tar" "shard_size $SHARD_SIZE"
fi

say "parts of at most $PART_MIB MiB in $PARTS"
rm -rf "$PARTS"/p[0-9]*
mkdir -p "$PARTS/p1/wheels"
cp "$CACHE/shards.tar" "$tagged" "$PARTS/p1/"
cp "$wheels"/*.whl "$PARTS/p1/wheels/"
cap=$((PART_MIB * 1024 * 1024 - 65536))  # room for SHA256SUMS and PAYLOAD
# The pieces in order, each into the current part while it fits, else into the next.
part=1 used=$(du -cb "$PARTS/p1" | tail -1 | cut -f1)
for piece in "$chunks"/dali-tree.*.xz; do
    size=$(stat -c %s "$piece")
    if [ $((used + size)) -gt "$cap" ]; then
        part=$((part + 1)) used=0
    fi
    mkdir -p "$PARTS/p$part"
    cp "$piece" "$PARTS/p$part/"
    used=$((used + size))
done
parts=$part
{
    echo "tag $PY_TAG"
    echo "parts $parts"
    echo "pieces $(find "$chunks" -name 'dali-tree.*.xz' | wc -l)"
    echo "tree_sha256 $(cat "$chunks/TREE_SHA256")"
    echo "built $(date -u +%FT%TZ) from $(git rev-parse --short HEAD) by $(hostname)"
} >"$PARTS/p1/PAYLOAD"
for i in $(seq 1 "$parts"); do
    (cd "$PARTS/p$i" && find . -type f | sort | xargs sha256sum >../SHA256SUMS.tmp && mv ../SHA256SUMS.tmp SHA256SUMS)
done

tree_bytes=$(git ls-files -z | du --files0-from=- -cb | tail -1 | cut -f1)
echo "$parts parts for $PY_TAG (the working tree that travels with each: $((tree_bytes / 1024)) KiB):"
du -bs "$PARTS"/p[0-9]* | awk '{printf "  %-28s %6.1f MiB\n", $2, $1 / 1048576}'
echo "carry one per call, back to back: docs/GPU.md"
