"""Copy a shard directory to node-local disk, verified, so that training reads local files, not the network.

    python -m shards stage --data=/scratch/$USER/imagenet-shards --to=/tmp/$USER/imagenet-shards

Copies every shard of the manifest (`.tar` and `.idx`), then `stats.npz`, then `manifest.json` last: a destination
with a manifest is complete. Each copied shard is checked against the manifest's sha256 before staging succeeds.
A shard already at the destination that passes the same check is not copied again, so a requeued job that lands on
the same node stages in the time it takes to read the local copies once.
"""
import json
import os
import shutil
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from config import UsageError, parse_config, run_main
from runtime import shard_path
from shards.verify import verify_shard

MANIFEST = "manifest.json"
STATS = "stats.npz"
GB = 1e9


@dataclass
class StageConfig:
    data: str = ""  # shard directory to copy (what `make shards` wrote), usually on the parallel filesystem
    to: str = ""  # destination on node-local disk; created if absent
    splits: str = ""  # comma-separated splits to copy (e.g. val for an evaluation job); empty: every split
    workers: int = 8  # files copied and checked at once (parallel streams help on Lustre/GPFS)


def load_manifest(data: Path) -> dict:
    path = data / MANIFEST
    if not path.is_file():
        raise UsageError(f"{data} is not a shard directory: no {MANIFEST} (run `make shards` first)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UsageError(f"{path}: not valid JSON ({e})") from None


def shard_entries(manifest: dict, splits: str, data: Path) -> list[dict]:
    available = manifest.get("splits", {})
    wanted = [s for s in splits.split(",") if s] or list(available)
    for split in wanted:
        if split not in available:
            raise UsageError(f"--splits: no split {split!r} in the manifest (it has {', '.join(available)})")
    entries = [entry for split in wanted for entry in available[split]["shards"]]
    for entry in entries:  # relative and inside DATA, so that the copy lands inside --to as well
        try:
            shard_path(data, entry["file"])
        except ValueError as e:
            raise UsageError(str(e)) from None
    return entries


def shard_bytes(entry: dict, data: Path) -> int:
    """Size of a shard and its index in `data`; a UsageError when either is missing."""
    size = 0
    for src in (data / entry["file"], (data / entry["file"]).with_suffix(".idx")):
        if not src.is_file():
            raise UsageError(f"{src} is listed in the manifest but missing: the shard directory is incomplete")
        size += src.stat().st_size
    return size


def copy_atomically(src: Path, dst: Path) -> None:
    """Copy to a temporary name and rename, so that an interrupted copy never looks like a finished one."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.partial-{socket.gethostname()}-{os.getpid()}")
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


def same_bytes(a: Path, b: Path) -> bool:
    if not b.is_file() or a.stat().st_size != b.stat().st_size:
        return False
    return a.read_bytes() == b.read_bytes()


def stage_shard(entry: dict, data: Path, to: Path) -> tuple[int, bool]:
    """Bring one shard and its index to `to`; returns (bytes, whether anything was copied)."""
    tar = Path(entry["file"])
    idx = tar.with_suffix(".idx")
    copied = False
    if not same_bytes(data / idx, to / idx):  # first: verify_shard checks the index against the tar
        copy_atomically(data / idx, to / idx)
        copied = True
    dst = to / tar
    if not (dst.is_file() and dst.stat().st_size == (data / tar).stat().st_size and verify_shard(dst, entry) is None):
        copy_atomically(data / tar, dst)
        copied = True
        problem = verify_shard(dst, entry)
        if problem is not None:
            dst.unlink(missing_ok=True)
            raise UsageError(f"the copy in {to} fails verification: {problem} (check the source with "
                             f"`python -m shards verify --data={data}`)")
    return shard_bytes(entry, data), copied


def check_space(entries: list[dict], data: Path, to: Path) -> None:
    needed = sum(shard_bytes(e, data) for e in entries if not (to / e["file"]).is_file())
    free = shutil.disk_usage(to).free
    if needed > free:
        raise UsageError(f"{to} has {free / GB:.1f} GB free, staging needs {needed / GB:.1f} GB more")


def stage_main(argv: list[str]) -> None:
    cfg = parse_config(StageConfig, argv, description=__doc__)
    if not cfg.data or not cfg.to:
        raise UsageError("both --data=<shard dir> and --to=<local dir> are required")
    if cfg.workers < 1:
        raise UsageError(f"--workers={cfg.workers}: expected at least 1")
    data, to = Path(cfg.data), Path(cfg.to)
    manifest = load_manifest(data)
    if not (data / STATS).is_file():
        raise UsageError(f"{data} is not a complete shard directory: no {STATS}")
    to.mkdir(parents=True, exist_ok=True)
    if to.resolve() == data.resolve():
        raise UsageError(f"--to={cfg.to} is the shard directory itself")
    entries = shard_entries(manifest, cfg.splits, data)
    (to / MANIFEST).unlink(missing_ok=True)  # incomplete until every shard is in place again
    check_space(entries, data, to)

    start = time.perf_counter()
    total = sum(shard_bytes(e, data) for e in entries)
    copied_files = copied_bytes = 0
    pool = ThreadPoolExecutor(cfg.workers)
    try:
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"stage {to}", file=sys.stderr) as bar:
            for size, copied in pool.map(lambda e: stage_shard(e, data, to), entries):
                copied_files += copied
                copied_bytes += size if copied else 0
                bar.update(size)
    finally:
        pool.shutdown(cancel_futures=True)  # on an error, report it now rather than after copying the rest
    if not same_bytes(data / STATS, to / STATS):
        copy_atomically(data / STATS, to / STATS)
    copy_atomically(data / MANIFEST, to / MANIFEST)
    seconds = time.perf_counter() - start
    print(f"staged {len(entries)} shards ({total / GB:.2f} GB) to {to} in {seconds:.0f} s: "
          f"{copied_files} copied ({copied_bytes / GB / max(seconds, 1e-9):.2f} GB/s), "
          f"{len(entries) - copied_files} already there")


if __name__ == "__main__":
    run_main(stage_main)
