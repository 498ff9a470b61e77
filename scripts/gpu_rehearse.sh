#!/usr/bin/env bash
# `make gpu-rehearse`: the three stages of scripts/gpu_check.sh run here, without a GPU, the way the GPU machine
# runs them (docs/GPU.md):
#   - a Python like that machine's: a venv (.dev/gpu/rehearse/python) with torch and the other packages that machine
#     has preinstalled, and without DALI, webdataset or anything else the payload brings;
#   - the payload from scripts/make_gpu_payload.sh for this Python's CPython version (the same cache and the same
#     DALI tree; only the version-specific extension modules and wheels differ);
#   - a fresh KIT_WORK, each stage given its own part only, an emptied OUT before each stage, stage 3 its deadline
#     as an argument;
#   - every step runs: those that need CUDA run their commands as small CPU smoke runs and say "skipped: no GPU".
# It ends with the table, what differs from the GPU machine, and the checks of the machine's rules that hold here:
# stages 1 and 2 probe and unpack within 45 s, /dev/shm first and every probe present, the measurements all in
# stage 3 in the order of value, its deadline from the call, at most 8 files back, each stage's log archive holding
# every step. Exit status 1 when one of these, or any row, failed (a CPU smoke run included).
#
#   scripts/gpu_rehearse.sh          # about 11 minutes on two cores once the payload is built
set -euo pipefail
cd "$(dirname "$0")/.."

BASE_PYTHON=${BASE_PYTHON:-python3}  # a CPython without this project's .venv: the rehearsal's venv is made from it
REHEARSE=.dev/gpu/rehearse
VENV=$REHEARSE/python
INSTALL_S=180        # stages 1 and 2: their CPU smoke runs compile on two shared cores (on the machine: 45 s)
STAGE3_SECONDS=1200  # stage 3's deadline, given as the call gives it
start=$(date +%s)

echo "== a Python like the GPU machine's: $VENV"
# That machine's preinstalled packages that this project or DALI imports, at this project's pins; webdataset is
# not among them (the payload brings it).
mapfile -t preinstalled < <("$BASE_PYTHON" - <<'EOF'
import tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
for requirement in project["dependencies"] + project["optional-dependencies"]["dev"]:
    if not requirement.startswith("webdataset"):
        print(requirement)
for name in ("pyyaml", "packaging", "six", "typing-extensions", "wheel"):  # what DALI's and webdataset's need
    print(name)
EOF
)
if [ "$(cat "$VENV/.installed" 2>/dev/null)" != "${preinstalled[*]}" ]; then
    rm -rf "$VENV"
    "$BASE_PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --quiet --disable-pip-version-check "${preinstalled[@]}"
    echo "${preinstalled[*]}" >"$VENV/.installed"
fi
tag=$("$VENV/bin/python" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')

echo "== the payload for $tag"
PY_TAG=$tag PARTS=$REHEARSE/parts scripts/make_gpu_payload.sh

rm -rf "$REHEARSE/work"
kit() {  # STAGE [SECONDS]: one call, as the GPU machine gets it: its own part, an emptied OUT
    local out=$REHEARSE/out$1
    rm -rf "$out" && mkdir -p "$out"
    echo
    echo "=================== stage $1"
    env -u PYTHONPATH -u VIRTUAL_ENV OUT="$out" KIT_WORK="$REHEARSE/work" PY="$VENV/bin/python" REHEARSAL=1 \
        INSTALL_S="$INSTALL_S" bash scripts/gpu_check.sh "$1" "$REHEARSE/parts/p$1" "${@:2}" || true
}
kit 1
kit 2
kit 3 "$STAGE3_SECONDS"

cat <<EOF

== what differs on the GPU machine
- CPython 3.12 instead of $tag: its dali-cp312.tar.xz instead of dali-$tag.tar.xz (the extension modules
  backend_impl, python_function_plugin and nvimgcodec_impl), and the cp312 builds of the same versions of libcst,
  optree and nvtx. The DALI tree's pieces are the same files (PAYLOAD's tree_sha256).
- Its own torch 2.11.0+cu130 and numpy 2.5.2 instead of $("$VENV/bin/python" -c 'import numpy, torch
print(f"torch {torch.__version__} and numpy {numpy.__version__}")'); more packages preinstalled.
- A GPU: the rows marked "skipped: no GPU" measure there; here they ran their commands on the CPU with batches of 8,
  1-s bench rows, 4 training steps and one copy of the split instead of REPEAT (50). The hardware decoder sweep
  runs here whatever the probe found; there it is skipped without libnvcuvid.so.1.
- Parts read from $REHEARSE/parts instead of carried; KIT_WORK is $REHEARSE/work instead of .dev/gpu/work; stages 1
  and 2 end within ${INSTALL_S} s instead of 45 s (their CPU smoke runs: the CUDA and torch.compile probes), stage 3
  within ${STAGE3_SECONDS} s, each step's limit four times its own: two shared CPU cores compile far more slowly.
EOF

# What the GPU machine's rules need, as far as they can be checked here.
failed=0
fail() { echo "REHEARSAL FAILED: $*" >&2; failed=1; }
table=$REHEARSE/out3/notes.md
steps_of() { awk -F' [|] ' -v stage="| $1" '$1 == stage { print $2 }' "$table"; }  # STAGE: its steps, in order
for row in "part p1" "part p2" "part p3" "wheels" "shards" "data x1" "DALI"; do
    grep -q "^| [0-9] | $row | [^fs]" "$table" || fail "the kit's row '$row' is missing or did not succeed"
done
grep "failed" "$table" >&2 && fail "the rows above failed"
# Stages 1 and 2 only probe and unpack: their own work (every row but the CPU smoke runs) within 45 s, here too.
for stage in 1 2; do
    own=$(awk -F' [|] ' -v stage="| $stage" '$1 == stage && $3 !~ /smoke run/ && $4 ~ /^[0-9]+ [|]$/ { s += $4 }
                                               END { print s + 0 }' "$table")
    echo "stage $stage: its probes and unpacking took ${own} s"
    [ "$own" -le 45 ] || fail "stage $stage's probes and unpacking took ${own} s (more than 45)"
done
[ "$(steps_of 1 | head -1)" = /dev/shm ] || fail "stage 1 does not log /dev/shm first"
for probe in GPU CUDA "hardware JPEG decoder" "torch.compile probe"; do
    steps_of 1 | grep -qx "$probe" || fail "stage 1 has no '$probe' probe"
done
# The measurements: all in stage 3, in the order of value, within the deadline the call gave.
mapfile -t measured < <(steps_of 3 | sed -n '/^DALI$/,$p' | sed '1d;$d')
expected=("model alone, eager" "model alone, compiled" "pipeline alone, default" "end to end, eager"
          "end to end, compiled" "pytest -m gpu" "pipeline alone, hw_decoder_load=0" "pipeline alone, hw_decoder_load=1"
          "hardware decoder" "train.py --compile" "eval.py" "pipeline alone, hw_decoder_load=0.5" "not run here: DDP"
          "not run here: --mean=channel")
[ "${#measured[@]}" = "${#expected[@]}" ] || fail "stage 3 measured ${#measured[@]} rows, not ${#expected[@]}"
for i in "${!expected[@]}"; do
    [[ ${measured[i]:-} == "${expected[i]}"* ]] || fail "row $((i + 1)) of stage 3 is '${measured[i]:-}', not '${expected[i]}...'"
done
grep -q "^| 3 | stage 3 | .*deadline ${STAGE3_SECONDS} s, the call's SECONDS argument" "$table" ||
    fail "stage 3 did not take its deadline from the call"
if bash scripts/gpu_check.sh 3 "$REHEARSE/parts/p3" 2>/dev/null; then
    fail "stage 3 without SECONDS did not refuse"
fi
# What comes back: at most 8 files, and each stage's archive holds every step it ran (it is refreshed after each).
for stage in 1 2 3; do
    files=$(find "$REHEARSE/out$stage" -type f | wc -l)
    [ "$files" -le 8 ] || fail "stage $stage leaves $files files under OUT; at most 8 come back"
    ran=$(awk -F' [|] ' -v stage="| $stage" '$1 == stage && $4 ~ /^[0-9]+ [|]$/' "$table" | wc -l)
    logs=$(tar -tzf "$REHEARSE/out$stage/logs-stage$stage.tar.gz" | grep -c '\.log$')
    [ "$logs" -ge "$ran" ] || fail "stage $stage's archive holds $logs step logs for $ran steps"
done
echo "== rehearsal done in $(($(date +%s) - start)) s; the table: $table"
exit "$failed"
