"""`--what=breakdown`: where a CPU DALI train pipeline spends its time, the pipeline cut down step by step.

Each row adds one step to the one before (reader; window decode; cast to float32; crop_mirror_normalize to CHW);
the last is train_loader itself. A diagnosis of the pipeline row, on the same shards, threads and batch.
"""
from nvidia.dali import fn, pipeline_def, types

from bench.harness import batches_work, endless
from bench.loaders import webdataset_reader
from pipeline import Reading, train_loader
from pipeline.data import CROP, read_split


def window(jpegs):
    x, y = fn.random.uniform(range=(0, 1)), fn.random.uniform(range=(0, 1))
    return fn.decoders.image_crop(jpegs, device="cpu", crop=(CROP, CROP), crop_pos_x=x, crop_pos_y=y)


STEPS = {
    "breakdown: reader alone": lambda jpegs: jpegs,
    "breakdown: + decode the 224x224 window (uint8)": window,
    "breakdown: + cast to float32": lambda jpegs: fn.cast(window(jpegs), dtype=types.FLOAT),
    "breakdown: + crop_mirror_normalize to CHW float32": lambda jpegs: fn.crop_mirror_normalize(
        window(jpegs), dtype=types.FLOAT, output_layout="CHW", mean=[120.0, 115.0, 100.0], std=[1.0, 1.0, 1.0],
        mirror=fn.random.coin_flip()),
}


def cut_down_work(step, data, batch, threads):
    split = read_split(data, "train")

    @pipeline_def
    def cut_down():
        jpegs, _ = webdataset_reader(split.tars, split.indexes)
        return step(jpegs)

    pipe = cut_down(batch_size=batch, num_threads=threads, device_id=None, seed=1, exec_dynamic=True)
    pipe.build()

    def work(n: int) -> int:
        for _ in range(n):
            pipe.run()
        return n * batch
    return work


def breakdown_works(data, batch, threads) -> dict:
    works = {name: cut_down_work(step, data, batch, threads) for name, step in STEPS.items()}
    works["breakdown: train_loader (the paper's augmentation)"] = batches_work(endless(
        train_loader(data, batch, reading=Reading(num_threads=threads))))
    return works
