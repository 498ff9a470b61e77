"""Classify image files with a trained network: per image, the top classes with WNID, words and probability.

    python predict.py --checkpoint=runs/alexnet/best.pt photo.jpg more/*.JPEG            # files or folders
    python predict.py --checkpoint=runs/alexnet/best.safetensors --json photos/           # JSON lines, for machines
    python predict.py --checkpoint=runs/demo/checkpoint.pt --crops=center --top=1 photo.jpg

The paper's test preprocessing, as train.py and eval.py see their images: the shorter side resized to 256 (LANCZOS,
EXIF orientation applied, CMYK, greyscale, PNG and other modes converted to RGB), the central 256x256 patch stored
as the shards store it (a JPEG of the checkpoint's quality) and decoded again, minus the training set's mean image;
then the paper's ten 224x224 patches (four corners, centre, and their reflections) with their softmax probabilities
averaged, or the centre patch alone (--crops=center). The preparation is shards/image.py's, so the probabilities
agree with eval.py's on the same images up to the decoders' rounding. Runs on a CPU without DALI and without DATA:
the checkpoint (or the file `python -m model.export` wrote) carries the class list and the mean image.

A file that cannot be classified (missing, not an image, damaged) gets one line on stderr and the others still run;
the exit status is then 1 (0: every file classified; 2: a usage error, such as an unreadable checkpoint).
Folders are searched recursively for files ending in one of IMAGE_SUFFIXES.
"""
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from config import parse_config
from model import recipe
from model.export import Inference, Preprocessing, read_inference
from runtime import UsageError, available_cpus, check_option, limit_threads, run_main, usage_errors, why_no_gpu
from shards.image import Rejected, decoded_pixels, prepare

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")  # what a folder is searched for


@dataclass
class PredictConfig:
    checkpoint: str = "runs/alexnet/best.pt"  # train.py's checkpoint (full or weights only) or an exported .safetensors
    crops: Literal["ten", "center"] = "ten"  # ten: the paper's ten patches averaged; center: the central patch only
    top: int = 5  # classes listed per image
    json: bool = False  # one JSON object per image and line instead of text
    batch_size: int = 8  # images per forward pass (each is ten patches with --crops=ten)
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: the GPU when there is one (float32 either way)

    def __post_init__(self):  # ranges, checked when parsed
        check_option("top", self.top, self.top >= 1, "at least 1")
        check_option("batch_size", self.batch_size, self.batch_size >= 1, "at least 1")


@dataclass(frozen=True)
class Prepared:
    """One input file, ready for the network, or why it is not."""
    path: Path
    patches: np.ndarray | None  # (patches, 3, crop, crop) float32, mean subtracted
    converted: list[str]  # what was converted on the way (CMYK->RGB, EXIF orientation 6 applied, ...)
    error: str | None = None


def image_files(arguments: list[str]) -> list[Path]:
    """The files named, and the image files inside the folders named, in the order given (folders sorted)."""
    files = []
    for argument in arguments:
        path = Path(argument)
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            files.append(path)  # a missing file is reported with the others' results
    return files


def test_patches(centred: np.ndarray, crop: int, crops: str) -> np.ndarray:
    """The paper's test patches of a mean-subtracted (size, size, 3) image as (patches, 3, crop, crop): the centre
    one, or the four corners and the centre with their reflections (eval.py's ten, in another order)."""
    far = centred.shape[0] - crop
    middle = far // 2  # the pipelines' centre: crop_pos 0.5 of the 32 free pixels
    corners = [(middle, middle)] if crops == "center" else [(0, 0), (far, 0), (0, far), (far, far), (middle, middle)]
    windows = [centred[y:y + crop, x:x + crop] for x, y in corners]
    if crops == "ten":
        windows += [w[:, ::-1] for w in windows]
    return np.ascontiguousarray(np.stack(windows).transpose(0, 3, 1, 2))


def prepare_file(path: Path, preprocessing: Preprocessing, crops: str) -> Prepared:
    try:
        data = path.read_bytes()
        jpeg, converted = prepare(data, quality=preprocessing.jpeg_quality, size=preprocessing.size)
    except (OSError, Rejected) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        return Prepared(path, None, [], reason)
    centred = decoded_pixels(jpeg).astype(np.float32) - preprocessing.subtrahend()
    return Prepared(path, test_patches(centred, preprocessing.crop, crops), converted)


@torch.inference_mode()
def probabilities(network, batch: list[Prepared], numerics: recipe.Numerics) -> torch.Tensor:
    """[images, classes] softmax probabilities, averaged over each image's patches."""
    patches = torch.from_numpy(np.concatenate([p.patches for p in batch])).to(numerics.device)
    with numerics.autocast:
        per_patch = network(patches).float().softmax(dim=1)
    return per_patch.view(len(batch), -1, per_patch.shape[1]).mean(dim=1).cpu()


def ranked(probs: torch.Tensor, classes: list[dict], top: int) -> list[dict]:
    values, indices = probs.topk(min(top, len(classes)))
    return [{"index": int(i), "wnid": classes[i]["wnid"], "name": classes[i]["name"], "probability": float(v)}
            for v, i in zip(values.tolist(), indices.tolist())]


def report(prepared: Prepared, top: list[dict], as_json: bool) -> str:
    if as_json:
        return json.dumps({"file": str(prepared.path), "top": top, "converted": prepared.converted})
    note = f"  ({', '.join(prepared.converted)})" if prepared.converted else ""
    lines = [f"{prepared.path}{note}"]
    lines += [f"  {t['probability']:7.2%}  {t['wnid']}  {t['name']}" for t in top]
    return "\n".join(lines)


def predict(inference: Inference, files: list[Path], cfg: PredictConfig, numerics: recipe.Numerics) -> int:
    """Print every file's top classes (errors on stderr), in batches; the number of files not classified."""
    failed = 0
    for start in range(0, len(files), cfg.batch_size):
        prepared = [prepare_file(f, inference.preprocessing, cfg.crops) for f in files[start:start + cfg.batch_size]]
        for p in prepared:
            if p.error:
                text = f"error: {p.path}: {p.error}"
                print(json.dumps({"file": str(p.path), "error": p.error}) if cfg.json else text, file=sys.stderr,
                      flush=True)
        good = [p for p in prepared if p.error is None]
        failed += len(prepared) - len(good)
        if good:
            for p, probs in zip(good, probabilities(inference.network, good, numerics)):
                print(report(p, ranked(probs, inference.classes, cfg.top), cfg.json), flush=True)
    return failed


def main(argv: list[str]) -> None:
    arguments = []  # files and folders: the words that are no option's value, and all after `--`
    cfg = parse_config(PredictConfig, argv, description=__doc__, positional=arguments)
    if not arguments:
        raise UsageError("no image files or folders given: python predict.py --checkpoint=... photo.jpg photos/")
    limit_threads(available_cpus())
    cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device=cuda but torch sees no CUDA GPU: {why_no_gpu()}")
    numerics = recipe.numerics(torch.device("cuda" if cuda else "cpu"))  # float32, no TF32
    with usage_errors():
        inference = read_inference(cfg.checkpoint)
    inference.network.to(numerics.device)
    files = image_files(arguments)
    if not files:
        raise UsageError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in {', '.join(arguments)}")
    sys.exit(1 if predict(inference, files, cfg, numerics) else 0)


if __name__ == "__main__":
    run_main(main)
