"""The preprocessing rows: the whole `make shards` command against the naive all-core Pillow loop (bench/naive.py),
each run as the command a user types (its own interpreter, all cores), on the same real JPEGs in class folders.

Every repeat of a row is one complete run into a fresh output directory: planning, decoding, resizing, encoding,
the exact statistics, tar and index writing, checksums and the merge for the build; decode, resize, crop and
save for the naive loop. Per-core figures are these rates divided by the cores both used.
"""
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.folders import class_folders
from bench.harness import REPO


def run(command: list[str]) -> None:
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}): {result.stderr[-2000:]}")


def preprocess_works(images: Path, work_dir: Path) -> dict:
    """{"preprocess": work, "preprocess_naive": work} over the JPEGs of `images` (train: all, val: every 10th)."""
    work_dir.mkdir(parents=True, exist_ok=True)
    folders = work_dir / "preprocess-raw"
    count = class_folders(images, folders, val_every=10)

    def command_work(make_command):
        def work(n: int) -> int:
            for _ in range(n):
                out = Path(tempfile.mkdtemp(prefix="out-", dir=work_dir))
                try:
                    run(make_command(out))
                finally:
                    shutil.rmtree(out, ignore_errors=True)
            return n * count
        return work

    return {"preprocess": command_work(lambda out: [sys.executable, "-m", "shards", "build", f"--raw={folders}",
                                                    f"--out={out}"]),
            "preprocess_naive": command_work(lambda out: [sys.executable, "-m", "bench.naive", str(folders),
                                                          str(out)])}
