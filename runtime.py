"""What every entry point needs from the machine it runs on: its share of the CPUs, and thread pools sized to it.

    from runtime import available_cpus, limit_threads
    limit_threads(available_cpus() // processes_on_this_node)

Why it matters: numpy's OpenBLAS, OpenMP and torch each start a thread per core in every process. Next to other
worker processes those threads spin against each other: a shard build with one OpenBLAS pool per worker ran 9x
slower than with one thread each. Every process that does numeric work beside others limits its pools here.
"""
import os
import sys
from pathlib import Path

# Read by OpenBLAS, OpenMP and MKL when they start: set for child processes started after limit_threads().
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def available_cpus() -> int:
    """CPUs this process may use: the smallest of its affinity mask, its cgroup's CPU quota and Slurm's allocation.

    Sites that do not confine a job's cores leave the affinity mask at the whole node; the cgroup quota and
    SLURM_CPUS_ON_NODE then still say what the job was given.
    """
    counts = [len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1]
    quota = cgroup_cpu_quota()
    if quota:
        counts.append(quota)
    slurm = os.environ.get("SLURM_CPUS_ON_NODE", "")
    if slurm.isdigit() and int(slurm) > 0:
        counts.append(int(slurm))
    return max(1, min(counts))


def cgroup_cpu_quota(path: Path = Path("/sys/fs/cgroup/cpu.max")) -> int | None:
    """CPUs allowed by a cgroup v2 `cpu.max` quota (rounded down, at least 1), or None when there is no quota."""
    try:
        quota, period = path.read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    return max(1, int(quota) // int(period))


def limit_threads(threads: int) -> None:
    """Cap this process's BLAS/OpenMP pools and torch's intra-op threads at `threads`, and its children's too."""
    threads = max(1, int(threads))
    for name in THREAD_VARIABLES:
        os.environ[name] = str(threads)
    from threadpoolctl import threadpool_limits  # pools already loaded (numpy's OpenBLAS) ignore the variables
    threadpool_limits(threads)
    if "torch" in sys.modules:  # only where torch is already used: shard workers never import it
        sys.modules["torch"].set_num_threads(threads)
