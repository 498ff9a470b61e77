"""Re-read every shard of DATA against manifest.json: sha256, sample count, tar structure, DALI index.

    python -m shards verify --data=DATA      # exit 1 naming each missing, truncated or altered shard

Progress in bytes read: a bar on a terminal, a line every --progress_interval seconds in a file.
"""
import dataclasses
import hashlib
import sys
import tarfile
from pathlib import Path

from config import parse_config
from progress import DEFAULT_INTERVAL_S, progress_bar
from runtime import UsageError, run_main, shard_path
from shardformat import STATS, index_path, read_manifest
from shards import tario

READ_BYTES = 1 << 22  # hash in 4 MiB reads


@dataclasses.dataclass
class VerifyConfig:
    data: str = ""  # the DATA directory (holds manifest.json)
    progress_interval: float = DEFAULT_INTERVAL_S  # seconds between progress lines when the output is not a terminal


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(READ_BYTES):
            digest.update(block)
    return digest.hexdigest()


def count_samples(path: Path) -> int:
    """Samples (distinct keys with a .jpg) in a tar; raises tarfile.TarError/EOFError on a damaged archive."""
    keys = set()
    with tarfile.open(path, "r:") as tar:
        for m in tar:
            if m.isfile() and m.name.endswith(".jpg"):
                keys.add(m.name[:-4])
    return len(keys)


def verify_shard(path: str | Path, expected: dict) -> str | None:
    """None when the shard at `path` matches its manifest entry ({file, num_samples, sha256}), else the problem."""
    path = Path(path)
    name = expected.get("file", path.name)
    if not path.is_file():
        return f"{name}: missing"
    if sha256_file(path) != expected["sha256"]:
        try:
            found = count_samples(path)
        except (tarfile.TarError, EOFError, OSError) as e:
            return f"{name}: truncated or damaged ({type(e).__name__}: {e})"
        if found != expected["num_samples"]:
            return f"{name}: {found} samples, manifest says {expected['num_samples']} (truncated or altered)"
        return f"{name}: sha256 differs from the manifest (altered)"
    idx = index_path(path)
    if not idx.is_file():
        return f"{name}: index {idx.name} missing"
    # The tar is what the manifest vouches for; the index must describe exactly that tar.
    if idx.read_text() != tario.index_of_tar(str(path)):
        return f"{name}: index {idx.name} does not match the tar"
    return None


def verify(data: str | Path, progress_interval: float | None = None) -> list[str]:
    """Problems found in DATA (empty when every shard listed in the manifest is intact); with `progress_interval`,
    the bytes read shown as progress."""
    data = Path(data)
    try:
        manifest = read_manifest(data)
    except (FileNotFoundError, ValueError) as e:  # missing (no complete build here), unreadable, another format
        return [str(e)]
    problems, sizes = [], shard_sizes(data, manifest)
    with progress_bar(sum(sizes.values()), f"verify {data}", unit="B", unit_scale=True,
                      enabled=progress_interval is not None, interval_s=progress_interval or 0) as bar:
        for split, entry in manifest["splits"].items():
            if sum(s["num_samples"] for s in entry["shards"]) != entry["num_samples"]:
                problems.append(f"manifest: {split} shard counts do not add up to num_samples={entry['num_samples']}")
            for shard in entry["shards"]:
                try:
                    problem = verify_shard(shard_path(data, shard["file"]), shard)
                except ValueError as e:  # never read a file outside DATA
                    problem = str(e)
                if problem:
                    problems.append(problem)
                bar.update(sizes.get(shard["file"], 0))
    if not (data / STATS).is_file():
        problems.append(f"{STATS}: missing")
    return problems


def shard_sizes(data: Path, manifest: dict) -> dict[str, int]:
    """Bytes of each shard file of the manifest that is there to read (inside DATA)."""
    sizes = {}
    for entry in manifest["splits"].values():
        for shard in entry["shards"]:
            try:
                sizes[shard["file"]] = shard_path(data, shard["file"]).stat().st_size
            except (ValueError, OSError):  # outside DATA, or missing: verify_shard names the problem
                pass
    return sizes


def verify_main(argv: list[str]) -> None:
    cfg = parse_config(VerifyConfig, argv, description=__doc__)
    if not cfg.data:
        raise UsageError("--data=DIR is required")
    if not Path(cfg.data).is_dir():
        raise UsageError(f"--data={cfg.data}: not a directory")
    problems = verify(cfg.data, cfg.progress_interval)
    if problems:
        for p in problems:
            print(f"BAD {p}", file=sys.stderr)
        print(f"{len(problems)} problem(s) in {cfg.data}", file=sys.stderr)
        sys.exit(1)
    shards = sum(len(e["shards"]) for e in read_manifest(cfg.data)["splits"].values())
    print(f"OK: {shards} shards in {cfg.data} match the manifest")


if __name__ == "__main__":
    run_main(verify_main)
