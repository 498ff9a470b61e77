"""The training reader's startup and memory on a split of ImageNet's size: each figure from a fresh process.

    python -m shards synthetic --out=data/fullsize        # 1,281,167 samples in 1,024 shards, about 2 minutes
    python -m bench.scale --data=data/fullsize             # the figures below, as a table and JSON

  table_parse     `order.read_table` over every `.idx` of the split: seconds (and CPU seconds, which a loaded
                  machine distorts less), and the peak memory it adds
  table_cached    `order.load_table` with its `.npy` cache present (every later start): seconds
  order_and_table the memory one rank adds for the sample table (mapped from the cache, every page touched) and
                  one epoch's permutation
  first_batch     seconds from calling `train_loader(...)` (cache present) to its first batch, and to building it
  worker          resident memory of each reader worker (`--reader_workers`, default 2) after a few batches:
                  RSS, and PSS, which counts the pages it shares with other processes (the mapped table) in part
The targets (issue "ImageNet scale"): order and table at most 100 MB per rank, each worker at most 150 MB, first
batch within 10 s on 1,024 shards.
"""
import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from bench.harness import REPO, cpu_name
from config import parse_config
from runtime import UsageError, run_main
from shardformat import MANIFEST

MEMORY = '''
def memory(pid="self"):
    """(RSS, peak RSS, PSS) of a process in MiB, from /proc."""
    fields = {}
    for name in ("status", "smaps_rollup"):
        for line in open(f"/proc/{pid}/{name}"):
            key, _, value = line.partition(":")
            if value.strip().endswith("kB"):
                fields[key] = int(value.split()[0]) / 1024
    return fields["VmRSS"], fields["VmHWM"], fields["Pss"]
'''

TABLE_PARSE = '''
import time
from pipeline.data import read_split
from pipeline.order import read_table
split = read_split(DATA, "train", check=False)
before = memory()[0]
start, cpu = time.perf_counter(), time.process_time()
table = read_table(split.tars, split.indexes)
print({"seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu,
       "peak_added_mib": memory()[1] - before, "samples": len(table)})
'''

TABLE_CACHED = '''
import time
import numpy as np
from pipeline.data import read_split
from pipeline.order import GlobalOrder, load_table
split = read_split(DATA, "train", check=False)
load_table(split.tars, split.indexes)  # writes the cache if it is missing
rss = memory()[0]
start = time.perf_counter()
table = load_table(split.tars, split.indexes)
seconds = time.perf_counter() - start
touched = int(sum(int(np.asarray(getattr(table, c)).sum() & 1) for c in ("shard", "start", "span", "label_at")))
permutation = GlobalOrder(len(table), 128, 8, 0, 0).permutation(0)
print({"seconds": seconds, "order_and_table_mib": memory()[0] - rss, "cache": table.cache})
'''

FIRST_BATCH = '''
import subprocess, time
from pipeline import Reading, train_loader
start, cpu = time.perf_counter(), time.process_time()
loader = train_loader(DATA, 128, reading=Reading(reader_workers=WORKERS))
built = time.perf_counter() - start
batches = iter(loader)
next(batches)
first, first_cpu = time.perf_counter() - start, time.process_time() - cpu
for _ in range(8):
    next(batches)
children = subprocess.run(["pgrep", "-P", str(os.getpid())], capture_output=True, text=True).stdout.split()
workers = [memory(pid) for pid in children if b"spawn_main" in open(f"/proc/{pid}/cmdline", "rb").read()]
print({"built_s": built, "first_batch_s": first, "first_batch_cpu_s": first_cpu, "rank_rss_mib": memory()[0],
       "workers": [{"rss_mib": rss, "pss_mib": pss} for rss, _, pss in workers]})
'''


@dataclasses.dataclass
class ScaleConfig:
    data: str = "data/fullsize"  # a split of ImageNet's size (`python -m shards synthetic`)
    reader_workers: int = 2  # reader workers for the worker figures
    out: str = ""  # JSON results; empty: bench-results/scale-<host>.json


def run(template: str, **values) -> dict:
    """Run a template above in a fresh interpreter, its DATA and WORKERS replaced by `values`; what it printed."""
    code = MEMORY + template
    for name, value in values.items():
        code = code.replace(name.upper(), repr(value))
    proc = subprocess.run([sys.executable, "-c", "import os\n" + code], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return eval(proc.stdout.strip().splitlines()[-1], {})  # a dict literal this module's own code printed


def main(argv: list[str]) -> None:
    cfg = parse_config(ScaleConfig, argv, description=__doc__)
    if not (Path(cfg.data) / MANIFEST).is_file():
        raise UsageError(f"{cfg.data}: no {MANIFEST} (python -m shards synthetic --out={cfg.data})")
    data = str(Path(cfg.data).resolve())
    figures = {"table_parse": run(TABLE_PARSE, data=data), "table_cached": run(TABLE_CACHED, data=data),
               "first_batch": run(FIRST_BATCH, data=data, workers=0),
               "with_workers": run(FIRST_BATCH, data=data, workers=cfg.reader_workers)}
    parse, cached, first, workers = figures.values()
    print(f"{cpu_name()}, {os.cpu_count()} cores; {data}: {parse['samples']:,} samples")
    print(f"table_parse      {parse['seconds']:8.2f} s   ({parse['cpu_seconds']:.2f} s of CPU) "
          f"+{parse['peak_added_mib']:.0f} MiB peak")
    print(f"table_cached     {cached['seconds']:8.3f} s")
    print(f"order_and_table  {cached['order_and_table_mib']:8.1f} MiB per rank (table mapped, one permutation)")
    print(f"first_batch      {first['first_batch_s']:8.2f} s   ({first['first_batch_cpu_s']:.2f} s of CPU; loader "
          f"returned after {first['built_s']:.2f} s; rank RSS {first['rank_rss_mib']:.0f} MiB, no workers)")
    print(f"with {cfg.reader_workers} workers     {workers['first_batch_s']:8.2f} s   to the first batch; per worker: "
          + ", ".join(f"RSS {w['rss_mib']:.0f} MiB (PSS {w['pss_mib']:.0f})" for w in workers["workers"]))
    out = Path(cfg.out or f"bench-results/scale-{socket.gethostname()}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"data": data, "cpu": cpu_name(), "figures": figures}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    run_main(main)
