"""The naive way to preprocess ImageNet, the baseline of the `preprocess` row: a Pillow loop on every core.

    python -m bench.naive <class folders> <out dir>

For every file under <class folders>/*/*/: open, convert to RGB, LANCZOS-resize the shorter side to 256, crop the
central 256x256, save as a JPEG of quality 90 into <out dir>; a multiprocessing pool with a worker per core.
No tar shards, no index, no statistics, no checksums: what a user would write in ten minutes.
"""
import glob
import os
import sys
from multiprocessing import Pool

from PIL import Image

SIZE = 256


def resize_crop_save(job: tuple[str, str]) -> None:
    source, target = job
    image = Image.open(source).convert("RGB")
    scale = SIZE / min(image.size)
    image = image.resize((max(SIZE, round(image.width * scale)), max(SIZE, round(image.height * scale))),
                         Image.Resampling.LANCZOS)
    left, top = (image.width - SIZE) // 2, (image.height - SIZE) // 2
    image.crop((left, top, left + SIZE, top + SIZE)).save(target, quality=90)


def main(source: str, out: str) -> None:
    files = sorted(glob.glob(os.path.join(source, "*", "*", "*")))
    os.makedirs(out, exist_ok=True)
    with Pool(len(os.sched_getaffinity(0))) as pool:
        pool.map(resize_crop_save, [(f, os.path.join(out, f"{i}.jpg")) for i, f in enumerate(files)], chunksize=16)


if __name__ == "__main__":
    main(*sys.argv[1:3])
