"""Files from someone else: a checkpoint cannot run code, a manifest cannot point a reader or `stage` outside DATA."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from model import AlexNet
from pipeline import eval_loader, train_loader
from runtime import shard_path
from tests.conftest import REPO
from tests.shardkit import write_data


class RunsCode:
    """Unpickling this object runs a shell command: what a crafted checkpoint can hold."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def images(count: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [(np.asarray(Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((256, 256))), i % 2)
            for i in range(count)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_data(tmp_path_factory.mktemp("untrusted") / "data", {"train": images(4), "val": images(3, seed=1)},
                      shard_size=2)


def run(*args):
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=600)


def assert_one_error_line(result, *words):
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    assert all(word in lines[0] for word in words), lines[0]


@pytest.fixture
def crafted_checkpoint(tmp_path):
    """A checkpoint.pt whose unpickling would create `marker`."""
    marker = tmp_path / "marker"
    path = tmp_path / "run" / "checkpoint.pt"
    path.parent.mkdir()
    torch.save({"model": RunsCode(f"touch {marker}"), "num_classes": 2, "epoch": 1}, path)
    return path, marker


def test_eval_refuses_a_checkpoint_that_would_run_code(data, crafted_checkpoint):
    path, marker = crafted_checkpoint
    result = run("eval.py", f"--data={data}", f"--checkpoint={path}")
    assert_one_error_line(result, str(path), "refused", "could run code")
    assert not marker.exists()


def test_resume_refuses_a_checkpoint_that_would_run_code(data, crafted_checkpoint):
    path, marker = crafted_checkpoint
    result = run("train.py", f"--data={data}", f"--run={path.parent}", "--device=cpu", "--num_threads=1")
    assert_one_error_line(result, str(path), "refused", "--resume=false")
    assert not marker.exists()


def test_a_truncated_checkpoint_is_a_one_line_error_for_resume(data, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    torch.save({"model": AlexNet(num_classes=2).state_dict(), "num_classes": 2}, run_dir / "checkpoint.pt")
    (run_dir / "checkpoint.pt").write_bytes((run_dir / "checkpoint.pt").read_bytes()[:1000])
    result = run("train.py", f"--data={data}", f"--run={run_dir}", "--device=cpu", "--num_threads=1")
    assert_one_error_line(result, "unreadable or not written by train.py")


def test_statistics_that_would_run_code_are_refused(data, tmp_path):
    copy = shutil.copytree(data, tmp_path / "data")
    marker = tmp_path / "marker"
    np.savez(copy / "stats.npz", mean_image=np.array([RunsCode(f"touch {marker}")], dtype=object))
    with pytest.raises(ValueError, match="stats.npz"):
        train_loader(copy, 2)
    assert not marker.exists()


# --- shard paths in manifest.json ----------------------------------------------------------------------------------

def with_shard_file(data, tmp_path, file: str):
    """A copy of DATA whose manifest lists `file` as its first train shard; a valid shard lies at DATA/file, so
    only the check, not a missing file, can stop a reader."""
    copy = shutil.copytree(data, tmp_path / "data")
    manifest = json.loads((copy / "manifest.json").read_text())
    first = manifest["splits"]["train"]["shards"][0]
    target = copy / file
    target.parent.mkdir(parents=True, exist_ok=True)
    for suffix in (".tar", ".idx"):
        shutil.copy(copy / first["file"].replace(".tar", suffix), target.with_suffix(suffix))
    first["file"] = file
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


@pytest.fixture(params=["../outside/train-000000.tar", "{outside}/train-000000.tar", "train/linked/train-000000.tar"])
def escaping(request, data, tmp_path):
    """DATA whose manifest points outside it: by `..`, by an absolute path, through a symbolic link."""
    outside = tmp_path / "outside"
    file = request.param.format(outside=outside)
    copy = with_shard_file(data, tmp_path, file if "linked" not in file else "../outside/train-000000.tar")
    if "linked" in file:
        (copy / "train" / "linked").symlink_to(outside, target_is_directory=True)
        manifest = json.loads((copy / "manifest.json").read_text())
        manifest["splits"]["train"]["shards"][0]["file"] = file
        (copy / "manifest.json").write_text(json.dumps(manifest))
    assert (copy / file).is_file()
    return copy, file


def test_the_check_accepts_paths_inside_data(data):
    assert shard_path(data, "train/train-000000.tar") == data / "train" / "train-000000.tar"
    for bad in ("", "/etc/passwd", "../x.tar", "train/../../x.tar", None, 3):
        with pytest.raises(ValueError, match="manifest lists shard file"):
            shard_path(data, bad)


def test_loaders_refuse_a_shard_outside_data(escaping):
    copy, file = escaping
    with pytest.raises(ValueError, match="manifest lists shard file") as error:
        train_loader(copy, 2)
    assert repr(file) in str(error.value)
    eval_loader(copy, "val", "center", 2)  # the val entries are fine


def test_train_and_eval_refuse_a_shard_outside_data_in_one_line(data, tmp_path):
    file = "../outside/train-000000.tar"
    copy = with_shard_file(data, tmp_path, file)
    result = run("train.py", f"--data={copy}", f"--run={tmp_path / 'run'}", "--device=cpu", "--num_threads=1",
                 "--epochs=1")
    assert_one_error_line(result, repr(file))
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["splits"]["val"] = manifest["splits"]["train"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    checkpoint = tmp_path / "checkpoint.pt"
    torch.save({"model": AlexNet(num_classes=2).state_dict(), "num_classes": 2}, checkpoint)
    result = run("eval.py", f"--data={copy}", f"--checkpoint={checkpoint}", "--num_threads=1")
    assert_one_error_line(result, repr(file))


def test_verify_names_a_shard_outside_data(escaping):
    copy, file = escaping
    result = run("-m", "shards", "verify", f"--data={copy}")
    assert result.returncode == 1 and f"BAD manifest lists shard file {file!r}" in result.stderr, result.stderr


def test_stage_refuses_a_shard_outside_data_and_writes_nothing(escaping, tmp_path):
    copy, file = escaping
    local = tmp_path / "local"
    result = run("-m", "shards", "stage", f"--data={copy}", f"--to={local}")
    assert_one_error_line(result, repr(file))
    assert not [p for p in local.rglob("*") if p.is_file()]
