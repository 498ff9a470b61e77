#!/usr/bin/env bash
# One pass over everything that needs a CUDA GPU, on a machine without internet (Python 3.12, its own torch):
#   1. DALI: when `import nvidia.dali` fails, install it (and whatever else is missing) from the payload that
#      scripts/make_gpu_payload.sh split into .dev/p1/part, .dev/p2/part, ... (checked against .dev/p1/SHA256SUMS)
#   2. tests: `pytest -m gpu`, then the quick rest (`not gpu and not slow`)
#   3. realistic shards: the 1000 real JPEGs (../shared/data/imagenet-sample) or the payload's prebuilt 256-px
#      shards, copied REPEAT times (REPEAT x 1000 samples per split; benchmark data, never for training)
#   4. bench.py on the GPU (limit, pipeline alone, ten-crop, alternative, model alone, end to end, preprocess),
#      a short train.py run (its images/s log lines) and an eval.py run (ten-crop + centre, timed)
#   5. a short table, last
# Logs and JSON go to $OUT (default gpu-check/). Every step runs even if an earlier one failed; exit status 1 then.
#
#   scripts/gpu_check.sh                      # about 5 minutes on an H100
#   REPEAT=20 BENCH_SECONDS=5 TRAIN_STEPS=100 scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

PY=${PY:-python3}
OUT=${OUT:-gpu-check}
SITE=${SITE:-/tmp/site}
WORK=${WORK:-/tmp/gpu-check}
REPEAT=${REPEAT:-40}              # copies of the 1000 images per split: 40k training samples
BENCH_SECONDS=${BENCH_SECONDS:-8} # timed seconds per bench measurement
TRAIN_STEPS=${TRAIN_STEPS:-150}   # steps of the short training run (batch 256; an epoch of 40k is 157)
REAL_IMAGES=${REAL_IMAGES:-../shared/data/imagenet-sample}
mkdir -p "$OUT" "$WORK"
OUT=$(cd "$OUT" && pwd)
summary=()
failed=0

note() { summary+=("$(printf '%-34s %s' "$1" "$2")"); }
step() { echo; echo "== $* ($(date +%T), load $(cut -d' ' -f1-3 /proc/loadavg))"; }
seconds_since() { echo "$(( $(date +%s) - $1 ))"; }

step "machine"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | tee "$OUT/gpu.txt"
"$PY" -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
"available", torch.cuda.is_available())' 2>&1 | tee "$OUT/python.txt"

# ---- 1. DALI and the rest from the payload
step "1. DALI"
if "$PY" -c 'import nvidia.dali' 2>/dev/null; then
    note "DALI" "already installed"
elif [ ! -f .dev/p1/SHA256SUMS ]; then
    note "DALI" "MISSING: no import and no payload in .dev/p1 (run scripts/make_gpu_payload.sh, carry .dev/pN)"
    failed=1
else
    start=$(date +%s)
    parts=$(grep -c ' p[0-9]*/part$' .dev/p1/SHA256SUMS)
    if ! (cd .dev && grep -v '^#' p1/SHA256SUMS | sha256sum -c --quiet -); then
        note "DALI" "MISSING: payload parts absent or damaged (need $parts: .dev/p1 .. .dev/p$parts)"
        failed=1
    else
        rm -rf "$WORK/payload" && mkdir -p "$WORK/payload"
        for i in $(seq 1 "$parts"); do cat ".dev/p$i/part"; done | tar -C "$WORK/payload" -xf -
        # Only what this Python lacks: the machine's own torch, numpy, ... stay in charge.
        mapfile -t wheels < <("$PY" - "$WORK"/payload/wheels/*.whl <<'EOF'
import re, sys
from importlib.metadata import PackageNotFoundError, version
for path in sys.argv[1:]:
    name = re.sub(r"[-_.]+", "-", path.rsplit("/", 1)[-1].split("-")[0]).lower()
    try:
        version(name)
    except PackageNotFoundError:
        print(path)
EOF
        )
        echo "installing ${#wheels[@]} wheels into $SITE"
        mkdir -p "$SITE"
        if "$PY" -m pip --version >/dev/null 2>&1; then
            "$PY" -m pip install --quiet --no-index --no-deps --target "$SITE" "${wheels[@]}"
        else  # no pip: a wheel is a zip; its scripts go to $SITE/bin as pip --target puts them
            "$PY" - "$SITE" "${wheels[@]}" <<'EOF'
import os, shutil, sys, zipfile
site = sys.argv[1]
for wheel in sys.argv[2:]:
    zipfile.ZipFile(wheel).extractall(site)
for data in [d for d in os.listdir(site) if d.endswith(".data")]:
    for kind in os.listdir(os.path.join(site, data)):
        target = os.path.join(site, "bin") if kind == "scripts" else site
        shutil.copytree(os.path.join(site, data, kind), target, dirs_exist_ok=True)
    shutil.rmtree(os.path.join(site, data))
os.makedirs(os.path.join(site, "bin"), exist_ok=True)
for info in [d for d in os.listdir(site) if d.endswith(".dist-info")]:  # console scripts (DALI's wds2idx)
    path = os.path.join(site, info, "entry_points.txt")
    section = None
    for line in open(path).read().splitlines() if os.path.exists(path) else []:
        if line.startswith("["):
            section = line.strip("[] ")
        elif section == "console_scripts" and "=" in line:
            name, target = (x.strip() for x in line.split("=", 1))
            module, func = target.split(":")
            with open(os.path.join(site, "bin", name), "w") as f:
                f.write(f"#!{sys.executable}\nimport sys\nfrom {module} import {func}\nsys.exit({func}())\n")
for script in os.listdir(os.path.join(site, "bin")):
    os.chmod(os.path.join(site, "bin", script), 0o755)
EOF
        fi
        export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
        export PATH="$SITE/bin:$PATH"
        # tests/shardkit.py finds DALI's wds2idx next to sys.executable: a venv that sees the system's packages
        # (torch) and has the installed scripts beside its python.
        if "$PY" -m venv --without-pip --system-site-packages "$WORK/venv" 2>/dev/null; then
            ln -sf "$SITE"/bin/* "$WORK/venv/bin/" 2>/dev/null
            PY="$WORK/venv/bin/python"
        fi
        if "$PY" -c 'import nvidia.dali' 2>&1; then
            note "DALI" "installed from $parts parts in $(seconds_since "$start") s"
        else
            note "DALI" "FAILED to import after installing"
            failed=1
        fi
    fi
fi
"$PY" -c 'import nvidia.dali as d; print("DALI", d.__version__)' 2>&1 | tee -a "$OUT/python.txt"

# ---- 2. tests
step "2. tests marked gpu"
start=$(date +%s)
timeout 300 "$PY" -m pytest -q -m gpu -p no:cacheprovider 2>&1 | tee "$OUT/pytest-gpu.txt" | tail -25
note "pytest -m gpu" "$(tail -1 "$OUT/pytest-gpu.txt") ($(seconds_since "$start") s)"
grep -qE '(failed|error)' <(tail -1 "$OUT/pytest-gpu.txt") && failed=1

step "2. the other tests (the quick ones)"
start=$(date +%s)
timeout 240 "$PY" -m pytest -q -m 'not gpu and not slow' -x -p no:cacheprovider 2>&1 | tee "$OUT/pytest-rest.txt" | tail -15
note "pytest -m 'not gpu and not slow'" "$(tail -1 "$OUT/pytest-rest.txt") ($(seconds_since "$start") s)"
grep -qE '(failed|error)' <(tail -1 "$OUT/pytest-rest.txt") && failed=1

# ---- 3. realistic shards
step "3. bench shards, $REPEAT copies of the 1000 real images"
DATA="$WORK/bench-data"
rm -rf "$DATA"
start=$(date +%s)
if [ -d "$REAL_IMAGES" ]; then
    source_desc="built from $REAL_IMAGES"
    "$PY" bench.py --make_data="$DATA" --raw="$REAL_IMAGES" --repeat="$REPEAT" 2>&1 | tail -3
elif [ -d "$WORK/payload/bench-shards" ] || { [ -f .dev/p1/SHA256SUMS ] && mkdir -p "$WORK/payload" &&
        for i in $(seq 1 "$(grep -c ' p[0-9]*/part$' .dev/p1/SHA256SUMS)"); do cat ".dev/p$i/part"; done |
        tar -C "$WORK/payload" -xf - bench-shards; }; then
    source_desc="prebuilt 256-px shards from the payload"
    "$PY" bench.py --make_data="$DATA" --raw="$WORK/payload/bench-shards" --repeat="$REPEAT" 2>&1 | tail -3
else
    source_desc="NONE: no real images and no payload shards"
fi
if [ -f "$DATA/manifest.json" ]; then
    note "bench shards" "$source_desc, x$REPEAT ($(seconds_since "$start") s)"
else
    note "bench shards" "FAILED ($source_desc)"
    failed=1
fi

# ---- 4. bench, train, eval
if [ -f "$DATA/manifest.json" ]; then
    step "4. bench.py on the GPU"
    timeout 420 "$PY" bench.py --data="$DATA" --device=cuda --seconds="$BENCH_SECONDS" --out="$OUT/bench-gpu.json" \
        2>&1 | tee "$OUT/bench-gpu.txt" | grep -v '^measuring\|^  '
    [ -f "$OUT/bench-gpu.json" ] || { note "bench.py --device=cuda" "FAILED (see bench-gpu.txt)"; failed=1; }

    step "4. train.py, $TRAIN_STEPS steps of 256"
    start=$(date +%s)
    timeout 300 "$PY" train.py --data="$DATA" --run="$WORK/run" --resume=false --epochs=1 --batch_size=256 \
        --max_steps_per_epoch="$TRAIN_STEPS" --log_interval=50 2>&1 | tee "$OUT/train.txt" | tail -8
    if [ -f "$WORK/run/checkpoint.pt" ]; then
        cp "$WORK/run/metrics.jsonl" "$OUT/train-metrics.jsonl"
        rate=$("$PY" -c 'import json, sys; rows = [json.loads(l) for l in open(sys.argv[1]) if "images_per_s" in l]
print(f"{rows[-1][\"images_per_s\"]:.0f}" if rows else "?")' "$WORK/run/metrics.jsonl")
        note "train.py (steady images/s)" "$rate, whole run $(seconds_since "$start") s incl. centre-crop val"
    else
        note "train.py" "FAILED (see train.txt)"
        failed=1
    fi

    step "4. eval.py (ten-crop and centre crop over val)"
    start=$(date +%s)
    if [ -f "$WORK/run/checkpoint.pt" ] && timeout 300 "$PY" eval.py --data="$DATA" \
            --checkpoint="$WORK/run/checkpoint.pt" 2>&1 | tee "$OUT/eval.txt" | tail -12; then
        cp "$WORK/run/eval-val.json" "$OUT/" 2>/dev/null
        note "eval.py (ten-crop + centre)" "$(grep -o '([0-9]* images, [0-9.]* s)' "$OUT/eval.txt" | tail -1), $(seconds_since "$start") s in all"
    else
        note "eval.py" "FAILED (see eval.txt)"
        failed=1
    fi
fi

# ---- 5. the short table
step "5. summary"
if [ -f "$OUT/bench-gpu.json" ]; then
    "$PY" - "$OUT/bench-gpu.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
gpu = r["hardware"]["gpu"] or {}
print(f"{gpu.get('name')}, {r['hardware']['cpus_usable']} CPU cores ({r['hardware']['cpu']}), batch {r['batch_size']}")
for key, row in r["results"].items():
    print(f"  {r['labels'][key]:<62} {row['images_per_s']:>10.0f} images/s")
for key, value in r["ratios"].items():
    print(f"  {key:<62} {value:>10.2f}")
EOF
fi
printf '%s\n' "${summary[@]}" | tee "$OUT/summary.txt"
exit "$failed"
