"""The options both loaders take, in two groups: what the caller gets (`Output`), how it is read (`Reading`).

Neither changes which samples a batch holds or how they are augmented; `Reading` changes how fast they come, and
the pixels only by decoder rounding (`hw_decoder_load` shares a GPU batch between two JPEG decoders). Nothing here
imports DALI or torch, so a caller can build them before it decides to read anything.
"""
from dataclasses import dataclass

DTYPES = ("float32", "float16", "bfloat16")  # image types a loader can hand over
MEANS = ("pixel", "channel")
STORAGES = ("local", "network")
# Training reads per rank waiting on the storage at once, by default: reads/s = reads in flight / read latency, so
# 40 keep 40,000 images/s at 1 ms per read (network scratch answers a ~30 KB read in 0.5 to 2 ms uncached).
READS_IN_FLIGHT = 40


@dataclass(frozen=True)
class Output:
    """What the caller gets: images (and labels) of which type, where, in which layout, minus which mean."""
    device: object = "cpu"  # "cpu", "cuda", "cuda:N" or a torch.device; plain "cuda": torch's current device
    dtype: str | None = None  # one of DTYPES; None: bfloat16 on a GPU, float32 on the CPU (its only choice)
    channels_last: bool = False  # NCHW shape with channels-last memory (DALI writes HWC; this is its NCHW view)
    mean: str = "pixel"  # "pixel": minus stats.npz's mean image (the paper); "channel": minus its RGB mean
    with_index: bool = False  # also yield each sample's position in the split (int64 [B], on the CPU)

    def __post_init__(self):
        if self.mean not in MEANS:
            raise ValueError(f"mean {self.mean!r}: expected 'pixel' or 'channel'")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r}: expected one of {', '.join(DTYPES)}")


@dataclass(frozen=True)
class Reading:
    """How a loader reads its shards and runs its pipeline: speed and memory, never which samples or crops."""
    num_threads: int | None = None  # DALI CPU threads; None: every CPU this process may use
    prefetch: int = 2  # batches DALI prepares ahead (its prefetch_queue_depth)
    storage: str = "local"  # evaluation's shard reader: "network" (Lustre, GPFS, NFS) reads without mmap
    reader_workers: int | None = None  # training: processes reading samples; None: loader.default_reader_workers
    hw_decoder_load: float | None = None  # GPU: share of a batch for the hardware JPEG decoder; None: 0.75
    reads_in_flight: int | None = None  # training: sample reads waiting on the storage at once; None: READS_IN_FLIGHT

    def __post_init__(self):
        if self.storage not in STORAGES:
            raise ValueError(f"storage {self.storage!r}: expected 'local' or 'network'")
        if self.reads_in_flight is not None and self.reads_in_flight < 1:
            raise ValueError(f"reads_in_flight {self.reads_in_flight}: must be at least 1")
        if self.reader_workers is not None and self.reader_workers < 0:
            raise ValueError(f"reader_workers {self.reader_workers}: must be at least 0")
