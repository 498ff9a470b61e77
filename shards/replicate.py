"""Benchmark data: a shard directory whose every split is copied N times, listed in one manifest.

    python -m shards replicate --data=data/bench-1x --out=data/bench --copies=20

Copies every shard of `data` (`.tar` and `.idx`) `copies` times into `out`, with `stats.npz` and a manifest listing
all copies; positions (`.pos`) repeat in every copy, so `num_inputs` grows with them. The manifest says
`params.replicated`: the same images many times over are for measuring speed, never for training.
"""
import dataclasses
import json
import shutil
import sys
from pathlib import Path

from config import parse_config
from runtime import UsageError, run_main, shard_path, usage_errors, write_atomically
from shardformat import MANIFEST, STATS, index_path, read_manifest, shard_file


@dataclasses.dataclass
class ReplicateConfig:
    data: str = ""  # a shard directory written by `python -m shards build` (not itself replicated)
    out: str = ""  # the new directory: empty or absent
    copies: int = 20  # copies of every split (1: a plain copy)


def replicate(data: Path, out: Path, copies: int) -> dict:
    manifest = read_manifest(data)
    if manifest.get("params", {}).get("replicated", 1) != 1:
        raise ValueError(f"{data} is already replicated: replicate the original shards")
    out.mkdir(parents=True, exist_ok=True)
    for name, split in manifest["splits"].items():
        originals = [(shard, shard_path(data, shard["file"])) for shard in split["shards"]]
        split["shards"] = []
        for copy in range(copies):
            for n, (shard, source) in enumerate(originals):
                file = shard_file(name, copy * len(originals) + n)
                (out / file).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, out / file)
                shutil.copyfile(index_path(source), index_path(out / file))
                split["shards"].append({**shard, "file": file})
        for count in ("num_samples", "num_inputs", "num_rejected"):
            if count in split:
                split[count] *= copies
    manifest["params"].update(replicated=copies, note="benchmark data: the same images copied; never train on it")
    shutil.copyfile(data / STATS, out / STATS)
    write_atomically(out / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())
    return manifest


def replicate_main(argv: list[str]) -> None:
    cfg = parse_config(ReplicateConfig, argv, description=__doc__)
    data, out = Path(cfg.data), Path(cfg.out)
    if not cfg.data or not cfg.out:
        raise UsageError("both --data=<shard dir> and --out=<new dir> are required")
    if cfg.copies < 1:
        raise UsageError(f"--copies={cfg.copies}: must be at least 1")
    if out.exists() and any(out.iterdir()):
        raise UsageError(f"--out={out} is not empty")
    with usage_errors():  # no manifest, already replicated, or a shard path outside DATA
        manifest = replicate(data, out, cfg.copies)
    sizes = ", ".join(f"{k} {v['num_samples']}" for k, v in manifest["splits"].items())
    print(f"{out}: {cfg.copies} copies of {data}: {sizes} samples (benchmarking only)", file=sys.stderr)


if __name__ == "__main__":
    run_main(replicate_main)
