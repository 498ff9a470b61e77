"""DALI pipelines over the shards of docs/FORMAT.md, and the loaders a PyTorch loop iterates.

    import pipeline
    output = pipeline.Output(device="cuda", channels_last=True)
    for images, labels in pipeline.train_loader("data/sample", 128, rank=r, world_size=n, output=output):
        ...

`pipeline/` reads only shard files, `manifest.json` and `stats.npz`; it imports nothing from `shards/` or `model/`
(the format's details come from `shardformat.py`, as the writer's do). Importing it does not import DALI: the
loaders do, when first used, so that code which only reads a manifest, or times train.py's training step on a
synthetic batch, runs where DALI is not installed.
"""
from pipeline.data import DataError, dataset_identity
from pipeline.options import Output, Reading
from shardformat import read_manifest

LOADERS = ("train_loader", "eval_loader", "TrainLoader", "EvalLoader")
FAULTS = ("BadSample", "BadSampleError")  # pipeline/faults.py (it imports DALI when it decodes, not before)
DALI_MISSING = ("NVIDIA DALI is not installed in this environment: `make setup` installs it, or "
                "pip install -e '.[cuda130]' ('.[cuda120]' for a driver that supports only CUDA 12)")


def __getattr__(name):
    if name in LOADERS:
        try:
            from pipeline import loader
        except ModuleNotFoundError as e:
            if not (e.name or "").startswith("nvidia"):
                raise
            raise ModuleNotFoundError(DALI_MISSING, name=e.name) from None
        return getattr(loader, name)
    if name in FAULTS:
        from pipeline import faults
        return getattr(faults, name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")


__all__ = ["DataError", "dataset_identity", "read_manifest", "Output", "Reading", *LOADERS, *FAULTS]
