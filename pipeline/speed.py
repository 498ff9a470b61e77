"""How fast the train pipeline is, next to its baselines, measured in one run.

    python -m pipeline.speed --data=DATA                         # CPU: DALI vs Pillow decode vs DataLoader+webdataset
    python -m pipeline.speed --data=DATA --device=cuda           # GPU: the pipeline alone, output types, decoder share
    python -m pipeline.speed --data=DATA --device=cuda --train_ips=2900   # ... and its ratio to AlexNet's training rate

(`python bench.py --data=DATA --device=cuda --what=pipeline,model` measures AlexNet's training rate and this
pipeline in one run, and prints their ratio.)

CPU, all on `cores` cores (default 2) over the same shard JPEGs:
  pillow    libjpeg-turbo (Pillow) decoding the JPEG bytes to RGB, nothing else, in `cores` processes: the ceiling.
  dali      `train_loader` on the CPU with `cores` threads: full paper augmentation (random crop, reflection,
            per-pixel mean, PCA lighting), float32 NCHW torch tensors; again with the per-channel mean.
  torch     a torch DataLoader with `cores` workers reading the shards with the `webdataset` library, decoding with
            Pillow and doing the same crop, reflection and per-pixel mean subtraction (no lighting), float32 NCHW.
Each is run once to warm up (page cache, thread pools, worker start), then `repeats` times; the median counts.
Next to images/s, each reports the CPU time per image of all its processes: on a machine shared with other work,
wall-clock rates depend on how the scheduler splits the cores (one process with several threads against several
processes), CPU time much less. Both ratios are printed.

The functions are importable (`bench.py` reuses them): each returns a `Rate`, a float of images/s.
"""
import dataclasses
import io
import json
import multiprocessing
import os
import tarfile
import time

import numpy as np

from config import parse_config, run_main
from pipeline.data import CROP, SIZE, read_manifest, read_split, read_stats


@dataclasses.dataclass
class SpeedConfig:
    data: str = "data/sample"  # the DATA directory (shards of 256x256 JPEGs)
    device: str = "cpu"  # cpu: all three measurements; cuda: the DALI pipeline alone
    cores: int = 2  # CPU processes / threads / DataLoader workers for every CPU measurement
    batch_size: int = 128  # images per batch (GPU: per step of one GPU)
    repeats: int = 5  # timed runs after the warm-up; the median is reported
    images: int = 0  # images per timed run; 0 = the whole training split (CPU) or 50 batches (GPU)
    train_ips: float = 0.0  # images/s AlexNet trains at on this GPU (from bench.py), for the ratio; 0 = none
    out: str = ""  # also write the results as JSON here


def train_jpegs(data, limit: int = 0) -> list[bytes]:
    """The training split's JPEG bytes, read with tarfile."""
    out = []
    for tar_path in read_split(data, "train").tars:
        with tarfile.open(tar_path) as tar:
            for member in tar:
                if member.name.endswith(".jpg"):
                    out.append(tar.extractfile(member).read())
                    if limit and len(out) >= limit:
                        return out
    return out


def cpu_seconds(pids) -> float:
    """User + system CPU time of these processes (all their threads) so far, from /proc."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / ticks


class Rate(float):
    """images/s on the wall clock (the median timed run), carrying `cpu_ms`: CPU milliseconds per image over all
    the processes doing the work in that run. The CPU time is what a shared, loaded machine distorts least."""

    cpu_ms: float

    def __new__(cls, ips: float, cpu_ms: float):
        rate = super().__new__(cls, ips)
        rate.cpu_ms = cpu_ms
        return rate

    @property
    def ips(self) -> float:
        return float(self)


def median_rate(run, images: int, repeats: int, pids=lambda: [os.getpid()]) -> Rate:
    """Rate of `run()` (which processes `images` images): one warm-up call, then the median of `repeats` more."""
    run()
    runs = []
    for _ in range(repeats):
        cpu, start = cpu_seconds(pids()), time.perf_counter()
        run()
        runs.append((time.perf_counter() - start, cpu_seconds(pids()) - cpu))
    wall, cpu = sorted(runs)[len(runs) // 2]
    return Rate(images / wall, 1000 * cpu / images)


_JPEGS: list[bytes] = []  # set before the pool forks, so workers inherit the bytes instead of receiving them


def _decode_part(part: tuple[int, int]) -> int:
    from PIL import Image
    for jpeg in _JPEGS[part[0]::part[1]]:
        with Image.open(io.BytesIO(jpeg)) as im:
            im.convert("RGB").load()
    return len(_JPEGS[part[0]::part[1]])


def pillow_decode(jpegs: list[bytes], processes: int = 2, repeats: int = 5) -> Rate:
    """Rate of a plain libjpeg-turbo decode loop (Pillow, to RGB) over `jpegs` in `processes` processes."""
    global _JPEGS
    _JPEGS = jpegs
    with multiprocessing.get_context("fork").Pool(processes) as pool:
        parts = [(i, processes) for i in range(processes)]
        workers = [p.pid for p in pool._pool]
        return median_rate(lambda: pool.map(_decode_part, parts), len(jpegs), repeats, lambda: workers)


def consume(loader, images: int) -> int:
    """Iterate `loader` (restarting epochs) until `images` images have been produced; returns the count."""
    seen = 0
    while seen < images:
        for x, _ in loader:
            seen += x.shape[0]
            if seen >= images:
                break
    return seen


def dali_train(data, batch_size: int = 128, threads: int = 2, images: int = 0, repeats: int = 5,
               device: str = "cpu", **options) -> Rate:
    """Rate of `train_loader` (full augmentation) delivering torch tensors; on a GPU, synchronised."""
    import torch

    from pipeline import train_loader
    loader = train_loader(data, batch_size, device=device, num_threads=threads, **options)
    images = images or loader.num_samples
    if device == "cpu":
        return median_rate(lambda: consume(loader, images), images, repeats)

    def run():
        consume(loader, images)
        torch.cuda.synchronize()
    return median_rate(run, images, repeats)


class PillowTrainTransform:
    """What the DALI train pipeline does, minus lighting, in Pillow + NumPy: crop, reflect, subtract mean, CHW."""

    def __init__(self, mean_image: np.ndarray):
        self.mean_image = mean_image.astype(np.float32)
        self.rng = np.random.default_rng()

    def __call__(self, jpeg: bytes):
        from PIL import Image
        image = Image.open(io.BytesIO(jpeg)).convert("RGB")
        x, y = self.rng.integers(0, SIZE - CROP + 1, size=2)
        patch = image.crop((x, y, x + CROP, y + CROP))
        mean = self.mean_image[y:y + CROP, x:x + CROP]
        if self.rng.random() < 0.5:
            patch, mean = patch.transpose(Image.Transpose.FLIP_LEFT_RIGHT), mean[:, ::-1]
        return (np.asarray(patch, np.float32) - mean).transpose(2, 0, 1).copy()


def torch_webdataset(data, batch_size: int = 128, workers: int = 2, images: int = 0, repeats: int = 5) -> Rate:
    """Rate of a torch DataLoader (`workers` workers) over the shards through the `webdataset` library."""
    import torch
    import webdataset as wds

    split = read_split(data, "train")
    transform = PillowTrainTransform(read_stats(data).mean_image)
    dataset = (wds.WebDataset(split.tars, shardshuffle=False, nodesplitter=wds.single_node_only, empty_check=False)
               .shuffle(1000).to_tuple("jpg", "cls").map_tuple(transform, int)
               .batched(batch_size, partial=True))
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers, persistent_workers=True,
                                         prefetch_factor=4)
    images = images or split.num_samples

    def run():
        seen = 0
        while seen < images:
            for x, _ in loader:
                torch.as_tensor(x)
                seen += len(x)
                if seen >= images:
                    break
    def pids():
        return [os.getpid()] + [w.pid for w in getattr(loader._iterator, "_workers", [])]
    return median_rate(run, images, repeats, pids)


def measure_cpu(cfg: SpeedConfig) -> dict:
    jpegs = train_jpegs(cfg.data, cfg.images)
    images = cfg.images or len(jpegs)
    results = {"images": images, "cores": cfg.cores, "batch_size": cfg.batch_size, "load_before": os.getloadavg()}
    rates = {"pillow_decode": pillow_decode(jpegs, cfg.cores, cfg.repeats),
             "dali_train": dali_train(cfg.data, cfg.batch_size, cfg.cores, images, cfg.repeats),
             "dali_train_channel_mean": dali_train(cfg.data, cfg.batch_size, cfg.cores, images, cfg.repeats,
                                                   mean="channel"),
             "torch_webdataset": torch_webdataset(cfg.data, cfg.batch_size, cfg.cores, images, cfg.repeats)}
    for name, rate in rates.items():
        results[f"{name}_ips"] = rate.ips
        results[f"{name}_cpu_ms_per_image"] = rate.cpu_ms
    for name in ("dali_train", "dali_train_channel_mean"):
        for base in ("pillow_decode", "torch_webdataset"):
            results[f"{name}_vs_{base.split('_')[0]}"] = rates[name].ips / rates[base].ips
            # the same ratio on an idle machine: cores x (1 / CPU time per image) on both sides
            results[f"{name}_vs_{base.split('_')[0]}_by_cpu_time"] = rates[base].cpu_ms / rates[name].cpu_ms
    results["load_after"] = os.getloadavg()
    return results


def measure_gpu(cfg: SpeedConfig) -> dict:
    """The train pipeline on the GPU: output types, then the hardware decoder's share (bfloat16, channels-last)."""
    import torch

    from pipeline import pipelines
    threads = len(os.sched_getaffinity(0))
    images = cfg.images or 50 * cfg.batch_size
    results = {"device": torch.cuda.get_device_name(), "images": images, "threads": threads,
               "batch_size": cfg.batch_size, "hw_decoder_load": pipelines.GPU_DECODER["hw_decoder_load"]}
    for dtype, channels_last in (("bfloat16", True), ("float16", True), ("float32", False)):
        key = f"dali_train_ips_{dtype}{'_channels_last' if channels_last else ''}"
        results[key] = dali_train(cfg.data, cfg.batch_size, threads, images, cfg.repeats, device="cuda",
                                  dtype=dtype, channels_last=channels_last).ips
    chosen = pipelines.GPU_DECODER["hw_decoder_load"]
    for load in (0.0, 0.5, 0.9):
        pipelines.GPU_DECODER["hw_decoder_load"] = load
        results[f"dali_train_ips_hw_decoder_load_{load}"] = dali_train(
            cfg.data, cfg.batch_size, threads, images, cfg.repeats, device="cuda", channels_last=True).ips
    pipelines.GPU_DECODER["hw_decoder_load"] = chosen
    if cfg.train_ips:
        results["pipeline_vs_alexnet"] = results["dali_train_ips_bfloat16_channels_last"] / cfg.train_ips
    return results


def main(argv):
    cfg = parse_config(SpeedConfig, argv, __doc__)
    read_manifest(cfg.data)
    results = measure_cpu(cfg) if cfg.device == "cpu" else measure_gpu(cfg)
    for key, value in results.items():
        print(f"{key:>24}: {value:.2f}" if isinstance(value, float) else f"{key:>24}: {value}")
    if cfg.out:
        with open(cfg.out, "w") as f:
            json.dump({"config": dataclasses.asdict(cfg), "results": results}, f, indent=2)


if __name__ == "__main__":
    run_main(main)
