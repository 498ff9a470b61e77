#!/bin/bash
# Submit the shard writing as a job array, and the merge job that starts once every array task has succeeded.
#
#     RAW=/scratch/$USER/imagenet DATA=/scratch/$USER/imagenet-shards slurm/submit_shards.sh [sbatch options ...]
#
# NUM_TASKS array tasks (default 32); sbatch options such as --account=... --partition=... go to both jobs
# (or set SBATCH_ACCOUNT / SBATCH_PARTITION, which sbatch reads itself).
set -euo pipefail
: "${RAW:?set RAW to the raw ImageNet directory}" "${DATA:?set DATA to the shard directory to write}"
RAW=$(realpath -m -- "$RAW")
DATA=$(realpath -m -- "$DATA")
export RAW DATA
cd "$(dirname -- "$0")/.."
if [[ ! -x ${VENV:-.venv}/bin/python ]]; then
    echo "error: no ${VENV:-.venv}/bin/python: run \`make setup\` here first (the jobs use it)" >&2
    exit 2
fi
NUM_TASKS=${NUM_TASKS:-32}
if ! [[ $NUM_TASKS =~ ^[1-9][0-9]*$ ]]; then
    echo "error: NUM_TASKS=$NUM_TASKS: expected a positive whole number" >&2
    exit 2
fi
export NUM_TASKS
array=$(sbatch --parsable --array="0-$((NUM_TASKS - 1))" "$@" slurm/shards_array.sbatch)
array=${array%%;*}  # --parsable prints "id" or "id;cluster"
merge=$(sbatch --parsable --dependency="afterok:$array" "$@" slurm/shards_merge.sbatch)
merge=${merge%%;*}
echo "submitted: shard array job $array ($NUM_TASKS tasks), merge job $merge after it; follow with: squeue -j $array,$merge"
