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
in shard order, in batches of B/n samples (B = the global `batch_size`, as in training). The last batch is
partial, never padded: DALI fills it up by repeating the rank's last sample; those copies are cut off here and
never reach the caller, so across ranks every sample is counted once. `len(loader) == ceil(num_samples /
per_rank)`, which can differ by one between ranks.

What the caller gets (device, dtype, layout, mean, positions) is one `options.Output`; how the shards are read
(threads, queue depth, storage, reader processes, hardware decoder share) is one `options.Reading`.

Every batch's `.pos` values are checked against the split, and batches are handed to torch without a copy
(DLPack): with DALI's dynamic executor each output batch is a buffer of its own, so keeping a batch is safe.
"""
import dataclasses
import math

import torch

from pipeline import pipelines
from pipeline.data import find_bad_sample, rank_batch, rank_range, read_manifest, read_split, read_stats
from pipeline.options import Output, Reading
from pipeline.order import GlobalOrder, TrainSource, read_table
from runtime import available_cpus


class Loader:
    """What both loaders share: running the pipeline and handing its outputs to torch."""

    def __init__(self, *, split, per_rank: int, output: Output):
        self.split = split  # data.Split: shard paths, for error messages
        self.per_rank = per_rank  # samples per batch of this rank (the last evaluation batch may hold fewer)
        self.output = output  # resolved: a torch.device and a dtype (bfloat16 is made from float32 on the device)

    def _run(self, pipe):
        """One batch; on a GPU bound to torch's current stream, so that nothing waits on the host."""
        device = self.output.device
        stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
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
        with torch.device(self.output.device):
            images, labels = torch.from_dlpack(images.as_tensor())[:keep], torch.from_dlpack(labels.as_tensor())[:keep]
        if self.output.dtype == "bfloat16":
            images = images.to(torch.bfloat16)
        if self.output.channels_last:  # DALI wrote HWC: the NCHW view of it is channels-last in memory
            images = images.movedim(-1, -3)
        return (images, labels, index) if self.output.with_index else (images, labels)


class TrainLoader(Loader):
    """Training batches of one rank in the global order (module docstring); `step` counts the global steps of the
    current epoch done (during a `for`, the batch just yielded included)."""

    def __init__(self, make_pipe, order: GlobalOrder, *, epoch: int, step: int, split, output: Output):
        super().__init__(split=split, per_rank=order.per_rank, output=output)
        self.make_pipe = make_pipe  # first global step (counted from epoch 0) -> an unbuilt pipeline
        self.order = order
        self._epoch, self.step = epoch, step  # where the next batch comes from
        self._pipe = None
        self._in_epoch = False  # a `for` is under way (or was abandoned)

    def __len__(self) -> int:
        if self._in_epoch:  # during a `for`, or after one left early: the next `for` is a whole epoch
            return self.order.steps_per_epoch
        return self.order.steps_per_epoch - self.step

    def __iter__(self):
        if self._in_epoch:  # the last `for` was left early: the pipeline is ahead of it, so start afresh
            self._epoch, self.step, self._pipe = self._epoch + 1, 0, None
        if self._pipe is None:
            self._pipe = self.make_pipe(self._epoch * self.order.steps_per_epoch + self.step)
            self._pipe.build()
        self._in_epoch = True
        while self.step < self.order.steps_per_epoch:
            images, labels, index = self._run(self._pipe)
            self.step += 1
            yield self._batch(images, labels, index, self.per_rank)
        self._epoch, self.step, self._in_epoch = self._epoch + 1, 0, False


class EvalLoader(Loader):
    """Every real sample of one rank's share of a split, once per epoch, in shard order (module docstring)."""

    def __init__(self, pipe, *, num_samples: int, split, per_rank: int, output: Output):
        super().__init__(split=split, per_rank=per_rank, output=output)
        self.pipe = pipe
        self.pipe.build()
        self.num_samples = num_samples  # real samples this rank yields per epoch
        self._left = 0  # batches of the current epoch not yet read from the pipeline

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.per_rank)

    def __iter__(self):
        self._drain()  # an abandoned epoch: read its rest so that this one starts on its first sample
        self._left = self._reader_batches()
        for step in range(len(self)):
            images, labels, index = self._run(self.pipe)
            self._left -= 1
            keep = min(self.per_rank, self.num_samples - step * self.per_rank)
            yield self._batch(images, labels, index, keep)
        self._drain()

    def _reader_batches(self) -> int:
        """Batches the reader delivers per epoch: DALI pads every rank to the largest rank's batch count."""
        meta = self.pipe.reader_meta(pipelines.READER)
        batches = math.ceil(meta["epoch_size_padded"] // meta["number_of_shards"] / self.per_rank)
        assert batches >= len(self), meta
        return batches

    def _drain(self):
        """Read and drop the batches left in the current epoch (DALI's padding, or what a `break` left)."""
        while self._left:
            self._left -= 1
            self._run(self.pipe)


def _resolve(output: Output) -> Output:
    """`output` with a torch.device (plain "cuda": the current device) and a dtype, checked against each other."""
    device = torch.device(output.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device}: expected cpu or cuda")
    dtype = output.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    if device.type == "cpu" and dtype != "float32":
        raise ValueError(f"dtype {dtype}: CPU output is always float32")
    return dataclasses.replace(output, device=device, dtype=dtype)


def _processing(output: Output, reading: Reading, stats) -> pipelines.Processing:
    """What the pipeline makes of each JPEG for `output` (resolved); DALI writes float16 or float32."""
    return pipelines.Processing(mean=output.mean, mean_image=stats.mean_image, rgb_mean=stats.rgb_mean,
                                gpu=output.device.type == "cuda", channels_last=output.channels_last,
                                dtype="float16" if output.dtype == "float16" else "float32",
                                hw_decoder_load=reading.hw_decoder_load)


def _pipeline_options(device, per_rank, reading: Reading):
    """The arguments every @pipeline_def takes: batch, threads, queue depth, device; the seed of DALI's own random
    operators (the pipelines use none: training draws its augmentation in order.py)."""
    return dict(batch_size=per_rank, num_threads=reading.num_threads or available_cpus(),
                prefetch_queue_depth=reading.prefetch, device_id=device.index if device.type == "cuda" else None,
                exec_dynamic=True, seed=0)


def default_reader_workers(device: torch.device) -> int:
    """Processes reading training samples beside DALI. 0 on a CPU: there the source's ~13 us per sample in the
    calling thread cost less than handing samples over from other processes. A few on a GPU, where the calling
    thread also drives the training step and tens of thousands of samples per second are read."""
    return 0 if device.type == "cpu" else 4


def train_loader(data, batch_size: int, *, rank: int = 0, world_size: int = 1, seed: int = 0, epoch: int = 0,
                 start_step: int = 0, steps_per_epoch: int = 0, lighting: float = 0.1, split: str = "train",
                 output: Output = Output(), reading: Reading = Reading()) -> TrainLoader:
    """Augmented training batches of this rank: images [batch_size/world_size, 3, 224, 224], labels int64.

    data: the DATA directory (docs/FORMAT.md). batch_size: the global batch, summed over the world_size ranks.
    seed: the run's seed; the order and augmentation of epoch e are drawn from (seed, e).
    epoch, start_step: where the first `for` starts (a resumed run); the following ones take the next epochs.
    steps_per_epoch: stop every epoch after this many global steps (0: all N // batch_size).
    lighting: sigma of the PCA lighting's alpha (0 turns it off). split: the manifest's split to read.
    output, reading: what the caller gets and how the samples are read (pipeline/options.py).
    """
    if lighting < 0:
        raise ValueError(f"lighting {lighting}: sigma must be >= 0 (0 turns lighting off)")
    output = _resolve(output)
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
    workers = default_reader_workers(output.device) if reading.reader_workers is None else reading.reader_workers
    processing = _processing(output, reading, stats)

    def make_pipe(first_step: int):
        # In this process the source's batches are read by DALI in place for up to `prefetch` iterations; from
        # worker processes they arrive copied into shared memory.
        source = TrainSource(order, table, first_step, eigval=stats.pca_eigval, eigvec=stats.pca_eigvec,
                             rgb_mean=stats.rgb_mean if output.mean == "channel" else None,
                             keep_batches=0 if workers else reading.prefetch + 2)
        # Spawned, not forked: a fork would copy this process's threads' state (CUDA, DALI, torch) mid-flight.
        workers_options = dict(py_num_workers=workers, py_start_method="spawn") if workers else {}
        return pipelines.train(source, processing, reader_workers=workers, **workers_options,
                               **_pipeline_options(output.device, order.per_rank, reading))

    return TrainLoader(make_pipe, order, epoch=epoch, step=start_step, split=shards, output=output)


def eval_loader(data, split: str = "val", crops: str = "center", batch_size: int = 128, *, rank: int = 0,
                world_size: int = 1, output: Output = Output(), reading: Reading = Reading()) -> EvalLoader:
    """Every real sample of this rank's share of `split` once per epoch, in shard order, never padding.

    batch_size: the global batch, summed over the world_size ranks: each rank's batches hold
    batch_size/world_size samples (its last one fewer). crops: "center" -> images [B,3,224,224]; "ten" ->
    [B,10,3,224,224] in the order of `pipelines.TEN_CROP_ORDER`, then the same five reflected.
    output, reading: what the caller gets and how the shards are read (pipeline/options.py); with
    `output.with_index`, each sample's position in the split maps predictions back to files.
    """
    kinds = {"center": pipelines.center, "ten": pipelines.ten_crop}
    if crops not in kinds:
        raise ValueError(f"crops {crops!r}: expected 'center' or 'ten'")
    per_rank = rank_batch(batch_size, rank, world_size)
    output = _resolve(output)
    manifest = read_manifest(data)
    stats = read_stats(data, manifest)
    shards = read_split(data, split, manifest)
    begin, end = rank_range(shards.num_samples, rank, world_size)
    if end == begin:
        raise ValueError(f"split {split!r} has {shards.num_samples} samples: too few for {world_size} ranks")
    pipe = kinds[crops](shards.tars, shards.indexes, _processing(output, reading, stats), shard_id=rank,
                        num_shards=world_size, storage=reading.storage,
                        **_pipeline_options(output.device, per_rank, reading))
    return EvalLoader(pipe, num_samples=end - begin, split=shards, per_rank=per_rank, output=output)


__all__ = ["Loader", "TrainLoader", "EvalLoader", "train_loader", "eval_loader"]
