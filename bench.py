"""How fast this project's data path is, next to its baselines, on this machine; one table, the same as JSON.

    python bench.py --data=DATA                                   # everything, CPU (or the GPU when there is one)
    python bench.py --data=DATA --device=cuda --what=pipeline,model,end_to_end
    python bench.py --make_data=data/bench --repeat=20            # realistic shards from the 1000 real images
    make bench DATA=/scratch/imagenet-shards ARGS='--seconds=10'

Each measurement is warmed up, then timed `repeats` times (about `seconds` in all); the median counts.
  limit        libjpeg-turbo (Pillow) decoding the same shard JPEGs to RGB in `num_threads` processes: the
               ceiling for anything that decodes every pixel on the CPU. The train pipeline decodes only its
               224x224 window (libjpeg skips the rows outside it), so on the CPU it may exceed this limit.
  pipeline     `train_loader` alone: crop, reflection, per-pixel mean, PCA lighting, torch tensors on `device`.
  tencrop      `eval_loader(crops="ten")` alone: full decode, ten 224x224 patches per image (one image = 10 patches).
  alternative  what one would otherwise write: torch DataLoader, `num_threads` workers, the `webdataset` library
               on the same shards, Pillow crop/reflection/mean (no lighting); on a GPU, batches moved there.
  model        AlexNet training steps (SGD as train.py; bfloat16 autocast + channels_last on a GPU) on one
               synthetic batch already on the device: how fast the network can go.
  end_to_end   the same steps fed by `train_loader`.
  preprocess   `make shards` per image (shards/speed.py: decode, resize, encode, statistics) against the plain
               Pillow way, on full-size JPEGs from `raw`, one process pinned to one core: images/s per core.
GPU times come from CUDA events (model, end to end) or a clock read after torch.cuda.synchronize() (loaders).
Peak memory per row: this process's resident set (its high-water mark is reset before each row where Linux
allows) and, on a GPU, torch's peak allocation plus the device's memory in use (which includes DALI's pools).

Replicated data (`--make_data`) repeats the same 1000 images: for measuring speed only, never for training.
"""
import dataclasses
import json
import math
import multiprocessing
import os
import platform
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from config import UsageError, parse_config, run_main
from model import AlexNet
from pipeline import eval_loader, read_manifest, train_loader
from pipeline import speed as pipeline_speed
from runtime import available_cpus, limit_threads
from shards import speed as shard_speed

REPO = Path(__file__).resolve().parent
REAL_IMAGES = REPO.parent / "shared" / "data" / "imagenet-sample"  # 1000 real ILSVRC2012 JPEGs, one per class
WHAT = ("limit", "pipeline", "tencrop", "alternative", "model", "end_to_end", "preprocess")
SMALL_SPLIT = 5000  # samples: below this an epoch is over within seconds, so repeats see epoch restarts
MIB = 2 ** 20


@dataclass
class BenchConfig:
    data: str = "data/sample"  # shard directory (docs/FORMAT.md)
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: the GPU when there is one
    batch_size: int = 0  # images per batch; 0: 64 on the CPU, 256 on a GPU (ten-crop: at most 64)
    seconds: float = 5.0  # timed seconds per measurement, split over the repeats (plus a warm-up of one repeat)
    repeats: int = 3  # timed repeats per measurement; the median counts
    what: str = ",".join(WHAT)  # comma list of: limit, pipeline, tencrop, alternative, model, end_to_end, preprocess
    num_threads: int = 0  # DALI threads = decode processes = DataLoader workers; 0: every core this process may use
    raw: str = str(REAL_IMAGES)  # folder of full-size JPEGs for `preprocess` (skipped with a note when absent)
    out: str = ""  # JSON results; empty: bench-results/bench-<host>-<device>.json
    make_data: str = ""  # instead of benchmarking: shards here from the JPEGs in `raw` (or the shard dir `raw`)
    repeat: int = 20  # with make_data: copies of the training and validation shards


# ---------------------------------------------------------------------------------------------------- machine
def hardware(device: torch.device) -> dict:
    """What ran the benchmark: CPU, cores, memory, GPU, library versions, code revision."""
    import PIL
    import webdataset
    from PIL import features

    try:
        import nvidia.dali as dali
        dali_version = dali.__version__
    except ImportError:
        dali_version = None
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    info = {"host": socket.gethostname(), "cpu": shard_speed.cpu_name(), "cpu_count": os.cpu_count(),
            "cpus_usable": len(os.sched_getaffinity(0)), "memory_gib": round(mem, 1), "platform": platform.platform(),
            "gpu": None, "versions": {
                "python": platform.python_version(), "torch": torch.__version__, "nvidia-dali": dali_version,
                "pillow": PIL.__version__, "libjpeg_turbo": features.version("libjpeg_turbo"),
                "numpy": np.__version__, "webdataset": getattr(webdataset, "__version__", None) or pkg_version(
                    "webdataset")},
            "git": git_revision()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = {"name": props.name, "memory_gib": round(props.total_memory / 2 ** 30, 1),
                       "capability": f"{props.major}.{props.minor}", "cuda": torch.version.cuda,
                       "cudnn": torch.backends.cudnn.version()}
    return info


def pkg_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def git_revision() -> str | None:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+modified" if dirty else "") if head else None


class Peak:
    """Peak memory over one measurement: this process's RSS high-water mark, torch's and the device's GPU memory."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        try:  # Linux: "5" resets VmHWM to the current RSS, so each row gets its own peak
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc):
        self.memory = {"host_rss_peak_mib": host_rss_peak() / MIB}
        if self.device.type == "cuda" and exc[0] is None:
            free, total = torch.cuda.mem_get_info(self.device)
            self.memory["gpu_torch_peak_mib"] = torch.cuda.max_memory_allocated(self.device) / MIB
            self.memory["gpu_device_used_mib"] = (total - free) / MIB


def host_rss_peak() -> int:
    """Bytes: VmHWM from /proc (resettable), else ru_maxrss (the whole life of the process)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ---------------------------------------------------------------------------------------------------- timing
def stream_rate(batches, cfg, device: torch.device) -> tuple[float, dict]:
    """(images/s, details) of an endless iterator of (images, labels) batches, read without restarts.

    A warm-up of one repeat's time (at least two batches: pipelines fill their queues, workers start), then
    `repeats` spans of seconds/repeats each; the median rate counts. The clock is read after a
    torch.cuda.synchronize(), so GPU work still queued is inside the span. Epochs end where the data ends, never
    early: breaking off an epoch would make the next one read and drop the rest first.
    """
    span = cfg.seconds / cfg.repeats

    def run(min_batches: int) -> tuple[float, int]:
        sync(device)
        start, images, count = time.perf_counter(), 0, 0
        while count < min_batches or time.perf_counter() - start < span:
            x, _ = next(batches)
            images, count = images + x.shape[0], count + 1
        sync(device)
        return images / (time.perf_counter() - start), images

    run(2)
    runs = [run(1) for _ in range(cfg.repeats)]
    return statistics.median(r[0] for r in runs), {"images_per_repeat": int(statistics.median(r[1] for r in runs))}


def limit_rate(cfg, threads: int) -> tuple[float, dict]:
    """libjpeg-turbo decode of the shard JPEGs (pipeline/speed.py's loop) in `threads` processes."""
    sample = pipeline_speed.train_jpegs(cfg.data, 64)
    start = time.perf_counter()
    for jpeg in sample:
        shard_speed.decode_only(jpeg)
    rate = len(sample) / (time.perf_counter() - start) * threads
    images = max(threads, math.ceil(rate * cfg.seconds / cfg.repeats))
    jpegs = pipeline_speed.train_jpegs(cfg.data, images)
    jpegs = (jpegs * math.ceil(images / len(jpegs)))[:images]  # a small split: the same bytes again
    return pipeline_speed.pillow_decode(jpegs, threads, cfg.repeats), {"images_per_repeat": images}


def alternative_batches(data, batch_size: int, workers: int, device: torch.device):
    """pipeline/speed.py's baseline as an endless stream: DataLoader + webdataset + its Pillow transform; on a GPU
    each batch is pinned and moved there."""
    import webdataset as wds

    from pipeline.data import read_split, read_stats
    split = read_split(data, "train")
    transform = pipeline_speed.PillowTrainTransform(read_stats(data).mean_image)
    dataset = (wds.WebDataset(split.tars, shardshuffle=False, nodesplitter=wds.single_node_only, empty_check=False)
               .shuffle(1000).to_tuple("jpg", "cls").map_tuple(transform, int).batched(batch_size, partial=True))
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers, persistent_workers=True,
                                         prefetch_factor=4, pin_memory=device.type == "cuda")
    for x, y in endless(loader):
        yield torch.as_tensor(x).to(device, non_blocking=True), y


class Trainer:
    """AlexNet training steps as train.py takes them: SGD with momentum and weight decay, bf16 autocast and
    channels_last on a GPU. No host-device sync inside a step."""

    def __init__(self, num_classes: int, device: torch.device):
        cuda = device.type == "cuda"
        torch.manual_seed(0)
        self.model = AlexNet(num_classes=num_classes).to(device)
        if cuda:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4,
                                         fused=cuda)
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda)
        self.device = device

    def step(self, images, labels):
        with self.autocast:
            logits = self.model(images)
        loss = F.cross_entropy(logits.float(), labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def rate(self, batches, batch_size: int, cfg) -> tuple[float, int]:
        """(images/s, steps per repeat) over `batches` (an endless iterator of (images, labels)).

        Warm-up: `warmup` steps (cuDNN picks its algorithms on the first), the last of them timed to size the
        repeats. GPU repeats are timed by CUDA events recorded on the stream the steps run on, after a
        synchronisation, so the time includes any wait for the loader.
        """
        cuda = self.device.type == "cuda"
        warmup = 5 if cuda else 2  # a CPU step of a 64-image batch takes seconds: one more is enough there
        for _ in range(warmup - 1):
            self.step(*next(batches))
        sync(self.device)
        start = time.perf_counter()
        self.step(*next(batches))
        sync(self.device)
        per_step = time.perf_counter() - start
        steps = max(1, math.ceil(cfg.seconds / cfg.repeats / per_step))
        times = []
        for _ in range(cfg.repeats):
            sync(self.device)
            if cuda:
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                begin.record()
            else:
                t0 = time.perf_counter()
            for _ in range(steps):
                self.step(*next(batches))
            if cuda:
                end.record()
                end.synchronize()
                times.append(begin.elapsed_time(end) / 1000)
            else:
                times.append(time.perf_counter() - t0)
        return steps * batch_size / statistics.median(times), steps


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def endless(loader):
    while True:
        yield from loader


def preprocess_rates(cfg) -> dict:
    """shards/speed.py's per-image work (build vs plain Pillow), in a child process pinned to one core."""
    files = sorted(p for p in Path(cfg.raw).iterdir() if p.is_file())
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(1) as pool:
        return pool.apply(_preprocess_child, ([str(p) for p in files], cfg.seconds, cfg.repeats))


def _preprocess_child(files: list[str], seconds: float, repeats: int) -> dict:
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    Peak(torch.device("cpu")).__enter__()  # this child's own RSS high-water mark from here on
    ways = {"build": shard_speed.build_step, "plain": shard_speed.image.plain_pillow}
    warm = [Path(f).read_bytes() for f in files[:8]]
    spent = shard_speed.time_ways(warm, ways, 1)  # warm-up; its time sizes the repeats
    count = min(len(files), max(len(warm), math.ceil(len(warm) * seconds / repeats / sum(spent.values()))))
    datas = [Path(f).read_bytes() for f in files[:count]]
    runs = [shard_speed.time_ways(datas, ways, 1) for _ in range(repeats)]
    return ({name: count / statistics.median(r[name] for r in runs) for name in ways}
            | {"images": count, "host_rss_peak_mib": host_rss_peak() / MIB})


# ---------------------------------------------------------------------------------------------------- data
def is_procedural_sample(manifest: dict) -> bool:
    """The built-in sample (`shards sample`): its ten WNIDs exactly."""
    from shards.sample import CLASSES
    return {c["wnid"] for c in manifest["classes"]} == {c.wnid for c in CLASSES}


def data_notes(manifest: dict) -> list[str]:
    notes = []
    if is_procedural_sample(manifest):
        notes.append("WARNING: this is the built-in procedural sample: its images are too easy to decode to be a "
                     "fair benchmark. Use real shards (DATA=...) or `python bench.py --make_data=data/bench`.")
    train = manifest["splits"]["train"]["num_samples"]
    if train < SMALL_SPLIT:
        notes.append(f"note: only {train} training samples: epochs restart within each timed repeat, which "
                     "the figures include")
    if manifest.get("params", {}).get("replicated"):
        notes.append(f"note: replicated data ({manifest['params']['replicated']} copies of the same images), "
                     "for benchmarking only")
    return notes


def make_data(cfg: BenchConfig) -> None:
    """Shards from the real JPEGs in `raw` (train and val: the same images), each split copied `repeat` times.

    When `raw` is itself a shard directory (unreplicated), its shards are copied instead of built.
    """
    from shards.build import BuildConfig, build
    raw, out = Path(cfg.raw), Path(cfg.make_data)
    if not raw.is_dir():
        raise UsageError(f"--raw={raw}: no such folder (the real ImageNet JPEGs, named <wnid>_<anything>.JPEG)")
    if cfg.repeat < 1:
        raise UsageError(f"--repeat={cfg.repeat}: must be at least 1")
    if (out / "manifest.json").exists():
        raise UsageError(f"{out} already holds shards; choose an empty --make_data folder")
    if (raw / "manifest.json").exists():
        manifest = read_manifest(raw)
        if manifest.get("params", {}).get("replicated", 1) != 1:
            raise UsageError(f"--raw={raw}: already replicated; copy from the unreplicated shards")
        for shard in (s for split in manifest["splits"].values() for s in split["shards"]):
            for suffix in (".tar", ".idx"):
                (out / shard["file"]).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(raw / Path(shard["file"]).with_suffix(suffix), out / Path(shard["file"]).with_suffix(suffix))
        shutil.copyfile(raw / "stats.npz", out / "stats.npz")
        return replicate(out, manifest, cfg.repeat, f"the shards of {raw}")
    folders = out / ".raw"
    count = 0
    for p in sorted(raw.iterdir()):
        if not (p.is_file() and p.name.startswith("n") and "_" in p.name):
            continue
        for split in ("train", "val"):
            link = folders / split / p.name.split("_")[0] / p.name
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.exists():
                link.symlink_to(p.resolve())
        count += 1
    if not count:
        raise UsageError(f"{raw}: no files named <wnid>_*.JPEG")
    manifest = build(BuildConfig(raw=str(folders), out=str(out)))
    replicate(out, manifest, cfg.repeat, f"{count} real images")


def replicate(out: Path, manifest: dict, repeat: int, source: str) -> None:
    """Copy every shard of `out` repeat-1 times and list the copies in its manifest (statistics unchanged)."""
    from shards.build import atomic_write
    for name, split in manifest["splits"].items():
        shards = list(split["shards"])
        for copy in range(1, repeat):
            for n, shard in enumerate(shards):
                number = copy * len(shards) + n
                file = f"{name}/{name}-{number:06d}.tar"
                for suffix in (".tar", ".idx"):
                    shutil.copyfile(out / Path(shard["file"]).with_suffix(suffix), out / Path(file).with_suffix(suffix))
                split["shards"].append({**shard, "file": file})
        split["num_samples"] *= repeat
        if "num_inputs" in split:
            split["num_inputs"] *= repeat
    manifest["params"]["replicated"] = repeat
    manifest["params"]["note"] = "benchmark data: the same images copied; never train on it"
    atomic_write(out / "manifest.json", (json.dumps(manifest, indent=1) + "\n").encode())
    sizes = ", ".join(f"{k} {v['num_samples']}" for k, v in manifest["splits"].items())
    print(f"{out}: {source}, {repeat} copies per split: {sizes} samples (benchmarking only)")


# ---------------------------------------------------------------------------------------------------- report
ROWS = {  # key -> what the row measures, for the table
    "limit": "limit: libjpeg-turbo decode, {threads} processes",
    "pipeline": "pipeline alone: train ({device}, {threads} threads)",
    "tencrop": "pipeline alone: ten-crop ({device}; 1 image = 10 patches)",
    "alternative": "alternative: DataLoader+webdataset+Pillow, {threads} workers{to_gpu}",
    "model": "model alone: AlexNet train steps, synthetic batch",
    "end_to_end": "end to end: train steps fed by the pipeline",
    "preprocess": "preprocess: make shards, per core",
    "preprocess_plain": "preprocess: plain Pillow, per core",
}
RATIOS = (  # (key, numerator, denominator, what it says)
    ("pipeline_vs_limit", "pipeline", "limit", "train pipeline / limit"),
    ("tencrop_vs_limit", "tencrop", "limit", "ten-crop pipeline / limit"),
    ("pipeline_vs_alternative", "pipeline", "alternative", "train pipeline / alternative"),
    ("end_to_end_vs_model", "end_to_end", "model", "end to end / model alone (1.0: the GPU never waits)"),
    ("pipeline_vs_model", "pipeline", "model", "train pipeline / model alone (>1: data is not the limit)"),
    ("preprocess_vs_plain", "preprocess", "preprocess_plain", "make shards / plain Pillow, per core"),
)


def table(results: dict, ratios: dict, labels: dict) -> str:
    head = f"{'measurement':<62} {'images/s':>10} {'host RSS MiB':>13} {'GPU MiB (torch/device)':>23}"
    lines = [head, "-" * len(head)]
    for key, r in ((k, results[k]) for k in ROWS if k in results):
        gpu = (f"{r['gpu_torch_peak_mib']:.0f} / {r['gpu_device_used_mib']:.0f}" if "gpu_torch_peak_mib" in r else "-")
        host = f"{r['host_rss_peak_mib']:.0f}" if "host_rss_peak_mib" in r else "-"
        lines.append(f"{labels[key]:<62} {r['images_per_s']:>10.1f} {host:>13} {gpu:>23}")
    if ratios:
        lines += ["", f"{'ratio':<62} {'x':>10}", "-" * 73]
        for key, num, den, text in RATIOS:
            if key in ratios:
                lines.append(f"{text:<62} {ratios[key]:>10.2f}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- main
def main(argv):
    cfg = parse_config(BenchConfig, argv, __doc__)
    if cfg.make_data:
        return make_data(cfg)
    what = [w.strip() for w in cfg.what.split(",") if w.strip()]
    unknown = [w for w in what if w not in WHAT]
    if unknown:
        raise UsageError(f"--what: unknown {', '.join(unknown)} (choose from {', '.join(WHAT)})")
    if cfg.seconds <= 0 or cfg.repeats < 1:
        raise UsageError("--seconds must be positive and --repeats at least 1")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device=cuda but no CUDA GPU is available")
    cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    try:
        manifest = read_manifest(cfg.data)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(str(e)) from None
    batch = cfg.batch_size or (256 if cuda else 64)
    threads = cfg.num_threads or available_cpus()
    limit_threads(threads)
    if cuda:
        torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest convolution algorithms once
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    gpu_loader = dict(dtype="bfloat16", channels_last=True) if cuda else {}
    notes = data_notes(manifest)
    for note in notes:
        print(note, file=sys.stderr)
    out = Path(cfg.out or f"bench-results/bench-{socket.gethostname()}-{device.type}.json")
    record = {"config": dataclasses.asdict(cfg), "device": device.type, "batch_size": batch, "threads": threads,
              "hardware": hardware(device), "data": {
                  "path": str(Path(cfg.data).resolve()), "train_samples": manifest["splits"]["train"]["num_samples"],
                  "val_samples": manifest["splits"].get("val", {}).get("num_samples"),
                  "procedural_sample": is_procedural_sample(manifest),
                  "replicated": manifest.get("params", {}).get("replicated", 1)},
              "load_before": os.getloadavg(), "notes": notes, "results": {}}
    results = record["results"]
    fmt = dict(threads=threads, device=device.type, to_gpu=", moved to the GPU" if cuda else "")
    labels = {k: v.format(**fmt) for k, v in ROWS.items()}

    def measure(key, fn, **extra):
        print(f"measuring {labels[key]} ...", file=sys.stderr, flush=True)
        with Peak(device) as peak:
            rate, amount = fn()
        results[key] = {"images_per_s": rate, **peak.memory, **amount, **extra}
        print(f"  {rate:.1f} images/s", file=sys.stderr, flush=True)

    if "preprocess" in what:
        if not Path(cfg.raw).is_dir():
            notes.append(f"preprocess skipped: no folder of full-size JPEGs at {cfg.raw} (set --raw=DIR)")
            print(notes[-1], file=sys.stderr)
        else:
            print(f"measuring {labels['preprocess']} ...", file=sys.stderr, flush=True)
            rates = preprocess_rates(cfg)  # first: its child process forks from a still small parent
            for key, way in (("preprocess", "build"), ("preprocess_plain", "plain")):
                results[key] = {"images_per_s": rates[way], "images_per_repeat": rates["images"], "cores": 1,
                                "host_rss_peak_mib": rates["host_rss_peak_mib"]}
            print(f"  {rates['build']:.1f} vs {rates['plain']:.1f} images/s", file=sys.stderr, flush=True)

    if "limit" in what:
        measure("limit", lambda: limit_rate(cfg, threads))
    if "pipeline" in what:
        measure("pipeline", lambda: stream_rate(endless(train_loader(
            cfg.data, batch, device=str(device), num_threads=threads, **gpu_loader)), cfg, device))
    if "tencrop" in what:
        if "val" not in manifest["splits"]:
            notes.append("tencrop skipped: the shards have no val split")
        else:
            ten_batch = min(batch, 64)  # 64 images = 640 patches per batch, as eval.py
            measure("tencrop", lambda: stream_rate(endless(eval_loader(
                cfg.data, "val", "ten", ten_batch, device=str(device), num_threads=threads, **gpu_loader)),
                cfg, device), batch_size=ten_batch)
    if "alternative" in what:
        measure("alternative", lambda: stream_rate(alternative_batches(cfg.data, batch, threads, device), cfg, device))
    num_classes = len(manifest["classes"])
    if "model" in what:
        def model():
            trainer = Trainer(num_classes, device)
            x = torch.randn(batch, 3, 224, 224, device=device)
            if cuda:
                x = x.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
            y = torch.randint(0, num_classes, (batch,), device=device)
            rate, steps = trainer.rate(iter(lambda: (x, y), None), batch, cfg)
            return rate, {"steps_per_repeat": steps}
        measure("model", model)
    if "end_to_end" in what:
        def end_to_end():
            trainer = Trainer(num_classes, device)
            loader = train_loader(cfg.data, batch, device=str(device), num_threads=threads, **gpu_loader)
            rate, steps = trainer.rate(endless(loader), batch, cfg)
            return rate, {"steps_per_repeat": steps}
        measure("end_to_end", end_to_end)
    record["ratios"] = {key: results[num]["images_per_s"] / results[den]["images_per_s"]
                        for key, num, den, _ in RATIOS if num in results and den in results}
    record["load_after"] = os.getloadavg()
    self_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    children_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    record["peak"] = {"host_rss_mib": self_peak / MIB, "largest_child_rss_mib": children_peak / MIB}
    if cuda:
        record["peak"]["gpu_torch_mib"] = max(r.get("gpu_torch_peak_mib", 0) for r in results.values())
    record["labels"] = {k: labels[k] for k in results}

    hw = record["hardware"]
    gpu = f", {hw['gpu']['name']}" if hw["gpu"] else ""
    print(f"\n{hw['cpu']} ({hw['cpus_usable']} of {hw['cpu_count']} cores usable){gpu}; torch {torch.__version__}, "
          f"DALI {hw['versions']['nvidia-dali']}, Pillow {hw['versions']['pillow']} (libjpeg-turbo "
          f"{hw['versions']['libjpeg_turbo']}); batch {batch}, {threads} threads; median of {cfg.repeats} after "
          f"warm-up; load average {record['load_before'][0]:.2f} before, {record['load_after'][0]:.2f} after")
    print(f"data: {record['data']['path']} ({record['data']['train_samples']} train samples)")
    print(table(results, record["ratios"], labels))
    print(f"peak host RSS: {record['peak']['host_rss_mib']:.0f} MiB (this process), "
          f"{record['peak']['largest_child_rss_mib']:.0f} MiB (largest worker process)")
    for note in notes:
        print(note)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    run_main(main)
