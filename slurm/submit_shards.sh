#!/bin/bash
# Submit the shard writing as a job array, and the merge job that starts once every array task has succeeded.
#
#     RAW=/scratch/$USER/imagenet DATA=/scratch/$USER/imagenet-shards slurm/submit_shards.sh [sbatch options ...]
#
# NUM_TASKS array tasks (default 4: the whole conversion is about 1.5 core-hours, so a few tasks of several cores
# each finish as fast as many, with less queueing and less reading of the archive headers). Optional:
#   MAX_RUNNING  at most this many array tasks at once (sbatch's --array=...%M), e.g. to spare the filesystem
#   TASKS        only these tasks of the NUM_TASKS, e.g. TASKS=1,3 to rerun the ones that failed (same SHARDS_ARGS)
# sbatch options such as --account=... --partition=... --time=... go to both jobs, except that the merge job uses
# one CPU whatever --cpus-per-task says (or set SBATCH_ACCOUNT, ..., which sbatch reads itself). The merge job is
# cancelled, not left pending, when an array task fails (--kill-on-invalid-dep=yes): rerun those tasks with TASKS.
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
NUM_TASKS=${NUM_TASKS:-4}
for name in NUM_TASKS MAX_RUNNING; do
    if [[ -n ${!name:-} && ! ${!name} =~ ^[1-9][0-9]*$ ]]; then
        echo "error: $name=${!name}: expected a positive whole number" >&2
        exit 2
    fi
done
TASKS=${TASKS:-0-$((NUM_TASKS - 1))}
if ! [[ $TASKS =~ ^[0-9]+(-[0-9]+)?(,[0-9]+(-[0-9]+)?)*$ ]]; then
    echo "error: TASKS=$TASKS: expected task numbers and ranges, e.g. 3 or 1,5-7" >&2
    exit 2
fi
for option in "$@"; do
    if [[ $option == --array* || $option == -a* ]]; then
        echo "error: $option: the array is set by NUM_TASKS, TASKS and MAX_RUNNING (an --array option would make" \
             "the merge job an array too)" >&2
        exit 2
    fi
done
export NUM_TASKS
array=$(sbatch --parsable --array="$TASKS${MAX_RUNNING:+%$MAX_RUNNING}" "$@" slurm/shards_array.sbatch)
array=${array%%;*}  # --parsable prints "id" or "id;cluster"
merge=$(sbatch --parsable --dependency="afterok:$array" --kill-on-invalid-dep=yes "$@" --cpus-per-task=1 \
        slurm/shards_merge.sbatch)
merge=${merge%%;*}
echo "submitted: shard array job $array (tasks $TASKS of $NUM_TASKS), merge job $merge after it;" \
     "follow with: squeue -j $array,$merge"
