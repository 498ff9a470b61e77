"""PyTorch-facing loaders: `for images, labels in loader:` and nothing else to know.

A loader runs one DALI pipeline for one rank; each `for` over it is one epoch, and `len(loader)` is the number
of batches that `for` yields.

Training (`train_loader`): batches in the global order that order.py's docstring explains (the same global batches
on any number of ranks, N // B steps per epoch), augmented as augment.py draws. `train_loader(..., epoch=e,
start_step=s)` starts directly at global step s of epoch e (nothing before it is read), which is how a stopped run
resumes, on any number of ranks. Breaking out of a `for` and iterating again starts the next epoch at its first
step (the pipeline is rebuilt there, about a second; the rest of the abandoned epoch is not read).

Evaluation (`eval_loader`): every real sample of the rank's share [N*r//n, N*(r+1)//n) exactly once per epoch,
in shard order, in batches of B/n samples (B = the global `batch_size`, as in training). The last batch is
partial, never padded: DALI fills it up by repeating the rank's last sample; those copies are cut off here and
never reach the caller, so across ranks every sample is counted once. `len(loader) == ceil(num_samples /
per_rank)`, which can differ by one between ranks.

What the caller gets (device, dtype, layout, mean, positions) is one `options.Output`; how the shards are read
(threads, queue depth, storage, reader processes, hardware decoder share) is one `options.Reading`.

When a pipeline fails, the loader checks only the samples of the failed batch and those queued after it
(pipeline/faults.py) and raises what it found: `DataError` (a shard missing, unreadable or cut short),
`BadSampleError` (a JPEG that does not decode: shard, key, split, epoch and step), or a RuntimeError naming the
split and step. With `bad_samples="skip"` a training loader instead replaces each bad sample by its substitute,
rebuilds its pipeline at the failed step and goes on; `found` lists what it replaced.

Every batch's `.pos` values are checked against the split, and batches are handed to torch without a copy
(DLPack): with DALI's dynamic executor each output batch is a buffer of its own, so keeping a batch is safe.
"""
import contextlib
import dataclasses
import importlib.machinery
import math
import os
import sys

import torch

from pipeline import pipelines
from pipeline.augment import Augment
from pipeline.data import rank_batch, rank_range, read_manifest, read_split, read_stats
from pipeline.faults import BadSample, BadSampleError, Candidate, diagnose, sample_key, substitutes
from pipeline.options import READS_IN_FLIGHT, Output, Reading
from pipeline.order import GlobalOrder, SampleTable, TrainSource, load_table, read_table
from runtime import available_cpus

MAX_READER_WORKERS = 4
CPUS_PER_READER_WORKER = 4  # a GPU rank starts one reader worker per this many CPUs of its share


class Loader:
    """What both loaders share: running the pipeline and handing its outputs to torch."""

    def __init__(self, *, split, per_rank: int, output: Output, queued: int):
        self.split = split  # data.Split: shard paths, for error messages
        self.per_rank = per_rank  # samples per batch of this rank (the last evaluation batch may hold fewer)
        self.output = output  # resolved: a torch.device and a dtype (bfloat16 is made from float32 on the device)
        self.queued = queued  # batches the pipeline may be working on after the one asked for (DALI's prefetch)

    def _run(self, pipe):
        """One batch; on a GPU bound to torch's current stream, so that nothing waits on the host."""
        device = self.output.device
        stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
        try:
            return pipe.run(stream)
        except Exception as e:  # DALI's RuntimeError; the training source's OSError (or a reader worker's Exception)
            if type(e) is Exception and e.__cause__ is not None:  # a reader worker's error, inside DALI's wrapper
                e = e.__cause__
            table, candidates, where = self._suspects()
            raise diagnose(e, self.split.name, table, candidates, where) from e

    def _suspects(self) -> tuple[SampleTable, list[Candidate], str]:
        """(the split's sample table, the samples of the failed batch and of those queued after it, which batch)."""
        raise NotImplementedError

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
    """Training batches of one rank in the global order (order.py's docstring); `step` counts the global steps of the
    current epoch done (during a `for`, the batch just yielded included)."""

    def __init__(self, make_pipe, order: GlobalOrder, table: SampleTable, *, epoch: int, step: int, split,
                 output: Output, queued: int, bad_samples: str = "stop", known_bad: set[int] = frozenset()):
        super().__init__(split=split, per_rank=order.per_rank, output=output, queued=queued)
        # (first global step counted from epoch 0, substitutes) -> (an unbuilt pipeline, its order.TrainSource)
        self.make_pipe = make_pipe
        self.order, self.table = order, table
        self.bad_samples = bad_samples  # "stop": a bad sample raises BadSampleError; "skip": it is replaced
        self.found: list[BadSample] = []  # the bad samples this loader met and replaced, in order
        self._bad = set(known_bad)  # sample numbers replaced by their substitutes
        self._epoch, self.step = epoch, step  # where the next batch comes from
        self._pipe = self._source = None
        self._in_epoch = False  # a `for` is under way (or was abandoned)

    def __len__(self) -> int:
        if self._in_epoch:  # during a `for`, or after one left early: the next `for` is a whole epoch
            return self.order.steps_per_epoch
        return self.order.steps_per_epoch - self.step

    def __iter__(self):
        if self._in_epoch:  # the last `for` was left early: the pipeline is ahead of it, so start afresh
            self._epoch, self.step, self._pipe = self._epoch + 1, 0, None
        if self._pipe is None:
            self._start()
        self._in_epoch = True
        while self.step < self.order.steps_per_epoch:
            images, labels, index = self._next()
            self.step += 1
            yield self._batch(images, labels, index, self.per_rank)
        self._epoch, self.step, self._in_epoch = self._epoch + 1, 0, False

    def _start(self):
        """A pipeline from the current step on, with every bad sample known so far replaced."""
        first = self._epoch * self.order.steps_per_epoch + self.step
        self._pipe, self._source = self.make_pipe(first, substitutes(self._bad, len(self.table)))
        with workers_without_main_script():
            self._pipe.build()  # starts the reader workers

    def _next(self):
        """The next batch; under the skip policy bad samples are replaced and the step is read again."""
        while True:
            try:
                return self._run(self._pipe)
            except BadSampleError as e:
                new = [b for b in e.found if b.sample not in self._bad]
                if self.bad_samples != "skip" or not new:
                    raise
                self.found += new
                self._bad |= {b.sample for b in new}
                self._start()

    def _suspects(self):
        steps = self.order.steps_per_epoch
        failed = self._epoch * steps + self.step  # counted from epoch 0, as the pipeline counts its iterations
        candidates = []
        for global_step in range(failed, failed + 1 + self.queued):
            epoch, step = divmod(global_step, steps)
            candidates += [Candidate(int(s), epoch + 1, global_step + 1) for s in self._source.samples(epoch, step)]
        return self.table, candidates, f"epoch {self._epoch + 1}, global step {failed + 1}"


class EvalLoader(Loader):
    """Every real sample of one rank's share of a split, once per epoch, in shard order (module docstring)."""

    def __init__(self, pipe, *, first: int, num_samples: int, split, per_rank: int, output: Output, queued: int):
        super().__init__(split=split, per_rank=per_rank, output=output, queued=queued)
        self.pipe = pipe
        self.pipe.build()
        self.first = first  # the split's number of this rank's first sample
        self.num_samples = num_samples  # real samples this rank yields per epoch
        self._left = 0  # batches of the current epoch not yet read from the pipeline
        self._read = 0  # batches of the current epoch read from the pipeline
        self._table = None  # the split's sample table, read when a batch fails

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.per_rank)

    def __iter__(self):
        self._drain()  # an abandoned epoch: read its rest so that this one starts on its first sample
        self._left, self._read = self._reader_batches(), 0
        for step in range(len(self)):
            images, labels, index = self._run(self.pipe)
            self._left -= 1
            self._read += 1
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
            self._read += 1

    def _suspects(self):
        if self._table is None:
            self._table = read_table(self.split.tars, self.split.indexes)
        begin = min(self._read * self.per_rank, self.num_samples - 1)  # padding batches repeat the last sample
        end = min(self.num_samples, (self._read + 1 + self.queued) * self.per_rank)
        candidates = [Candidate(self.first + k, None, k // self.per_rank + 1) for k in range(begin, end)]
        return self._table, candidates, f"batch {self._read + 1}"


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
    operators (the pipelines use none: training draws its augmentation in augment.py)."""
    return dict(batch_size=per_rank, num_threads=reading.num_threads or available_cpus(),
                prefetch_queue_depth=reading.prefetch, device_id=device.index if device.type == "cuda" else None,
                exec_dynamic=True, seed=0)


def rank_cpus() -> int:
    """This rank's share of the node's CPUs: the CPUs it may use divided by the ranks on the node (torchrun's
    LOCAL_WORLD_SIZE), at least 1."""
    ranks = os.environ.get("LOCAL_WORLD_SIZE", "1")
    return max(1, available_cpus() // max(1, int(ranks) if ranks.isdigit() else 1))


def default_reader_workers(device: torch.device, cpus: int) -> int:
    """Processes reading training samples beside DALI, from the rank's share of CPUs (`cpus`).

    0 on a CPU: there the source's ~13 us per sample in the calling thread cost less than handing samples over from
    other processes (tens of us each), and the decoders are the limit. On a GPU, where the calling thread also drives
    the training step: one worker per 4 CPUs of the rank's share, at most 4, so that the workers never outnumber the
    cores left beside DALI's threads and the training thread (8 ranks on 16 cores: none). Reads in flight do not
    depend on the workers: each source reads with its own threads (`Reading.reads_in_flight`).
    """
    return 0 if device.type == "cpu" else min(MAX_READER_WORKERS, cpus // CPUS_PER_READER_WORKER)


@contextlib.contextmanager
def workers_without_main_script():
    """While DALI spawns reader workers: have them skip the main script.

    A spawned process runs the main script again (as `__mp_main__`, for what it might pickle) unless the script's
    module is named `__main__`: train.py's top level would import torch in every worker, about 250 MB each. The
    source needs nothing from the script (it is pickled by reference to pipeline.order and pipeline.augment), and a
    script without an `if __name__ == "__main__":` guard is then not run a second time in every worker either.
    """
    main = sys.modules["__main__"]
    saved = getattr(main, "__spec__", None)
    main.__spec__ = importlib.machinery.ModuleSpec("__main__", None)
    try:
        yield
    finally:
        main.__spec__ = saved


def train_loader(data, batch_size: int, *, rank: int = 0, world_size: int = 1, seed: int = 0, epoch: int = 0,
                 start_step: int = 0, steps_per_epoch: int = 0, lighting: float = 0.1, split: str = "train",
                 output: Output = Output(), reading: Reading = Reading(), bad_samples: str = "stop",
                 known_bad: dict[int, str] | None = None) -> TrainLoader:
    """Augmented training batches of this rank: images [batch_size/world_size, 3, 224, 224], labels int64.

    data: the DATA directory (docs/FORMAT.md). batch_size: the global batch, summed over the world_size ranks.
    seed: the run's seed; the order and augmentation of epoch e are drawn from (seed, e).
    epoch, start_step: where the first `for` starts (a resumed run); the following ones take the next epochs.
    steps_per_epoch: stop every epoch after this many global steps (0: all N // batch_size).
    lighting: sigma of the PCA lighting's alpha (0 turns it off). split: the manifest's split to read.
    output, reading: what the caller gets and how the samples are read (pipeline/options.py).
    bad_samples: "stop" (a JPEG that does not decode raises BadSampleError) or "skip" (it is replaced by its
    substitute, pipeline/faults.py; `loader.found` lists it). known_bad: {sample number: key} of bad samples met
    before (a resumed run): replaced from the start; an entry whose key is not that sample's is ignored.
    """
    if bad_samples not in ("stop", "skip"):
        raise ValueError(f"bad_samples {bad_samples!r}: expected 'stop' or 'skip'")
    if lighting < 0:
        raise ValueError(f"lighting {lighting}: sigma must be >= 0 (0 turns lighting off)")
    output = _resolve(output)
    manifest = read_manifest(data)
    stats = read_stats(data, manifest)
    shards = read_split(data, split, manifest)
    table = load_table(shards.tars, shards.indexes)
    if len(table) != shards.num_samples:
        raise ValueError(f"split {split!r}: the shard indexes list {len(table)} samples, the manifest "
                         f"{shards.num_samples}")
    order = GlobalOrder(len(table), batch_size, world_size, rank, seed, steps_per_epoch)
    augment = Augment.of(lighting, stats, output.mean)
    if not 0 <= start_step < order.steps_per_epoch:
        raise ValueError(f"start_step {start_step} outside 0..{order.steps_per_epoch - 1}")
    workers = reading.reader_workers
    if workers is None:
        workers = default_reader_workers(output.device, rank_cpus())
    in_flight = reading.reads_in_flight or READS_IN_FLIGHT
    processing = _processing(output, reading, stats)

    def make_pipe(first_step: int, replaced: dict[int, int]):
        # In this process the source's batches are read by DALI in place for up to `prefetch` iterations; from
        # worker processes they arrive copied into shared memory. In this process the source reads the next batches
        # ahead, as many as keep `in_flight` reads going; a worker cannot (DALI hands its iterations to whichever
        # worker is free), so the workers share the reads in flight.
        source = TrainSource(order, table, first_step, augment=augment,
                             keep_batches=0 if workers else reading.prefetch + 2,
                             reads_in_flight=math.ceil(in_flight / workers) if workers else in_flight,
                             read_ahead=0 if workers else math.ceil(in_flight / order.per_rank) - 1,
                             substitutes=replaced)
        # Spawned, not forked: a fork would copy this process's threads' state (CUDA, DALI, torch) mid-flight.
        workers_options = dict(py_num_workers=workers, py_start_method="spawn") if workers else {}
        pipe = pipelines.train(source, processing, reader_workers=workers, **workers_options,
                               **_pipeline_options(output.device, order.per_rank, reading))
        return pipe, source

    known = {s for s, key in (known_bad or {}).items() if 0 <= s < len(table) and sample_key(table, s) == key}
    # A failed step's samples are checked with those of the steps queued after it: DALI's `prefetch`, and the
    # batches reader workers prepare ahead (read_source's queue), whose reads may have failed first.
    queued = reading.prefetch + pipelines.source_queue_depth(workers)
    return TrainLoader(make_pipe, order, table, epoch=epoch, step=start_step, split=shards, output=output,
                       queued=queued, bad_samples=bad_samples, known_bad=known)


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
    return EvalLoader(pipe, first=begin, num_samples=end - begin, split=shards, per_rank=per_rank, output=output,
                      queued=reading.prefetch)


__all__ = ["Loader", "TrainLoader", "EvalLoader", "train_loader", "eval_loader"]
