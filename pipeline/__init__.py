"""DALI pipelines over the shards of docs/FORMAT.md, and the loaders a PyTorch loop iterates.

    from pipeline import train_loader, eval_loader
    for images, labels in train_loader("data/sample", 128, device="cuda", rank=r, world_size=n):
        ...

`pipeline/` reads only shard files, `manifest.json` and `stats.npz`; it imports nothing from `shards/` or `model/`.
"""
from pipeline.data import read_manifest
from pipeline.loader import Loader, eval_loader, train_loader

__all__ = ["train_loader", "eval_loader", "read_manifest", "Loader"]
