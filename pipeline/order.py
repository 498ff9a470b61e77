"""The training order: a fresh global permutation every epoch, the same global batches on any number of ranks.

Everything here is a pure function of (seed, epoch, global step): which samples form a global batch, which part
of it each rank takes, and each sample's augmentation (crop offset, reflection, lighting). So a run stopped with
8 ranks and resumed with 4 sees exactly the batches it would have seen, and a resumed run starts at its next step
directly instead of reading the steps already done.

    epoch e, global step s  ->  samples permutation(seed, e)[s*B : (s+1)*B]  (B = the global batch size)
    rank r of n             ->  its part [r*B/n : (r+1)*B/n] of that global batch

An epoch has N // B global steps (N: samples in the split). The last N % B samples of each epoch's permutation
(fewer than one batch, a different random set every epoch) are left out of that epoch, so that every global batch
is full and every rank takes the same share: DDP's gradient average is then the gradient of the whole batch.

Samples are read straight from the shard tars through their DALI index (`.idx`) offsets, one `os.preadv` per sample
covering its `.jpg`, `.cls`, `.label` and `.pos` members (docs/FORMAT.md). Nothing here imports DALI or torch.
"""
import collections
import ctypes
import multiprocessing
import os
import signal
import weakref
from dataclasses import dataclass

import numpy as np

from pipeline.data import CROP, SIZE, rank_batch
from runtime import limit_threads

OFFSETS = SIZE - CROP  # 32: a crop may start at 0..32 in x and y
PR_SET_PDEATHSIG = 1  # prctl(2): the signal a process gets when the thread that started it ends


@dataclass(frozen=True)
class SampleTable:
    """Where every sample of a split lies: its shard, and the byte range of its members inside the tar."""
    tars: tuple[str, ...]
    shard: np.ndarray  # int32 [N]: index into `tars`
    start: np.ndarray  # int64 [N]: byte offset of the sample's .jpg data
    jpeg_size: np.ndarray  # int32 [N]
    label_at: np.ndarray  # int32 [N]: offset of the .label data, relative to `start`
    pos_at: np.ndarray  # int32 [N]: offset of the .pos data, relative to `start`
    span: np.ndarray  # int32 [N]: bytes to read: from the .jpg data to the end of the .pos data

    def __len__(self) -> int:
        return len(self.start)


def read_table(tars: list[str], indexes: list[str]) -> SampleTable:
    """The sample table of a split from its DALI index files (text: `<ext> <offset> <size> [<name>]` per member)."""
    shard, start, jpeg_size, label_at, pos_at = [], [], [], [], []
    for number, idx in enumerate(indexes):
        with open(idx) as f:
            header = f.readline().split()
            step = 4 if header[0] == "v1.2" else 3
            for line in f:
                fields = line.split()
                members = {fields[i]: (int(fields[i + 1]), int(fields[i + 2])) for i in range(0, len(fields), step)}
                try:
                    (jpg, size), label, pos = members["jpg"], members["label"], members["pos"]
                except KeyError as e:
                    raise ValueError(f"{idx}: a sample without a .{e.args[0]} member") from None
                if not jpg < label[0] < pos[0]:  # one read covers a sample: .jpg first, .pos last (FORMAT.md)
                    raise ValueError(f"{idx}: a sample's members are not in the order .jpg .cls .label .pos")
                shard.append(number)
                start.append(jpg)
                jpeg_size.append(size)
                label_at.append(label[0] - jpg)
                pos_at.append(pos[0] - jpg)
    pos_at = np.array(pos_at, np.int32)
    return SampleTable(tuple(tars), np.array(shard, np.int32), np.array(start, np.int64),
                       np.array(jpeg_size, np.int32), np.array(label_at, np.int32), pos_at, pos_at + 4)


@dataclass(frozen=True)
class Augmentation:
    """Per-sample augmentation of a training batch, drawn from (seed, epoch, step) for the whole global batch."""
    crop_x: np.ndarray  # float32 [b]: normalised crop anchor k/32, k uniform in 0..32
    crop_y: np.ndarray  # float32 [b]
    mirror: np.ndarray  # int32 [b]: 1 = reflect horizontally (p = 0.5)
    alpha: np.ndarray  # float32 [b, 3]: PCA lighting coefficients, N(0, sigma^2)


@dataclass(frozen=True)
class GlobalOrder:
    """The order of one split for one rank: which samples, in which order, with which augmentation."""
    num_samples: int  # N: samples in the split
    batch_size: int  # B: the global batch, summed over ranks
    world_size: int
    rank: int
    seed: int
    lighting: float  # sigma of the PCA lighting coefficients (0: none)
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

    def rank_part(self, step: int) -> slice:
        begin = step * self.batch_size + self.rank * self.per_rank
        return slice(begin, begin + self.per_rank)

    def augmentation(self, epoch: int, step: int) -> Augmentation:
        """This rank's part of the global batch's draws: the same values for a sample on any number of ranks."""
        rng = np.random.default_rng([self.seed, epoch, step, 1])
        offsets = rng.integers(0, OFFSETS + 1, size=(2, self.batch_size))
        mirror = rng.integers(0, 2, size=self.batch_size)
        alpha = rng.normal(0.0, self.lighting, size=(self.batch_size, 3)) if self.lighting > 0 else (
            np.zeros((self.batch_size, 3)))
        part = slice(self.rank * self.per_rank, (self.rank + 1) * self.per_rank)
        return Augmentation((offsets[0, part] / OFFSETS).astype(np.float32),
                            (offsets[1, part] / OFFSETS).astype(np.float32),
                            mirror[part].astype(np.int32), alpha[part].astype(np.float32))


class SampleReader:
    """Reads the samples of a batch by number, each with one `os.preadv` straight into a row of one array."""

    def __init__(self, table: SampleTable):
        self.table = table
        self._fds: dict[int, int] = {}
        weakref.finalize(self, close_all, self._fds)

    def __getstate__(self):  # a worker process opens its own descriptors
        return {"table": self.table}

    def __setstate__(self, state):
        self.__init__(state["table"])

    def read(self, samples: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(rows, jpeg sizes, labels, positions): row i holds sample i's JPEG in its first `size[i]` bytes.

        One array per batch rather than one per sample: handing a batch to DALI then costs the same for 64
        samples as for one.
        """
        t = self.table
        spans = t.span[samples]
        rows = np.empty((len(samples), int(spans.max())), np.uint8)  # bytes past a row's span are never read
        for row, shard, start, span in zip(rows, t.shard[samples].tolist(), t.start[samples].tolist(),
                                           spans.tolist()):
            self._read_into(row[:span], shard, start)
        labels, positions = self._int32_at(rows, t.label_at[samples]), self._int32_at(rows, t.pos_at[samples])
        return rows, t.jpeg_size[samples], labels, positions

    def _read_into(self, buffer: np.ndarray, shard: int, start: int) -> None:
        """Fill `buffer` from byte `start` of the shard; a network filesystem may return fewer bytes per call."""
        done = 0
        while done < len(buffer):
            got = os.preadv(self._fd(shard), [buffer[done:]], start + done)
            if got == 0:
                raise OSError(f"{self.table.tars[shard]}: ends before byte {start + len(buffer)}, where its index "
                              "puts a sample")
            done += got

    def _fd(self, shard: int) -> int:
        fd = self._fds.get(shard)
        if fd is None:
            fd = self._fds[shard] = os.open(self.table.tars[shard], os.O_RDONLY)
        return fd

    @staticmethod
    def _int32_at(rows: np.ndarray, at: np.ndarray) -> np.ndarray:
        """The little-endian int32 at byte `at[i]` of each row."""
        raw = rows[np.arange(len(rows))[:, None], at[:, None] + np.arange(4)]
        return np.ascontiguousarray(raw).view("<i4")[:, 0]


def close_all(fds: dict[int, int]) -> None:
    for fd in fds.values():
        os.close(fd)
    fds.clear()


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
    Returns, one array per batch: JPEG rows and sizes, labels, positions, crop (x, y) anchors, mirror flags, and
    `offset`: the per-channel value that crop_mirror_normalize subtracts (the RGB mean minus the lighting shift,
    or minus the shift alone when the per-pixel mean image is subtracted before).
    """

    def __init__(self, order: GlobalOrder, table: SampleTable, first_step: int, *, eigval: np.ndarray,
                 eigvec: np.ndarray, rgb_mean: np.ndarray | None, keep_batches: int):
        self.order, self.reader, self.first_step = order, SampleReader(table), first_step
        self.lighting = (np.asarray(eigvec, np.float64) * np.asarray(eigval, np.float64)).T * 255  # alpha -> shift
        self.rgb_mean = None if rgb_mean is None else np.asarray(rgb_mean, np.float32)
        self._epoch, self._permutation = -1, None
        # DALI reads a batch in place (no copy) until it has run the iterations it queues ahead: keep it alive.
        self._handed_over = collections.deque(maxlen=keep_batches)

    def __setstate__(self, state):  # unpickled in a reader worker that DALI spawned
        self.__dict__.update(state)
        if multiprocessing.parent_process() is not None:
            become_reader_worker()

    def samples(self, epoch: int, step: int) -> np.ndarray:
        if epoch != self._epoch:
            self._epoch, self._permutation = epoch, self.order.permutation(epoch)
        return self._permutation[self.order.rank_part(step)]

    def __call__(self, info):
        epoch, step = divmod(self.first_step + info.iteration, self.order.steps_per_epoch)
        rows, sizes, labels, positions = self.reader.read(self.samples(epoch, step))
        aug = self.order.augmentation(epoch, step)
        shift = (aug.alpha.astype(np.float64) @ self.lighting).astype(np.float32)
        offset = -shift if self.rgb_mean is None else self.rgb_mean - shift
        batch = rows, sizes[:, None], labels, positions, np.stack([aug.crop_x, aug.crop_y], 1), aug.mirror, offset
        self._handed_over.append(batch)
        return batch
