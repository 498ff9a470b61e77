#!/usr/bin/env bash
# The GPU measurements of docs/GPU.md, on a machine without internet, in three calls made back to back. Each call
# carries one part of the payload (scripts/make_gpu_payload.sh) and stops at its own deadline:
#   scripts/gpu_check.sh 1 .dev/gpu/p1   versions and nvidia-smi; installs the small wheels, unpacks and replicates
#                                        the shards; model alone, eager, batch 128 and 256
#   scripts/gpu_check.sh 2 .dev/gpu/p2   model alone, compiled (its kernels stay in the compile cache for stage 3)
#   scripts/gpu_check.sh 3 .dev/gpu/p3   installs DALI from the three parts; pytest -m gpu; pipeline alone over
#                                        hw_decoder_load; end to end, eager and compiled; train.py --compile and
#                                        eval.py on its checkpoint; ten-crop over 50,000 images; the whole table
# A stage uses what the stages before it left in KIT_WORK (/tmp/gpu-kit), so the machine must stay up between the
# calls. Each step's result is appended to $OUT/notes.md as soon as it is known, the stage's logs (bench JSON too)
# go to $OUT/logs-stageN.tar.gz, also when the stage is stopped. A failed step does not stop the next; a step that
# cannot finish before the deadline is skipped. A model row of stage 1 or 2 that did not succeed (its deadline) is
# tried again at the end of stage 3.
#
#   scripts/gpu_check.sh 1 .dev/gpu/p1
#   DEADLINE_S=240 scripts/gpu_check.sh 3 .dev/gpu/p3       # less device time left: a shorter stage
#   REHEARSAL=1 PY=... KIT_WORK=... OUT=... scripts/gpu_check.sh 1 PART   # `make gpu-rehearse`, without a GPU
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

STAGE=${1:?usage: scripts/gpu_check.sh STAGE [PART_DIR]  (STAGE 1, 2 or 3; see docs/GPU.md)}
PART=${2:-}
PY=${PY:-python3}            # the machine's own Python, torch included: never a venv made from it (it would lose torch)
WORK=${KIT_WORK:-/tmp/gpu-kit}
OUT=${OUT:-$WORK/out}
REHEARSAL=${REHEARSAL:-0}    # 1: no GPU here; each GPU step runs a small CPU smoke run of its commands instead
case $STAGE in
    1) DEADLINE_S=${DEADLINE_S:-90} ;;  # the three add up to under 11 minutes: with the machine's start-up and
    2) DEADLINE_S=${DEADLINE_S:-150} ;; # the pauses between calls, inside 15 minutes of device time
    3) DEADLINE_S=${DEADLINE_S:-400} ;;
    *) echo "stage $STAGE: must be 1, 2 or 3" >&2; exit 2 ;;
esac
REPEAT=${REPEAT:-50}               # copies of the 1000 real images per split: 50,000 val images, as ILSVRC2012's
BENCH_SECONDS=${BENCH_SECONDS:-6}  # timed seconds per bench row
TRAIN_BATCH=${TRAIN_BATCH:-256}    # images per step for the end-to-end rows and the short training run
TRAIN_STEPS=${TRAIN_STEPS:-180}    # steps of the short training run (an epoch of 50,000 images is 195)
LOG_INTERVAL=${LOG_INTERVAL:-20}   # its steps per interval row
HW_DECODER_LOADS=${HW_DECODER_LOADS:-"0 0.5 0.75 1"}
MARGIN_S=15                        # kept free before the deadline for the table and the log archive

START=$(date +%s)
DEADLINE=$((START + DEADLINE_S))
SITE=$WORK/site                  # what the payload installs: first on PYTHONPATH, its bin/ first on PATH
SHARDS=$WORK/shards              # the carried split (1000 real images), unpacked
DATA=$WORK/data                  # the same, replicated REPEAT times
RUN=$WORK/run                    # the short training run
LOGS=$WORK/logs/stage$STAGE
NOTES=$WORK/notes.md             # every stage's rows; each stage copies it to $OUT/notes.md and appends to both
THREADS=$(($(nproc) > 3 ? $(nproc) - 2 : 1))  # DALI threads: every core but two (the training loop, the system)
export PYTHONPATH=$SITE PATH=$SITE/bin:$PATH PYTHONUNBUFFERED=1
export TORCHINDUCTOR_CACHE_DIR=$WORK/inductor TRITON_CACHE_DIR=$WORK/triton  # compiled in stage 2, reused in 3
mkdir -p "$OUT" "$LOGS" "$WORK/parts" "$WORK/done" "$WORK/rates"

if "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    GPU=1 DEVICE=cuda SMOKE=0
else
    GPU=0 DEVICE=cpu SMOKE=$REHEARSAL
fi
LIMIT_SCALE=1
if [ "$SMOKE" = 1 ]; then  # the same commands, sized for two CPU cores: they prove the flags, not the speed
    BENCH_SECONDS=1 TRAIN_STEPS=4 LOG_INTERVAL=2 REPEAT=1 LIMIT_SCALE=4
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

# limited COMMAND...: every external command of a step runs through this: at most the step's limit, never past
# the deadline. Exit status 124: stopped at the limit.
limited() { timeout --kill-after=10 "$STEP_LIMIT" "$@"; }

# step KIND NAME NEED_S LIMIT_S FUNCTION [ARGS...]: runs FUNCTION with its output in STEP_LOG ($LOGS/<name>.log)
# and records the row it leaves in RESULT (or why it failed). KIND gpu: a step that needs CUDA (a smoke run on the
# CPU in a rehearsal). Skipped when less than NEED_S is left before the deadline.
CURRENT=""
step() {
    local kind=$1 name=$2 need=$3 limit=$(($4 * LIMIT_SCALE)) fn=$5 log started status left last
    shift 5
    log="$LOGS/$(slug "$name").log"
    left=$(seconds_left)
    if [ "$kind" = gpu ] && [ "$GPU" = 0 ] && [ "$SMOKE" = 0 ]; then
        record "$name" "skipped: no GPU"
        return
    fi
    if [ "$left" -lt "$need" ]; then
        record "$name" "skipped: deadline (${left} s left, needs ${need})"
        return
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
        last=$(grep -v '^[[:space:]]*$' "$log" | tail -1 | cut -c1-160)
        RESULT="failed (exit $status): ${RESULT:-$last}"
    fi
    if [ "$kind" = gpu ] && [ "$GPU" = 0 ]; then
        RESULT="skipped: no GPU (CPU smoke run: $RESULT)"
    fi
    record "$name" "$RESULT" "$(($(date +%s) - started))"
}

finish() {
    local status=$?
    trap - EXIT TERM INT
    [ -n "$CURRENT" ] && record "$CURRENT" "failed: the stage was stopped during this step"
    record "stage $STAGE" "ended after $(($(date +%s) - START)) s (deadline ${DEADLINE_S} s)"
    tar -czf "$OUT/logs-stage$STAGE.tar.gz" -C "$WORK/logs" "stage$STAGE" 2>/dev/null
    echo
    echo "== the table so far ($OUT/notes.md; logs: $OUT/logs-stage$STAGE.tar.gz)"
    cat "$OUT/notes.md"
    if grep -q "^| $STAGE | .* | failed" "$OUT/notes.md"; then exit 1; fi
    exit "$status"
}
trap 'exit 143' TERM INT
trap finish EXIT

# ------------------------------------------------------------------------------------------------ the payload
# stash: the carried part goes to KIT_WORK/parts, after its own checksums, so that stage 3 has all three.
stash() {
    local name
    name=$(basename "$PART")
    [ -f "$PART/SHA256SUMS" ] || { RESULT="$PART: no such part here (was it in the call's carry?)"; return 1; }
    (cd "$PART" && sha256sum --quiet -c SHA256SUMS) || { RESULT="$name damaged: its SHA256SUMS do not match"; return 1; }
    rm -rf "${WORK:?}/parts/$name"
    cp -r "$PART" "$WORK/parts/$name"
    RESULT="$name: $(find "$PART" -type f | wc -l) files, $(du -sm "$PART" | cut -f1) MiB, checksums ok"
}

payload_field() { awk -v key="$1" '$1 == key { print $2 }' "$WORK/parts/p1/PAYLOAD"; }

# Only what this Python lacks: a package the machine already has stays in charge (a second copy first on
# PYTHONPATH could break what imports it, torch included).
install_wheels() {
    local -a wheels
    mapfile -t wheels < <("$PY" - "$WORK"/parts/p1/wheels/*.whl <<'EOF'
import re, sys
from importlib.metadata import PackageNotFoundError, version
for path in sys.argv[1:]:
    name = re.sub(r"[-_.]+", "-", path.rsplit("/", 1)[-1].split("-")[0]).lower()
    try:
        print(f"already there: {name} {version(name)}", file=sys.stderr)
    except PackageNotFoundError:
        print(path)
EOF
    )
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
    if command -v xz >/dev/null; then xz -dc -T0; else "$PY" -c 'import lzma, shutil, sys
shutil.copyfileobj(lzma.open(sys.stdin.buffer), sys.stdout.buffer, 1 << 20)'; fi
}

install_dali() {
    local parts tag mine i sum
    parts=$(payload_field parts) tag=$(payload_field tag)
    mine=$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
    for i in $(seq 1 "$parts"); do
        [ -f "$WORK/parts/p$i/SHA256SUMS" ] || { RESULT="p$i missing (was the machine released between calls?)"; return 1; }
    done
    [ "$tag" = "$mine" ] || { RESULT="the payload is for $tag, this Python is $mine"; return 1; }
    sum=$(cat "$WORK"/parts/p*/dali-common.tar.xz.* | sha256sum | cut -d' ' -f1)
    [ "$sum" = "$(payload_field common_sha256)" ] || { RESULT="the reassembled DALI tree does not match PAYLOAD"; return 1; }
    mkdir -p "$SITE/bin"
    cat "$WORK"/parts/p*/dali-common.tar.xz.* | unxz | tar -x -C "$SITE" || return
    unxz <"$WORK/parts/p1/dali-$tag.tar.xz" | tar -x -C "$SITE" || return
    # DALI's console script, for this Python (the tests index their tars with it; pip would have written it).
    printf '#!%s\nimport sys\nfrom wds2idx import main\nsys.exit(main())\n' \
        "$("$PY" -c 'import sys; print(sys.executable)')" >"$SITE/bin/wds2idx"
    chmod +x "$SITE/bin/wds2idx"
    wds2idx --help >/dev/null || { RESULT="wds2idx does not run"; return 1; }
    RESULT=$("$PY" - "$parts" "$tag" <<'EOF'
import sys
import nvidia.dali as dali
import nvidia.dali.plugin.pytorch  # noqa: F401 (the loaders' import)
import webdataset  # noqa: F401
import pipeline  # noqa: F401
print(f"DALI {dali.__version__} from {sys.argv[1]} parts ({sys.argv[2]}); imports and wds2idx ok")
EOF
    ) || return
}

# ------------------------------------------------------------------------------------------------ the rows
# The only place that knows the flags of `python -m bench`, train.py and eval.py. The model rows need no DALI, so
# stages 1 and 2 measure them before DALI is installed.

sized() { if [ "$SMOKE" = 1 ]; then echo 8; else echo "$1"; fi; }  # images per batch: tiny in a smoke run

# replicate_shards SOURCE DEST COPIES: the one call that copies the carried split (no DALI needed).
replicate_shards() { limited "$PY" -m shards replicate --data="$1" --out="$2" --copies="$3"; }

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

make_data() {
    rm -rf "$DATA"
    replicate_shards "$SHARDS" "$DATA" "$REPEAT" || return
    RESULT="$(split_sizes "$DATA/manifest.json") samples ($REPEAT copies)"
}

row_name() { if [ "$1" = compiled ]; then echo "$2_compiled"; else echo "$2"; fi; }  # eager|compiled ROW

model_row() {  # eager|compiled BATCH
    local json="$LOGS/model-$1-$2.json" batch row
    batch=$(sized "$2") row=$(row_name "$1" model)
    bench "$json" "$SHARDS" --what="$row" --batch_size="$batch" || return
    RESULT=$(bench_rate "$json" "$row" "$batch")
}

pipeline_row() {  # HW_DECODER_LOAD: the pipeline with that share of every batch on the hardware JPEG decoder
    local json="$LOGS/pipeline-hw$1.json" batch
    batch=$(sized "$TRAIN_BATCH")
    bench "$json" "$DATA" --what=pipeline --batch_size="$batch" --num_threads="$THREADS" --hw_decoder_load="$1" \
        || return
    RESULT=$(bench_rate "$json" "$([ "$GPU" = 1 ] && echo "pipeline[hw_decoder_load=$1]" || echo pipeline)" 0 \
        "$WORK/rates/pipeline-hw$1")
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
    bench "$json" "$DATA" --what="$row" --batch_size="$batch" --num_threads="$THREADS" || return
    RESULT=$(bench_rate "$json" "$row" "$batch")
}

ten_crop_row() {  # eval.py's ten-crop evaluation over the whole val split, loader and model ready before the clock
    local json="$LOGS/ten-crop.json"
    bench "$json" "$DATA" --what=eval_tencrop --num_threads="$THREADS" --repeats=1 || return
    RESULT=$("$PY" - "$json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
rate, n = r["results"]["eval_tencrop"]["images_per_s"], r["data"]["val_samples"]
print(f"{rate:,.0f} images/s: {n:,} val images in {n / rate:.1f} s")
EOF
    )
}

gpu_tests() {
    # -rA prints every test's captured output: the GPU-vs-CPU comparison's error statistics.
    limited "$PY" -m pytest -q -m gpu -rA -p no:cacheprovider tests
    local status=$?
    RESULT=$(grep -E '(passed|failed|skipped|error|deselected)' "$STEP_LOG" | tail -1 | tr -d '=')
    [ "$status" = 0 ] || [ "$status" = 5 ]  # 5: nothing collected, which the row shows
}

# The real training step, as users run it: train.py --compile. Its steady rate is the median of the interval rows
# after the first (which holds the compile and the pipeline's start); the epoch row includes both.
train_short() {
    rm -rf "$RUN"
    limited "$PY" train.py --data="$DATA" --run="$RUN" --resume=false --epochs=1 --compile --device="$DEVICE" \
        --batch_size="$(sized "$TRAIN_BATCH")" --num_threads="$THREADS" --max_steps_per_epoch="$TRAIN_STEPS" \
        --log_interval="$LOG_INTERVAL" || return
    cp "$RUN/metrics.jsonl" "$LOGS/train-metrics.jsonl"
    RESULT=$("$PY" - "$RUN/metrics.jsonl" <<'EOF'
import json, statistics, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
intervals = [r["images_per_s"] for r in rows if "epoch" not in r][1:]
epoch = [r for r in rows if "epoch" in r][-1]
steady = f"steady {statistics.median(intervals):,.0f} images/s (median of {len(intervals)} intervals after the first)" \
    if intervals else "no interval rows after the first"
print(f"{steady}; epoch row with start-up {epoch['images_per_s']:,.0f} images/s; val top-1 err "
      f"{epoch['val_top1_err']:.1%}")
EOF
    )
}

eval_checkpoint() {
    [ -f "$RUN/checkpoint.pt" ] || { RESULT="no checkpoint from the training run"; return 1; }
    limited "$PY" eval.py --data="$DATA" --checkpoint="$RUN/checkpoint.pt" --device="$DEVICE" \
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

gpu_versions() {
    command -v nvidia-smi >/dev/null || { RESULT="no nvidia-smi"; [ "$GPU" = 0 ]; return; }
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

python_versions() {
    limited "$PY" -m pip list --format=freeze
    RESULT=$("$PY" - "$THREADS" <<'EOF'
import os, platform, sys
import numpy, torch
cuda = f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}" if torch.cuda.is_available() else "no CUDA"
print(f"Python {platform.python_version()}, torch {torch.__version__} ({cuda}), numpy {numpy.__version__}, "
      f"{os.cpu_count()} CPUs, DALI threads {sys.argv[1]}")
EOF
    ) || return
}

# ------------------------------------------------------------------------------------------------ the stages
[ -n "$PART" ] && step cpu "part $(basename "$PART")" 1 120 stash

case $STAGE in
1)
    step gpu "GPU" 1 60 gpu_versions
    step cpu "Python" 1 60 python_versions
    step cpu "wheels" 5 120 install_wheels
    step cpu "shards" 5 60 unpack_shards
    step cpu "data x$REPEAT" 10 120 make_data
    for batch in 128 256; do
        step gpu "model alone, eager, batch $batch" 20 90 model_row eager "$batch"
    done
    ;;
2)
    for batch in 128 256; do
        step gpu "model alone, compiled, batch $batch" 45 130 model_row compiled "$batch"
    done
    ;;
3)
    step cpu "DALI" 20 180 install_dali
    done_before "data x$REPEAT" || step cpu "data x$REPEAT" 10 120 make_data
    step gpu "pytest -m gpu" 30 120 gpu_tests
    for batch in 128 256; do
        done_before "model alone, eager, batch $batch" ||
            step gpu "model alone, eager, batch $batch" 20 90 model_row eager "$batch"
    done
    for load in $HW_DECODER_LOADS; do
        step gpu "pipeline alone, hw_decoder_load=$load, $THREADS threads" 15 60 pipeline_row "$load"
    done
    step gpu "hardware decoder" 1 10 hw_decoder_verdict
    step gpu "end to end, eager" 20 90 end_to_end_row eager
    step gpu "end to end, compiled" 40 180 end_to_end_row compiled
    step gpu "train.py --compile, $TRAIN_STEPS steps" 60 240 train_short
    step gpu "eval.py on its checkpoint" 30 150 eval_checkpoint
    step gpu "ten-crop alone, val split" 20 120 ten_crop_row
    for batch in 128 256; do
        done_before "model alone, compiled, batch $batch" ||
            step gpu "model alone, compiled, batch $batch" 45 130 model_row compiled "$batch"
    done
    ;;
esac
