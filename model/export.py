"""What inference needs, beside the weights: the class list and the test preprocessing; the files that carry them.

    python -m model.export --checkpoint=runs/alexnet/best.pt                # -> runs/alexnet/best.safetensors
    python -m model.export --checkpoint=runs/alexnet/best.pt --onnx         # and runs/alexnet/best.onnx
    net = model.load_exported("runs/alexnet/best.safetensors")             # AlexNet, eval mode, on the CPU
    inference = read_inference("runs/alexnet/checkpoint.pt")              # network, classes, preprocessing

Every checkpoint train.py writes carries, beside its weights:

    "classes":       [{"index": 0, "wnid": "n01440764", "name": "tench, Tinca tinca"}, ...]   (the manifest's)
    "preprocessing": {"size": 256, "crop": 224, "jpeg_quality": 90, "resample": "LANCZOS", "mean": "pixel",
                      "mean_image": float32 tensor (256, 256, 3), RGB, 0-255, "rgb_mean": [r, g, b]}

that is, what the network was trained on: images whose shorter side was resized to `size` (LANCZOS, EXIF
orientation applied, any mode converted to RGB), the central size x size patch, stored as a JPEG of `jpeg_quality`
and decoded again, minus the training set's mean image ("pixel", the paper) or its RGB mean ("channel"). The test
input is a crop x crop patch of that: the centre one, or the ten patches of the paper's section 4.1 with their
softmax probabilities averaged.

The exported file is safetensors (tensors and strings, no pickle, so loading it runs no code): the network's
weights under their state-dict names, the mean image as `mean_image`, and in its metadata the architecture, the
class list and the preprocessing as JSON. Its weights are the paper's network (model/__init__.py), which
torchvision's `alexnet` is not: they do not load there.

With --onnx (the `onnx` extra: onnx, onnxscript; onnxruntime to check it) the network is also written as ONNX: input
`images` (N x 3 x crop x crop, mean subtracted), output `logits`, the same metadata in its metadata_props (the mean
image stays in the .safetensors file). Where onnxruntime is installed, its logits are checked against torch's.
"""
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save

from config import parse_config
from model import AlexNet
from runtime import UsageError, atomic_path, load_checkpoint, not_a_file, run_main, usage_errors, write_atomically

FORMAT = "alexnet-krizhevsky2012/1"  # the exported file's layout; a reader refuses any other
ARCHITECTURE = ("AlexNet of Krizhevsky, Sutskever & Hinton (NIPS 2012) as in model/__init__.py: two towers "
                "(groups=2 in conv2, conv4, conv5), local response normalisation after conv1 and conv2, 96 conv1 "
                "maps, conv1 padding 2 for a 224x224 input, 60,965,224 parameters with 1000 classes; not "
                "torchvision's alexnet (one tower, no LRN, 64 conv1 maps)")
RESAMPLE = "LANCZOS"  # shards/image.py's resampling of the central box
TEST_PATCHES = {"ten": "the four corner and the centre crop x crop patches and their reflections, softmax "
                       "probabilities averaged (the paper's section 4.1)",
                "center": "the central crop x crop patch"}
MEAN_IMAGE = "mean_image"  # the exported tensor holding the mean image
# What a weights-only file keeps of a checkpoint: everything but the optimiser, schedule, RNG and epoch sums.
WEIGHTS_ONLY_KEYS = ("model", "num_classes", "classes", "preprocessing", "epoch", "step", "config")


def inference_record(classes: list[dict], *, mean: str, mean_image: np.ndarray, rgb_mean: np.ndarray,
                     jpeg_quality: int, size: int, crop: int) -> dict:
    """The checkpoint's "classes" and "preprocessing" entries (see the module docstring)."""
    return {"classes": [{"index": c["index"], "wnid": c["wnid"], "name": c["name"]} for c in classes],
            "preprocessing": {"size": size, "crop": crop, "jpeg_quality": jpeg_quality, "resample": RESAMPLE,
                              "mean": mean, "mean_image": torch.as_tensor(np.asarray(mean_image, np.float32)),
                              "rgb_mean": [float(v) for v in rgb_mean]}}


def weights_only(checkpoint: dict, **extra) -> dict:
    """The part of a checkpoint that inference and --init need (about half its size: no momentum buffers)."""
    return {**{k: checkpoint[k] for k in WEIGHTS_ONLY_KEYS if k in checkpoint}, **extra}


@dataclass(frozen=True)
class Preprocessing:
    """The test preprocessing a network was trained for (see the module docstring)."""
    size: int  # px: shorter side resized to this, central size x size patch kept
    crop: int  # px: side of the network's input patch
    jpeg_quality: int  # the patch is stored as a JPEG of this quality and decoded again, as in the shards
    mean: str  # "pixel": minus mean_image (the paper); "channel": minus rgb_mean
    mean_image: np.ndarray  # (size, size, 3) float32, RGB, 0-255
    rgb_mean: np.ndarray  # (3,) float32, RGB, 0-255

    @classmethod
    def from_record(cls, record: dict) -> "Preprocessing":
        return cls(int(record["size"]), int(record["crop"]), int(record["jpeg_quality"]), record["mean"],
                   np.asarray(record["mean_image"], np.float32), np.asarray(record["rgb_mean"], np.float32))

    def subtrahend(self) -> np.ndarray:
        """What is subtracted from every decoded size x size image, (size, size, 3) float32."""
        if self.mean == "pixel":
            return self.mean_image
        return np.broadcast_to(self.rgb_mean, self.mean_image.shape)


@dataclass(frozen=True)
class Inference:
    """A network ready to classify, with what its outputs mean and what its inputs must be."""
    network: AlexNet  # eval mode, on the CPU
    classes: list[dict]  # index, wnid, name; index i is logit i
    preprocessing: Preprocessing


def network_from(state: dict, num_classes: int, path) -> AlexNet:
    network = AlexNet(num_classes=num_classes)
    try:
        network.load_state_dict(state)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"{path} holds another network ({' '.join(str(e).split())[:300]})") from None
    return network.eval()


def checkpoint_inference(checkpoint: dict, path: Path) -> Inference:
    if "classes" not in checkpoint or "preprocessing" not in checkpoint:
        raise ValueError(f"{path} carries no class list or mean image: it was written by a train.py before "
                         "checkpoints carried them (resuming its run writes them into the next checkpoint)")
    network = network_from(checkpoint["model"], checkpoint["num_classes"], path)
    return Inference(network, checkpoint["classes"], Preprocessing.from_record(checkpoint["preprocessing"]))


def exported_metadata(path: Path) -> dict:
    """The metadata of an exported file, the JSON entries decoded; ValueError when it is not one."""
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for damaged headers
        raise ValueError(f"{path} is not a safetensors file ({type(e).__name__}: {str(e)[:200]})") from None
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path} is not an exported AlexNet of format {FORMAT} (format: {metadata.get('format')})")
    return {**metadata, "num_classes": int(metadata["num_classes"]), "classes": json.loads(metadata["classes"]),
            "preprocessing": json.loads(metadata["preprocessing"])}


def read_exported_tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}


def read_exported(path: str | Path) -> Inference:
    path = Path(path)
    metadata = exported_metadata(path)
    tensors = read_exported_tensors(path)
    mean_image = tensors.pop(MEAN_IMAGE).numpy()
    network = network_from(tensors, metadata["num_classes"], path)
    preprocessing = Preprocessing.from_record({**metadata["preprocessing"], "mean_image": mean_image})
    return Inference(network, metadata["classes"], preprocessing)


def load_exported(path: str | Path) -> AlexNet:
    """The network of a file written by `python -m model.export`, in eval mode on the CPU (`.to(device)` moves it).
    Its class list and preprocessing: `read_inference(path)`."""
    return read_exported(path).network


def read_inference(path: str | Path) -> Inference:
    """Network, classes and preprocessing from an exported file (.safetensors) or a checkpoint of train.py (full or
    weights only); ValueError with a one-line reason when the file is none of these."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(not_a_file(path))
    return read_exported(path) if path.suffix == ".safetensors" else checkpoint_inference(load_checkpoint(path), path)


def read_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], list[dict] | None]:
    """(state dict, class list or None) of an exported file or a checkpoint: the weights --init starts from."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(not_a_file(path))
    if path.suffix == ".safetensors":
        classes = exported_metadata(path)["classes"]
        tensors = read_exported_tensors(path)
        tensors.pop(MEAN_IMAGE)
        return tensors, classes
    checkpoint = load_checkpoint(path)
    return checkpoint["model"], checkpoint.get("classes")


FC8 = "classifier.fc8."  # the output layer's parameters: another class list needs fresh ones


def start_from_weights(network: AlexNet, path: str | Path, classes: list[dict]) -> str:
    """Load the weights of `path` (a checkpoint or an exported file) into `network`, which a new run for `classes`
    has just initialised; fc8 keeps that initialisation where the class list differs from the one the weights were
    trained for (another number of classes, or other WNIDs in its rows). Returns what was done, for the log;
    ValueError (FileNotFoundError) when the file holds another network (is missing)."""
    state, trained_for = read_weights(path)
    rows = state[FC8 + "weight"].shape[0] if FC8 + "weight" in state else None
    wnids = [c["wnid"] for c in classes]
    same = rows == len(classes) and (trained_for is None or [c["wnid"] for c in trained_for] == wnids)
    if not same:
        state = {k: v for k, v in state.items() if not k.startswith(FC8)}
    try:
        missing, unexpected = network.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise ValueError(f"--init={path} holds another network ({' '.join(str(e).split())[:300]})") from None
    if unexpected or any(not k.startswith(FC8) for k in missing) or (same and missing):
        raise ValueError(f"--init={path} holds another network (missing {missing[:3]}, unexpected {unexpected[:3]})")
    fresh = "" if same else f"; fc8 fresh: this data's {len(classes)} classes, not the {rows} it was trained on"
    return f"starting from the weights of {path}{fresh}"


def export(inference: Inference, out: Path, source: dict) -> dict[str, str]:
    """Write `inference` as a safetensors file; `source` (strings) says where it came from. Returns its metadata."""
    record = inference.preprocessing
    preprocessing = {"size": record.size, "crop": record.crop, "jpeg_quality": record.jpeg_quality,
                     "resample": RESAMPLE, "mean": record.mean, "rgb_mean": record.rgb_mean.tolist(),
                     "mean_image": f"the tensor {MEAN_IMAGE!r}", "test": TEST_PATCHES}
    metadata = {"format": FORMAT, "architecture": ARCHITECTURE, "num_classes": str(len(inference.classes)),
                "classes": json.dumps(inference.classes), "preprocessing": json.dumps(preprocessing), **source}
    tensors = {name: t.detach().cpu().contiguous() for name, t in inference.network.state_dict().items()}
    tensors[MEAN_IMAGE] = torch.from_numpy(np.ascontiguousarray(record.mean_image, np.float32))
    write_atomically(out, save(tensors, metadata=metadata))
    return metadata


ONNX_TOLERANCE = 1e-4  # onnxruntime's logits may differ from torch's by this much of their largest magnitude


def export_onnx(network: AlexNet, out: Path, metadata: dict[str, str], crop: int) -> float | None:
    """Write `network` as ONNX (input "images", N x 3 x crop x crop; output "logits") with `metadata`. Where
    onnxruntime is installed, the largest difference between its logits and torch's on a random batch (ValueError
    beyond ONNX_TOLERANCE); None where it is not. ImportError without onnx and onnxscript."""
    example = torch.randn(2, 3, crop, crop) * 60  # about the spread of mean-subtracted pixels
    program = torch.onnx.export(network, (example,), input_names=["images"], output_names=["logits"], dynamo=True,
                                dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
    program.model.metadata_props.update(metadata)
    with atomic_path(out) as tmp:
        program.save(tmp)
    try:
        import onnxruntime
    except ImportError:
        return None
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = network(example).numpy()
    difference = float(np.abs(session.run(["logits"], {"images": example.numpy()})[0] - expected).max())
    if difference > ONNX_TOLERANCE * max(1.0, float(np.abs(expected).max())):
        raise ValueError(f"{out}: onnxruntime's logits differ from torch's by up to {difference:g}")
    return difference


@dataclass
class ExportConfig:
    checkpoint: str = "runs/alexnet/best.pt"  # a checkpoint of train.py (full or weights only, e.g. RUN/best.pt)
    out: str = ""  # the .safetensors file to write (default: the checkpoint's path with .safetensors)
    onnx: bool = False  # also write the network as ONNX beside it (.onnx; needs the onnx extra)


def main(argv: list[str]) -> None:
    cfg = parse_config(ExportConfig, argv, description=__doc__)
    source = Path(cfg.checkpoint)
    out = Path(cfg.out) if cfg.out else source.with_suffix(".safetensors")
    if source.suffix == ".safetensors" or out.suffix != ".safetensors":
        raise UsageError(f"--checkpoint={source} --out={out}: exports a checkpoint of train.py to a .safetensors file")
    if not source.is_file():
        raise UsageError(f"checkpoint {not_a_file(source)}")
    with usage_errors():
        checkpoint = load_checkpoint(source)
        inference = checkpoint_inference(checkpoint, source)
        metadata = export(inference, out, {"source": source.name, "epoch": str(checkpoint.get("epoch", "")),
                                           "step": str(checkpoint.get("step", ""))})
    print(f"wrote {out} ({out.stat().st_size / 1e6:.0f} MB): {len(inference.classes)} classes, "
          f"mean {inference.preprocessing.mean}; load with model.load_exported({str(out)!r})")
    if cfg.onnx:
        write_onnx(inference, out.with_suffix(".onnx"), metadata)


def write_onnx(inference: Inference, out: Path, metadata: dict[str, str]) -> None:
    try:
        with usage_errors():
            difference = export_onnx(inference.network, out, metadata, inference.preprocessing.crop)
    except ImportError as e:
        raise UsageError(f"--onnx needs onnx and onnxscript ({e}): install pyproject.toml's onnx extra") from None
    checked = ("not checked: onnxruntime is not installed" if difference is None
               else f"onnxruntime's logits within {difference:.2g} of torch's")
    print(f"wrote {out} ({out.stat().st_size / 1e6:.0f} MB; {checked})")


if __name__ == "__main__":
    run_main(main)
