"""The benchmark from the outside: a short run on tiny shards measures every row it is asked for, with the
spread, the ratios and the hardware; the peers it cannot run are named as skipped, never left out silently."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import train
from bench import training
from bench.rows import ROWS as REGISTRY
from bench.rows import default_rows, ratios
from model import recipe
from tests.conftest import REPO
from tests.shardkit import write_data

OPTIONAL = ("pipeline_latency", "ffcv")  # FUSE, `make setup PEERS=1`: measured where installed, else named as skipped
# The CPU's default rows that run everywhere, with the rows measured as their parts.
ROWS = [name for name, row in REGISTRY.items()
        if name not in OPTIONAL and {name, row.part_of} & set(default_rows("cpu"))]
RATIOS = [r.key for numerator, r in ratios() if {numerator, r.denominator} <= set(ROWS)]


def random_images(n: int, classes: int, seed: int = 0) -> list[tuple[np.ndarray, int]]:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (n, 8, 8, 3)).astype(np.uint8)  # smooth images: JPEGs of a realistic size
    return [(np.asarray(Image.fromarray(b).resize((256, 256), Image.Resampling.BICUBIC)), i % classes)
            for i, b in enumerate(base)]


def full_size_jpegs(folder: Path, n: int) -> Path:
    """`n` JPEGs of ImageNet's typical size, named like the real sample (<wnid>_<name>.JPEG)."""
    folder.mkdir(parents=True)
    for i, (rgb, _) in enumerate(random_images(n, 1, seed=1)):
        Image.fromarray(rgb).resize((500, 375)).save(folder / f"n{i:08d}_img.JPEG", quality=90)
    return folder


def bench(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bench", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def test_every_row_is_measured_with_its_spread(tmp_path):
    data = write_data(tmp_path / "data", {"train": random_images(48, 4), "val": random_images(16, 4, seed=2)},
                      shard_size=16)
    raw = full_size_jpegs(tmp_path / "raw", 6)
    out = tmp_path / "bench.json"
    run = bench(f"--data={data}", "--device=cpu", f"--what={','.join(ROWS)},ffcv", "--batch_size=8",
                "--seconds=0.5", "--repeats=2", "--num_threads=2", f"--raw={raw}", f"--work_dir={tmp_path / 'w'}",
                f"--out={out}")
    assert run.returncode == 0, run.stderr[-3000:]
    record = json.loads(out.read_text())
    for row in ROWS:
        figures = record["results"][row]
        assert 0 < figures["low"] <= figures["images_per_s"] <= figures["high"], row
        assert figures["repeats"] == 2 and figures["host_rss_peak_mib"] > 0, row
        assert any(line.startswith(record["labels"][row]) for line in run.stdout.splitlines()), row
    ffcv = record["results"]["ffcv"]
    assert ffcv.get("images_per_s", 0) > 0 or ffcv["skipped"].startswith("skipped: not installed")
    assert set(RATIOS) <= set(record["ratios"]) and all(v > 0 for v in record["ratios"].values())
    assert record["results"]["preprocess"]["per_core"] == record["results"]["preprocess"]["images_per_s"] / 2
    hw = record["hardware"]
    assert hw["cpu"] and hw["cpus_usable"] >= 1 and hw["memory_gib"] > 0
    assert all(hw["versions"][lib] for lib in ("python", "torch", "nvidia-dali-cuda130", "pillow", "numpy"))
    assert record["data"]["train_samples"] == 48 and record["config"]["seconds"] == 0.5


def test_the_training_rows_run_train_pys_own_step(monkeypatch):
    calls = []
    step = recipe.train_step  # the step train.py imports
    assert train.train_step is step
    monkeypatch.setattr(recipe, "train_step", lambda *args: calls.append(1) or step(*args))
    work = training.model_alone(num_classes=3, device=torch.device("cpu"), batch=2, compiled=False)
    assert work(2) == 4 and len(calls) == 2


def test_procedural_sample_is_flagged(tmp_path):
    from shards.sample import CLASSES
    data = write_data(tmp_path / "data", {"train": random_images(16, len(CLASSES))}, num_classes=len(CLASSES))
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["classes"] = [{"index": i, "wnid": c.wnid, "name": c.words} for i, c in enumerate(CLASSES)]
    (data / "manifest.json").write_text(json.dumps(manifest))
    run = bench(f"--data={data}", "--device=cpu", "--what=limit", "--seconds=0.2", "--repeats=1",
                f"--out={tmp_path / 'b.json'}")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "too easy to decode" in run.stdout
    assert json.loads((tmp_path / "b.json").read_text())["data"]["procedural_sample"] is True


def test_bench_data_is_built_and_replicated_by_the_shards_package(tmp_path):
    raw = full_size_jpegs(tmp_path / "raw", 4)
    for command in (["bench.folders", f"--images={raw}", f"--out={tmp_path / 'links'}"],
                    ["shards", "build", f"--raw={tmp_path / 'links'}", f"--out={tmp_path / 'one'}"],
                    ["shards", "replicate", f"--data={tmp_path / 'one'}", f"--out={tmp_path / 'three'}",
                     "--copies=3"]):
        result = subprocess.run([sys.executable, "-m", *command], cwd=REPO, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-3000:]
    data = tmp_path / "three"
    manifest = json.loads((data / "manifest.json").read_text())
    for split in ("train", "val"):
        entry = manifest["splits"][split]
        assert entry["num_samples"] == 12 and entry["num_inputs"] == 12 and len(entry["shards"]) == 3
    assert manifest["params"]["replicated"] == 3
    from pipeline.data import read_split
    assert read_split(data, "train").num_samples == 12  # every copy passes the reader's index checks
    again = subprocess.run([sys.executable, "-m", "shards", "replicate", f"--data={data}",
                            f"--out={tmp_path / 'nine'}"], cwd=REPO, capture_output=True, text=True)
    assert again.returncode == 2 and "already replicated" in again.stderr


def test_unknown_row_is_a_usage_error(tmp_path):
    run = bench("--what=limit,everything", f"--out={tmp_path / 'b.json'}")
    assert run.returncode == 2 and "everything" in run.stderr


def test_model_rows_and_replication_run_without_dali(tmp_path):
    """Where DALI is not installed yet (the GPU kit's first stages), train.py's step is measured all the same."""
    blocker = tmp_path / "no-dali" / "sitecustomize.py"
    blocker.parent.mkdir()
    blocker.write_text("import sys\n\nclass NoDali:\n    def find_spec(self, name, path=None, target=None):\n"
                       "        if name.split('.')[:2] == ['nvidia', 'dali']:\n"
                       "            raise ImportError('DALI is not installed here')\n\n"
                       "sys.meta_path.insert(0, NoDali())\n")
    data = write_data(tmp_path / "data", {"train": random_images(8, 2)}, shard_size=8)
    env = {**os.environ, "PYTHONPATH": str(blocker.parent)}
    run = subprocess.run([sys.executable, "-m", "bench", f"--data={data}", "--device=cpu", "--what=model",
                          "--batch_size=2", "--seconds=0.2", "--repeats=1", f"--out={tmp_path / 'b.json'}"],
                         cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads((tmp_path / "b.json").read_text())["results"]["model"]["images_per_s"] > 0
    copies = subprocess.run([sys.executable, "-m", "shards", "replicate", f"--data={data}",
                             f"--out={tmp_path / 'two'}", "--copies=2"], cwd=REPO, capture_output=True, text=True,
                            env=env)
    assert copies.returncode == 0, copies.stderr
    dali = subprocess.run([sys.executable, "-c", "import nvidia.dali"], capture_output=True, env=env)
    assert dali.returncode != 0, "the blocker must keep DALI out, or this test proves nothing"
