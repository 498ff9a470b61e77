"""What every entry point needs: one-line errors, its rank and device, sums over ranks, stop signals, top-k counts,
seeds, its share of the CPUs, thread pools sized to it, files written whole, and safe reads of others' files.

    from runtime import UsageError, join_ranks, limit_threads, load_checkpoint, run_main, shard_path
    rank = join_ranks("auto")                                    # rank, world size, device, process group
    limit_threads(rank.cpus)                                     # this rank's share of the node
    checkpoint = load_checkpoint("runs/alexnet/checkpoint.pt")   # refuses anything that could run code
    tar = shard_path(data, entry["file"])                        # refuses a manifest entry pointing outside DATA

Why it matters: numpy's OpenBLAS, OpenMP and torch each start a thread per core in every process. Next to other
worker processes those threads spin against each other: a shard build with one OpenBLAS pool per worker ran 9x
slower than with one thread each. Every process that does numeric work beside others limits its pools here.
"""
import errno
import os
import signal
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

# Read by OpenBLAS, OpenMP and MKL when they start: set for child processes started after limit_threads().
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
# What a checkpoint may hold: train.py writes nothing else, so that it loads with torch.load(weights_only=True).
CHECKPOINT_CONTENT = "tensors, numbers, strings, lists and dicts"
TOP_K = (1, 5)  # the errors every evaluation reports: top-1 and top-5
# What says that the job was given GPUs on this node, whatever torch can see: Slurm's allocation, or a launcher's
# (or the user's) explicit list of devices.
GPU_ALLOCATION_VARIABLES = ("SLURM_GPUS_ON_NODE", "SLURM_JOB_GPUS", "SLURM_STEP_GPUS", "CUDA_VISIBLE_DEVICES")
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)  # a full disk, or a full quota
EXIT_BAD_SAMPLE = 65  # a sample that does not decode stopped train.py or eval.py: a rerun meets it again (EX_DATAERR)


class UsageError(Exception):
    """A problem with what the user asked for: printed as one line, exit status 2, no traceback."""


def run_main(main, argv: list[str] | None = None):
    """Call `main(argv)`; turn a UsageError into `error: ...` on stderr and exit status 2."""
    try:
        return main(sys.argv[1:] if argv is None else argv)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        if e.errno not in NO_SPACE:
            raise
        print(f"error: {no_space(e)}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def no_space(e: OSError) -> str:
    """One line for a full disk or quota. Every writer here writes under a temporary name and renames a file only
    when it is whole, so what the error interrupted left nothing that looks finished."""
    where = f" writing {e.filename}" if e.filename else ""
    return (f"{e.strerror or os.strerror(e.errno)}{where}: free space (or quota) there and rerun; what was finished "
            "is kept, and nothing half-written is left under a final name")


def check_option(name: str, value, ok: bool, expected: str) -> None:
    """A UsageError naming `--name=value` unless `ok`: for range checks in the configuration dataclasses'
    __post_init__, which run whatever parsed the command line."""
    if not ok:
        raise UsageError(f"--{name}={value}: expected {expected}")


@contextmanager
def usage_errors(advice: str = "") -> Iterator[None]:
    """Turn the OSError or ValueError of a file the user named (a manifest, a checkpoint), or the ModuleNotFoundError
    of a package missing from the environment (DALI), into a one-line UsageError, with `advice` appended. Library
    code raises ordinary exceptions; the entry points wrap their calls in this."""
    try:
        yield
    except (OSError, ValueError, ModuleNotFoundError) as e:
        raise UsageError(f"{e}{advice}") from None


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside `path` to write to, renamed onto `path` when the block ends without an exception.

    A kill mid-write leaves the previous file (or none), never a partial one. The temporary name is this host's and
    process's own (`train-000001.tar.tmp-node7-4242`): array tasks that write the same file at once (plan.json, an
    archive listing) never rename each other's half-written one into place, and nothing that looks for `*.tar`
    takes it for a shard or an archive. Writers that pick a format by the suffix must name the format.
    """
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomically(path: str | os.PathLike, data: bytes) -> None:
    """`data` into `path` through atomic_path, on disk before the rename: never a partial file under the final name,
    also after a crash of the machine."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


@dataclass(frozen=True)
class Rank:
    """Where this process stands among the ranks torchrun started (rank 0 of 1 without torchrun)."""
    rank: int
    world_size: int
    local_size: int  # ranks on this node, which share its CPUs
    device: "torch.device"  # noqa: F821 - torch is imported only by the entry points that need it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def cpus(self) -> int:
        """This rank's share of the node's CPUs."""
        return max(1, available_cpus() // self.local_size)


def join_ranks(device_choice: str) -> Rank:
    """This process's rank and device ("auto": the GPU when there is one); the process group when several ranks run.

    Under torchrun each rank takes the GPU of its local rank; the process group is NCCL's on GPUs, gloo's on CPUs.
    """
    import torch
    import torch.distributed as dist

    world_size, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    local_rank, local_size = int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if not torch.cuda.is_available():
        if device_choice == "cuda":
            raise UsageError(f"--device=cuda but torch sees no CUDA GPU: {why_no_gpu()}")
        allocated = gpu_allocation(os.environ)
        if device_choice == "auto" and allocated:
            raise UsageError(f"this job was given GPUs ({allocated}) but torch sees none: {why_no_gpu()}; "
                             "--device=cpu runs on the CPU anyway")
    cuda = device_choice == "cuda" or (device_choice == "auto" and torch.cuda.is_available())
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world_size > 1:
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    return Rank(rank, world_size, local_size, device)


def gpu_allocation(environ) -> str:
    """The variables saying that GPUs were allocated to this job on this node ("" if none), as `NAME=value`."""
    allocated = []
    for name in GPU_ALLOCATION_VARIABLES:
        value = environ.get(name, "").strip()
        # What means "none": a count of 0 GPUs; a device list that is empty, -1 or Slurm's NoDevFiles (a device
        # list's "0" is GPU 0)
        none = ("0",) if name == "SLURM_GPUS_ON_NODE" else ("-1", "NoDevFiles")
        if value and value not in none:
            allocated.append(f"{name}={value}")
    return ", ".join(allocated)


def why_no_gpu() -> str:
    """The likely reason torch sees no GPU: a CPU-only build, or a driver older than the CUDA torch was built for."""
    import torch

    if torch.version.cuda is None:
        return (f"this torch ({torch.__version__}) is a CPU-only build; install a CUDA build (docs/HPC.md) in this "
                "environment")
    return (f"torch {torch.__version__} is built for CUDA {torch.version.cuda}: the node's driver is missing, not "
            "loaded or older than that (nvidia-smi shows the CUDA version it supports)")


def all_sum(values, device) -> "torch.Tensor":  # noqa: F821 - see Rank.device
    """Sum a list or tensor of numbers over ranks, in float64 so that counts stay exact, onto the CPU. A host-device
    sync: use at intervals only."""
    import torch
    import torch.distributed as dist

    t = torch.as_tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.cpu()


def leave_ranks() -> None:
    """End the process group, if `join_ranks` started one."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def stop_signals() -> Iterator[list[str]]:
    """The names of the stop signals received (SIGTERM, SIGUSR1), acted on at the next sync point so that all ranks
    stop together. The previous handlers come back on exit: pool workers forked later by the same process (the
    tests call main) would otherwise inherit this one and never end when their pool terminates them."""
    received = []
    previous = {sig: signal.signal(sig, lambda signum, frame: received.append(signal.Signals(signum).name))
                for sig in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def topk_correct(scores, labels, ks=TOP_K) -> "torch.Tensor":  # noqa: F821 - see Rank.device
    """How many rows have their label among the k highest scores, for each k: int64 [len(ks)]."""
    import torch

    ranked = scores.topk(min(max(ks), scores.shape[1]), dim=1).indices
    hits = ranked == labels[:, None]
    return torch.stack([hits[:, :k].any(dim=1).sum() for k in ks])


def derived_seed(*keys: int) -> int:
    """A seed for torch's generators drawn from integer keys, e.g. (seed, epoch, rank): a stream per key tuple."""
    import numpy as np

    return int(np.random.SeedSequence(keys).generate_state(1)[0] % 2**31)


def available_cpus() -> int:
    """CPUs this process may use: the smallest of its affinity mask, its cgroups' CPU quotas and Slurm's allocation.

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


def cgroup_cpu_quota(root: Path = Path("/sys/fs/cgroup"), membership: Path = Path("/proc/self/cgroup")) -> int | None:
    """CPUs allowed by the cgroup v2 `cpu.max` quota of this process's cgroup and those above it (rounded down, at
    least 1), or None when none sets one. cgroup v1 quotas are not read."""
    try:
        line = next(line for line in membership.read_text().splitlines() if line.startswith("0::"))
    except (OSError, StopIteration):
        return None
    folder, quotas = root / line[3:].lstrip("/"), []
    while True:
        try:
            quota, period = (folder / "cpu.max").read_text().split()[:2]
            if quota != "max":
                quotas.append(max(1, int(quota) // int(period)))
        except (OSError, ValueError):
            pass
        if folder == root:
            return min(quotas, default=None)
        folder = folder.parent


def limit_threads(threads: int) -> None:
    """Cap this process's BLAS/OpenMP pools and torch's intra-op threads at `threads`, and its children's too."""
    threads = max(1, int(threads))
    for name in THREAD_VARIABLES:
        os.environ[name] = str(threads)
    from threadpoolctl import threadpool_limits  # pools already loaded (numpy's OpenBLAS) ignore the variables
    threadpool_limits(threads)
    if "torch" in sys.modules:  # only where torch is already used: shard workers never import it
        sys.modules["torch"].set_num_threads(threads)


def shard_path(data: str | os.PathLike, file) -> Path:
    """DATA / file for a shard `file` of manifest.json; ValueError naming the entry when it could lead outside DATA.

    Shard directories are shared, so a manifest may come from someone else: an absolute path, a `..` component or
    a symbolic link out of DATA would make a reader (or `stage`, a writer) touch files elsewhere.
    """
    if not isinstance(file, str) or not file:
        raise ValueError(f"manifest lists shard file {file!r}: expected a path relative to the shard directory")
    relative = Path(file)
    if relative.is_absolute() or ".." in relative.parts:
        raise ValueError(f"manifest lists shard file {file!r}: shard paths must be relative to the shard directory "
                         "and must not contain '..'")
    path = Path(data) / relative
    if not path.resolve().is_relative_to(Path(data).resolve()):
        raise ValueError(f"manifest lists shard file {file!r}: it resolves to {path.resolve()}, outside {data}")
    return path


def not_a_file(path: Path) -> str:
    """Why `path` cannot be read as a file: it is a folder, or it does not exist."""
    return f"{path} is a folder, not a file" if Path(path).is_dir() else f"{path} does not exist"


def load_checkpoint(path: str | os.PathLike) -> dict:
    """A checkpoint written by train.py, on the CPU; ValueError with a one-line reason when it is refused or damaged.

    Unpickling runs whatever code a file names, so checkpoints are loaded with `weights_only=True`: only
    CHECKPOINT_CONTENT, which is all train.py writes. A file from someone else can then hold wrong weights, no code.
    """
    import pickle

    import torch
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = next((line.strip() for line in str(e).splitlines() if "GLOBAL" in line), "an unsupported object")
        raise ValueError(f"checkpoint {path} refused: it holds more than {CHECKPOINT_CONTENT}, and loading that "
                         f"could run code ({found})") from None
    except Exception as e:  # noqa: BLE001 - torch raises RuntimeError, KeyError, EOFError... for damaged files
        first_line = (str(e).splitlines() or [""])[0]
        raise ValueError(f"checkpoint {path} is unreadable or not written by train.py "
                         f"({type(e).__name__}: {first_line})") from None
    if not isinstance(checkpoint, dict) or "model" not in checkpoint:
        raise ValueError(f"checkpoint {path} is not written by train.py (it has no model weights)")
    return checkpoint
