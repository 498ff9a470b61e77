r"""Ten-crop evaluation of a checkpoint written by train.py, next to the paper's numbers.

    python eval.py --data=data/sample --checkpoint=runs/demo/checkpoint.pt
    torchrun --nproc_per_node=8 eval.py --data=/scratch/imagenet-shards --checkpoint=runs/alexnet/checkpoint.pt \
        --batch_size=512                                    # global, as in train.py: 64 images per GPU

Ten-crop as in the paper's §4.1: the four corner patches and the centre patch, each also reflected; the network's
softmax probabilities (not its logits) are averaged over the ten patches, then ranked. The centre-crop result is
measured in the same run with the centre-crop pipeline. Writes `<checkpoint dir>/eval-<split>.json`.
A JPEG that does not decode ends the pass with status 65 and one line naming its shard and key, as in train.py.
"""
import json
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist

from config import parse_config, save_config
from model import AlexNet, recipe
from model.export import network_from
import pipeline
from pipeline import DataError
from progress import DEFAULT_INTERVAL_S, progress_bar
from runtime import (EXIT_BAD_SAMPLE, TOP_K, Rank, UsageError, check_option, join_ranks, leave_ranks, limit_threads,
                     load_checkpoint, not_a_file, run_main, shard_path, topk_correct, usage_errors)
from shardformat import read_manifest

# The paper's single-network results (top-1 %, top-5 %): Table 1 and §6.
PAPER_RESULTS = [
    ("ILSVRC-2010 test, ten patches (Table 1)", 37.5, 17.0),
    ("ILSVRC-2010 test, without ten-patch averaging", 39.0, 18.3),
    ("ILSVRC-2012 val, 1 CNN (Table 2)", 40.7, 18.2),
]


@dataclass
class EvalConfig:
    data: str = "data/sample"  # shard directory written by `make shards`
    checkpoint: str = "runs/demo/checkpoint.pt"  # checkpoint written by train.py
    split: str = "val"  # split to evaluate: val, or test when the shards have one
    batch_size: int = 64  # images per batch, summed over all ranks as in train.py (each expands to ten patches)
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: the GPU when there is one
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"  # GPU autocast dtype (float32: no TF32; CPU: float32)
    num_threads: int = 0  # DALI CPU threads per rank (0: all this process may use)
    storage: Literal["local", "network"] = "local"  # where DATA lives: network = Lustre/GPFS/NFS (DALI I/O options)
    save_predictions: bool = False  # also write per-image top-5 predictions and per-class accuracy
    progress_interval: float = DEFAULT_INTERVAL_S  # seconds between progress lines when the output is not a terminal

    def __post_init__(self):  # ranges, checked when parsed
        check_option("batch_size", self.batch_size, self.batch_size >= 1, "at least 1")
        check_option("num_threads", self.num_threads, self.num_threads >= 0, ">= 0 (0: all this process may use)")
        check_option("progress_interval", self.progress_interval, self.progress_interval >= 0,
                     ">= 0 seconds (0: a line at every update)")



# ---------------------------------------------------------------------------------------------------- scoring
def ten_crop_probabilities(model, patches: torch.Tensor) -> torch.Tensor:
    """[B, P, 3, H, W] patches -> [B, classes] softmax probabilities averaged over the P patches."""
    batch, num_patches = patches.shape[:2]
    logits = model(patches.flatten(0, 1))  # float32 even under autocast: fc8 computes in float32
    return logits.softmax(dim=1).view(batch, num_patches, -1).mean(dim=1)


def error_percent(correct: int, n: int) -> float:
    return 100.0 * (1 - correct / n)


# ---------------------------------------------------------------------------------------------------- setup
def load_model(path: Path, classes: list[dict], device: torch.device) -> AlexNet:
    """The network of a train.py checkpoint, refused unless it was trained on `classes` (the shards' list)."""
    if not path.is_file():
        raise UsageError(f"checkpoint {not_a_file(path)}")
    with usage_errors():
        checkpoint = load_checkpoint(path)  # refuses a file that would run code when loaded
    num_classes = len(classes)
    if checkpoint.get("num_classes") != num_classes:
        raise UsageError(f"checkpoint {path} has {checkpoint.get('num_classes')} classes but the shards have "
                         f"{num_classes}")
    trained = [c["wnid"] for c in checkpoint.get("classes", classes)]  # older checkpoints carry no list
    differ = [(i, a, c["wnid"]) for i, (a, c) in enumerate(zip(trained, classes)) if a != c["wnid"]]
    if differ:
        index, there, here = differ[0]
        raise UsageError(f"checkpoint {path} was trained on other classes than the shards': {len(differ)} of "
                         f"{num_classes} differ (class {index}: {there} there, {here} here), so its scores would be "
                         "meaningless")
    with usage_errors():
        return network_from(checkpoint["model"], num_classes, path).to(device)


def split_keys(data: Path, manifest: dict, split: str) -> dict[int, str]:
    """Sample position (the `.pos` member, docs/FORMAT.md) -> key (the source file's stem), over the split."""
    keys = {}
    for shard in manifest["splits"][split]["shards"]:
        with tarfile.open(shard_path(data, shard["file"])) as tar:  # members are read, never extracted
            for member in tar:
                key, _, ext = member.name.partition(".")
                if ext == "pos":
                    keys[int(np.frombuffer(tar.extractfile(member).read(), "<i4")[0])] = key
    return keys


# ---------------------------------------------------------------------------------------------------- the pass
@torch.inference_mode()
def score_split(model, loader, numerics: recipe.Numerics, keep_predictions: bool, bar=None):
    """Top-k correct counts over this rank's samples, and (optionally) each sample's top-5 predictions; `bar`
    (progress.progress_bar), if given, advances by the images of each batch."""
    device = numerics.device
    correct = torch.zeros(len(TOP_K), dtype=torch.int64, device=device)
    count = torch.zeros((), dtype=torch.int64, device=device)
    predictions = []
    for images, labels, index in loader:
        with numerics.autocast:
            if images.dim() == 5:
                scores = ten_crop_probabilities(model, images)
            else:
                scores = model(images)
        correct += topk_correct(scores, labels)
        count += labels.numel()
        if keep_predictions:
            top5 = scores.topk(min(5, scores.shape[1]), dim=1).indices.cpu()
            predictions += [(int(i), int(y), p.tolist()) for i, y, p in zip(index, labels.cpu(), top5)]
        if bar:
            bar.update(len(labels))
    return correct, count, predictions


def reduce_results(correct, count, predictions, world_size):
    """Exact totals over ranks: every real sample counted once, padding never reached this point."""
    if world_size > 1:
        dist.all_reduce(correct)
        dist.all_reduce(count)
        gathered = [None] * world_size
        dist.all_gather_object(gathered, predictions)
        predictions = [p for part in gathered for p in part]
    n = int(count)
    errors = {f"top{k}_err": error_percent(int(c), n) for k, c in zip(TOP_K, correct.tolist())}
    return n, errors, sorted(predictions)


def per_class_accuracy(predictions, classes) -> list[dict]:
    seen = [0] * len(classes)
    top1 = [0] * len(classes)
    for _, label, top5 in predictions:
        seen[label] += 1
        top1[label] += top5[0] == label
    return [{"index": c["index"], "wnid": c["wnid"], "name": c["name"], "n": seen[i],
             "top1_acc": 100.0 * top1[i] / seen[i] if seen[i] else None} for i, c in enumerate(classes)]


def results_table(result: dict) -> str:
    ten, center = result["ten_crop"], result["center"]
    lines = [f"{'':54s} {'top-1 err':>9s} {'top-5 err':>9s}",
             f"{'this run, ' + result['split'] + ', ten patches':54s} {ten['top1_err']:8.1f}% {ten['top5_err']:8.1f}%",
             f"{'this run, ' + result['split'] + ', centre patch':54s} {center['top1_err']:8.1f}% "
             f"{center['top5_err']:8.1f}%"]
    lines += [f"{'paper: ' + name:54s} {t1:8.1f}% {t5:8.1f}%" for name, t1, t5 in PAPER_RESULTS]
    lines.append(f"({result['n']} images, {result['seconds']:.1f} s)")
    return "\n".join(lines)


def split_loader(cfg: EvalConfig, rank: Rank, numerics: recipe.Numerics, crops: str):
    """This rank's loader of cfg.split with `crops` ("ten" or "center"), each sample's position included."""
    with usage_errors():  # a manifest the user must fix (e.g. a shard path outside DATA)
        return pipeline.eval_loader(
            cfg.data, cfg.split, crops, cfg.batch_size, rank=rank.rank, world_size=rank.world_size,
            output=pipeline.Output(**numerics.loader_output, with_index=True),
            reading=pipeline.Reading(num_threads=cfg.num_threads or rank.cpus, storage=cfg.storage))


def evaluate_crops(model, cfg: EvalConfig, rank: Rank, numerics: recipe.Numerics, crops: str,
                   keep_predictions: bool):
    """One pass over the split with `crops` ("ten" or "center"): (images, errors, predictions), totalled over ranks."""
    loader = split_loader(cfg, rank, numerics, crops)
    shown = f" (rank 0 of {rank.world_size})" if rank.world_size > 1 else ""
    try:
        with progress_bar(loader.num_samples, f"{crops}-crop {cfg.split}{shown}", unit="img", enabled=rank.is_main,
                          interval_s=cfg.progress_interval) as bar:
            correct, count, predictions = score_split(model, loader, numerics, keep_predictions, bar)
    except pipeline.BadSampleError as e:  # this rank's own: it ends now, torchrun stops the others
        print(e, file=sys.stderr, flush=True)
        sys.exit(EXIT_BAD_SAMPLE)
    except DataError as e:
        raise UsageError(str(e)) from None
    return reduce_results(correct, count, predictions, rank.world_size)


def main(argv):
    cfg = parse_config(EvalConfig, argv, description=__doc__)
    data, checkpoint_path = Path(cfg.data), Path(cfg.checkpoint)
    with usage_errors():
        manifest = read_manifest(data)
    if cfg.split not in manifest["splits"]:
        raise UsageError(f"split {cfg.split!r} is not in {data}: it has {', '.join(manifest['splits'])}")
    rank = join_ranks(cfg.device)
    if cfg.batch_size % rank.world_size:
        raise UsageError(f"--batch_size={cfg.batch_size} does not split evenly over {rank.world_size} ranks")
    numerics = recipe.numerics(rank.device, cfg.dtype)  # as in train.py: --dtype=float32 means float32, no TF32
    limit_threads(rank.cpus)
    model = load_model(checkpoint_path, manifest["classes"], rank.device)

    start = time.perf_counter()
    result = {"split": cfg.split, "checkpoint": str(checkpoint_path), "world_size": rank.world_size}
    result["n"], result["ten_crop"], predictions = evaluate_crops(model, cfg, rank, numerics, "ten",
                                                                   cfg.save_predictions)
    _, result["center"], _ = evaluate_crops(model, cfg, rank, numerics, "center", False)
    result["seconds"] = time.perf_counter() - start
    if result["n"] != manifest["splits"][cfg.split]["num_samples"]:
        raise RuntimeError(f"evaluated {result['n']} images but the manifest lists "
                           f"{manifest['splits'][cfg.split]['num_samples']}")

    if rank.is_main:
        out_dir = checkpoint_path.parent
        (out_dir / f"eval-{cfg.split}.json").write_text(json.dumps(result, indent=2) + "\n")
        save_config(cfg, out_dir / f"eval-{cfg.split}-config.json")
        if cfg.save_predictions:
            write_predictions(out_dir, cfg.split, data, manifest, predictions)
        print(results_table(result))
        print(f"wrote {out_dir / f'eval-{cfg.split}.json'}")
    leave_ranks()


def write_predictions(out_dir: Path, split: str, data: Path, manifest: dict, predictions) -> None:
    classes = manifest["classes"]
    keys = split_keys(data, manifest, split)
    rows = [{"key": keys[i], "label": classes[y]["wnid"], "top5": [classes[p]["wnid"] for p in top5]}
            for i, y, top5 in predictions]
    (out_dir / f"predictions-{split}.json").write_text(json.dumps(rows) + "\n")
    per_class = per_class_accuracy(predictions, classes)
    (out_dir / f"per-class-{split}.json").write_text(json.dumps(per_class, indent=1) + "\n")
    print(f"wrote {out_dir / f'predictions-{split}.json'} and per-class-{split}.json")


if __name__ == "__main__":
    run_main(main)
