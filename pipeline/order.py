"""The training order: a fresh global permutation every epoch, the same global batches on any number of ranks.

Everything here is a pure function of (seed, epoch, global step): which samples form a global batch and which part
of it each rank takes (and, in augment.py, each sample's crop, reflection and lighting). So a run stopped with
8 ranks and resumed with 4 sees exactly the batches it would have seen, and a resumed run starts at its next step
directly instead of reading the steps already done.

    epoch e, global step s  ->  samples permutation(seed, e)[s*B : (s+1)*B]  (B = the global batch size)
    rank r of n             ->  its part [r*B/n : (r+1)*B/n] of that global batch

Every epoch is a fresh, uniformly random permutation of the whole split, like `DataLoader(shuffle=True)`. An epoch
has N // B global steps (N: samples in the split), the same number on every rank, so DDP ranks stay in lockstep
without `join()`. The last N % B samples of each epoch's permutation (fewer than one batch: 15 of ImageNet's
1,281,167 at B = 128; a different random set every epoch) are left out of that epoch, and every other sample is read
exactly once: every global batch is full and every rank takes the same share, so DDP's gradient average is the
gradient of the whole batch of B samples, on any number of ranks.

Samples are read straight from the shard tars through their DALI index (`.idx`) offsets, one `os.preadv` per sample
covering its `.jpg`, `.cls`, `.label` and `.pos` members (docs/FORMAT.md). Nothing here imports DALI or torch.
"""
import collections
import concurrent.futures
import contextlib
import ctypes
import errno
import hashlib
import itertools
import multiprocessing
import os
import resource
import signal
import threading
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.augment import Augment, TrainInputs
from pipeline.data import rank_batch
from runtime import atomic_path, limit_threads
from shardformat import fields_per_member, parse_index_header, parse_index_line

PR_SET_PDEATHSIG = 1  # prctl(2): the signal a process gets when the thread that started it ends
DESCRIPTOR_MARGIN = 128  # open files left to the rest of a process that reads shards (DALI, CUDA, sockets)


@dataclass(frozen=True)
class SampleTable:
    """Where every sample of a split lies: its shard, and the byte range of its members inside the tar.

    The columns may be views of one memory-mapped `.npy` (`cache`, see `load_table`): every process that reads the
    split then shares one copy in the page cache, and a worker process receives the file's name, not the columns.
    """
    tars: tuple[str, ...]
    shard: np.ndarray  # int32 [N]: index into `tars`
    start: np.ndarray  # int64 [N]: byte offset of the sample's .jpg data
    jpeg_size: np.ndarray  # int32 [N]
    label_at: np.ndarray  # int32 [N]: offset of the .label data, relative to `start`
    pos_at: np.ndarray  # int32 [N]: offset of the .pos data, relative to `start`
    span: np.ndarray  # int32 [N]: bytes to read: from the .jpg data to the end of the .pos data
    cache: str | None = None  # the .npy the columns are mapped from, if any

    def __len__(self) -> int:
        return len(self.start)

    def __reduce__(self):
        if self.cache is None:
            return SampleTable, (self.tars, self.shard, self.start, self.jpeg_size, self.label_at, self.pos_at,
                                 self.span)
        return open_table, (self.tars, self.cache)

    @classmethod
    def of_rows(cls, tars, rows: np.ndarray, cache: str | None = None) -> "SampleTable":
        """The table whose columns are the fields of the structured array `rows` (TABLE_ROW)."""
        return cls(tuple(tars), *(rows[name] for name in TABLE_ROW.names), cache=cache)


# One sample of a SampleTable as stored in its cache: 28 bytes, 35.9 MB for ImageNet's 1,281,167 training samples.
TABLE_ROW = np.dtype([("shard", "<i4"), ("start", "<i8"), ("jpeg_size", "<i4"), ("label_at", "<i4"),
                      ("pos_at", "<i4"), ("span", "<i4")])


def read_table(tars: list[str], indexes: list[str]) -> SampleTable:
    """The sample table of a split from its DALI index files (text: `<ext> <offset> <size> [<name>]` per member)."""
    return SampleTable.of_rows(tars, split_rows(indexes))


def split_rows(indexes: list[str]) -> np.ndarray:
    """The TABLE_ROWs of every sample of a split, from its index files."""
    return np.concatenate([index_rows(number, idx) for number, idx in enumerate(indexes)])


def index_rows(number: int, idx: str) -> np.ndarray:
    """The TABLE_ROW of every sample listed in one DALI index, the shard's `number` in the split."""
    with open(idx, "rb") as f:
        header, body = f.readline(), f.read()
    try:
        version, _ = parse_index_header(header)
    except ValueError as e:
        raise ValueError(f"{idx}: line 1: {e}") from None
    rows = uniform_index_rows(body, version)
    if rows is None:  # lines of different layouts, or something wrong: the line loop names the line
        rows = index_rows_by_line(idx, body.splitlines(), version)
    rows["shard"] = number
    rows["span"] = rows["pos_at"] + 4
    return rows


def uniform_index_rows(body: bytes, version: str) -> np.ndarray | None:
    """TABLE_ROWs of an index body whose lines all list the same members in the same order (what `shards build`
    writes), parsed column by column: about 4x faster than line by line (docs/PERFORMANCE.md). None where that
    does not hold, or where a field or the members' order is wrong."""
    lines, fields = len(body.splitlines()), body.split()
    step = fields_per_member(version)
    width = len(fields) // lines if lines else 0
    if not width or width % step or width * lines != len(fields):
        return None
    exts = fields[0:width:step]
    at = {ext.decode(): j for j, ext in zip(range(0, width, step), exts)}
    if len(at) != len(exts) or not {"jpg", "label", "pos"} <= at.keys():
        return None
    if any(fields[j::width].count(ext) != lines for j, ext in zip(range(0, width, step), exts)):
        return None  # a line with other members, or a line break inside a member's name
    numbers = {j: integers(fields[j::width], lines) for j in range(width) if j % step in (1, 2)}  # offsets, sizes
    if any(column is None for column in numbers.values()):
        return None
    start, jpeg_size, label, pos = (numbers[j] for j in (at["jpg"] + 1, at["jpg"] + 2, at["label"] + 1, at["pos"] + 1))
    if not ((start < label) & (label < pos)).all():
        return None
    return table_rows(start, jpeg_size, label - start, pos - start)


def integers(fields: list[bytes], count: int) -> np.ndarray | None:
    """`fields` as int64; None unless they are `count` decimal integers."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy warns, and stops, at the first field that is not an integer
        try:
            column = np.fromstring(b" ".join(fields), dtype=np.int64, sep=" ")
        except (ValueError, DeprecationWarning):
            return None
    return column if len(column) == count else None


def index_rows_by_line(idx: str, lines: list[bytes], version: str) -> np.ndarray:
    """TABLE_ROWs parsed line by line; ValueError naming the index and the line where one is not a sample's."""
    start, jpeg_size, label_at, pos_at = [], [], [], []
    for line_number, line in enumerate(lines, 2):
        try:
            members = {ext: (offset, size) for ext, offset, size in parse_index_line(line, version)}
        except ValueError as e:
            raise ValueError(f"{idx}: line {line_number}: {e}") from None
        try:
            (jpg, size), label, pos = members["jpg"], members["label"], members["pos"]
        except KeyError as e:
            raise ValueError(f"{idx}: a sample without a .{e.args[0]} member") from None
        if not jpg < label[0] < pos[0]:  # one read covers a sample: .jpg first, .pos last (FORMAT.md)
            raise ValueError(f"{idx}: a sample's members are not in the order .jpg .cls .label .pos")
        start.append(jpg)
        jpeg_size.append(size)
        label_at.append(label[0] - jpg)
        pos_at.append(pos[0] - jpg)
    return table_rows(start, jpeg_size, label_at, pos_at)


def table_rows(start, jpeg_size, label_at, pos_at) -> np.ndarray:
    """TABLE_ROWs of these columns; `shard` and `span` are index_rows' to fill."""
    rows = np.zeros(len(start), TABLE_ROW)
    rows["start"], rows["jpeg_size"], rows["label_at"], rows["pos_at"] = start, jpeg_size, label_at, pos_at
    return rows


def load_table(tars: list[str], indexes: list[str]) -> SampleTable:
    """`read_table`, parsed once and kept as a `.npy` beside the indexes, memory-mapped by every process.

    The cache's name carries a digest of the index files' names, sizes and modification times, so a changed index
    is parsed again. Where the cache cannot be written (a read-only directory) or mapped (some FUSE mounts), the
    table is parsed into this process's memory, as `read_table` does.
    """
    cache, rows = table_cache_path(indexes), None
    if not cache.exists():
        rows = split_rows(indexes)
        try:
            with atomic_path(cache) as tmp, open(tmp, "wb") as f:
                np.save(f, rows)
        except OSError:
            return SampleTable.of_rows(tars, rows)
    try:
        return open_table(tars, str(cache))
    except OSError:
        return SampleTable.of_rows(tars, split_rows(indexes) if rows is None else rows)


def table_cache_path(indexes: list[str]) -> Path:
    digest = hashlib.sha256()
    for idx in indexes:
        info = os.stat(idx)
        digest.update(f"{os.path.basename(idx)} {info.st_size} {info.st_mtime_ns}\n".encode())
    return Path(indexes[0]).parent / f".sample-table-{digest.hexdigest()[:20]}.npy"


def open_table(tars, cache: str) -> SampleTable:
    rows = np.load(cache, mmap_mode="r")
    if rows.dtype != TABLE_ROW:
        raise ValueError(f"{cache}: not a sample table (delete it: the loader writes it again)")
    return SampleTable.of_rows(tars, rows, cache)


@dataclass(frozen=True)
class GlobalOrder:
    """The order of one split for one rank: which samples, in which order."""
    num_samples: int  # N: samples in the split
    batch_size: int  # B: the global batch, summed over ranks
    world_size: int
    rank: int
    seed: int
    max_steps: int = 0  # end every epoch after this many global steps (0: after all N // B)

    def __post_init__(self):
        rank_batch(self.batch_size, self.rank, self.world_size)  # checks the rank and the split of the batch
        if self.num_samples < self.batch_size:
            raise ValueError(f"{self.num_samples} samples: fewer than one global batch of {self.batch_size}")

    @property
    def steps_per_epoch(self) -> int:
        full = self.num_samples // self.batch_size
        return min(full, self.max_steps) if self.max_steps > 0 else full

    @property
    def per_rank(self) -> int:
        return self.batch_size // self.world_size

    def permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)

    @property
    def places_in_batch(self) -> slice:
        """This rank's places in every global batch (`rank_part` is the same part as places in the permutation)."""
        return slice(self.rank * self.per_rank, (self.rank + 1) * self.per_rank)

    def rank_part(self, step: int) -> slice:
        begin = step * self.batch_size + self.rank * self.per_rank
        return slice(begin, begin + self.per_rank)


class OpenShards:
    """The shards' file descriptors, at most `limit` open: the least recently used one not being read is closed to
    open another. Safe to use from many threads; `acquire` and `release` enclose each read."""

    def __init__(self, tars: tuple[str, ...], limit: int):
        self.tars, self.limit = tars, limit
        self._open: collections.OrderedDict[int, list[int]] = collections.OrderedDict()  # shard -> [fd, readers]
        self._lock = threading.Lock()

    def acquire(self, shard: int) -> int:
        with self._lock:
            entry = self._open.get(shard)
            if entry is None:
                self._close_idle(len(self._open) + 1 - self.limit)
                try:
                    entry = self._open[shard] = [os.open(self.tars[shard], os.O_RDONLY), 0]
                except OSError as e:
                    raise OSError(e.errno, f"{self.tars[shard]}: cannot open this shard ({e.strerror}; "
                                           f"{len(self._open)} shards open)") from None
            self._open.move_to_end(shard)
            entry[1] += 1
            return entry[0]

    def release(self, shard: int) -> None:
        with self._lock:
            self._open[shard][1] -= 1

    def _close_idle(self, count: int) -> None:
        """Close up to `count` descriptors, the least recently used first, of shards no thread is reading."""
        if count <= 0:
            return
        idle = (s for s, (_, readers) in self._open.items() if readers == 0)
        for shard in list(itertools.islice(idle, count)):  # stops at the first idle ones: called per read at the limit
            os.close(self._open.pop(shard)[0])

    def close_all(self) -> None:
        with self._lock:
            for fd, _ in self._open.values():
                with contextlib.suppress(OSError):  # a network mount already gone: the descriptor is closed anyway
                    os.close(fd)
            self._open.clear()


def shard_descriptor_limit(num_shards: int, threads: int) -> int:
    """How many shards a reader keeps open: all of them where the process may open that many files.

    The soft limit on open files (often 1,024) is raised towards the hard one as far as the shards need; where
    even the hard limit is lower, the reader keeps what it leaves free, minus a margin for everything else the
    process opens (DALI, CUDA, sockets), and reopens shards as it goes.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    in_use = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else DESCRIPTOR_MARGIN
    wanted = num_shards + in_use + DESCRIPTOR_MARGIN
    if soft != resource.RLIM_INFINITY and soft < wanted:
        raised = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        if raised > soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
            soft = raised
    free = num_shards if soft == resource.RLIM_INFINITY else soft - in_use - DESCRIPTOR_MARGIN
    return max(threads + 1, min(num_shards, free))  # every thread can hold one shard and open another


class SampleReader:
    """Reads the samples of a batch by number, each with one `os.preadv` into its place in one buffer, up to
    `threads` reads at a time (`os.preadv` releases the GIL: the reads wait for the storage together)."""

    def __init__(self, table: SampleTable, threads: int = 1):
        self.table, self.threads = table, max(1, threads)
        self._shards = OpenShards(table.tars, shard_descriptor_limit(len(table.tars), self.threads))
        weakref.finalize(self, self._shards.close_all)
        self._pool = None
        if self.threads > 1:
            self._pool = concurrent.futures.ThreadPoolExecutor(self.threads, thread_name_prefix="sample-reader")
            weakref.finalize(self, self._pool.shutdown, wait=False, cancel_futures=True)

    def __getstate__(self):  # a worker process opens its own descriptors and starts its own threads
        return {"table": self.table, "threads": self.threads}

    def __setstate__(self, state):
        self.__init__(state["table"], state["threads"])

    def read(self, samples: np.ndarray) -> tuple[list[np.ndarray], np.ndarray, np.ndarray, np.ndarray]:
        """(JPEGs, JPEG sizes, labels, positions) of the samples, in their order (see `submit`)."""
        return self.submit(samples).result()

    def submit(self, samples: np.ndarray) -> "PendingBatch":
        """Start reading the samples; `.result()` waits for them. Each sample's span (.jpg to .pos) lies at its own
        place in one buffer, without padding; its JPEG is handed on as a view of the buffer."""
        t = self.table
        spans = t.span[samples].astype(np.int64)
        places = np.cumsum(spans) - spans
        buffer = np.empty(int(spans.sum()), np.uint8)
        reads = list(zip(t.shard[samples].tolist(), t.start[samples].tolist(), places.tolist(), spans.tolist()))
        batch = PendingBatch(self.table, samples, buffer, places)
        if self._pool is None:
            self._read_all(memoryview(buffer), reads, itertools.count())
        else:
            taken = itertools.count()  # the threads take the reads in order: next() on it is atomic under the GIL
            batch.tasks = [self._pool.submit(self._read_all, memoryview(buffer), reads, taken)
                           for _ in range(min(self.threads, len(reads)))]
        return batch

    def _read_all(self, buffer: memoryview, reads: list, taken) -> None:
        while (k := next(taken)) < len(reads):
            self._read_into(buffer, *reads[k])

    def _read_into(self, buffer: memoryview, shard: int, start: int, place: int, span: int) -> None:
        """Bytes [start, start + span) of the shard into buffer[place:]; a network filesystem may return fewer
        bytes per call than asked for."""
        tar, done = self.table.tars[shard], 0
        fd = self._shards.acquire(shard)
        try:
            while done < span:
                try:
                    got = os.preadv(fd, [buffer[place + done:place + span]], start + done)
                except OSError as e:
                    raise OSError(e.errno, f"{tar}: reading bytes {start}..{start + span} of this shard, where its "
                                           f"index puts a sample: {e.strerror}") from None
                if got == 0:
                    raise OSError(errno.EIO, f"{tar}: ends before byte {start + span}, where its index puts a "
                                             "sample (truncated? rebuild or re-copy it)")
                done += got
        finally:
            self._shards.release(shard)


class PendingBatch:
    """A batch being read by a SampleReader."""

    def __init__(self, table: SampleTable, samples: np.ndarray, buffer: np.ndarray, places: np.ndarray):
        self.table, self.samples, self.buffer, self.places = table, samples, buffer, places
        self.tasks: list[concurrent.futures.Future] = []

    def result(self) -> tuple[list[np.ndarray], np.ndarray, np.ndarray, np.ndarray]:
        """(JPEGs, JPEG sizes, labels, positions): JPEG i is a view of the buffer, `size[i]` bytes long."""
        for task in self.tasks:
            task.result()  # the first failed read raises here, naming its shard
        t, samples = self.table, self.samples
        sizes = np.asarray(t.jpeg_size[samples], np.int32)
        jpegs = [self.buffer[place:place + size] for place, size in zip(self.places.tolist(), sizes.tolist())]
        labels = self._int32_at(self.places + t.label_at[samples])
        positions = self._int32_at(self.places + t.pos_at[samples])
        return jpegs, sizes, labels, positions

    def cancel(self) -> None:
        for task in self.tasks:
            task.cancel()

    def _int32_at(self, at: np.ndarray) -> np.ndarray:
        """The little-endian int32 at byte `at[i]` of the buffer."""
        return np.ascontiguousarray(self.buffer[at[:, None] + np.arange(4)]).view("<i4")[:, 0]


def become_reader_worker() -> None:
    """Set up a process that DALI started to run the source (a reader worker).

    Slurm sends its stop signals (SIGTERM at preemption, SIGUSR1 before the time limit) to every process of the job
    step. They are meant for the trainer, which stops at its next sync point and needs these workers until then: a
    worker ignores them, ends when its pipeline closes it, and is killed if the trainer's process ends first.
    It also keeps to one thread of numeric work: DALI's threads and the training loop share the rank's cores.
    """
    for stop in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(stop, signal.SIG_IGN)
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the worker still ends with its pipeline
        pass
    limit_threads(1)


class TrainSource:
    """DALI external_source callback: global step -> this rank's samples and their augmentation, as numpy.

    Endless: iteration i of the pipeline is global step `first_step + i` counted from epoch 0, so the pipeline
    never stops at an epoch's end (no drain and refill of DALI's queues); the loader counts the epochs.
    Each batch is an `augment.TrainInputs` (the samples read, and their augmentation drawn by `augment`), handed
    to DALI as the tuple of its fields.

    Reads: up to `reads_in_flight` samples at a time (threads), and, since every step's samples are known in
    advance, the batches of the next `read_ahead` iterations are read while the current one is handed over. Neither
    changes what a step holds: its samples and augmentation are functions of (seed, epoch, step) alone.
    """

    def __init__(self, order: GlobalOrder, table: SampleTable, first_step: int, *, augment: Augment,
                 keep_batches: int, reads_in_flight: int = 1, read_ahead: int = 0,
                 substitutes: dict[int, int] | None = None):
        self.order, self.reader, self.first_step = order, SampleReader(table, reads_in_flight), first_step
        self.augment, self.read_ahead = augment, read_ahead
        # Bad samples and what replaces each (pipeline/faults.py): applied where a step's samples are chosen.
        self.substitutes = dict(substitutes or {})
        self._bad = np.fromiter(self.substitutes, np.int64, len(self.substitutes))
        self._permutations: dict[int, np.ndarray] = {}  # epoch -> its permutation: the current one (and the next)
        self._reading: dict[int, PendingBatch] = {}  # iteration -> its batch being read
        # DALI reads a batch in place (no copy) until it has run the iterations it queues ahead: keep it alive.
        self._handed_over = collections.deque(maxlen=keep_batches)

    def __getstate__(self):  # pickled for a reader worker: no batches, no threads
        return {**self.__dict__, "_permutations": {}, "_reading": {}}

    def __setstate__(self, state):  # unpickled in a reader worker that DALI spawned
        self.__dict__.update(state)
        if multiprocessing.parent_process() is not None:
            become_reader_worker()

    def samples(self, epoch: int, step: int) -> np.ndarray:
        """The sample numbers of this rank's part of global step `step` of `epoch`, bad ones replaced."""
        permutation = self._permutations.get(epoch)
        if permutation is None:  # int32: half the memory (every sample number fits), the same values
            permutation = self._permutations[epoch] = self.order.permutation(epoch).astype(np.int32)
        chosen = permutation[self.order.rank_part(step)]
        if len(self._bad) and np.isin(chosen, self._bad).any():
            chosen = np.array([self.substitutes.get(s, s) for s in chosen.tolist()], np.int32)
        return chosen

    def epoch_and_step(self, iteration: int) -> tuple[int, int]:
        return divmod(self.first_step + iteration, self.order.steps_per_epoch)

    def __call__(self, info) -> tuple:
        return self.batch(info.iteration).outputs()

    def batch(self, iteration: int) -> TrainInputs:
        """The inputs of pipeline iteration `iteration`, kept alive until DALI is done with them."""
        for stale in [i for i in self._reading if i < iteration]:  # not asked for (another pipeline's iteration)
            self._reading.pop(stale).cancel()
        for past in [e for e in self._permutations if e < self.epoch_and_step(iteration)[0]]:
            del self._permutations[past]  # reading ahead reaches into the next epoch, never back
        for ahead in range(iteration, iteration + 1 + self.read_ahead):
            if ahead not in self._reading:
                self._reading[ahead] = self.reader.submit(self.samples(*self.epoch_and_step(ahead)))
        jpegs, _, labels, positions = self._reading.pop(iteration).result()
        inputs = self.augment.inputs(self.order, *self.epoch_and_step(iteration), jpegs, labels, positions)
        self._handed_over.append(inputs)
        return inputs
