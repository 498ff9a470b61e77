"""PyTorch-facing loaders: `for images, labels in loader:` and nothing else to know.

A loader runs one DALI pipeline for one rank. It knows how many batches an epoch has (`len(loader)`), starts a
new epoch each time it is iterated, and hides DALI's outputs, padding and resets:

- Each rank reads the samples [N*r//n, N*(r+1)//n) of the split (DALI's `shard_id`/`num_shards`), always the
  same ones (`stick_to_shard`); training shuffles them anew every epoch through the reader's buffer.
- Last batch: *partial*, never dropped and never padded. Every sample of the rank is yielded exactly once per
  epoch, so across ranks every sample of the split is seen exactly once, in training as in evaluation.
  `len(loader) == ceil(num_samples / batch_size)`; the last batch holds `num_samples - (len-1)*batch_size`
  samples. DALI fills that batch up by repeating the rank's last sample; those copies are cut off here and
  never reach the caller (the `.pos` of each sample is checked, too).
- Rank shares differ by at most one sample, so with several ranks `len()` can differ by one between ranks
  (only when ceil(N/n) % batch_size == 1). A DDP training loop that must step in lockstep wraps its epoch in
  `model.join()` (torch.nn.parallel.DistributedDataParallel) for that case.
- Breaking out of a loop and iterating again starts a new epoch: the rest of the old one is read and discarded.
"""
import math

import numpy as np
import torch

from pipeline import pipelines
from runtime import available_cpus
from pipeline.data import find_bad_sample, read_manifest, read_split, read_stats, rank_range

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class Loader:
    """Iterable of `(images, labels)` for one rank; see the module docstring for the epoch contract."""

    def __init__(self, pipe, *, split, num_samples: int, batch_size: int, num_classes: int,
                 device: torch.device, dtype: str, channels_last: bool, with_index: bool = False):
        self.pipe = pipe
        self.split = split  # data.Split: shard paths, for error messages
        self.num_samples = num_samples  # real samples this rank yields per epoch
        self.batch_size = batch_size
        self.num_classes = num_classes
        self.device = device
        self.dtype = dtype  # what the caller gets (bfloat16 is made from DALI's float32 on the device)
        self.channels_last = channels_last
        self.with_index = with_index
        self.epoch = 0  # epochs started
        self._left = 0  # batches of the current epoch not yet read from the pipeline
        self._built = False

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.batch_size)

    def __iter__(self):
        if not self._built:
            self._run(self.pipe.build)
            self._built = True
        self._drain()  # an abandoned epoch: read its rest so that this one starts on its first sample
        self.epoch += 1
        self._left = self._reader_batches()
        for step in range(len(self)):
            images, labels, index = self._run(self.pipe.run)
            self._left -= 1
            keep = min(self.batch_size, self.num_samples - step * self.batch_size)
            yield self._batch(images, labels, index, keep)
        self._drain()

    def _reader_batches(self) -> int:
        """Batches the reader delivers per epoch: DALI pads every rank to the largest rank's batch count."""
        meta = self.pipe.reader_meta(pipelines.READER)
        batches = math.ceil(meta["epoch_size_padded"] // meta["number_of_shards"] / self.batch_size)
        assert batches >= len(self), meta
        return batches

    def _drain(self):
        """Read and drop the batches left in the current epoch (DALI's padding, or what a `break` left)."""
        while self._left:
            self._left -= 1
            self._run(self.pipe.run)

    def _run(self, call):
        try:
            return call()
        except RuntimeError as e:
            shards = self.split.tars
            where = find_bad_sample(shards, self.split.indexes)
            if where is None:
                where = shards[0] if len(shards) == 1 else f"{shards[0]} ... {shards[-1]} ({len(shards)} shards)"
            raise RuntimeError(f"reading split {self.split.name!r}: {where}: {e}") from e

    def _batch(self, images, labels, index, keep):
        index = torch.from_dlpack(index.as_tensor()).to(torch.int64)[:keep]
        if not bool(((index >= 0) & (index < self.split.num_inputs)).all()):
            raise RuntimeError(f"split {self.split.name!r}: sample positions {index.tolist()} outside "
                               f"0..{self.split.num_inputs - 1}: the shards' .pos members do not match the manifest")
        # Zero-copy: with DALI's dynamic executor each output batch is a buffer of its own that lives as long as
        # the torch tensor viewing it (DLPack), so no copy is needed to hand it over safely. On a GPU, DLPack
        # makes torch's current stream wait for DALI's.
        with torch.device(self.device):
            images, labels = torch.from_dlpack(images.as_tensor())[:keep], torch.from_dlpack(labels.as_tensor())[:keep]
        if self.dtype == "bfloat16":
            images = images.to(torch.bfloat16)
        if self.channels_last:  # DALI wrote HWC: the NCHW view of it is channels-last in memory
            images = images.movedim(-1, -3)
        return (images, labels, index) if self.with_index else (images, labels)


def _device(device) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device}: expected cpu or cuda")
    return device


def _dtype(dtype, device) -> str:
    if dtype is None:
        return "bfloat16" if device.type == "cuda" else "float32"
    if dtype not in TORCH_DTYPES:
        raise ValueError(f"dtype {dtype!r}: expected one of {', '.join(TORCH_DTYPES)}")
    if device.type == "cpu" and dtype != "float32":
        raise ValueError(f"dtype {dtype}: CPU output is always float32")
    return dtype


def _seeds(seed: int, rank: int) -> tuple[int, int]:
    """Independent (augmentation, shuffling) seeds per (seed, rank), so ranks do not draw the same crops."""
    a, b = np.random.SeedSequence([seed, rank]).generate_state(2)
    return int(a % 2**31), int(b % 2**31)


def _make(kind, data, split, batch_size, *, device, rank, world_size, seed, dtype, channels_last, num_threads,
          prefetch, mean, dont_use_mmap, read_ahead, with_index=False, **options):
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside 0..{world_size - 1}")
    if mean not in ("pixel", "channel"):
        raise ValueError(f"mean {mean!r}: expected 'pixel' or 'channel'")
    device = _device(device)
    dtype = _dtype(dtype, device)
    manifest = read_manifest(data)
    stats = read_stats(data, manifest)
    shards = read_split(data, split, manifest)
    begin, end = rank_range(shards.num_samples, rank, world_size)
    if end == begin:
        raise ValueError(f"split {split!r} has {shards.num_samples} samples: too few for {world_size} ranks")
    pipe_seed, reader_seed = _seeds(seed, rank)
    gpu = device.type == "cuda"
    extra = {}
    if kind is pipelines.train:
        extra = dict(reader_seed=reader_seed, eigval=stats.pca_eigval, eigvec=stats.pca_eigvec)
    pipe = kind(shards.tars, shards.indexes, shard_id=rank, num_shards=world_size, mean_image=stats.mean_image,
                rgb_mean=stats.rgb_mean, mean=mean, dont_use_mmap=dont_use_mmap, read_ahead=read_ahead, gpu=gpu,
                dtype="float16" if dtype == "float16" else "float32", channels_last=channels_last, **extra,
                **options, batch_size=batch_size, num_threads=num_threads or available_cpus(),
                device_id=device.index if gpu else None, seed=pipe_seed, prefetch_queue_depth=prefetch,
                exec_dynamic=True)
    return Loader(pipe, split=shards, num_samples=end - begin, batch_size=batch_size,
                  num_classes=len(manifest["classes"]), device=device, dtype=dtype, channels_last=channels_last,
                  with_index=with_index)


def train_loader(data, batch_size: int, *, device="cpu", rank: int = 0, world_size: int = 1, seed: int = 0,
                 lighting: float = 0.1, mean: str = "pixel", dtype: str | None = None, channels_last: bool = False,
                 num_threads: int | None = None, shuffle_buffer: int = 4096, prefetch: int = 2,
                 dont_use_mmap: bool = False, read_ahead: bool = False, split: str = "train",
                 with_index: bool = False) -> Loader:
    """Augmented training batches of this rank's share of `split`: images [B,3,224,224], labels int64 [B].

    data: the DATA directory (docs/FORMAT.md); batch_size: images per step on this rank.
    device: "cpu" or "cuda"/"cuda:N" (plain "cuda" = the current device, i.e. the local rank under DDP).
    lighting: sigma of the PCA lighting's alpha (0 turns it off). mean: "pixel" (the paper) or "channel".
    dtype: "float32" | "float16" | "bfloat16" (default bfloat16 on a GPU; always float32 on the CPU).
    channels_last: NCHW shape with channels-last memory. num_threads: DALI CPU threads (default: all this
    process may use). shuffle_buffer: samples in the reader's shuffle buffer. prefetch: batches queued ahead.
    dont_use_mmap / read_ahead: DALI reader I/O options for network filesystems (Lustre, GPFS).
    with_index: also yield each sample's position in the split (int64 [B], on the CPU).
    """
    if lighting < 0:
        raise ValueError(f"lighting {lighting}: sigma must be >= 0 (0 turns lighting off)")
    return _make(pipelines.train, data, split, batch_size, device=device, rank=rank, world_size=world_size,
                 seed=seed, dtype=dtype, channels_last=channels_last, num_threads=num_threads, prefetch=prefetch,
                 mean=mean, dont_use_mmap=dont_use_mmap, read_ahead=read_ahead, with_index=with_index,
                 lighting=float(lighting), shuffle_buffer=shuffle_buffer)


def eval_loader(data, split: str = "val", crops: str = "center", batch_size: int = 128, *, device="cpu",
                rank: int = 0, world_size: int = 1, mean: str = "pixel", dtype: str | None = None,
                channels_last: bool = False, num_threads: int | None = None, prefetch: int = 2,
                dont_use_mmap: bool = False, read_ahead: bool = False, with_index: bool = False) -> Loader:
    """Every real sample of this rank's share of `split` once per epoch, in shard order, never padding.

    crops: "center" -> images [B,3,224,224]; "ten" -> [B,10,3,224,224] in the order of
    `pipelines.TEN_CROP_ORDER`, then the same five reflected. with_index: also yield each sample's position in
    the split (int64 [B], on the CPU), to map predictions back to files. Other arguments as in `train_loader`.
    """
    kinds = {"center": pipelines.center, "ten": pipelines.ten_crop}
    if crops not in kinds:
        raise ValueError(f"crops {crops!r}: expected 'center' or 'ten'")
    return _make(kinds[crops], data, split, batch_size, device=device, rank=rank, world_size=world_size, seed=0,
                 dtype=dtype, channels_last=channels_last, num_threads=num_threads, prefetch=prefetch, mean=mean,
                 dont_use_mmap=dont_use_mmap, read_ahead=read_ahead, with_index=with_index)


__all__ = ["Loader", "train_loader", "eval_loader"]
