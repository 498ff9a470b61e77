"""When reading fails: which sample or shard is at fault, found from the failed step alone, and what replaces a bad
sample.

A pipeline that fails reports a batch, not a sample. The loader knows which step failed and which steps DALI had
queued after it, and so which samples they hold (at most a few hundred per rank); `diagnose` checks only those:
first that their shards are still whole and readable, then each JPEG on its own with DALI's CPU decoder
(libjpeg-turbo, the decoder of the CPU pipelines). It never reads the rest of the split: its time depends on the
samples checked, not on the split's size.

What DALI's decoder fails on, as tried with DALI 2.4 on the CPU: a JPEG overwritten with zeros, cut short, or
without its end marker. What it decodes: a flipped byte in the entropy-coded data (libjpeg-turbo warns "Corrupt
JPEG data" and goes on), a run of 0xFF bytes there, 50 zeroed bytes in the tables before the scan: the image is
damaged but the run goes on, and here that is no fault either. Pillow refuses some of these (the 0xFF run), so it
would name samples that stop nothing; DALI's own decoder keeps "bad" to what stops a run. The GPU decoder (nvJPEG)
was not tried: a sample that only it refuses is not found here, and the error then says that every sample of the
failed steps decodes on the CPU.

A bad sample is replaced (the `skip` policy) by `substitute`: the next sample of the split, in shard order, that is
not bad. It depends on the sample alone, so every rank that meets it, in this run or a resumed one, replaces it
the same way and the global batches stay the same on any number of ranks.
"""
import os
from dataclasses import asdict, dataclass

import numpy as np

from pipeline.data import DataError, check_shard
from pipeline.order import SampleReader, SampleTable
from shardformat import index_path

TAR_BLOCK = 512  # bytes: a tar member's header precedes its data by one block


@dataclass(frozen=True)
class BadSample:
    """A sample whose JPEG the decoder refuses, and where it was met (epoch and step as metrics.jsonl counts them)."""
    split: str
    sample: int  # its number in the split, in shard order (the loaders' sample table)
    shard: str  # the tar's path
    key: str  # the sample's key in the tar (the source image's name)
    epoch: int | None  # 1-based; None for an evaluation pass
    step: int  # training: global steps done when the batch holding it ends (its row's "step"); evaluation: batch
    error: str  # the decoder's reason, one line

    def describe(self) -> str:
        when = f"epoch {self.epoch}, global step {self.step}" if self.epoch is not None else f"batch {self.step}"
        return f"bad sample in split {self.split!r}: {self.shard}: {self.key} ({when}): {self.error}"

    def as_row(self) -> dict:
        return asdict(self)


class BadSampleError(RuntimeError):
    """One or more samples of the batches that failed cannot be decoded; `found` lists them."""

    def __init__(self, found: list[BadSample]):
        more = f" (and {len(found) - 1} more in the same batches)" if len(found) > 1 else ""
        super().__init__(found[0].describe() + more)
        self.found = found


@dataclass(frozen=True)
class Candidate:
    """A sample the failed pipeline may have been working on, and when (as BadSample counts it)."""
    sample: int
    epoch: int | None
    step: int


def diagnose(error: BaseException, split: str, table: SampleTable, candidates: list[Candidate], where: str):
    """The exception that explains `error`, a failure of the batches `candidates` belong to (`where` says which).

    DataError: a shard of theirs is missing, unreadable or shorter than its index. BadSampleError: some of their
    JPEGs do not decode. Otherwise a RuntimeError naming the split and the steps, with the pipeline's first line.
    """
    samples = np.array([c.sample for c in candidates], np.int64)
    for shard in sorted(set(table.shard[samples].tolist())):
        tar = table.tars[shard]
        try:
            check_shard(tar, str(index_path(tar)))
        except DataError as e:
            return DataError(f"reading split {split!r} ({where}): {e}")
    first_met = {}  # a sample may come again in a queued step of the next epoch
    for candidate in candidates:
        first_met.setdefault(candidate.sample, candidate)
    reader, decoder = SampleReader(table), SingleDecoder()
    found = []
    for candidate in first_met.values():
        jpegs, _, _, _ = reader.read(np.array([candidate.sample]))
        reason = decoder.failure(jpegs[0])
        if reason:
            found.append(BadSample(split, candidate.sample, table.tars[table.shard[candidate.sample]],
                                   sample_key(table, candidate.sample), candidate.epoch, candidate.step, reason))
    if found:
        return BadSampleError(found)
    first = next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)
    return RuntimeError(f"reading split {split!r} ({where}) failed, yet each of the {len(first_met)} samples of that "
                        f"batch and the queued ones decodes on the CPU on its own: {first}")


class SingleDecoder:
    """DALI's CPU JPEG decoder, one sample at a time: `failure(jpeg)` is its reason to refuse it, or ""."""

    def __init__(self):
        from nvidia.dali import fn, pipeline_def, types

        self._next = None

        @pipeline_def(batch_size=1, num_threads=1, device_id=None, exec_dynamic=True, prefetch_queue_depth=1)
        def decode_one():
            jpeg = fn.external_source(source=lambda: [self._next], batch=True, dtype=types.UINT8)
            return fn.decoders.image(jpeg, device="cpu", output_type=types.RGB)

        self._pipe = decode_one()
        self._pipe.build()

    def failure(self, jpeg: np.ndarray) -> str:
        self._next = np.ascontiguousarray(jpeg)
        try:
            self._pipe.run()  # a failed run leaves the pipeline usable for the next sample (dynamic executor)
        except RuntimeError:  # DALI's message says only "Failed to decode sample #0"; the markers say more
            return f"the JPEG does not decode: {damage(jpeg.tobytes())}"
        return ""


def damage(jpeg: bytes) -> str:
    """What is visibly wrong with a JPEG the decoder refused."""
    if jpeg[:2] != b"\xff\xd8":
        return "not a JPEG (no start marker)"
    if jpeg[-2:] != b"\xff\xd9":
        return "no end marker (cut short or overwritten)"
    return "damaged headers or data"


def sample_key(table: SampleTable, sample: int) -> str:
    """The key of a sample: the name of its .jpg member, read from the tar header just before its data."""
    with open(table.tars[table.shard[sample]], "rb") as f:
        header = os.pread(f.fileno(), TAR_BLOCK, int(table.start[sample]) - TAR_BLOCK)
    name = header[:100].split(b"\0")[0].decode(errors="replace")
    return name.rsplit(".", 1)[0] if name else f"sample at byte {int(table.start[sample])}"


def substitute(sample: int, bad: set[int], num_samples: int) -> int:
    """What replaces bad `sample`: the next sample of the split (in shard order, wrapping) that is not bad."""
    for step in range(1, num_samples):
        other = (sample + step) % num_samples
        if other not in bad:
            return other
    raise ValueError(f"every one of the split's {num_samples} samples is bad")


def substitutes(bad: set[int], num_samples: int) -> dict[int, int]:
    """bad sample -> its substitute, for every bad sample."""
    return {sample: substitute(sample, bad, num_samples) for sample in sorted(bad)}
