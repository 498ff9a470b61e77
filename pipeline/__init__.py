"""DALI pipelines over the shards of docs/FORMAT.md, and the loaders a PyTorch loop iterates.

    import pipeline
    output = pipeline.Output(device="cuda", channels_last=True)
    for images, labels in pipeline.train_loader("data/sample", 128, rank=r, world_size=n, output=output):
        ...

`pipeline/` reads only shard files, `manifest.json` and `stats.npz`; it imports nothing from `shards/` or `model/`.
Importing it does not import DALI: the loaders do, when first used, so that code which only reads a manifest, or
times train.py's training step on a synthetic batch, runs where DALI is not installed.
"""
from pipeline.data import read_manifest
from pipeline.options import Output, Reading

LOADERS = ("train_loader", "eval_loader", "TrainLoader", "EvalLoader")


def __getattr__(name):
    if name in LOADERS:
        from pipeline import loader
        return getattr(loader, name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")


__all__ = ["read_manifest", "Output", "Reading", *LOADERS]
