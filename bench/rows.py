"""The rows `python -m bench` can measure: one record per row, with its label, how its work is built, the devices
whose default run measures it and the rows its ratio lines compare it with.

A row's `build` takes the `Setting` of the run and returns {result name: work} (bench/harness.py times the works)
or a string saying why the row is skipped. Adding a row is adding one `Row` to ROWS.
"""
import contextlib
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import torch

from bench import latencyfs, training
from bench.preprocess import preprocess_works
from pipeline.options import READS_IN_FLIGHT


@dataclass(frozen=True)
class Setting:
    """What every row is built from: the options (bench's BenchConfig) and what main made of them."""
    cfg: object  # BenchConfig
    manifest: dict
    device: torch.device
    batch: int
    threads: int
    mounts: contextlib.ExitStack  # holds a row's mount (the latency rows) until every row is measured

    @property
    def num_classes(self) -> int:
        return len(self.manifest["classes"])

    @property
    def reader_workers(self) -> int | None:
        return None if self.cfg.reader_workers < 0 else self.cfg.reader_workers

    @property
    def reads_in_flight(self) -> int | None:
        return self.cfg.reads_in_flight or None


@dataclass(frozen=True)
class Ratio:
    key: str  # in the JSON's "ratios"
    denominator: str  # the row this one's images/s is divided by
    text: str  # the table's line


@dataclass(frozen=True)
class Row:
    name: str
    label: str  # the table's label, formatted with main's figures ({cores}, {threads}, {device}, ...)
    build: Callable[[Setting], dict | str] | None  # None: measured by the row `part_of` names
    devices: tuple[str, ...] = ()  # device types whose default run measures it
    ratios: tuple[Ratio, ...] = ()  # this row's images/s over others'
    part_of: str = ""  # the row whose work measures this one too
    interleaved: str = ""  # rows naming the same group are measured in one go, their repeats interleaved
    warmup_units: int = 2  # units run before timing


# --- how each row is built ------------------------------------------------------------------------------------------
# DALI is imported by the rows that read data, not before: the model rows run where it is not installed yet.

def model(s: Setting, compiled: bool = False) -> dict:
    name = "model_compiled" if compiled else "model"
    return {name: training.model_alone(s.num_classes, s.device, s.batch, compiled=compiled)}


def preprocess(s: Setting) -> dict | str:
    if not Path(s.cfg.raw).is_dir():
        return f"skipped: no folder of full-size JPEGs at {s.cfg.raw} (set --raw=DIR)"
    return preprocess_works(Path(s.cfg.raw), Path(s.cfg.work_dir))


def limit(s: Setting) -> dict:
    from bench import loaders
    return {"limit": loaders.limit(s.cfg.data, s.batch, s.threads)}


def pipeline(s: Setting) -> dict:
    """train_loader; on a GPU with --hw_decoder_load, one row per hardware-decoder share."""
    from bench import loaders
    data = s.cfg.data
    loads = [float(v) for v in s.cfg.hw_decoder_load.split(",") if v.strip()] if s.device.type == "cuda" else []
    if not loads:
        return {"pipeline": loaders.pipeline(data, s.batch, s.device, s.threads, reader_workers=s.reader_workers,
                                             reads_in_flight=s.reads_in_flight)}
    return {f"pipeline[hw_decoder_load={v:g}]": loaders.pipeline(data, s.batch, s.device, s.threads, v,
                                                                 s.reader_workers, s.reads_in_flight)
            for v in loads}


def latency_mount(s: Setting, name: str) -> tuple[str | None, str | None]:
    """(the shards through a FUSE mount that adds --latency_ms to every read, held until every row is measured,
    None), or (None, why a row reading through it is skipped)."""
    unavailable = latencyfs.why_unavailable()
    if unavailable:
        return None, f"skipped: {unavailable}"
    try:
        return str(s.mounts.enter_context(latencyfs.mounted(Path(s.cfg.data), Path(s.cfg.work_dir) / f"mount-{name}",
                                                            s.cfg.latency_ms))), None
    except OSError as e:  # FUSE installed, yet no mount allowed (e.g. a container without the right to mount)
        return None, f"skipped: no latency mount here ({e})"


def pipeline_latency(s: Setting) -> dict | str:
    from bench import loaders
    mount, skipped = latency_mount(s, "pipeline_latency")
    if skipped:
        return skipped
    return {"pipeline_latency": loaders.pipeline(mount, s.batch, s.device, s.threads,
                                                 reader_workers=s.reader_workers, reads_in_flight=s.reads_in_flight)}


def source_latency(s: Setting) -> dict | str:
    from bench import loaders
    mount, skipped = latency_mount(s, "source_latency")
    if skipped:
        return skipped
    return {"source_latency": loaders.source(mount, s.batch, s.reads_in_flight or READS_IN_FLIGHT)}


def source(s: Setting) -> dict:
    from bench import loaders
    return {"source": loaders.source(s.cfg.data, s.batch)}


def dali_peer(kind: str, s: Setting) -> dict:
    from bench import loaders
    return {kind: loaders.dali_peer(kind, s.cfg.data, s.batch, s.device, s.threads)}


def ffcv(s: Setting) -> dict | str:
    from bench import loaders
    if not loaders.ffcv_available():
        return "skipped: not installed (make setup PEERS=1, see the README)"
    beton = Path(s.cfg.work_dir) / f"ffcv-{Path(s.cfg.data).resolve().name}-train.beton"
    return {"ffcv": loaders.ffcv(s.cfg.data, s.batch, s.device, s.threads, beton)}


def alternative(s: Setting) -> dict:
    from bench import loaders
    return {"alternative": loaders.alternative(s.cfg.data, s.batch, s.device, s.threads)}


def tencrop(s: Setting) -> dict | str:
    from bench import loaders
    if "val" not in s.manifest["splits"]:
        return "skipped: the shards have no val split"
    return {"tencrop": loaders.tencrop(s.cfg.data, min(s.batch, 64), s.device, s.threads)}  # 64 images = 640 patches


def eval_tencrop(s: Setting) -> dict | str:
    if "val" not in s.manifest["splits"]:
        return "skipped: the shards have no val split"
    return {"eval_tencrop": training.eval_tencrop(s.cfg.data, s.num_classes, s.device, min(s.batch, 64), s.threads)}


def end_to_end(s: Setting, compiled: bool = False) -> dict:
    name = "end_to_end_compiled" if compiled else "end_to_end"
    return {name: training.end_to_end(s.cfg.data, s.num_classes, s.device, s.batch, s.threads, compiled,
                                      s.reader_workers, s.reads_in_flight)}


def breakdown(s: Setting) -> dict | str:
    from bench.breakdown import breakdown_works
    if s.device.type == "cuda":
        return "skipped: the breakdown is of the CPU pipeline (--device=cpu)"
    return breakdown_works(s.cfg.data, s.batch, s.threads)


# --- the rows, in the order of the table and of --help --------------------------------------------------------------
CPU, GPU, BOTH = ("cpu",), ("cuda",), ("cpu", "cuda")
# Rows whose ratio is a target are measured in one go, their repeats interleaved, so that the machine's load changes
# hit both alike (preprocess and its naive baseline are one row already).
PIPELINE_READERS = "pipeline readers"

ROWS = {row.name: row for row in (
    Row("preprocess", "preprocess: make shards (whole command, {cores} cores)", preprocess, CPU,
        (Ratio("preprocess_vs_naive", "preprocess_naive", "make shards / naive Pillow loop (goal >= 0.9)"),)),
    Row("preprocess_naive", "preprocess: naive Pillow loop ({cores} processes)", None, part_of="preprocess"),
    Row("limit", "limit: libjpeg-turbo decode only, {threads} processes", limit, CPU),
    Row("pipeline", "pipeline: train_loader ({device}, {threads} threads)", pipeline, BOTH, (
        Ratio("pipeline_vs_limit", "limit", "train pipeline / decode limit"),
        Ratio("pipeline_vs_webdataset", "pipeline_webdataset", "global order / previous reader (>= 0.9)"),
        Ratio("pipeline_vs_dali_stock", "dali_stock", "train pipeline / DALI's example pipeline"),
        Ratio("pipeline_vs_ffcv", "ffcv", "train pipeline / FFCV"),
        Ratio("pipeline_vs_alternative", "alternative", "train pipeline / DataLoader+webdataset"),
        Ratio("pipeline_vs_model", "model", "train pipeline / model alone (>1: data is not the limit)"),
    ), interleaved=PIPELINE_READERS),
    Row("pipeline_latency", "pipeline, storage adding {latency_ms:g} ms per read (FUSE)", pipeline_latency, BOTH,
        (Ratio("pipeline_latency_vs_pipeline", "pipeline", "train pipeline, slow storage / direct (>= 0.8)"),),
        interleaved=PIPELINE_READERS),
    Row("source", "pipeline's sample source alone, one process", source, GPU),
    Row("source_latency", "sample source alone, {latency_ms:g} ms per read, {reads} reads in flight",
        source_latency),
    Row("pipeline_webdataset", "pipeline over DALI's webdataset reader (previous)",
        partial(dali_peer, "pipeline_webdataset"), BOTH, interleaved=PIPELINE_READERS),
    Row("dali_stock", "peer: DALI as in NVIDIA's examples (no PCA)", partial(dali_peer, "dali_stock"), BOTH),
    Row("ffcv", "peer: FFCV {ffcv} ({threads} workers)", ffcv, BOTH),
    Row("alternative", "peer: DataLoader+webdataset+Pillow ({threads} workers)", alternative, BOTH),
    Row("tencrop", "pipeline: ten-crop (1 image = 10 patches)", tencrop, BOTH),
    Row("model", "model alone: train.py's step, synthetic batch", model, BOTH),
    Row("model_compiled", "model alone, --compile", partial(model, compiled=True), GPU),
    Row("end_to_end", "end to end: train.py's step fed by train_loader", end_to_end, BOTH,
        (Ratio("end_to_end_vs_model", "model", "end to end / model alone (1.0: the GPU never waits)"),)),
    Row("end_to_end_compiled", "end to end, --compile", partial(end_to_end, compiled=True), GPU,
        (Ratio("end_to_end_compiled_vs_model_compiled", "model_compiled", "end to end / model alone, compiled"),)),
    Row("eval_tencrop", "eval.py ten-crop pass over the val split", eval_tencrop, GPU, warmup_units=0),
    Row("breakdown", "breakdown", breakdown),  # its results are named by the steps it cuts the pipeline into
)}


def default_rows(device_type: str) -> list[str]:
    """The rows measured when --what is not given."""
    return [row.name for row in ROWS.values() if device_type in row.devices]


def ratios() -> list[tuple[str, Ratio]]:
    """(numerator, ratio) of every ratio line, in the table's order."""
    return [(row.name, ratio) for row in ROWS.values() for ratio in row.ratios]
