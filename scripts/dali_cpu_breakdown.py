"""Where a CPU DALI train pipeline spends its time: the pipeline cut down step by step, images/s for each.

    python -m scripts.dali_cpu_breakdown --data=data/bench [--seconds=5] [--threads=2] [--batch_size=64]

Each row adds one step to the one before (reader; window decode; cast to float32; crop_mirror_normalize to CHW);
the last row is this project's `train_loader` with the paper's augmentation. Compare with bench.py's `limit` row.
"""
import glob
import time
from dataclasses import dataclass
from pathlib import Path

from nvidia.dali import fn, pipeline_def, types

from config import parse_config, run_main
from pipeline import train_loader
from pipeline.data import CROP


@dataclass
class BreakdownConfig:
    data: str = "data/bench"  # shard directory (docs/FORMAT.md); realistic JPEGs: `make bench-data`
    seconds: float = 5.0  # timed seconds per row, after a warm-up
    threads: int = 2  # DALI CPU threads
    batch_size: int = 64  # images per batch


def window(jpegs):
    x, y = fn.random.uniform(range=(0, 1)), fn.random.uniform(range=(0, 1))
    return fn.decoders.image_crop(jpegs, device="cpu", crop=(CROP, CROP), crop_pos_x=x, crop_pos_y=y)


STEPS = {
    "reader alone": lambda jpegs: jpegs,
    "+ decode the 224x224 window (uint8)": window,
    "+ cast to float32": lambda jpegs: fn.cast(window(jpegs), dtype=types.FLOAT),
    "+ crop_mirror_normalize to CHW float32": lambda jpegs: fn.crop_mirror_normalize(
        window(jpegs), dtype=types.FLOAT, output_layout="CHW", mean=[120.0, 115.0, 100.0], std=[1.0, 1.0, 1.0],
        mirror=fn.random.coin_flip()),
}


def rate(run, batch_size: int, seconds: float) -> float:
    for _ in range(5):  # warm-up: thread pools, page cache
        run()
    start, images = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        run()
        images += batch_size
    return images / (time.perf_counter() - start)


def main(argv):
    cfg = parse_config(BreakdownConfig, argv, description=__doc__)
    tars = sorted(glob.glob(str(Path(cfg.data) / "train" / "*.tar")))
    indexes = [str(Path(t).with_suffix(".idx")) for t in tars]
    for name, step in STEPS.items():
        @pipeline_def
        def cut_down():
            jpegs = fn.readers.webdataset(paths=tars, index_paths=indexes, ext=["jpg"], random_shuffle=True,
                                          initial_fill=1024)
            return step(jpegs)

        pipe = cut_down(batch_size=cfg.batch_size, num_threads=cfg.threads, device_id=None, seed=1)
        pipe.build()
        print(f"{name:50s} {rate(pipe.run, cfg.batch_size, cfg.seconds):8.0f} images/s", flush=True)
    loader = iter(train_loader(cfg.data, cfg.batch_size, num_threads=cfg.threads))
    print(f"{'train_loader (paper augmentation, per-pixel mean)':50s} "
          f"{rate(lambda: next(loader), cfg.batch_size, cfg.seconds):8.0f} images/s")


if __name__ == "__main__":
    run_main(main)
