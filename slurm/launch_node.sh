#!/bin/bash
# One node's share of a training job: `torchrun "$@"`, with SIGUSR1 handed on to the training processes.
# slurm/train.sbatch runs it directly (one node) or once per node through srun (several nodes).
#
# torchrun ends on SIGUSR1 (the default action), which would kill the workers before they save a checkpoint,
# so it starts with SIGUSR1 ignored. Its workers inherit that, but train.py installs its own handler; this
# script signals them directly because torchrun starts each in its own session, out of reach of a process group.
# SIGTERM (preemption, scancel) goes to torchrun, which passes it to the workers itself.
set -euo pipefail

(trap '' USR1; exec torchrun "$@") &
agent=$!
trap 'pkill -USR1 -P "$agent" || true' USR1
trap 'kill -TERM "$agent" 2>/dev/null || true' TERM
# A trapped signal interrupts `wait` while torchrun is still running: wait again until it has exited.
while kill -0 "$agent" 2>/dev/null; do
    wait "$agent" || true
done
wait "$agent"
