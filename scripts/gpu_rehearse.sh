#!/usr/bin/env bash
# `make gpu-rehearse`: the three stages of scripts/gpu_check.sh run here, without a GPU, the way the GPU machine
# runs them (docs/GPU.md):
#   - a Python like that machine's: a venv (.dev/gpu/rehearse/python) with torch and the other packages that machine
#     has preinstalled, and without DALI, webdataset or anything else the payload brings;
#   - the payload from scripts/make_gpu_payload.sh for this Python's CPython version (the same cache and the same
#     DALI tree; only the version-specific extension modules and wheels differ);
#   - a fresh KIT_WORK, each stage given its own part only, and an emptied OUT before each stage;
#   - every step runs: those that need CUDA run their commands as small CPU smoke runs and say "skipped: no GPU".
# It ends with the table and what differs from the GPU machine. Exit status 1 when the kit itself failed (a part,
# the install, DALI's import, what comes back) or any row failed, a CPU smoke run included.
#
#   scripts/gpu_rehearse.sh          # about 10 minutes on two cores once the payload is built
set -euo pipefail
cd "$(dirname "$0")/.."

BASE_PYTHON=${BASE_PYTHON:-python3}  # a CPython without this project's .venv: the rehearsal's venv is made from it
REHEARSE=.dev/gpu/rehearse
VENV=$REHEARSE/python
STAGE_DEADLINE_S=${STAGE_DEADLINE_S:-1200}  # two CPU cores compile more slowly than the GPU machine's sixteen
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
for stage in 1 2 3; do
    out=$REHEARSE/out$stage
    rm -rf "$out" && mkdir -p "$out"
    echo
    echo "=================== stage $stage"
    env -u PYTHONPATH -u VIRTUAL_ENV OUT="$out" KIT_WORK="$REHEARSE/work" PY="$VENV/bin/python" REHEARSAL=1 \
        DEADLINE_S="$STAGE_DEADLINE_S" bash scripts/gpu_check.sh "$stage" "$REHEARSE/parts/p$stage" || true
done

cat <<EOF

== what differs on the GPU machine
- CPython 3.12 instead of $tag: its dali-cp312.tar.xz instead of dali-$tag.tar.xz (the extension modules
  backend_impl, python_function_plugin and nvimgcodec_impl), and the cp312 builds of the same versions of libcst,
  optree and nvtx. The DALI tree in dali-common.tar.xz is the same file (PAYLOAD's common_sha256).
- Its own torch 2.11.0+cu130 and numpy 2.5.2 instead of $("$VENV/bin/python" -c 'import numpy, torch
print(f"torch {torch.__version__} and numpy {numpy.__version__}")'); more packages preinstalled.
- A GPU: the rows marked "skipped: no GPU" measure there; here they ran their commands on the CPU with batches of 8,
  1-s bench rows, 4 training steps and one copy of the split instead of REPEAT (50).
- Parts read from $REHEARSE/parts instead of carried; KIT_WORK is $REHEARSE/work instead of /tmp/gpu-kit; the
  stage deadline is ${STAGE_DEADLINE_S} s instead of 90/150/400 s, and each step's limit four times its own.
EOF

# The kit's own rows must succeed here, and every measurement's commands must run (as CPU smoke runs).
failed=0
for row in "part p1" "part p2" "part p3" "wheels" "shards" "DALI" "data x1"; do
    if ! grep -q "^| [0-9] | $row | [^fs]" "$REHEARSE/out3/notes.md"; then
        echo "the kit failed: row '$row' is missing or did not succeed" >&2
        failed=1
    fi
done
if grep "failed" "$REHEARSE/out3/notes.md" >&2; then
    echo "the rows above failed" >&2
    failed=1
fi
for stage in 1 2 3; do
    files=$(find "$REHEARSE/out$stage" -type f | wc -l)
    if [ "$files" -gt 8 ]; then
        echo "stage $stage leaves $files files under OUT; at most 8 come back" >&2
        failed=1
    fi
done
echo "== rehearsal done in $(($(date +%s) - start)) s; the table: $REHEARSE/out3/notes.md"
exit "$failed"
