"""Speed and resampling quality of the shard writer's image path against the straightforward Pillow way.

    taskset -c 0 python -m shards.speed [--images=DIR] [--limit=N] [--repeats=3] [--quality_check=true]

Single process, pinned to one core by taskset, so the figures are images/s per core. Both ways run on the same
in-memory bytes, interleaved image by image (so load on a shared machine hits both alike), best of `repeats`:
  plain   open, convert("RGB"), LANCZOS resize of the whole image, crop, save            (image.plain_pillow)
  prepare the build's image path: decode (DCT-domain downscale only for huge JPEGs), LANCZOS of the central
          box only, save                                                                   (image.prepare)
  build   what a build worker does per image: prepare, then decode its JPEG for the exact statistics sums, which
          the plain way lacks
  decode  a full-size decode alone: no way that decodes every pixel can beat it
Quality: PSNR of the 256x256 pixels (before JPEG encoding, which both share) against an exact float64 LANCZOS
(a=3) resampling of the full-size decoded image with the same geometry; higher is closer.
"""
import dataclasses
import io
import math
import os
import platform
import time
from pathlib import Path

import numpy as np
from PIL import Image

from config import parse_config, run_main
from shards import image
from shards.build import add_pixel_sums

DEFAULT_IMAGES = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet-sample"


@dataclasses.dataclass
class SpeedConfig:
    images: str = str(DEFAULT_IMAGES)  # folder of full-size JPEGs (default: the 1000 real ImageNet samples)
    limit: int = 0  # use only the first N files (0: all)
    repeats: int = 3  # timing passes; the best pass counts
    quality_check: bool = True  # also compute PSNR against the exact float LANCZOS reference (slower)


def plain_patch(data: bytes, size: int = image.SIZE) -> np.ndarray:
    """plain_pillow's pixels before its JPEG encoding."""
    im = Image.open(io.BytesIO(data)).convert("RGB")
    resized, _ = image.crop_geometry(*im.size, size)
    left, top = (resized[0] - size) // 2, (resized[1] - size) // 2
    return np.asarray(im.resize(resized, Image.Resampling.LANCZOS).crop((left, top, left + size, top + size)))


def build_patch(data: bytes, size: int = image.SIZE) -> np.ndarray:
    im, box, _ = image.decode(data, size, fast=True)
    return np.asarray(im.resize((size, size), Image.Resampling.LANCZOS, box=box))


def lanczos_matrix(in_size: int, out_size: int, lo: float, hi: float, a: int = 3) -> np.ndarray:
    """Rows of float64 LANCZOS weights (antialiased: the kernel widens by the reduction factor), Pillow's geometry."""
    scale = (hi - lo) / out_size
    widen = max(scale, 1.0)
    centers = lo + (np.arange(out_size) + 0.5) * scale
    x = np.arange(in_size) + 0.5
    t = (x[None, :] - centers[:, None]) / widen
    w = np.where(np.abs(t) < a, np.sinc(t) * np.sinc(t / a), 0.0)
    return w / w.sum(1, keepdims=True)


def reference_patch(data: bytes, size: int = image.SIZE) -> np.ndarray:
    """Exact resampling: full-size decode, float64 separable LANCZOS of the central box, clipped, not rounded."""
    im, box, _ = image.decode(data, size, fast=False)
    pixels = np.asarray(im, np.float64)
    wy = lanczos_matrix(pixels.shape[0], size, box[1], box[3])
    wx = lanczos_matrix(pixels.shape[1], size, box[0], box[2])
    out = np.einsum("yh,hwc->ywc", wy, pixels)
    return np.clip(np.einsum("xw,ywc->yxc", wx, out), 0, 255)


_SUMS = {"sum_image": np.zeros((image.SIZE, image.SIZE, 3), np.uint64), "pixel_sum": np.zeros(3, np.int64),
         "pixel_outer": np.zeros((3, 3), np.int64), "num_images": 0}


def build_step(data: bytes) -> None:
    """One image as a build worker handles it: prepare + the statistics sums (the build's own code for both)."""
    jpeg, _ = image.prepare(data)
    add_pixel_sums(_SUMS, image.decoded_pixels(jpeg))


def decode_only(data: bytes) -> None:
    Image.open(io.BytesIO(data)).load()


def time_ways(datas: list[bytes], ways: dict, repeats: int) -> dict[str, float]:
    """Best-of-`repeats` seconds per way, the ways interleaved image by image."""
    best = {name: math.inf for name in ways}
    for _ in range(repeats):
        spent = dict.fromkeys(ways, 0.0)
        for data in datas:
            for name, fn in ways.items():
                t = time.perf_counter()
                fn(data)
                spent[name] += time.perf_counter() - t
        best = {name: min(best[name], spent[name]) for name in ways}
    return best


def psnr(mse: float) -> float:
    return 10 * math.log10(255.0 ** 2 / mse) if mse > 0 else math.inf


def quality(datas: list[bytes]) -> dict[str, tuple[float, float, int]]:
    """Per way: (PSNR of the pooled MSE, median per-image PSNR, images compared) against the exact reference."""
    errors = {"plain": [], "build": []}
    for data in datas:
        im = Image.open(io.BytesIO(data))
        if im.getexif().get(image.ORIENTATION_TAG, 1) in range(2, 9):
            continue  # the plain way ignores EXIF orientation: no like-for-like reference
        ref = reference_patch(data)
        errors["plain"].append(np.mean((plain_patch(data) - ref) ** 2))
        errors["build"].append(np.mean((build_patch(data) - ref) ** 2))
    return {k: (psnr(float(np.mean(v))), float(np.median([psnr(e) for e in v])), len(v)) for k, v in errors.items()}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def measure(cfg: SpeedConfig) -> dict:
    files = sorted(p for p in Path(cfg.images).iterdir() if p.is_file())
    files = files[:cfg.limit] if cfg.limit else files
    datas = [p.read_bytes() for p in files]
    ways = {"plain": lambda d: image.plain_pillow(d), "prepare": lambda d: image.prepare(d), "build": build_step,
            "decode": decode_only}
    seconds = time_ways(datas, ways, cfg.repeats)
    rates = {name: len(datas) / s for name, s in seconds.items()}
    result = {"images": len(datas), "rates": rates, "ratio": rates["prepare"] / rates["plain"],
              "ratio_with_stats": rates["build"] / rates["plain"],
              "decode_bound": rates["decode"] / rates["plain"], "cpu": cpu_name(),
              "cores_allowed": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None}
    if cfg.quality_check:
        result["quality"] = quality(datas)
    return result


def report(r: dict) -> str:
    lines = [f"{r['images']} images from the folder, one process on {r['cores_allowed']} allowed core(s), {r['cpu']}"]
    for name, rate in r["rates"].items():
        lines.append(f"  {name:<7} {rate:8.1f} images/s per core")
    lines.append(f"  prepare / plain = {r['ratio']:.2f}x, with the statistics {r['ratio_with_stats']:.2f}x   (decode "
                 f"alone / plain = {r['decode_bound']:.2f}x: the ceiling for any way that decodes every pixel)")
    for name, (pooled, median, n) in r.get("quality", {}).items():
        lines.append(f"  {name:<7} PSNR vs exact float LANCZOS: {pooled:.2f} dB pooled, {median:.2f} dB median ({n} images)")
    return "\n".join(lines)


def speed_main(argv: list[str]) -> None:
    print(report(measure(parse_config(SpeedConfig, argv, description=__doc__))))


if __name__ == "__main__":
    run_main(speed_main)
