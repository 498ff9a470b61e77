#!/bin/bash
# One node's share of a training job, started by slurm/train.sbatch through srun on every node (one node too):
# torchrun (through slurm/torchrun_status.py) with the stop signals handed straight to the training processes.
#
# Slurm signals every process of the job step: SIGTERM on preemption, and SIGUSR1 when srun passes on the job
# script's warning before the time limit. torchrun ignores both (see slurm/torchrun_status.py); the workers stop
# at their next log interval, save a checkpoint and exit 75. This script passes both signals to the workers too,
# which is all that reaches them where Slurm signals a process group rather than the step's cgroup (torchrun
# starts each worker in a session of its own). Exit status: torchrun's, with 75 for "stopped early" and 65 for "a
# bad sample".
set -euo pipefail

# Both signals ignored from the start: Python takes seconds to start and import torch, and either would end it.
(trap '' USR1 TERM; exec python "$(dirname -- "$0")/torchrun_status.py" "$@") &
agent=$!
trap 'pkill -USR1 -P "$agent" || true' USR1
trap 'pkill -TERM -P "$agent" || true' TERM
# A trapped signal interrupts `wait` while torchrun is still running: wait again until it has exited.
while kill -0 "$agent" 2>/dev/null; do
    wait "$agent" || true
done
wait "$agent"
