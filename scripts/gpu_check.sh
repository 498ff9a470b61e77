#!/usr/bin/env bash
# The GPU measurements of docs/GPU.md, on a machine without internet, in three calls made back to back. Each call
# carries one part of the payload (scripts/make_gpu_payload.sh):
#   scripts/gpu_check.sh 1 .dev/gpu/p1          probes (/dev/shm, nvidia-smi, CUDA, the hardware JPEG decoder,
#                                               torch.compile); unpacks p1: the shards, the wheels, DALI's first pieces
#   scripts/gpu_check.sh 2 .dev/gpu/p2          unpacks p2; copies the shards to 50,000 images per split
#   scripts/gpu_check.sh 3 .dev/gpu/p3 SECONDS  unpacks p3 and installs DALI, then every measurement, the most
#                                               valuable first, ending within SECONDS
# Stages 1 and 2 only unpack, install and probe (about 30 s each), so that a machine released between calls shows
# early and a restart still fits; every measurement is in the last call, whose SECONDS come from the device time
# the previous reply left (docs/GPU.md). What a stage unpacks stays in KIT_WORK, an ignored folder of the checkout
# that the machine keeps between calls while it stays up; each stage checks that the stages before it left their
# files and says which to rerun if not. Any stage given SECONDS measures once every part is in (after a release:
# rerun the missing stages, the last of them with SECONDS).
# Each row is appended to $OUT/notes.md the moment it is known; the logs (bench JSON too) are packed into
# $OUT/logs-stageN.tar.gz after every step and every 15 s; a failed step's last 30 lines go to $OUT/failures.md.
#
#   scripts/gpu_check.sh 1 .dev/gpu/p1
#   scripts/gpu_check.sh 3 .dev/gpu/p3 480
#   REHEARSAL=1 PY=... KIT_WORK=... OUT=... scripts/gpu_check.sh 1 PART   # `make gpu-rehearse`, without a GPU
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

USAGE="usage: scripts/gpu_check.sh STAGE PART [SECONDS]  (STAGE 1, 2 or 3, PART its .dev/gpu/pSTAGE; see docs/GPU.md)"
STAGE=${1:-} PART=${2:-} SECONDS_ARG=${3:-}
case $STAGE in 1 | 2 | 3) ;; *) echo "$USAGE" >&2; exit 2 ;; esac
[ -n "$PART" ] || { echo "$USAGE" >&2; exit 2; }
[[ $SECONDS_ARG =~ ^[0-9]*$ ]] || { echo "SECONDS=$SECONDS_ARG: a whole number of seconds. $USAGE" >&2; exit 2; }
if [ "$STAGE" = 3 ] && [ -z "$SECONDS_ARG" ]; then
    echo "stage 3 measures until its deadline: give SECONDS, the last reply's lease.budget_left_s minus 60" \
        "(at most 560; docs/GPU.md)" >&2
    exit 2
fi

PY=${PY:-python3}            # the machine's own Python, torch included: never a venv made from it (it would lose torch)
REHEARSAL=${REHEARSAL:-0}    # 1: no GPU here; each GPU step runs a small CPU smoke run of its commands instead
INSTALL_S=${INSTALL_S:-45}   # a stage without SECONDS: its probes and unpacking end within this
REPEAT=${REPEAT:-50}               # copies of the 1000 real images per split: 50,000 val images, as ILSVRC2012's
BENCH_SECONDS=${BENCH_SECONDS:-6}  # timed seconds per bench row
TRAIN_BATCH=${TRAIN_BATCH:-256}    # the training batch: every model, end-to-end and pipeline row and train.py
TRAIN_STEPS=${TRAIN_STEPS:-180}    # steps of the short training run (an epoch of 50,000 images is 195)
LOG_INTERVAL=${LOG_INTERVAL:-20}   # its steps per interval row
LATE_LOADS=${LATE_LOADS:-0.5}      # hw_decoder_load points measured last, when time is left (0.75 is the default)
SHM_NEEDED_MIB=${SHM_NEEDED_MIB:-1024}  # /dev/shm for DALI's reader workers: 6 chunks of ~14 MB per pipeline

mkdir -p "${KIT_WORK:=.dev/gpu/work}" "${OUT:=$KIT_WORK/out}"
WORK=$(cd "$KIT_WORK" && pwd) OUT=$(cd "$OUT" && pwd)
MEASURE=0
[ -n "$SECONDS_ARG" ] && MEASURE=1
DEADLINE_S=${SECONDS_ARG:-$INSTALL_S}
MARGIN_S=$((MEASURE ? 15 : 5))   # kept free before the deadline: a step's kill (10 s after its limit), the table
START=$(date +%s)
DEADLINE=$((START + DEADLINE_S))
SITE=$WORK/site                  # what the payload installs: first on PYTHONPATH, its bin/ first on PATH
SHARDS=$WORK/shards              # the carried split (1000 real images), unpacked
DATA=$WORK/data                  # the same, REPEAT times: the pipeline, end-to-end and eval.py rows
TRAIN_DATA=$WORK/train-data      # DATA with its first copy of val only (1,000 images): train.py's validation
EVAL_DATA=$DATA                  # eval.py's: the whole val split (50,000 images)
PROBES=$WORK/probes              # what stage 1 found, for the measurements: reader_workers, hw_decoder
RUN=$WORK/run                    # the short training run
LOGS=$WORK/logs/stage$STAGE
NOTES=$WORK/notes.md             # every stage's rows; each stage copies it to $OUT/notes.md and appends to both
THREADS=$(($(nproc) > 3 ? $(nproc) - 2 : 1))  # DALI threads: every core but two (the training loop, the system)
export PYTHONPATH=$SITE PATH=$SITE/bin:$PATH PYTHONUNBUFFERED=1
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INDEX=1  # pip never tries the network there
export TORCHINDUCTOR_CACHE_DIR=$WORK/inductor TRITON_CACHE_DIR=$WORK/triton  # the compile probe's and rows' cache
mkdir -p "$LOGS" "$WORK/parts" "$WORK/tree" "$WORK/done" "$WORK/rates" "$PROBES"

DEVICE=cuda LIMIT_SCALE=1
if [ "$REHEARSAL" = 1 ]; then  # the same commands, sized for two CPU cores: they prove the flags, not the speed
    DEVICE=cpu BENCH_SECONDS=1 TRAIN_STEPS=4 LOG_INTERVAL=2 REPEAT=1 LIMIT_SCALE=4 EVAL_DATA=$TRAIN_DATA
fi

# ------------------------------------------------------------------------------------------------ the table
if [ ! -f "$NOTES" ]; then
    { echo "# GPU check, $(hostname), $(date -u +%F)"; echo
      echo "| stage | step | result | s |"; echo "| --- | --- | --- | --- |"; } >"$NOTES"
fi
cp "$NOTES" "$OUT/notes.md"

# record STEP RESULT [SECONDS]: one row, at once in $OUT/notes.md (what comes back even if the stage is killed).
record() {
    local row
    row="| $STAGE | $1 | ${2//|//} | ${3:--} |"
    echo "$row" >>"$NOTES"
    echo "$row" >>"$OUT/notes.md"
    echo ">> $1: $2"
}

seconds_left() { echo $((DEADLINE - MARGIN_S - $(date +%s))); }
slug() { echo "$1" | tr '[:upper:]' '[:lower:]' | tr -c 'a-z0-9.\n' '-' | tr -s '-' | sed 's/^-//; s/-$//'; }
done_before() { [ -e "$WORK/done/$(slug "$1")" ]; }
probe() { cat "$PROBES/$1" 2>/dev/null; }  # a finding of stage 1's probes; empty when they did not run

# limited COMMAND...: every external command of a step runs through this: at most the step's limit, never past
# the deadline. Exit status 124: stopped at the limit.
limited() { timeout --kill-after=10 "$STEP_LIMIT" "$@"; }

# The logs so far, as they are: after every step and every 15 s, so that a stage killed at the call's limit still
# returns the step it was in. Written beside and renamed: the archive in $OUT is always whole.
archive() {
    local tmp="$OUT/logs-stage$STAGE.tar.gz.$BASHPID.tmp"
    tar -czf "$tmp" -C "$WORK/logs" "stage$STAGE" 2>/dev/null
    mv -f "$tmp" "$OUT/logs-stage$STAGE.tar.gz"
}

# failure_text NAME LOG: a failed step's last 30 lines, in the reply and in $OUT/failures.md.
failure_text() {
    { echo "## stage $STAGE: $1 (the last 30 lines of its log)"; echo '```'; tail -n 30 "$2"; echo '```'; echo; } |
        tee -a "$OUT/failures.md"
}

# step KIND NAME NEED_S LIMIT_S FUNCTION [ARGS...]: runs FUNCTION with its output in STEP_LOG ($LOGS/<name>.log)
# and records the row it leaves in RESULT (or why it failed); returns FUNCTION's status. KIND gpu: a step that needs
# CUDA (a smoke run on the CPU in a rehearsal). Skipped when less than NEED_S is left before the deadline.
CURRENT=""
step() {
    local kind=$1 name=$2 need=$3 limit=$(($4 * LIMIT_SCALE)) fn=$5 log started status left
    shift 5
    log="$LOGS/$(slug "$name").log"
    left=$(seconds_left)
    if [ "$left" -lt "$need" ]; then
        record "$name" "skipped: deadline (${left} s left, needs ${need})"
        return 0
    fi
    echo "== $name (stage $STAGE, ${left} s left, load $(cut -d' ' -f1 /proc/loadavg))"
    STEP_LIMIT=$((limit < left ? limit : left)) STEP_LOG=$log RESULT="" CURRENT=$name
    started=$(date +%s)
    "$fn" "$@" >"$log" 2>&1
    status=$?
    CURRENT=""
    if [ "$status" = 0 ]; then
        : "${RESULT:=ok}"
        touch "$WORK/done/$(slug "$name")"
    elif [ "$status" = 124 ] || [ "$status" = 137 ]; then
        RESULT="failed: stopped after ${STEP_LIMIT} s (the step's limit or the deadline)"
    else
        RESULT="failed (exit $status): ${RESULT:-$(grep -v '^[[:space:]]*$' "$log" | tail -1 | cut -c1-160)}"
    fi
    if [ "$kind" = gpu ] && [ "$REHEARSAL" = 1 ]; then
        RESULT="skipped: no GPU (CPU smoke run: $RESULT)"
    fi
    record "$name" "$RESULT" "$(($(date +%s) - started))"
    [ "$status" = 0 ] || failure_text "$name" "$log"
    archive
    return "$status"
}

finish() {
    local status=$?
    trap - EXIT TERM INT
    [ -n "$REFRESHER" ] && kill "$REFRESHER" 2>/dev/null && wait "$REFRESHER"
    [ -n "$CURRENT" ] && record "$CURRENT" "failed: the stage was stopped during this step"
    local deadline="deadline ${DEADLINE_S} s, the install stage's"
    [ "$MEASURE" = 1 ] && deadline="deadline ${DEADLINE_S} s, the call's SECONDS argument"
    record "stage $STAGE" "ended after $(($(date +%s) - START)) s ($deadline)"
    archive
    echo
    echo "== the table so far ($OUT/notes.md; logs: $OUT/logs-stage$STAGE.tar.gz)"
    cat "$OUT/notes.md"
    if grep -q "^| $STAGE | .* | failed" "$OUT/notes.md"; then exit 1; fi
    exit "$status"
}
REFRESHER=""
trap 'exit 143' TERM INT
trap finish EXIT
# refresh_logs: the archive every 15 s, in the background; TERM ends it after a whole archive, never midway.
refresh_logs() {
    local stop=""
    trap 'stop=1' TERM
    while [ -z "$stop" ]; do
        sleep 15 &
        wait $!
        archive
    done
}
refresh_logs >/dev/null 2>&1 &
REFRESHER=$!

# ------------------------------------------------------------------------------------------------ the probes
# /dev/shm first: DALI's reader workers hand batches over in it, and a container's default 64 MB ends them with
# SIGBUS. Too small: enlarged where this runs as root, else the measurements read without worker processes.
shm_probe() {
    local free
    df -m /dev/shm
    free=$(df -m --output=avail /dev/shm | tail -1 | tr -d ' ')
    if [ "$free" -lt "$SHM_NEEDED_MIB" ] && [ "$(id -u)" = 0 ] && mount -o remount,size=8g /dev/shm; then
        df -m /dev/shm
        RESULT="${free} MiB free, remounted: "
        free=$(df -m --output=avail /dev/shm | tail -1 | tr -d ' ')
    fi
    if [ "$free" -lt "$SHM_NEEDED_MIB" ]; then
        echo 0 >"$PROBES/reader_workers"
        RESULT="${RESULT:-}${free} MiB free (< ${SHM_NEEDED_MIB}): the measurements read with --reader_workers=0"
    else
        echo -1 >"$PROBES/reader_workers"
        RESULT="${RESULT:-}${free} MiB free: reader workers as by default"
    fi
}

gpu_versions() {
    command -v nvidia-smi >/dev/null || { RESULT="no nvidia-smi"; [ "$REHEARSAL" = 1 ]; return; }
    limited nvidia-smi || return
    limited nvidia-smi -q >"$LOGS/nvidia-smi-q.txt" 2>&1
    # The CUDA libraries DALI opens by name when an operator needs them (NPP, nvrtc, cuFFT) and the payload does
    # not carry: DALI looks in /usr/local/cuda/lib64 and the loader's paths.
    find /usr/local/cuda/lib64/ \( -name 'libnpp*' -o -name 'libnvrtc*' -o -name 'libcufft*' -o -name 'libnvjpeg*' \) \
        >"$LOGS/cuda-libraries.txt" 2>&1
    ldconfig -p 2>&1 | grep -E 'libcuda|libnpp|libnvrtc' >>"$LOGS/cuda-libraries.txt"
    RESULT="$(limited nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | head -1), \
CUDA $(limited nvidia-smi | grep -o 'CUDA Version: [0-9.]*' | cut -d' ' -f3) (driver)"
}

# CUDA must work before anything is measured: when it does not (and this is no rehearsal), the row holds torch's
# own error and the stage stops, rather than every later row failing alike.
cuda_probe() {
    limited "$PY" -m pip list --format=freeze >"$LOGS/pip-list.txt" 2>&1
    limited "$PY" - "$DEVICE" "$THREADS" <<'EOF'
import os, platform, sys
import numpy, torch
device, threads = sys.argv[1], sys.argv[2]
if device == "cuda":
    try:
        torch.ones(1, device="cuda").add_(1).cpu()
    except Exception as error:
        sys.exit(f"CUDA unusable: {type(error).__name__}: {str(error).strip().splitlines()[0][:200]}")
    cuda = f"{torch.cuda.get_device_name()}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}"
else:
    cuda = "the CPU: a rehearsal"
print(f"Python {platform.python_version()}, torch {torch.__version__} ({cuda}), numpy {numpy.__version__}, "
      f"{os.cpu_count()} CPUs, DALI threads {threads}")
EOF
    local status=$?
    RESULT=$(tail -1 "$STEP_LOG")  # the versions, or torch's error
    return "$status"
}

# nvJPEG's hardware decoder needs libnvcuvid.so.1, which a container has only with the driver's video capability.
# Without it the decoder-load sweep is skipped (the rehearsal runs its commands anyway).
hw_decoder_probe() {
    local found caps=${NVIDIA_DRIVER_CAPABILITIES-unset}
    ldconfig -p | grep nvcuvid
    found=$(ldconfig -p | grep -o '/[^ ]*libnvcuvid.so.1$' | head -1)
    [ -z "$found" ] && found=$(find /usr/local/nvidia /usr/lib/x86_64-linux-gnu -name 'libnvcuvid.so.1' 2>/dev/null | head -1)
    if [ -n "$found" ]; then
        echo present >"$PROBES/hw_decoder"
        RESULT="$found present; NVIDIA_DRIVER_CAPABILITIES=$caps"
    else
        echo absent >"$PROBES/hw_decoder"
        RESULT="libnvcuvid.so.1 absent (NVIDIA_DRIVER_CAPABILITIES=$caps, the video capability is needed): no decoder sweep"
        if [ "$REHEARSAL" = 1 ]; then RESULT+=" there (a rehearsal runs its commands anyway)"; fi
    fi
}

# torch.compile on this device, before the compiled rows and train.py --compile depend on it.
compile_probe() {
    RESULT=$(limited "$PY" - "$DEVICE" <<'EOF'
import sys, time
import torch
device = sys.argv[1]
started = time.perf_counter()
double_relu = torch.compile(lambda x: torch.relu(x) * 2 + 1)
x = torch.randn(4096, device=device)
assert torch.equal(double_relu(x).cpu(), (torch.relu(x) * 2 + 1).cpu())
print(f"a small function compiled and ran on {device} in {time.perf_counter() - started:.1f} s")
EOF
    )
}

# ------------------------------------------------------------------------------------------------ the payload
# unpack_part: the carried part after its own checksums: its DALI pieces decompressed into KIT_WORK/tree, its other
# files copied to KIT_WORK/parts/pN. done/part-pN lists what it left, for the later stages' check.
unpack_part() {
    local name piece pieces
    name=$(basename "$PART")
    [ -f "$PART/SHA256SUMS" ] || { RESULT="$PART: no such part here (was it in the call's carry?)"; return 1; }
    (cd "$PART" && sha256sum --quiet -c SHA256SUMS) || { RESULT="$name damaged: its SHA256SUMS do not match"; return 1; }
    rm -rf "${WORK:?}/parts/$name" && mkdir -p "$WORK/parts/$name"
    (cd "$PART" && find . -type f ! -name 'dali-tree.*.xz' -exec cp --parents {} "$WORK/parts/$name/" \;) || return
    mapfile -t pieces < <(cd "$PART" && find . -name 'dali-tree.*.xz' -printf '%f\n' | sort)
    for piece in "${pieces[@]}"; do  # dali-tree.NNN.xz -> tree/dali-tree.NNN
        unxz <"$PART/$piece" >"$WORK/tree/${piece%.xz}.tmp" && mv "$WORK/tree/${piece%.xz}.tmp" "$WORK/tree/${piece%.xz}" ||
            return
    done
    {
        (cd "$WORK" && find "parts/$name" -type f)
        for piece in "${pieces[@]}"; do echo "tree/${piece%.xz}"; done
    } >"$WORK/done/part-$name"
    RESULT="$name: $(find "$PART" -type f | wc -l) files, $(du -sm "$PART" | cut -f1) MiB, checksums ok, \
${#pieces[@]} DALI pieces unpacked"
}

# Which parts' files are not (or no longer) here; empty when all are. p1's PAYLOAD says how many parts there are.
missing_parts() {
    local i parts file
    parts=$(awk '$1 == "parts" { print $2 }' "$WORK/parts/p1/PAYLOAD" 2>/dev/null)
    for i in $(seq 1 "${parts:-3}"); do
        [ -f "$WORK/done/part-p$i" ] || { echo "p$i"; continue; }
        while read -r file; do [ -e "$WORK/$file" ] || { echo "p$i"; break; }; done <"$WORK/done/part-p$i"
    done
}

# The stages before this one (all of them when measuring) must have left their files; if not, the row says which
# stages to call again.
earlier_stages() {
    local -a missing gone=()
    mapfile -t missing < <(missing_parts)
    local part
    for part in "${missing[@]}"; do
        if [ "${part#p}" -lt "$STAGE" ] || { [ "$MEASURE" = 1 ] && [ "$part" != "p$STAGE" ]; }; then gone+=("$part"); fi
    done
    [ "${#gone[@]}" = 0 ] && { RESULT="their files are here"; return 0; }
    RESULT="missing ${gone[*]} (the machine was released, or the stage failed): call again $(printf 'stage %s, ' \
"${gone[@]#p}")"
    if [ "$MEASURE" = 1 ]; then RESULT+="the last of them with SECONDS"; else RESULT+="then the stages still to come"; fi
    RESULT+=" (docs/GPU.md, after a release)"
    return 1
}

payload_field() { awk -v key="$1" '$1 == key { print $2 }' "$WORK/parts/p1/PAYLOAD"; }

# Only what this Python lacks: a package the machine already has stays in charge (a second copy first on
# PYTHONPATH could break what imports it, torch included).
install_wheels() {
    local -a wheels
    mapfile -t wheels < <(find "$WORK/parts/p1/wheels" -name '*.whl' 2>/dev/null | sort | "$PY" -c '
import re, sys
from importlib.metadata import PackageNotFoundError, version
for path in sys.stdin.read().split():
    name = re.sub(r"[-_.]+", "-", path.rsplit("/", 1)[-1].split("-")[0]).lower()
    try:
        print(f"already there: {name} {version(name)}", file=sys.stderr)
    except PackageNotFoundError:
        print(path)
')
    [ "${#wheels[@]}" = 0 ] && { RESULT="nothing to install"; return 0; }
    limited "$PY" -m pip install --quiet --no-index --no-deps --no-compile --target "$SITE" "${wheels[@]}" || return
    RESULT="${#wheels[@]} wheels into $SITE: $(printf '%s\n' "${wheels[@]##*/}" | cut -d- -f1 | paste -sd' ')"
}

unpack_shards() {
    rm -rf "$SHARDS" && mkdir -p "$SHARDS"
    tar -xf "$WORK/parts/p1/shards.tar" -C "$SHARDS" || return
    local from to
    while read -r from to; do  # the val split: a copy of the carried train split (other order, same images)
        mkdir -p "$SHARDS/$(dirname "$to")"
        cp "$SHARDS/$from.tar" "$SHARDS/$to.tar" && cp "$SHARDS/$from.idx" "$SHARDS/$to.idx" || return
    done <"$SHARDS/COPIES"
    RESULT="$(split_sizes "$SHARDS/manifest.json") real images at 256 px"
}

split_sizes() {  # MANIFEST: "train 1,000, val 1,000"
    "$PY" - "$1" <<'EOF'
import json, sys
print(", ".join(f"{k} {v['num_samples']:,}" for k, v in json.load(open(sys.argv[1]))["splits"].items()))
EOF
}

# xz -d, with Python's lzma where the machine has no xz.
unxz() {
    if command -v xz >/dev/null; then xz -dc; else "$PY" -c 'import lzma, shutil, sys
shutil.copyfileobj(lzma.open(sys.stdin.buffer), sys.stdout.buffer, 1 << 20)'; fi
}

# The DALI tree from every part's pieces (checked against PAYLOAD), and this Python's extension modules.
install_dali() {
    local tag mine pieces
    tag=$(payload_field tag) pieces=$(payload_field pieces)
    mine=$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
    [ "$tag" = "$mine" ] || { RESULT="the payload is for $tag, this Python is $mine"; return 1; }
    [ "$(find "$WORK/tree" -name 'dali-tree.[0-9][0-9][0-9]' | wc -l)" = "$pieces" ] ||
        { RESULT="not all $pieces pieces of the DALI tree are here"; return 1; }
    [ "$(cat "$WORK"/tree/dali-tree.??? | sha256sum | cut -d' ' -f1)" = "$(payload_field tree_sha256)" ] ||
        { RESULT="the joined DALI tree does not match PAYLOAD"; return 1; }
    mkdir -p "$SITE/bin"
    cat "$WORK"/tree/dali-tree.??? | tar -x -C "$SITE" || return
    unxz <"$WORK/parts/p1/dali-$tag.tar.xz" | tar -x -C "$SITE" || return
    # DALI's console script, for this Python (the tests index their tars with it; pip would have written it).
    printf '#!%s\nimport sys\nfrom wds2idx import main\nsys.exit(main())\n' \
        "$("$PY" -c 'import sys; print(sys.executable)')" >"$SITE/bin/wds2idx"
    chmod +x "$SITE/bin/wds2idx"
    wds2idx --help >/dev/null || { RESULT="wds2idx does not run"; return 1; }
    RESULT=$("$PY" - "$pieces" "$tag" <<'EOF'
import sys
import nvidia.dali as dali
import nvidia.dali.plugin.pytorch  # noqa: F401 (the loaders' import)
import webdataset  # noqa: F401
import pipeline  # noqa: F401
print(f"DALI {dali.__version__} from {sys.argv[1]} pieces ({sys.argv[2]}); imports and wds2idx ok")
EOF
    ) || return
}

# ------------------------------------------------------------------------------------------------ the rows
# The only place that knows the flags of `python -m bench`, train.py and eval.py.

sized() { if [ "$REHEARSAL" = 1 ]; then echo 8; else echo "$1"; fi; }  # images per batch: tiny in a smoke run
reader_workers() { probe reader_workers || echo -1; }  # -1: the loader's default; 0 when /dev/shm is small

# replicate_shards SOURCE DEST COPIES: the one call that copies the carried split (no DALI needed).
replicate_shards() { limited "$PY" -m shards replicate --data="$1" --out="$2" --copies="$3"; }

# DATA, and TRAIN_DATA: the same files (hard links) with only the first copy of val, so that train.py's epoch-end
# validation reads 1,000 images rather than 50,000 (eval.py's row reads those); in a smoke run, only its first shard.
make_data() {
    rm -rf "$DATA" "$TRAIN_DATA"
    replicate_shards "$SHARDS" "$DATA" "$REPEAT" || return
    cp -al "$DATA" "$TRAIN_DATA" && rm "$TRAIN_DATA/manifest.json" || return
    "$PY" - "$DATA/manifest.json" "$TRAIN_DATA/manifest.json" "$REPEAT" "$REHEARSAL" <<'EOF' || return
import json, sys
manifest, copies, smoke = json.load(open(sys.argv[1])), int(sys.argv[3]), sys.argv[4] == "1"
val = manifest["splits"]["val"]
val["shards"] = val["shards"][:1 if smoke else len(val["shards"]) // copies]
val["num_samples"] = sum(shard["num_samples"] for shard in val["shards"])
for count in ("num_inputs", "num_rejected"):  # one copy's: every copy holds the same positions
    if count in val:
        val[count] //= copies
open(sys.argv[2], "w").write(json.dumps(manifest, indent=1) + "\n")
EOF
    RESULT="$(split_sizes "$DATA/manifest.json") samples (x$REPEAT); train.py's: $(split_sizes \
"$TRAIN_DATA/manifest.json")"
}

# bench JSON DATA FLAGS...: rows of the benchmark harness on this device.
bench() {
    local json=$1 data=$2
    shift 2
    limited "$PY" -m bench --data="$data" --device="$DEVICE" --seconds="$BENCH_SECONDS" --out="$json" "$@"
}

# bench_rate JSON KEY BATCH [RATE_FILE]: "N images/s (M steps/s)" from the harness's JSON (no steps/s for batch
# 0); RATE_FILE gets the bare number, for rows computed from others.
bench_rate() {
    "$PY" - "$@" <<'EOF'
import json, sys
path, key, batch = sys.argv[1], sys.argv[2], int(sys.argv[3])
rate = json.load(open(path))["results"][key]["images_per_s"]
if len(sys.argv) > 4:
    open(sys.argv[4], "w").write(f"{rate}\n")
print(f"{rate:,.0f} images/s ({rate / batch:,.1f} steps/s)" if batch else f"{rate:,.0f} images/s")
EOF
}

row_name() { if [ "$1" = compiled ]; then echo "$2_compiled"; else echo "$2"; fi; }  # eager|compiled ROW

model_row() {  # eager|compiled
    local json="$LOGS/model-$1.json" batch row
    batch=$(sized "$TRAIN_BATCH") row=$(row_name "$1" model)
    bench "$json" "$SHARDS" --what="$row" --batch_size="$batch" || return
    RESULT=$(bench_rate "$json" "$row" "$batch")
}

# pipeline_row LOAD: the training pipeline alone; LOAD "default" (0.75) or the share of every batch on the hardware
# JPEG decoder. At load 1, `nvidia-smi dmon` samples the decoder engines (its jpg column) while it runs.
pipeline_row() {
    local load=$1 json="$LOGS/pipeline-hw$1.json" key=pipeline dmon="$LOGS/dmon-hw$1.txt" sampler="" rate
    local -a flags=(--what=pipeline --batch_size="$(sized "$TRAIN_BATCH")" --num_threads="$THREADS"
                    --reader_workers="$(reader_workers)")
    if [ "$load" != default ]; then
        flags+=(--hw_decoder_load="$load")
        [ "$REHEARSAL" = 1 ] || key="pipeline[hw_decoder_load=$load]"
    fi
    if [ "$load" = 1 ] && command -v nvidia-smi >/dev/null; then
        nvidia-smi dmon -s u -d 1 >"$dmon" 2>&1 &
        sampler=$!
    fi
    bench "$json" "$DATA" "${flags[@]}"
    local status=$?
    [ -n "$sampler" ] && kill "$sampler" 2>/dev/null
    [ "$status" = 0 ] || return "$status"
    rate=$(bench_rate "$json" "$key" 0 "$WORK/rates/pipeline-hw$load") || return
    RESULT=$rate
    if [ "$load" = 1 ]; then RESULT+="; $(dmon_jpg "$dmon")"; fi
}

# dmon_jpg FILE: the hardware JPEG decoder's busiest second in `nvidia-smi dmon -s u` output (its jpg column).
dmon_jpg() {
    [ -s "$1" ] || { echo "no nvidia-smi dmon"; return; }
    awk '/^# *gpu/ { for (i = 2; i <= NF; i++) if ($i == "jpg") col = i - 1; next }
         /^#/ || !col { next }
         { n++; if ($col != "-" && $col + 0 > top) top = $col + 0 }
         END { if (!col) print "dmon shows no jpg column"; else printf "dmon: jpg busiest %d%% over %d s\n", top, n }' "$1"
}

hw_decoder_verdict() {
    local r0=$WORK/rates/pipeline-hw0 r1=$WORK/rates/pipeline-hw1
    if [ ! -f "$r0" ] || [ ! -f "$r1" ]; then RESULT="no rates at both 0 and 1"; return 1; fi
    RESULT=$("$PY" -c 'import sys; r0, r1 = (float(open(p).read()) for p in sys.argv[1:])
same = abs(r1 - r0) <= 0.03 * r0
print(f"load 1 / load 0 = {r1 / r0:.2f}: " + ("the same within 3%, so the hardware decoder is unused" if same
      else "the hardware decoder is in use"))' "$r0" "$r1")
}

end_to_end_row() {  # eager|compiled
    local json="$LOGS/end-to-end-$1.json" batch row
    batch=$(sized "$TRAIN_BATCH") row=$(row_name "$1" end_to_end)
    bench "$json" "$DATA" --what="$row" --batch_size="$batch" --num_threads="$THREADS" \
        --reader_workers="$(reader_workers)" || return
    RESULT=$(bench_rate "$json" "$row" "$batch")
}

gpu_tests() {
    # -rA prints every test's captured output: the GPU-vs-CPU comparison's error statistics.
    limited "$PY" -m pytest -q -m gpu -rA -p no:cacheprovider tests
    local status=$?
    RESULT=$(grep -E '(passed|failed|skipped|error|deselected)' "$STEP_LOG" | tail -1 | tr -d '=')
    [ "$status" = 0 ] || [ "$status" = 5 ]  # 5: nothing collected, which the row shows
}

# The real training step, as users run it: train.py (--compile when the compiled model row succeeded). Its steady
# rate is the median of the interval rows after the first (which holds the compile and the pipeline's start); the
# epoch row includes both.
train_short() {
    local -a compiled=()
    [ "$1" = compiled ] && compiled=(--compile)
    rm -rf "$RUN"
    limited "$PY" train.py --data="$TRAIN_DATA" --run="$RUN" --resume=false --epochs=1 "${compiled[@]}" \
        --device="$DEVICE" --batch_size="$(sized "$TRAIN_BATCH")" --num_threads="$THREADS" \
        --reader_workers="$(reader_workers)" --max_steps_per_epoch="$TRAIN_STEPS" --log_interval="$LOG_INTERVAL" ||
        return
    cp "$RUN/metrics.jsonl" "$LOGS/train-metrics.jsonl"
    RESULT=$("$PY" - "$RUN/metrics.jsonl" <<'EOF'
import json, statistics, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
intervals = [r["images_per_s"] for r in rows if "epoch" not in r][1:]
epoch = [r for r in rows if "epoch" in r][-1]
steady = f"steady {statistics.median(intervals):,.0f} images/s (median of {len(intervals)} intervals after the first)" \
    if intervals else "no interval rows after the first"
print(f"{steady}; epoch row with start-up {epoch['images_per_s']:,.0f} images/s; val top-1 err "
      f"{epoch['val_top1_err']:.1%} on {epoch['val_samples']:,}")
EOF
    )
}

# eval.py on the short run's checkpoint over the whole val split: the ten-crop and centre passes of the paper.
eval_checkpoint() {
    [ -f "$RUN/checkpoint.pt" ] || { RESULT="no checkpoint from the training run"; return 1; }
    limited "$PY" eval.py --data="$EVAL_DATA" --checkpoint="$RUN/checkpoint.pt" --device="$DEVICE" \
        --num_threads="$THREADS" || return
    cp "$RUN/eval-val.json" "$LOGS/"
    RESULT=$("$PY" - "$RUN/eval-val.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"{r['n']:,} images, ten-crop and centre passes together {r['seconds']:.1f} s; top-1 err ten-crop "
      f"{r['ten_crop']['top1_err']:.1f}%, centre {r['center']['top1_err']:.1f}%")
EOF
    )
}

# ------------------------------------------------------------------------------------------------ the plan
# The rows in order of value, each skipped when the deadline leaves too little: the training batch's model rows
# (eager, then compiled, whose compile cache the later compiled rows reuse), the pipeline at its default decoder
# load, end to end, the gpu tests, the decoder sweep, train.py, eval.py, and the sweep's other points last.
measure() {
    local late mode load
    step gpu "model alone, eager, batch $TRAIN_BATCH" 20 60 model_row eager
    step gpu "model alone, compiled, batch $TRAIN_BATCH" 45 150 model_row compiled
    step gpu "pipeline alone, default hw_decoder_load (0.75), $THREADS threads" 20 60 pipeline_row default
    for mode in eager compiled; do
        step gpu "end to end, $mode" 30 150 end_to_end_row "$mode"
    done
    step gpu "pytest -m gpu" 30 100 gpu_tests
    if [ "$(probe hw_decoder)" = absent ] && [ "$REHEARSAL" = 0 ]; then
        record "pipeline alone, hw_decoder_load=0 and 1" "skipped: no libnvcuvid.so.1, no hardware JPEG decoder"
    else
        for load in 0 1; do
            step gpu "pipeline alone, hw_decoder_load=$load" 20 60 pipeline_row "$load"
        done
        step gpu "hardware decoder" 1 10 hw_decoder_verdict
    fi
    if done_before "model alone, compiled, batch $TRAIN_BATCH"; then
        step gpu "train.py --compile, $TRAIN_STEPS steps" 60 200 train_short compiled
    else
        step gpu "train.py (eager: no compiled model row), $TRAIN_STEPS steps" 45 200 train_short eager
    fi
    step gpu "eval.py on its checkpoint" 40 150 eval_checkpoint
    if [ "$(probe hw_decoder)" != absent ] || [ "$REHEARSAL" = 1 ]; then
        for late in $LATE_LOADS; do
            step gpu "pipeline alone, hw_decoder_load=$late (time left)" 30 60 pipeline_row "$late"
        done
    fi
    record "not run here: DDP" "one GPU: train.py over several ranks (torchrun, NCCL) never ran on a GPU"
    record "not run here: --mean=channel" "its window decode (decoders.image_crop on the GPU) never ran on a GPU"
}

# ------------------------------------------------------------------------------------------------ the stages
if [ "$STAGE" -gt 1 ] || [ "$MEASURE" = 1 ]; then
    step cpu "earlier stages" 1 5 earlier_stages
fi
case $STAGE in
1)
    step cpu "/dev/shm" 1 10 shm_probe
    step cpu "hardware JPEG decoder" 1 5 hw_decoder_probe
    step gpu "GPU" 1 20 gpu_versions
    step gpu "CUDA" 1 30 cuda_probe || exit 1
    step cpu "part p1" 1 30 unpack_part
    step cpu "wheels" 3 30 install_wheels
    step cpu "shards" 1 20 unpack_shards
    step gpu "torch.compile probe" 5 20 compile_probe
    ;;
*)
    step cpu "part p$STAGE" 1 30 unpack_part
    ;;
esac
if [ "$STAGE" -gt 1 ] || [ "$MEASURE" = 1 ]; then  # what every part so far makes possible, once
    if done_before shards && ! done_before "data x$REPEAT"; then
        step cpu "data x$REPEAT" 5 60 make_data
    fi
    if [ -z "$(missing_parts)" ] && ! done_before DALI; then
        step cpu "DALI" 5 60 install_dali
    fi
fi
if [ "$MEASURE" = 1 ]; then
    # Without every part, the device time is better spent on the restart; a failed install still leaves the model
    # rows, which need no DALI.
    if [ -n "$(missing_parts)" ]; then
        record "measurements" "failed: not started, parts are missing (see 'earlier stages')"
    else
        measure
    fi
fi
