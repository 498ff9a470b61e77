"""Class folders (`train/<wnid>/<file>`, `val/<wnid>/<file>`) of symbolic links to a flat folder of real JPEGs
named `<wnid>_<anything>.JPEG` (../shared/data/imagenet-sample), so that `python -m shards build` can read them.

    python -m bench.folders --images=../shared/data/imagenet-sample --out=data/bench-raw [--val_every=1]
"""
import dataclasses
import sys
from pathlib import Path

from config import parse_config
from runtime import UsageError, run_main

REAL_IMAGES = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet-sample"


@dataclasses.dataclass
class FoldersConfig:
    images: str = str(REAL_IMAGES)  # flat folder of <wnid>_<anything>.JPEG
    out: str = ""  # where train/ and val/ are made
    val_every: int = 1  # every k-th image is also linked into val/ (1: all of them)


def class_folders(images: Path, out: Path, val_every: int = 1) -> int:
    """Link every `<wnid>_*` file of `images` into out/train/<wnid>/ (every `val_every`-th also into val/);
    returns the number of links made."""
    files = sorted(p for p in images.iterdir() if p.is_file() and p.name.startswith("n") and "_" in p.name)
    if not files:
        raise UsageError(f"{images}: no files named <wnid>_*.JPEG")
    links = 0
    for i, path in enumerate(files):
        for split in ("train", "val") if i % val_every == 0 else ("train",):
            link = out / split / path.name.split("_")[0] / path.name
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.is_symlink():
                link.symlink_to(path.resolve())
            links += 1
    return links


def main(argv: list[str]) -> None:
    cfg = parse_config(FoldersConfig, argv, description=__doc__)
    if not cfg.out or not Path(cfg.images).is_dir() or cfg.val_every < 1:
        raise UsageError("--images=<folder of real JPEGs> and --out=<dir> are required; --val_every >= 1")
    links = class_folders(Path(cfg.images), Path(cfg.out), cfg.val_every)
    print(f"{cfg.out}: {links} links to the images of {cfg.images}", file=sys.stderr)


if __name__ == "__main__":
    run_main(main)
