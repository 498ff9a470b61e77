"""How fast the commands users run are, next to the baselines and peers they would pick instead; one table + JSON.

    python -m bench --data=DATA                                  # the default rows on this machine
    python -m bench --data=DATA --what=pipeline,ffcv,alternative --seconds=20
    python -m bench --data=DATA --device=cuda --what=pipeline --hw_decoder_load=0,0.5,0.75,1
    python -m bench --data=DATA --what=breakdown                 # where the CPU pipeline's time goes
    make bench-data && make bench DATA=data/bench                # realistic: the 1000 real images x20

Every row is timed the same way (bench/harness.py): a warm-up, then `repeats` timed repeats of about
`seconds / repeats` each; the median images/s counts and the lowest and highest are shown beside it. The rows:
  preprocess, preprocess_naive  the whole `python -m shards build` against a naive all-core Pillow loop, each run
                as its own command on the real JPEGs in `raw` (bench/preprocess.py)
  limit, pipeline, source, pipeline_webdataset, dali_stock, ffcv, alternative, tencrop    data loading
                (bench/loaders.py)
  pipeline_latency, source_latency    the pipeline and its sample source reading through a FUSE mount that adds
                --latency_ms to every read (bench/latencyfs.py; skipped without FUSE)
  model, end_to_end, model_compiled, end_to_end_compiled, eval_tencrop          the network (bench/training.py)
  breakdown     the CPU pipeline cut down step by step (bench/breakdown.py)
Figures on the built-in procedural sample are not representative (its images are tiny to decode): the
benchmark says so and measures anyway.
"""
import contextlib
import dataclasses
import json
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from bench import rows
from bench.folders import REAL_IMAGES
from bench.harness import hardware, measure, package_version
from bench.rows import ROWS, Setting
from config import parse_config
from pipeline.options import READS_IN_FLIGHT
from runtime import UsageError, available_cpus, limit_threads, run_main
from shardformat import read_manifest

SMALL_SPLIT = 5000  # samples: below this an epoch is over within seconds, so repeats see epoch restarts


@dataclass
class BenchConfig:
    data: str = "data/sample"  # shard directory (docs/FORMAT.md)
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: the GPU when there is one
    what: str = ""  # comma list of rows (see --help); empty: the default rows for the device
    batch_size: int = 0  # images per batch; 0: 64 on the CPU, 256 on a GPU (ten-crop: at most 64)
    seconds: float = 6.0  # timed seconds per row, split over the repeats (plus a warm-up)
    repeats: int = 3  # timed repeats per row; the median counts
    num_threads: int = 0  # DALI threads = decode processes = DataLoader/FFCV workers; 0: every usable core
    hw_decoder_load: str = ""  # GPU: comma list of hardware-decoder shares, one pipeline row each (empty: default)
    reader_workers: int = -1  # processes reading training samples (-1: train_loader's default for the device)
    reads_in_flight: int = 0  # training reads waiting on the storage at once (0: train_loader's default)
    latency_ms: float = 5.0  # pipeline_latency: added to every read by the FUSE mount (bench/latencyfs.py)
    raw: str = str(REAL_IMAGES)  # flat folder of real full-size <wnid>_*.JPEG for the preprocess rows
    work_dir: str = "bench-results/work"  # scratch: preprocess outputs, the FFCV dataset
    out: str = ""  # JSON results; empty: bench-results/bench-<host>-<device>.json


def is_procedural_sample(manifest: dict) -> bool:
    """The built-in sample (`shards sample`): its ten WNIDs exactly."""
    from shards.sample import CLASSES
    return {c["wnid"] for c in manifest["classes"]} == {c.wnid for c in CLASSES}


def data_notes(manifest: dict) -> list[str]:
    notes = []
    if is_procedural_sample(manifest):
        notes.append("WARNING: the built-in procedural sample: its images are too easy to decode to be a fair "
                     "benchmark. Use real shards (DATA=...) or `make bench-data` (the 1000 real images x20).")
    train = manifest["splits"]["train"]["num_samples"]
    if train < SMALL_SPLIT:
        notes.append(f"note: only {train} training samples: epochs restart within each timed repeat")
    if manifest.get("params", {}).get("replicated"):
        notes.append(f"note: replicated data ({manifest['params']['replicated']} copies of the same images), "
                     "for benchmarking only")
    return notes


def measured_together(what: list[str]) -> list[list[str]]:
    """The requested rows in order, grouped: rows of one `interleaved` group share a group."""
    groups = {}
    for key in what:
        groups.setdefault(ROWS[key].interleaved or key, []).append(key)
    return list(groups.values())


def label(key: str, fmt: dict) -> str:
    base, _, variant = key.partition("[")
    text = (ROWS[base].label if base in ROWS else key).format(**fmt)
    return f"{text} [{variant}" if variant else text


def table(results: dict, ratios: dict, fmt: dict) -> str:
    head = (f"{'measurement':<58} {'images/s':>10} {'low-high':>15} {'per core':>9} {'CPU ms':>7} {'caller':>7} "
            f"{'host MiB':>9} {'GPU MiB':>15}")
    lines = [head, "-" * len(head)]
    for key, r in results.items():
        if "skipped" in r:
            lines.append(f"{label(key, fmt):<58} {r['skipped']}")
            continue
        gpu = f"{r['gpu_torch_peak_mib']:.0f}/{r['gpu_device_used_mib']:.0f}" if "gpu_torch_peak_mib" in r else "-"
        per_core = f"{r['per_core']:.1f}" if "per_core" in r else ""
        lines.append(f"{label(key, fmt):<58} {r['images_per_s']:>10.1f} {r['low']:>7.0f}-{r['high']:<7.0f} "
                     f"{per_core:>9} {r['cpu_ms_per_image']:>7.3f} {r['caller_ms_per_image']:>7.3f} "
                     f"{r.get('host_rss_peak_mib', 0):>9.0f} {gpu:>15}")
    if ratios:
        lines += ["", f"{'ratio (medians)':<58} {'x':>10}", "-" * 69]
        lines += [f"{r.text:<58} {ratios[r.key]:>10.2f}" for _, r in rows.ratios() if r.key in ratios]
    return "\n".join(lines)


def main(argv):
    cfg = parse_config(BenchConfig, argv, __doc__)
    if cfg.seconds <= 0 or cfg.repeats < 1:
        raise UsageError("--seconds must be positive and --repeats at least 1")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device=cuda but no CUDA GPU is available")
    cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    what = [w.strip() for w in cfg.what.split(",") if w.strip()] if cfg.what else rows.default_rows(device.type)
    unknown = [w for w in what if w not in ROWS]
    if unknown:
        raise UsageError(f"--what: unknown {', '.join(unknown)} (choose from {', '.join(ROWS)})")
    what = list(dict.fromkeys(ROWS[w].part_of or w for w in what))  # a part is measured by its row
    try:
        manifest = read_manifest(cfg.data)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(str(e)) from None
    batch = cfg.batch_size or (256 if cuda else 64)
    threads = cfg.num_threads or available_cpus()
    limit_threads(threads)
    notes = data_notes(manifest)
    for note in notes:
        print(note, file=sys.stderr)
    fmt = dict(threads=threads, cores=available_cpus(), device=device.type,
               ffcv=package_version("ffcv") or "", latency_ms=cfg.latency_ms,
               reads=cfg.reads_in_flight or READS_IN_FLIGHT)
    results = {}
    with contextlib.ExitStack() as mounts:  # a row's mount stays until every row is measured
        setting = Setting(cfg, manifest, device, batch, threads, mounts)
        for group in measured_together(what):
            print(f"measuring {' and '.join(group)} ...", file=sys.stderr, flush=True)
            works = {}
            for key in group:
                row = ROWS[key].build(setting)
                if isinstance(row, str):
                    results[key] = {"skipped": row}
                    print(f"  {key}: {row}", file=sys.stderr)
                else:
                    works.update(row)
            if not works:
                continue
            rates = measure(works, seconds=cfg.seconds, repeats=cfg.repeats, device=device,
                            warmup_units=min(ROWS[key].warmup_units for key in group))
            for name, rate in rates.items():
                results[name] = rate.as_dict()
                if name.startswith("preprocess"):
                    results[name]["per_core"] = rate.median / fmt["cores"]
                print(f"  {name}: {rate.median:.1f} images/s ({rate.low:.1f}-{rate.high:.1f})", file=sys.stderr)
    ratios = {r.key: results[num]["images_per_s"] / results[r.denominator]["images_per_s"] for num, r in rows.ratios()
              if "images_per_s" in results.get(num, {}) and "images_per_s" in results.get(r.denominator, {})}
    record = {"config": dataclasses.asdict(cfg), "device": device.type, "batch_size": batch, "threads": threads,
              "hardware": hardware(device), "load_average": os.getloadavg(), "notes": notes,
              "data": {"path": str(Path(cfg.data).resolve()), "procedural_sample": is_procedural_sample(manifest),
                       "train_samples": manifest["splits"]["train"]["num_samples"],
                       "val_samples": manifest["splits"].get("val", {}).get("num_samples"),
                       "replicated": manifest.get("params", {}).get("replicated", 1)},
              "results": results, "ratios": ratios, "labels": {k: label(k, fmt) for k in results}}
    hw = record["hardware"]
    gpu = f", {hw['gpu']['name']} (driver {hw['gpu']['driver']}, CUDA {hw['gpu']['cuda']})" if hw["gpu"] else ""
    print(f"\n{hw['cpu']} ({hw['cpus_usable']} of {hw['cpu_count']} cores usable){gpu}; torch {torch.__version__}, "
          f"DALI {hw['versions']['nvidia-dali-cuda130'] or hw['versions']['nvidia-dali-cuda120']}, Pillow "
          f"{hw['versions']['pillow']}; batch {batch}, {threads} threads; median of {cfg.repeats} after warm-up; "
          f"load average {record['load_average'][0]:.2f}")
    print(f"data: {record['data']['path']} ({record['data']['train_samples']} train samples)")
    print(table(results, ratios, fmt))
    for note in notes:
        print(note)
    out = Path(cfg.out or f"bench-results/bench-{socket.gethostname()}-{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    run_main(main)
