"""The training reader at scale, from the outside: many shards under a low open-file limit, many reads in flight
with unchanged batches, the sample table shared through its cache, reader workers without torch, workers from
the rank's CPU share, and the storage-latency benchmark row."""
import json
import os
import pickle
import resource
import shutil
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pipeline import Output, Reading, loader, train_loader
from pipeline import order as order_module
from pipeline.augment import Augment
from pipeline.data import read_split, read_stats
from pipeline.order import GlobalOrder, TrainSource, load_table, read_table
from tests import shardkit
from tests.conftest import REPO

WITH_INDEX = Output(with_index=True)


@pytest.fixture(scope="module")
def many_shards(tmp_path_factory):
    """1,024 shards of 4 samples (`shards synthetic`): sample i has position i and class i % 1000."""
    data = tmp_path_factory.mktemp("many") / "data"
    shardkit.run_cli("synthetic", f"--out={data}", "--samples=4096", "--shards=1024")
    return data


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    rng = np.random.default_rng(0)
    items = [(np.kron(rng.integers(0, 256, (16, 16, 3)), np.ones((16, 16, 1))).astype(np.uint8), i % 4)
             for i in range(40)]
    return shardkit.write_data(tmp_path_factory.mktemp("small"), {"train": items}, shard_size=8)


def run_python(code: str, *, open_files: int | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter from the repository, optionally under a soft and hard open-file limit."""
    limit = (lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (open_files, open_files))) if open_files else None
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          preexec_fn=limit, env={**os.environ, "PYTHONPATH": str(REPO)})


def test_synthetic_set_passes_verify(many_shards):
    assert "OK: 1024 shards" in shardkit.run_cli("verify", f"--data={many_shards}").stdout
    assert json.loads((many_shards / "manifest.json").read_text())["splits"]["train"]["num_samples"] == 4096


@pytest.mark.slow
def test_1024_shards_under_an_open_file_limit_of_256(many_shards):
    """Every global batch as the order says, in this process and in a reader worker, while at most 256 files may
    be open: more shards are touched than that, so the reader must close some to open others."""
    steps, batch = 24, 64  # 1,536 samples: about 800 of the 1,024 shards
    code = f"""
import json, numpy as np, resource
from pipeline import Output, Reading, train_loader
assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == 256
out = {{}}
for workers in (0, 1):
    loader = train_loader({str(many_shards)!r}, {batch}, output=Output(with_index=True),
                          reading=Reading(num_threads=1, reader_workers=workers))
    batches = iter(loader)
    out[workers] = [[x.tolist() for x in next(batches)[1:]] for _ in range({steps})]
print(json.dumps(out))
"""
    run = run_python(code, open_files=256)
    assert run.returncode == 0, run.stderr[-3000:]
    permutation = GlobalOrder(4096, batch, 1, 0, 0).permutation(0)
    for workers, batches in json.loads(run.stdout).items():
        for step, (labels, index) in enumerate(batches):
            assert index == permutation[step * batch:(step + 1) * batch].tolist(), (workers, step)
            assert labels == [i % 1000 for i in index]
    touched = len(set(permutation[:steps * batch] // 4))
    assert touched > 256, touched


class SlowReads:
    """os.preadv as the reader calls it, taking `seconds` per read, counting the reads under way at once."""

    def __init__(self, seconds: float):
        self.seconds, self.now, self.most = seconds, 0, 0
        self.read = os.preadv
        self._lock = threading.Lock()

    def __call__(self, fd, buffers, offset):
        with self._lock:
            self.now += 1
            self.most = max(self.most, self.now)
        time.sleep(self.seconds)
        with self._lock:
            self.now -= 1
        return self.read(fd, buffers, offset)


def source_of(data, batch: int, **reads) -> TrainSource:
    split, stats = read_split(data, "train"), read_stats(data)
    table = read_table(split.tars, split.indexes)
    return TrainSource(GlobalOrder(len(table), batch, 1, 0, 3), table, 0, augment=Augment.of(0.1, stats, "pixel"),
                       keep_batches=0, **reads)


def batches_of(source: TrainSource, iterations: int) -> list:
    return [source(SimpleNamespace(iteration=i)) for i in range(iterations)]


def assert_same_batches(a, b):
    for x, y in zip(a, b, strict=True):
        (jpegs_x, *rest_x), (jpegs_y, *rest_y) = x, y
        assert [j.tobytes() for j in jpegs_x] == [j.tobytes() for j in jpegs_y]
        assert all(np.array_equal(u, v) for u, v in zip(rest_x, rest_y))


def test_reads_in_flight_overlap_and_leave_the_batches_unchanged(small, monkeypatch):
    one_at_a_time = batches_of(source_of(small, 8), 10)  # 10 steps of 5 per epoch: two epochs
    slow = SlowReads(0.02)
    monkeypatch.setattr(order_module.os, "preadv", slow)
    start = time.monotonic()
    source = source_of(small, 8, reads_in_flight=16, read_ahead=1)
    many = batches_of(source, 10)
    elapsed = time.monotonic() - start
    assert_same_batches(one_at_a_time, many)
    assert slow.most == 16, "two batches of 8 read at once"
    assert elapsed < 80 * 0.02 / 4, f"80 reads of 20 ms took {elapsed:.2f} s"
    jpegs = many[0][0]
    assert all(j.base is jpegs[0].base for j in jpegs), "one buffer per batch"
    spans = source.reader.table.span[source.samples(0, 0)]
    assert jpegs[0].base.nbytes == spans.sum(), "each sample's bytes once, no padding to the longest"


def test_loader_batches_do_not_depend_on_how_they_are_read(small):
    def images(reading):
        epochs = train_loader(small, 8, output=WITH_INDEX, reading=reading)
        return [batch for _ in range(2) for batch in epochs]  # 5 steps each: read ahead across an epoch's end
    reference = images(Reading(num_threads=1, reads_in_flight=1))
    for reading in (Reading(num_threads=1), Reading(num_threads=2, reads_in_flight=3)):
        for (x, y, i), (x0, y0, i0) in zip(images(reading), reference):
            assert torch.equal(i, i0) and torch.equal(y, y0) and torch.equal(x, x0)


def test_sample_table_is_cached_beside_the_indexes_and_shared_by_name(small):
    split = read_split(small, "train")
    parsed = read_table(split.tars, split.indexes)
    first, second = load_table(split.tars, split.indexes), load_table(split.tars, split.indexes)
    assert first.cache and first.cache == second.cache and os.path.dirname(first.cache) == str(small / "train")
    assert isinstance(second.start, np.memmap) or isinstance(second.start.base, np.memmap)
    for name in ("shard", "start", "jpeg_size", "label_at", "pos_at", "span"):
        assert np.array_equal(getattr(parsed, name), getattr(second, name)), name
    shipped = pickle.dumps(second)
    assert len(shipped) < 2000 and np.array_equal(pickle.loads(shipped).start, parsed.start)
    idx = split.indexes[2]
    os.utime(idx, ns=(time.time_ns(), time.time_ns() + 10**9))  # a rewritten index: parsed again
    assert load_table(split.tars, split.indexes).cache != first.cache


def test_a_table_cache_that_cannot_be_written_leaves_the_table_in_memory(small, tmp_path, monkeypatch):
    split = read_split(small, "train")
    indexes = []
    for idx in split.indexes:  # a copy of the indexes, so that no cache is there yet
        indexes.append(str(tmp_path / os.path.basename(idx)))
        shutil.copyfile(idx, indexes[-1])

    def read_only(path):
        raise PermissionError(13, "Read-only file system", str(path))
    monkeypatch.setattr(order_module, "atomic_path", read_only)
    table = load_table(split.tars, indexes)
    assert table.cache is None and not list(tmp_path.glob("*.npy"))
    parsed = read_table(split.tars, split.indexes)
    for name in ("shard", "start", "jpeg_size", "label_at", "pos_at", "span"):
        assert np.array_equal(getattr(parsed, name), getattr(table, name)), name


def test_index_parsing_by_column_equals_parsing_by_line_and_falls_back_to_it(small, tmp_path):
    idx = read_split(small, "train").indexes[0]
    header, body = open(idx, "rb").read().split(b"\n", 1)
    lines, version = body.splitlines(), header.split()[0].decode()
    by_line = order_module.index_rows_by_line(idx, lines, version)
    assert np.array_equal(order_module.uniform_index_rows(body, version), by_line)
    fields = lines[1].split()
    reordered = b" ".join(fields[4:8] + fields[:4] + fields[8:])  # .cls listed before .jpg: still a sample
    shortened = b" ".join(fields[:-1])  # a member without its name
    for changed, error in ((reordered, None), (lines[1].replace(b" 4 ", b" 4x ", 1), "line 3: invalid literal"),
                           (shortened, "line 3: 15 fields, not 4 per member")):
        body_changed = b"\n".join([lines[0], changed, *lines[2:]]) + b"\n"
        assert order_module.uniform_index_rows(body_changed, version) is None
        path = tmp_path / "changed.idx"
        path.write_bytes(header + b"\n" + body_changed)
        if error is None:
            assert np.array_equal(order_module.index_rows(0, str(path)), order_module.index_rows(0, idx))
        else:
            with pytest.raises(ValueError, match=error):
                order_module.index_rows(0, str(path))


@pytest.mark.slow
def test_reader_workers_do_not_import_torch_even_from_a_script_without_a_main_guard(small, tmp_path):
    """train.py imports torch at its top; a spawned worker would run that again, ~250 MB each."""
    script = tmp_path / "no_guard.py"
    script.write_text(f"""
import os, subprocess, torch
from pipeline import Reading, train_loader
loader = train_loader({str(small)!r}, 8, reading=Reading(num_threads=1, reader_workers=2))
next(iter(loader))
for pid in subprocess.run(["pgrep", "-P", str(os.getpid())], capture_output=True, text=True).stdout.split():
    if b"spawn_main" in open(f"/proc/{{pid}}/cmdline", "rb").read():
        maps = open(f"/proc/{{pid}}/maps").read()
        rss = [line for line in open(f"/proc/{{pid}}/status") if line.startswith("VmRSS")][0].split()[1]
        print("worker", "libtorch" in maps, int(rss) // 1024)
""")
    run = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert run.returncode == 0, run.stderr[-3000:]
    workers = [line.split() for line in run.stdout.splitlines() if line.startswith("worker")]
    assert len(workers) == 2
    for _, has_torch, rss_mib in workers:
        assert has_torch == "False" and int(rss_mib) < 150, (has_torch, rss_mib)


def test_reader_workers_follow_the_rank_share_of_cpus(monkeypatch):
    monkeypatch.setattr(loader, "available_cpus", lambda: 16)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert loader.rank_cpus() == 2
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert loader.rank_cpus() == 16
    gpu, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert [loader.default_reader_workers(gpu, cpus) for cpus in (1, 2, 4, 8, 16, 64)] == [0, 0, 1, 2, 4, 4]
    assert loader.default_reader_workers(cpu, 64) == 0


def test_bench_has_a_storage_latency_row(small, tmp_path):
    out = tmp_path / "bench.json"
    run = subprocess.run([sys.executable, "-m", "bench", f"--data={small}", "--device=cpu",
                          "--what=pipeline,pipeline_latency", "--batch_size=8", "--seconds=0.5", "--repeats=1",
                          "--num_threads=1", "--latency_ms=2", f"--work_dir={tmp_path / 'w'}", f"--out={out}"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    row = json.loads(out.read_text())["results"]["pipeline_latency"]
    assert row.get("images_per_s", 0) > 0 or row["skipped"].startswith("skipped: no")
    assert "storage adding 2 ms per read" in run.stdout
