"""What `pipeline/` reads from a shard directory (docs/FORMAT.md): manifest, statistics, shard lists.

Nothing here imports DALI or torch, so it is cheap to call from anywhere (class names, split sizes).
"""
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from runtime import shard_path
from shardformat import MANIFEST, SIZE, STATS, index_path, parse_index_header, parse_index_line, read_manifest

CROP = 224  # px, side of the network input


class DataError(RuntimeError, ValueError):
    """A shard that is missing, unreadable or damaged: one line naming the file. A ValueError too, so that the entry
    points' `usage_errors` report it as the user's to fix (rebuild, re-copy or restore it), in one line."""


@dataclass(frozen=True)
class Stats:
    mean_image: np.ndarray  # (256, 256, 3) float32, RGB, 0-255: the per-pixel mean over the training set
    rgb_mean: np.ndarray  # (3,) float32, 0-255
    pca_eigval: np.ndarray  # (3,) float32, RGB covariance eigenvalues on the [0,1] scale, descending
    pca_eigvec: np.ndarray  # (3, 3) float32, eigenvectors as columns


def read_stats(data: str | os.PathLike, manifest: dict | None = None) -> Stats:
    """The training-set statistics: `mean_image` from stats.npz, PCA from the manifest (stats.npz as fallback)."""
    path = Path(data) / STATS
    try:
        with np.load(path) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: unreadable statistics: {e}") from None
    if "mean_image" not in arrays or arrays["mean_image"].shape != (SIZE, SIZE, 3):
        raise ValueError(f"{path}: expected mean_image of shape ({SIZE}, {SIZE}, 3)")
    stats = (manifest or read_manifest(data)).get("stats", {})
    pick = lambda key: np.asarray(stats[key] if key in stats else arrays[key], dtype=np.float32)  # noqa: E731
    return Stats(mean_image=arrays["mean_image"].astype(np.float32), rgb_mean=pick("rgb_mean"),
                 pca_eigval=pick("pca_eigval").reshape(3), pca_eigvec=pick("pca_eigvec").reshape(3, 3))


@dataclass(frozen=True)
class Split:
    name: str
    tars: list[str]  # absolute paths, in manifest order
    indexes: list[str]  # the DALI index next to each tar
    num_samples: int  # real samples in the split
    num_inputs: int  # inputs planned for the split: every sample's `.pos` is below it


def read_split(data: str | os.PathLike, split: str, manifest: dict | None = None, check: bool = True) -> Split:
    """The shard list of one split; with `check`, every shard is checked against its index (see `check_shard`)."""
    manifest = manifest or read_manifest(data)
    splits = manifest.get("splits", {})
    if split not in splits:
        raise ValueError(f"{Path(data) / MANIFEST}: no split {split!r} (have {', '.join(splits) or 'none'})")
    shards = splits[split]["shards"]
    if not shards:
        raise ValueError(f"{data}: split {split!r} has no shards")
    tars = [str(shard_path(data, s["file"])) for s in shards]  # never a file outside DATA
    indexes = [str(index_path(t)) for t in tars]
    if check:
        for tar, idx, shard in zip(tars, indexes, shards):
            check_shard(tar, idx, shard.get("num_samples"))
    num_samples = int(splits[split].get("num_samples", sum(s["num_samples"] for s in shards)))
    # Positions of rejected inputs stay unused (docs/FORMAT.md): valid positions lie below num_inputs.
    num_inputs = int(splits[split].get("num_inputs", num_samples))
    return Split(split, tars, indexes, num_samples, num_inputs)


def check_shard(tar: str, idx: str, num_samples: int | None = None) -> None:
    """Fail fast, naming the shard, on what would otherwise crash or stall the reader.

    DALI memory-maps the tar and trusts the index: a truncated tar would be read past its end (SIGBUS on
    the mmap path). Reading only the index's header and last line keeps this cheap on network filesystems.
    """
    try:
        with open(tar, "rb") as f:
            tar_bytes = os.fstat(f.fileno()).st_size
            head = f.read(512)
        with open(idx, "rb") as f:
            header = f.readline()
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 65536))
            lines = [line for line in f.read().splitlines() if line.strip()]
    except OSError as e:
        raise DataError(f"shard {tar}: cannot read it or its index {idx}: {e.strerror or e}") from None
    if head[257:262] != b"ustar":
        raise DataError(f"shard {tar}: not a tar archive (no ustar header at its start)")
    try:
        version, count = parse_index_header(header)
    except ValueError as e:
        raise DataError(f"shard {tar}: index {idx} {e}") from None
    if num_samples is not None and count != num_samples:
        raise DataError(f"shard {tar}: index {idx} lists {count} samples, the manifest {num_samples}")
    try:
        members = parse_index_line(lines[-1], version) if lines else []
    except ValueError:
        raise DataError(f"shard {tar}: malformed last line in index {idx}") from None
    end = max((offset + size for _, offset, size in members), default=0)
    if end > tar_bytes:
        raise DataError(f"shard {tar}: truncated ({tar_bytes} bytes, its index needs {end}); rebuild or re-copy it")


def dataset_identity(manifest: dict, split: str = "train") -> dict:
    """What identifies a split's samples and their order: its sample count and a digest of its shards' checksums
    (manifest order). A rebuilt or different shard set has another digest, so a mid-epoch position means
    other samples there."""
    if split not in manifest.get("splits", {}):
        raise ValueError(f"the manifest has no split {split!r}")
    shards = manifest["splits"][split]["shards"]
    digest = hashlib.sha256("\n".join(f"{s['file']} {s.get('sha256', '')}" for s in shards).encode()).hexdigest()
    return {"split": split, "num_samples": int(manifest["splits"][split]["num_samples"]), "shards_sha256": digest}


def rank_batch(batch_size: int, rank: int, world_size: int) -> int:
    """Samples per batch of `rank`: its equal part of the global `batch_size`; ValueError for a rank outside the world
    or a global batch that does not split evenly over it."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside 0..{world_size - 1}")
    if batch_size % world_size:
        raise ValueError(f"global batch {batch_size} does not split evenly over {world_size} ranks")
    return batch_size // world_size


def rank_range(num_samples: int, rank: int, world_size: int) -> tuple[int, int]:
    """[begin, end) positions of the samples this rank reads: DALI's `shard_id`/`num_shards` split."""
    return num_samples * rank // world_size, num_samples * (rank + 1) // world_size
