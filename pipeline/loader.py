"""PyTorch-facing loaders: `for images, labels in loader:` and nothing else to know.

A loader runs one DALI pipeline for one rank; each `for` over it is one epoch, and `len(loader)` is the number
of batches that `for` yields.

Training (`train_loader`, see order.py): every epoch a fresh permutation of the whole split, drawn from
(seed, epoch); global step s takes the samples [s*B, (s+1)*B) of it (B = the global `batch_size`) and rank r of
n takes its part [r*B/n, (r+1)*B/n), so the global batches are the same on any number of ranks. An epoch has
N // B steps; the N % B samples left over at the end of each epoch's permutation (a different random set every
epoch) are not used in that epoch. `train_loader(..., epoch=e, start_step=s)` starts directly at global step s of
epoch e (nothing before it is read), which is how a stopped run resumes, on any number of ranks. Breaking out of
a `for` and iterating again starts the next epoch at its first step (the pipeline is rebuilt there, about a
second; the rest of the abandoned epoch is not read).

Evaluation (`eval_loader`): every real sample of the rank's share [N*r//n, N*(r+1)//n) exactly once per epoch,
in shard order. The last batch is partial, never padded: DALI fills it up by repeating the rank's last sample;
those copies are cut off here and never reach the caller, so across ranks every sample is counted once.
`len(loader) == ceil(num_samples / batch_size)`, which can differ by one between ranks.

Every batch's `.pos` values are checked against the split, and batches are handed to torch without a copy
(DLPack): with DALI's dynamic executor each output batch is a buffer of its own, so keeping a batch is safe.
"""
import math

import torch

from pipeline import pipelines
from pipeline.data import find_bad_sample, read_manifest, read_split, read_stats, rank_range
from pipeline.order import GlobalOrder, TrainSource, read_table
from runtime import available_cpus

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class Loader:
    """What both loaders share: running the pipeline and handing its outputs to torch."""

    def __init__(self, *, split, batch_size: int, device: torch.device, dtype: str, channels_last: bool,
                 with_index: bool):
        self.split = split  # data.Split: shard paths, for error messages
        self.batch_size = batch_size  # samples per batch of this rank
        self.device = device
        self.dtype = dtype  # what the caller gets (bfloat16 is made from DALI's float32 on the device)
        self.channels_last = channels_last
        self.with_index = with_index

    def _run(self, pipe):
        """One batch; on a GPU bound to torch's current stream, so that nothing waits on the host."""
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        try:
            return pipe.run(stream)
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
        with torch.device(self.device):
            images, labels = torch.from_dlpack(images.as_tensor())[:keep], torch.from_dlpack(labels.as_tensor())[:keep]
        if self.dtype == "bfloat16":
            images = images.to(torch.bfloat16)
        if self.channels_last:  # DALI wrote HWC: the NCHW view of it is channels-last in memory
            images = images.movedim(-1, -3)
        return (images, labels, index) if self.with_index else (images, labels)


class TrainLoader(Loader):
    """Training batches of one rank in the global order (module docstring); `epoch` and `step` say where the next
    batch comes from."""

    def __init__(self, make_pipe, order: GlobalOrder, *, epoch: int, step: int, **batch_options):
        super().__init__(batch_size=order.per_rank, **batch_options)
        self.make_pipe = make_pipe  # first global step (counted from epoch 0) -> an unbuilt pipeline
        self.order = order
        self.epoch, self.step = epoch, step
        self._pipe = None
        self._in_epoch = False  # a `for` is under way (or was abandoned)

    def __len__(self) -> int:
        if self._in_epoch:  # during a `for`, or after one left early: the next `for` is a whole epoch
            return self.order.steps_per_epoch
        return self.order.steps_per_epoch - self.step

    def __iter__(self):
        if self._in_epoch:  # the last `for` was left early: the pipeline is ahead of it, so start afresh
            self.epoch, self.step, self._pipe = self.epoch + 1, 0, None
        if self._pipe is None:
            self._pipe = self.make_pipe(self.epoch * self.order.steps_per_epoch + self.step)
            self._pipe.build()
        self._in_epoch = True
        while self.step < self.order.steps_per_epoch:
            images, labels, index = self._run(self._pipe)
            self.step += 1
            yield self._batch(images, labels, index, self.batch_size)
        self.epoch, self.step, self._in_epoch = self.epoch + 1, 0, False


class EvalLoader(Loader):
    """Every real sample of one rank's share of a split, once per epoch, in shard order (module docstring)."""

    def __init__(self, pipe, *, num_samples: int, **batch_options):
        super().__init__(**batch_options)
        self.pipe = pipe
        self.pipe.build()
        self.num_samples = num_samples  # real samples this rank yields per epoch
        self._left = 0  # batches of the current epoch not yet read from the pipeline

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.batch_size)

    def __iter__(self):
        self._drain()  # an abandoned epoch: read its rest so that this one starts on its first sample
        self._left = self._reader_batches()
        for step in range(len(self)):
            images, labels, index = self._run(self.pipe)
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
            self._run(self.pipe)


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


def _check(rank, world_size, mean):
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside 0..{world_size - 1}")
    if mean not in ("pixel", "channel"):
        raise ValueError(f"mean {mean!r}: expected 'pixel' or 'channel'")


def _pipeline_options(device, batch_size, num_threads, prefetch):
    return dict(batch_size=batch_size, num_threads=num_threads or available_cpus(), prefetch_queue_depth=prefetch,
                device_id=device.index if device.type == "cuda" else None, exec_dynamic=True)


def default_reader_workers(device: torch.device) -> int:
    """Processes reading training samples beside DALI. 0 on a CPU: there the source's ~13 us per sample in the
    calling thread cost less than handing samples over from other processes. A few on a GPU, where the calling
    thread also drives the training step and tens of thousands of samples per second are read."""
    return 0 if device.type == "cpu" else 4


def train_loader(data, batch_size: int, *, device="cpu", rank: int = 0, world_size: int = 1, seed: int = 0,
                 epoch: int = 0, start_step: int = 0, steps_per_epoch: int = 0, lighting: float = 0.1,
                 mean: str = "pixel", dtype: str | None = None, channels_last: bool = False,
                 num_threads: int | None = None, reader_workers: int | None = None, prefetch: int = 2,
                 hw_decoder_load: float | None = None, split: str = "train", with_index: bool = False) -> TrainLoader:
    """Augmented training batches of this rank: images [batch_size/world_size, 3, 224, 224], labels int64.

    data: the DATA directory (docs/FORMAT.md). batch_size: the global batch, summed over the world_size ranks.
    device: "cpu" or "cuda"/"cuda:N" (plain "cuda" = the current device, i.e. the local rank under DDP).
    seed: the run's seed; the order and augmentation of epoch e are drawn from (seed, e).
    epoch, start_step: where the first `for` starts (a resumed run); the following ones take the next epochs.
    steps_per_epoch: stop every epoch after this many global steps (0: all N // batch_size).
    lighting: sigma of the PCA lighting's alpha (0 turns it off). mean: "pixel" (the paper) or "channel".
    dtype: "float32" | "float16" | "bfloat16" (default bfloat16 on a GPU; always float32 on the CPU).
    channels_last: NCHW shape with channels-last memory. num_threads: DALI CPU threads (default: all this
    process may use). reader_workers: processes that read samples (default: default_reader_workers).
    prefetch: batches queued ahead. hw_decoder_load: share of a GPU batch for the hardware JPEG decoder.
    with_index: also yield each sample's position in the split (int64 [B], on the CPU).
    """
    _check(rank, world_size, mean)
    if lighting < 0:
        raise ValueError(f"lighting {lighting}: sigma must be >= 0 (0 turns lighting off)")
    device = _device(device)
    dtype = _dtype(dtype, device)
    manifest = read_manifest(data)
    stats = read_stats(data, manifest)
    shards = read_split(data, split, manifest)
    table = read_table(shards.tars, shards.indexes)
    if len(table) != shards.num_samples:
        raise ValueError(f"split {split!r}: the shard indexes list {len(table)} samples, the manifest "
                         f"{shards.num_samples}")
    order = GlobalOrder(len(table), batch_size, world_size, rank, seed, float(lighting), steps_per_epoch)
    if not 0 <= start_step < order.steps_per_epoch:
        raise ValueError(f"start_step {start_step} outside 0..{order.steps_per_epoch - 1}")
    workers = default_reader_workers(device) if reader_workers is None else reader_workers
    gpu = device.type == "cuda"

    def make_pipe(first_step: int):
        # In this process the source's batches are read by DALI in place for up to `prefetch` iterations; from
        # worker processes they arrive copied into shared memory.
        source = TrainSource(order, table, first_step, eigval=stats.pca_eigval, eigvec=stats.pca_eigvec,
                             rgb_mean=stats.rgb_mean if mean == "channel" else None,
                             keep_batches=0 if workers else prefetch + 2)
        # Spawned, not forked: a fork would copy this process's threads' state (CUDA, DALI, torch) mid-flight.
        workers_options = dict(py_num_workers=workers, py_start_method="spawn") if workers else {}
        return pipelines.train(source, mean_image=stats.mean_image, mean=mean, reader_workers=workers, gpu=gpu,
                               dtype="float16" if dtype == "float16" else "float32", channels_last=channels_last,
                               hw_decoder_load=hw_decoder_load, seed=0, **workers_options,
                               **_pipeline_options(device, order.per_rank, num_threads, prefetch))

    return TrainLoader(make_pipe, order, epoch=epoch, step=start_step, split=shards, device=device, dtype=dtype,
                       channels_last=channels_last, with_index=with_index)


def eval_loader(data, split: str = "val", crops: str = "center", batch_size: int = 128, *, device="cpu",
                rank: int = 0, world_size: int = 1, mean: str = "pixel", dtype: str | None = None,
                channels_last: bool = False, num_threads: int | None = None, prefetch: int = 2,
                dont_use_mmap: bool = False, read_ahead: bool = False, hw_decoder_load: float | None = None,
                with_index: bool = False) -> EvalLoader:
    """Every real sample of this rank's share of `split` once per epoch, in shard order, never padding.

    batch_size: images per batch of this rank. crops: "center" -> images [B,3,224,224]; "ten" -> [B,10,3,224,224]
    in the order of `pipelines.TEN_CROP_ORDER`, then the same five reflected. dont_use_mmap / read_ahead: DALI
    reader I/O options for network filesystems (Lustre, GPFS). with_index: also yield each sample's position in
    the split (int64 [B], on the CPU), to map predictions back to files. Other arguments as in `train_loader`.
    """
    kinds = {"center": pipelines.center, "ten": pipelines.ten_crop}
    if crops not in kinds:
        raise ValueError(f"crops {crops!r}: expected 'center' or 'ten'")
    _check(rank, world_size, mean)
    device = _device(device)
    dtype = _dtype(dtype, device)
    manifest = read_manifest(data)
    stats = read_stats(data, manifest)
    shards = read_split(data, split, manifest)
    begin, end = rank_range(shards.num_samples, rank, world_size)
    if end == begin:
        raise ValueError(f"split {split!r} has {shards.num_samples} samples: too few for {world_size} ranks")
    pipe = kinds[crops](shards.tars, shards.indexes, shard_id=rank, num_shards=world_size,
                        mean_image=stats.mean_image, rgb_mean=stats.rgb_mean, mean=mean, dont_use_mmap=dont_use_mmap,
                        read_ahead=read_ahead, gpu=device.type == "cuda", hw_decoder_load=hw_decoder_load,
                        dtype="float16" if dtype == "float16" else "float32", channels_last=channels_last,
                        seed=0, **_pipeline_options(device, batch_size, num_threads, prefetch))
    return EvalLoader(pipe, num_samples=end - begin, split=shards, batch_size=batch_size, device=device, dtype=dtype,
                      channels_last=channels_last, with_index=with_index)


__all__ = ["Loader", "TrainLoader", "EvalLoader", "train_loader", "eval_loader"]
