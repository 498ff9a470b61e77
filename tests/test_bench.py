"""bench.py from the outside: a short run on tiny shards writes every figure, positive, with the hardware."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from tests.shardkit import REPO, write_data

ROWS = ("limit", "pipeline", "tencrop", "alternative", "model", "end_to_end", "preprocess", "preprocess_plain")
RATIOS = ("pipeline_vs_limit", "tencrop_vs_limit", "pipeline_vs_alternative", "end_to_end_vs_model",
          "pipeline_vs_model", "preprocess_vs_plain")


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


def bench(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "bench.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def test_every_figure_is_measured_and_positive(tmp_path):
    data = write_data(tmp_path / "data", {"train": random_images(48, 4), "val": random_images(16, 4, seed=2)},
                      shard_size=16)
    raw = full_size_jpegs(tmp_path / "raw", 6)
    out = tmp_path / "bench.json"
    run = bench(f"--data={data}", "--device=cpu", "--batch_size=8", "--seconds=0.5", "--repeats=1",
                "--num_threads=2", f"--raw={raw}", f"--out={out}")
    assert run.returncode == 0, run.stderr[-3000:]
    record = json.loads(out.read_text())
    for row in ROWS:
        figures = record["results"][row]
        assert figures["images_per_s"] > 0, row
        assert figures["host_rss_peak_mib"] > 0, row
    assert set(record["ratios"]) == set(RATIOS)
    assert all(v > 0 for v in record["ratios"].values()), record["ratios"]
    assert record["peak"]["host_rss_mib"] > 0 and record["peak"]["largest_child_rss_mib"] > 0
    hw = record["hardware"]
    assert hw["cpu"] and hw["cpu_count"] >= 1 and hw["cpus_usable"] >= 1 and hw["memory_gib"] > 0
    for lib in ("python", "torch", "nvidia-dali", "pillow", "numpy", "webdataset"):
        assert hw["versions"][lib], lib
    assert record["device"] == "cpu" and len(record["load_before"]) == 3 and len(record["load_after"]) == 3
    assert record["data"]["train_samples"] == 48 and record["config"]["seconds"] == 0.5
    for row in ROWS:  # the printed table names every row with its figure
        label = record["labels"][row]
        assert any(line.startswith(label) for line in run.stdout.splitlines()), label


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


def test_make_data_replicates_real_images(tmp_path):
    raw = full_size_jpegs(tmp_path / "raw", 4)
    data = tmp_path / "bench-data"
    run = bench(f"--make_data={data}", f"--raw={raw}", "--repeat=3")
    assert run.returncode == 0, run.stderr[-3000:]
    manifest = json.loads((data / "manifest.json").read_text())
    for split in ("train", "val"):
        entry = manifest["splits"][split]
        assert entry["num_samples"] == 12 and len(entry["shards"]) == 3
        for shard in entry["shards"]:
            assert (data / shard["file"]).stat().st_size > 0 and (data / shard["file"]).with_suffix(".idx").exists()
    assert manifest["params"]["replicated"] == 3
    from pipeline.data import read_split
    assert read_split(data, "train").num_samples == 12  # every copy passes the reader's index checks


def test_unknown_measurement_is_a_usage_error(tmp_path):
    run = bench("--what=limit,everything", f"--out={tmp_path / 'b.json'}")
    assert run.returncode == 2 and "everything" in run.stderr
