# shellcheck shell=bash
# Sourced by the job scripts in slurm/: strict mode, the site's own setup, the project's virtual environment.
# Environment (all optional):
#   PROJECT     the checkout (default: the directory sbatch was run from)
#   SITE_SETUP  a bash script sourced first, for what differs between clusters: `module load python/3.11`, ...
#               (no CUDA, cuDNN or NCCL module: the wheels bring those libraries, and a module's LD_LIBRARY_PATH
#               would put other versions in front of them)
#   VENV        the virtual environment `make setup` made (default: $PROJECT/.venv)
set -euo pipefail

PROJECT=${PROJECT:-${SLURM_SUBMIT_DIR:-$PWD}}
cd "$PROJECT"
if [[ -n ${SITE_SETUP:-} ]]; then
    # Module systems read unset variables, which `set -u` would turn into errors.
    set +u
    # shellcheck disable=SC1090  # the site's own file, unknown here
    source "$SITE_SETUP"
    set -u
fi
VENV=${VENV:-$PROJECT/.venv}
if [[ ! -x $VENV/bin/python ]]; then
    echo "error: no $VENV/bin/python: run \`make setup\` (without internet: \`make setup WHEELHOUSE=<dir>\`) in $PROJECT first" >&2
    exit 2
fi
export PATH="$VENV/bin:$PATH"
export PYTHONUNBUFFERED=1  # job logs show progress as it happens

# Echo a command, as make does, then run it.
run() {
    echo "+ $*" >&2
    "$@"
}

# The directory STAGE_TO names. `job`: one of this job on node-local disk, named here on the compute node (the
# submitting shell's TMPDIR is the login node's), so that no other job reads or stages into it.
stage_dir() {
    if [[ $STAGE_TO == job ]]; then
        echo "${SLURM_TMPDIR:-${TMPDIR:-/tmp}}/alexnet-shards-${SLURM_JOB_ID:?}"
    else
        echo "$STAGE_TO"
    fi
}

# The GPUs Slurm allocated on this node (0: none): SLURM_GPUS_ON_NODE, or the ids in SLURM_JOB_GPUS.
slurm_gpus() {
    if [[ -n ${SLURM_GPUS_ON_NODE:-} ]]; then
        echo "$SLURM_GPUS_ON_NODE"
    elif [[ -n ${SLURM_JOB_GPUS:-} ]]; then
        local ids
        IFS=, read -r -a ids <<< "$SLURM_JOB_GPUS"
        echo "${#ids[@]}"
    else
        echo 0
    fi
}

# Stop with a one-line error unless each named variable is set.
require() {
    local name
    for name in "$@"; do
        if [[ -z ${!name:-} ]]; then
            echo "error: set $name (see docs/HPC.md), e.g. $name=/scratch/\$USER/... sbatch $0" >&2
            exit 2
        fi
    done
}
