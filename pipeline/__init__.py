"""DALI pipelines over the shards of docs/FORMAT.md, and the loaders a PyTorch loop iterates.

    import pipeline
    for images, labels in pipeline.train_loader("data/sample", 128, device="cuda", rank=r, world_size=n):
        ...

`pipeline/` reads only shard files, `manifest.json` and `stats.npz`; it imports nothing from `shards/` or `model/`.
Importing it does not import DALI: the loaders do, when first used, so that code which only reads a manifest, or
times train.py's training step on a synthetic batch, runs where DALI is not installed.
"""
from pipeline.data import read_manifest

LOADERS = ("train_loader", "eval_loader", "TrainLoader", "EvalLoader")


def __getattr__(name):
    if name in LOADERS:
        from pipeline import loader
        return getattr(loader, name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")


__all__ = ["read_manifest", *LOADERS]
