"""Copy a shard directory to node-local disk, verified, so that training reads local files, not the network.

    python -m shards stage --data=/scratch/$USER/imagenet-shards --to=/tmp/$USER/imagenet-shards

Copies every shard of the manifest (`.tar` and `.idx`), then `stats.npz`, then `manifest.json` last: a destination
with a manifest is complete. Each shard is copied under a temporary name, checked against the manifest's sha256,
and only then renamed into place. A shard already at the destination that passes the same check is not copied
again, so a requeued job that lands on the same node stages in the time it takes to read the local copies once.

Another job may be training from the destination while this one stages into it: nothing a reader may have open is
deleted or rewritten in place (files are replaced by rename, the manifest too), and a destination whose manifest
differs from DATA's (another shard set, perhaps in use) is refused rather than overwritten.
"""
import os
import shutil
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from config import parse_config
from progress import DEFAULT_INTERVAL_S, progress_bar
from runtime import UsageError, run_main, shard_path, usage_errors
from shardformat import MANIFEST, STATS, index_path, read_manifest
from shards.verify import verify_shard

GB = 1e9


@dataclass
class StageConfig:
    data: str = ""  # shard directory to copy (what `make shards` wrote), usually on the parallel filesystem
    to: str = ""  # destination on node-local disk; created if absent
    splits: str = ""  # comma-separated splits to copy (e.g. val for an evaluation job); empty: every split
    workers: int = 8  # files copied and checked at once (parallel streams help on Lustre/GPFS)
    progress_interval: float = DEFAULT_INTERVAL_S  # seconds between progress lines when the output is not a terminal


def shard_entries(manifest: dict, splits: str, data: Path) -> list[dict]:
    available = manifest.get("splits", {})
    wanted = [s for s in splits.split(",") if s] or list(available)
    for split in wanted:
        if split not in available:
            raise ValueError(f"--splits: no split {split!r} in the manifest (it has {', '.join(available)})")
    entries = [entry for split in wanted for entry in available[split]["shards"]]
    for entry in entries:  # relative and inside DATA, so that the copy lands inside --to as well
        shard_path(data, entry["file"])
    return entries


def shard_bytes(entry: dict, data: Path) -> int:
    """Size of a shard and its index in `data`; a FileNotFoundError when either is missing."""
    size = 0
    for src in (data / entry["file"], index_path(data / entry["file"])):
        if not src.is_file():
            raise FileNotFoundError(f"{src} is listed in the manifest but missing: the shard directory is incomplete")
        size += src.stat().st_size
    return size


def partial_dir(to: Path) -> Path:
    """This process's directory for copies in progress, inside `to` so that a rename moves them into place."""
    return to / f".partial-{socket.gethostname()}-{os.getpid()}"


def copy_atomically(src: Path, to: Path) -> None:
    """Copy `src` into `to` under a temporary name and rename it: an interrupted copy never looks like a finished one,
    and a reader that has the old file open keeps reading the old file.

    The temporary name is in this process's partial directory, as the shards' pairs are (see stage_shard): one
    directory per process, which two jobs staging into the same place never share and copy_shards removes whole
    after an error."""
    tmp = partial_dir(to) / src.name
    tmp.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, tmp)
    os.replace(tmp, to / src.name)


def same_bytes(a: Path, b: Path) -> bool:
    if not b.is_file() or a.stat().st_size != b.stat().st_size:
        return False
    return a.read_bytes() == b.read_bytes()


def is_staged(entry: dict, data: Path, to: Path) -> bool:
    dst = to / entry["file"]
    same_size = dst.is_file() and dst.stat().st_size == (data / entry["file"]).stat().st_size
    return same_size and verify_shard(dst, entry) is None


def stage_shard(entry: dict, data: Path, to: Path) -> tuple[int, bool]:
    """Bring one shard and its index to `to`; returns (bytes, whether they were copied).

    Both are copied side by side into this process's partial directory and checked there (verify_shard reads the
    index next to the tar); only a verified pair is renamed into place, which atomic_path, one file at a time beside
    its final name, cannot do. copy_shards removes what an error leaves.
    """
    if is_staged(entry, data, to):
        return shard_bytes(entry, data), False
    tar = Path(entry["file"])
    idx = index_path(tar)
    tmp = partial_dir(to)
    (tmp / tar).parent.mkdir(parents=True, exist_ok=True)
    (to / tar).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(data / idx, tmp / idx)
    shutil.copyfile(data / tar, tmp / tar)
    problem = verify_shard(tmp / tar, entry)
    if problem is not None:
        raise ValueError(f"the copy in {to} fails verification: {problem} (check the source with "
                         f"`python -m shards verify --data={data}`)")
    os.replace(tmp / idx, to / idx)
    os.replace(tmp / tar, to / tar)
    return shard_bytes(entry, data), True


def check_same_shard_set(data: Path, to: Path) -> None:
    """A manifest at `to` must be DATA's own: any other describes shards that a job may be reading."""
    staged = to / MANIFEST
    if staged.is_file() and not same_bytes(data / MANIFEST, staged):
        raise ValueError(f"{to} holds another shard set (its {MANIFEST} differs from {data}'s), perhaps in use by "
                         "a running job: stage to another directory (one per job: STAGE_TO=job in slurm/), or delete "
                         "it first")


def check_space(entries: list[dict], data: Path, to: Path) -> None:
    needed = sum(shard_bytes(e, data) for e in entries if not (to / e["file"]).is_file())
    free = shutil.disk_usage(to).free
    if needed > free:
        raise ValueError(f"{to} has {free / GB:.1f} GB free, staging needs {needed / GB:.1f} GB more")


def copy_shards(entries: list[dict], data: Path, to: Path, workers: int, total: int,
                progress_interval: float = DEFAULT_INTERVAL_S) -> tuple[int, int]:
    """Stage every shard (`total` bytes), then stats.npz, then the manifest; returns (shards copied, bytes copied)."""
    copied_files = copied_bytes = 0
    pool = ThreadPoolExecutor(workers)
    try:
        with progress_bar(total, f"stage {to}", unit="B", unit_scale=True, interval_s=progress_interval) as bar:
            for size, copied in pool.map(lambda e: stage_shard(e, data, to), entries):
                copied_files += copied
                copied_bytes += size if copied else 0
                bar.update(size)
        if not same_bytes(data / STATS, to / STATS):
            copy_atomically(data / STATS, to)
        copy_atomically(data / MANIFEST, to)  # last: a destination with a manifest is complete
    finally:
        pool.shutdown(cancel_futures=True)  # on an error, report it now rather than after copying the rest
        shutil.rmtree(partial_dir(to), ignore_errors=True)
    return copied_files, copied_bytes


def stage_main(argv: list[str]) -> None:
    cfg = parse_config(StageConfig, argv, description=__doc__)
    if not cfg.data or not cfg.to:
        raise UsageError("both --data=<shard dir> and --to=<local dir> are required")
    if cfg.workers < 1:
        raise UsageError(f"--workers={cfg.workers}: expected at least 1")
    data, to = Path(cfg.data), Path(cfg.to)
    with usage_errors():
        manifest = read_manifest(data)
        if not (data / STATS).is_file():
            raise UsageError(f"{data} is not a complete shard directory: no {STATS}")
        to.mkdir(parents=True, exist_ok=True)
        if to.resolve() == data.resolve():
            raise UsageError(f"--to={cfg.to} is the shard directory itself")
        entries = shard_entries(manifest, cfg.splits, data)
        check_same_shard_set(data, to)
        check_space(entries, data, to)
        start = time.perf_counter()
        total = sum(shard_bytes(e, data) for e in entries)
        # Copying stays inside: a source shard found altered, or a full disk, is a one-line error too.
        copied_files, copied_bytes = copy_shards(entries, data, to, cfg.workers, total, cfg.progress_interval)
    seconds = time.perf_counter() - start
    print(f"staged {len(entries)} shards ({total / GB:.2f} GB) to {to} in {seconds:.0f} s: "
          f"{copied_files} copied ({copied_bytes / GB / max(seconds, 1e-9):.2f} GB/s), "
          f"{len(entries) - copied_files} already there")


if __name__ == "__main__":
    run_main(stage_main)
