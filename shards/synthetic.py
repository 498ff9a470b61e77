"""Benchmark data of ImageNet's size: 1,281,167 training samples in 1,024 shards, written in minutes.

    python -m shards synthetic --out=data/fullsize                        # ImageNet's training split
    python -m shards synthetic --out=data/many --samples=4096 --shards=1024   # many shards, few samples

Every sample is one of a few small flat-colour 256x256 JPEGs (about 1.7 KB: the set is ~6 GB instead of ImageNet's
~40 GB), with a valid `.cls`, `.label` and `.pos`; the tars, DALI indexes, manifest and statistics follow
docs/FORMAT.md, so every reader and check accepts them. Sample i has position i and class i % 1000. For measuring
what depends on the number of samples and shards (startup, memory, descriptors, reads per second), never for
training: the manifest says `params.synthetic`.
"""
import dataclasses
import hashlib
import io
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from config import parse_config
from runtime import UsageError, atomic_path, run_main, write_atomically
from shardformat import FORMAT_VERSION, INDEX_VERSION, MANIFEST, SIZE, STATS, index_path, shard_file
from shards import tario
from shards.build import sample_members

IMAGENET_TRAIN = 1_281_167
CLASSES = 1000
COLOURS = [(40 * (k % 4) + 50, 40 * (k // 4 % 4) + 50, 30 * (k // 16) + 60) for k in range(32)]  # RGB, 0-255
QUALITY = 90


@dataclasses.dataclass
class SyntheticConfig:
    out: str = ""  # the new directory: empty or absent
    samples: int = IMAGENET_TRAIN  # training samples
    shards: int = 1024  # training shards (sizes differ by at most one sample)


def flat_jpegs() -> list[bytes]:
    """One baseline 256x256 JPEG per colour of COLOURS."""
    jpegs = []
    for colour in COLOURS:
        out = io.BytesIO()
        Image.new("RGB", (SIZE, SIZE), colour).save(out, format="JPEG", quality=QUALITY)
        jpegs.append(out.getvalue())
    return jpegs


def write_shard(path: Path, positions: range, jpegs: list[bytes]) -> str:
    """The tar of the samples at `positions` and its DALI index (INDEX_VERSION); returns the tar's sha256."""
    parts, lines, offset = [], [], 0
    for position in positions:
        key, label = f"train_{position:08d}", position % CLASSES
        record, fields = tario.sample_record(*sample_members(key, label, position, jpegs[position % len(jpegs)]))
        parts.append(record)
        lines.append(" ".join(f"{ext} {offset + at} {size} {name}" for ext, at, size, name in fields))
        offset += len(record)
    parts.append(bytes(2 * tario.BLOCK))  # the end-of-archive marker
    tar = b"".join(parts)
    with atomic_path(path) as tmp:
        tmp.write_bytes(tar)
    with atomic_path(index_path(path)) as tmp:
        tmp.write_text(f"{INDEX_VERSION} {len(positions)}\n" + "\n".join(lines) + "\n")
    return hashlib.sha256(tar).hexdigest()


def statistics(jpegs: list[bytes], samples: int) -> dict:
    """mean_image, rgb_mean and PCA of the decoded training images, exact for flat images: weighted by how often
    each colour occurs."""
    decoded = np.array([np.asarray(Image.open(io.BytesIO(j)).convert("RGB"), np.float64)[0, 0] for j in jpegs])
    counts = np.bincount(np.arange(samples) % len(jpegs), minlength=len(jpegs)).astype(np.float64)
    rgb_mean = counts @ decoded / samples
    centred = (decoded - rgb_mean) / 255
    eigval, eigvec = np.linalg.eigh((centred.T * counts) @ centred / samples)
    order = np.argsort(eigval)[::-1]
    eigval, eigvec = eigval[order], eigvec[:, order]
    eigvec *= np.where(eigvec.max(0) >= -eigvec.min(0), 1.0, -1.0)  # each column's largest entry positive
    return {"mean_image": np.broadcast_to(rgb_mean, (SIZE, SIZE, 3)).copy(), "rgb_mean": rgb_mean,
            "pca_eigval": eigval, "pca_eigvec": eigvec}


def synthetic(out: Path, samples: int, shards: int) -> dict:
    jpegs = flat_jpegs()
    entries = []
    for n in range(shards):
        positions = range(samples * n // shards, samples * (n + 1) // shards)
        file = shard_file("train", n)
        (out / file).parent.mkdir(parents=True, exist_ok=True)
        entries.append({"file": file, "num_samples": len(positions),
                        "sha256": write_shard(out / file, positions, jpegs)})
        if n % 64 == 63:
            print(f"{n + 1}/{shards} shards", file=sys.stderr, flush=True)
    stats = statistics(jpegs, samples)
    np.savez(out / STATS, **stats)
    manifest = {
        "format": FORMAT_VERSION,
        "classes": [{"index": i, "wnid": f"n{i:08d}", "name": f"synthetic class {i}"} for i in range(CLASSES)],
        "splits": {"train": {"num_samples": samples, "num_inputs": samples, "num_rejected": 0, "shards": entries}},
        "rejected": [], "converted": [],
        "stats": {"rgb_mean": stats["rgb_mean"].tolist(), "pca_eigval": stats["pca_eigval"].tolist(),
                  "pca_eigvec": stats["pca_eigvec"].tolist(), "num_images": samples,
                  "num_pixels": samples * SIZE * SIZE},
        "params": {"size": SIZE, "quality": QUALITY, "shard_size": -(-samples // shards), "synthetic": True,
                   "note": "benchmark data: flat-colour images; never train on it"},
    }
    write_atomically(out / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())
    return manifest


def synthetic_main(argv: list[str]) -> None:
    cfg = parse_config(SyntheticConfig, argv, description=__doc__)
    if not cfg.out:
        raise UsageError("--out=<new dir> is required")
    if cfg.shards < 1 or cfg.samples < cfg.shards:
        raise UsageError(f"--samples={cfg.samples} --shards={cfg.shards}: need at least one sample per shard")
    out = Path(cfg.out)
    if out.exists() and any(out.iterdir()):
        raise UsageError(f"--out={out} is not empty")
    synthetic(out, cfg.samples, cfg.shards)
    print(f"{out}: {cfg.samples} synthetic training samples in {cfg.shards} shards (benchmarking only)",
          file=sys.stderr)


if __name__ == "__main__":
    run_main(synthetic_main)
