"""torchrun for a Slurm job step: deaf to the stop signals, and exiting 75 when the training stopped early.

    python slurm/torchrun_status.py --standalone --nnodes=1 --nproc_per_node=4 -- train.py --data=... --run=...

slurm/launch_node.sh runs it on every node; the arguments are torchrun's. Two things about torchrun itself:
  - On SIGTERM it passes the signal to its workers and SIGKILLs them 30 s later (a fixed delay in torch 2.11;
    `--shutdown-timeout` in 2.13), and SIGUSR1 ends it. Slurm delivers both signals to every process of a job
    step, so here torchrun ignores them (`--signals_to_handle` without SIGTERM; SIGTERM and SIGUSR1 set to
    SIG_IGN). The workers, which get them from Slurm and from launch_node.sh, stop in their own time: AlexNet's
    checkpoint takes seconds to write, and Slurm's grace time is the only limit.
  - A worker's non-zero exit status becomes torchrun's status 1. train.py exits 75 when it stopped early with its
    checkpoint saved (every rank waits for rank 0's save before exiting), so one worker's 75 is passed on as 75:
    the job script requeues on it and on nothing else. A worker's 65 (a bad sample stopped the run; the other
    ranks then fail on the lost connection) is passed on as 65, so that the job's status says why it ended.

torchrun (the console script on PATH) runs in this process, not as a child, so that the ChildFailedError it raises,
which holds every worker's exit status, can be read.
"""
import runpy
import shutil
import signal
import sys

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

EXIT_STOPPED_EARLY = 75  # train.py's EXIT_STOPPED_EARLY: checkpoint saved, rerun to resume
EXIT_BAD_SAMPLE = 65  # train.py's EXIT_BAD_SAMPLE: a JPEG that does not decode, named by the rank that met it
HANDLED_SIGNALS = "SIGINT,SIGHUP,SIGQUIT"  # torchrun's default set less SIGTERM


def main(argv: list[str]) -> None:
    torchrun = shutil.which("torchrun")
    if torchrun is None:
        sys.exit("error: no torchrun on PATH (is the virtual environment's bin/ on PATH?)")
    # Ignored already where launch_node.sh starts this process, and here for use without it. The workers inherit
    # SIG_IGN until train.py installs its own handlers.
    for stop in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(stop, signal.SIG_IGN)
    sys.argv = [torchrun, f"--signals_to_handle={HANDLED_SIGNALS}", *argv]
    try:
        runpy.run_path(torchrun, run_name="__main__")
    except ChildFailedError as e:
        statuses = {failure.exitcode for failure in e.failures.values()}
        for passed_on in (EXIT_STOPPED_EARLY, EXIT_BAD_SAMPLE):
            if passed_on in statuses:
                sys.exit(passed_on)
        raise


if __name__ == "__main__":
    main(sys.argv[1:])
