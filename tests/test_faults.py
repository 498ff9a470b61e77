"""Faults in a long run, tried as a user meets them: each drives the real command (train.py, eval.py, shards) on
small shards and checks what the user sees (one line, an exit status) and what is lost (nothing).

What DALI's decoder actually fails on was tried first (pipeline/faults.py): a JPEG overwritten with zeros or cut
short fails the batch; a flipped byte in the entropy-coded data decodes (libjpeg-turbo warns and goes on), so it
is not a fault and the run goes on: the tests assert both.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import train
from pipeline import Output, Reading, dataset_identity, eval_loader, read_manifest, train_loader
from pipeline.data import DataError, read_split
from pipeline.faults import BadSampleError, SingleDecoder
from pipeline.order import GlobalOrder, read_table
from rundir import Progress
from runtime import UsageError, gpu_allocation, load_checkpoint
from tests.conftest import REPO
from tests.shardkit import write_data

TRAIN, SHARD = 24, 4  # training samples, samples per shard: 6 shards
BATCH = 2  # global: 12 steps per epoch
# Full AlexNet costs about a second per few images on two cores: one or two steps per epoch.
QUICK = [f"--batch_size={BATCH}", "--log_interval=1", "--num_threads=1", "--device=cpu", "--lr=0.001"]
TWO_THREADS = Reading(num_threads=2)


def images(count: int, seed: int) -> list[tuple[np.ndarray, int]]:
    """Smooth random 256x256 images (upsampled noise: small JPEGs), 4 classes."""
    rng = np.random.default_rng(seed)
    return [(np.kron(rng.integers(0, 256, (8, 8, 3)), np.ones((32, 32, 1))).astype(np.uint8), i % 4)
            for i in range(count)]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    return write_data(tmp_path_factory.mktemp("faults") / "data", {"train": images(TRAIN, 0), "val": images(2, 1)},
                      shard_size=SHARD)


@pytest.fixture
def data(pristine, tmp_path):
    """A copy of the shards for the test to damage."""
    return Path(shutil.copytree(pristine, tmp_path / "data"))


def run_cmd(script: str, *args, env=None, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, script, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env=env)


def one_line(stream: str) -> str:
    """The only line of an error message: nothing else on stderr but the progress bar and DALI's and libjpeg's
    own warnings."""
    lines = [line for line in stream.splitlines() if line.strip() and not line.startswith(("[", "Corrupt JPEG"))
             and "WARNING" not in line and "warn" not in line.lower() and "%|" not in line]
    assert len(lines) == 1, stream
    return lines[0]


def table_of(data, split="train"):
    split = read_split(data, split)
    return read_table(split.tars, split.indexes)


def step_of(sample: int, epoch: int = 0, seed: int = 0) -> int:
    """The 0-based step of `epoch` whose global batch holds `sample`."""
    permutation = GlobalOrder(TRAIN, BATCH, 1, 0, seed).permutation(epoch)
    return int(np.flatnonzero(permutation == sample)[0]) // BATCH


def jpeg_range(data, sample: int, split="train") -> tuple[str, int, int]:
    table = table_of(data, split)
    return table.tars[table.shard[sample]], int(table.start[sample]), int(table.jpeg_size[sample])


def zero_jpeg(data, sample: int, split="train") -> str:
    """Overwrite a sample's whole JPEG with zeros in its shard (the tar stays whole); returns the shard."""
    tar, start, size = jpeg_range(data, sample, split)
    with open(tar, "r+b") as f:
        f.seek(start)
        f.write(bytes(size))
    return tar


def flip_entropy_byte(data, sample: int) -> bytes:
    """Invert one byte in the middle of a sample's entropy-coded data (after the start-of-scan header)."""
    tar, start, size = jpeg_range(data, sample)
    with open(tar, "r+b") as f:
        f.seek(start)
        jpeg = bytearray(f.read(size))
        scan = jpeg.index(b"\xff\xda")
        entropy = scan + 2 + int.from_bytes(jpeg[scan + 2:scan + 4], "big")
        jpeg[(entropy + size - 2) // 2] ^= 0xFF
        f.seek(start)
        f.write(jpeg)
    return bytes(jpeg)


# ------------------------------------------------------------------------------------------------ bad samples
def test_a_zeroed_jpeg_stops_the_run_with_65_naming_it_from_the_failed_step_alone(data, tmp_path):
    # Two bad samples: one in global step 2 and, in a shard earlier in the split, one in a late step. A scan of the
    # split in shard order would name the second; the failed step's own samples name the first.
    order = GlobalOrder(TRAIN, BATCH, 1, 0, 0).permutation(0)
    early, late = int(order[2]), min((int(s) for s in order[-6:]), key=lambda s: s // SHARD)
    assert late // SHARD < early // SHARD, "choose other samples: the late one must lie in an earlier shard"
    shard = zero_jpeg(data, early)
    zero_jpeg(data, late)
    result = run_cmd("train.py", f"--data={data}", f"--run={tmp_path / 'run'}", *QUICK, "--epochs=1")
    assert result.returncode == train.EXIT_BAD_SAMPLE == 65, result.stderr
    line = one_line(result.stderr)
    assert f"{shard}: train_{early:08d} " in line and "split 'train'" in line
    assert "epoch 1, global step 2" in line and "--bad_samples=skip" in line
    assert f"train_{late:08d}" not in line and "more" not in line
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


@pytest.mark.slow
def test_the_skip_policy_replaces_the_sample_lists_it_and_a_resumed_run_knows_it(data, tmp_path):
    # A sample in the first three steps of epochs 1 and 2, so that both runs below meet it.
    bad = next(s for s in range(TRAIN) if step_of(s, 0) < 3 and step_of(s, 1) < 3)
    shard = zero_jpeg(data, bad)
    # And one with a flipped byte in its scan, in the first step: libjpeg-turbo decodes past it (it warns), so it
    # is trained on, damaged, and not listed.
    flipped = next(s for s in range(TRAIN) if step_of(s, 0) == 0 and s != bad)
    jpeg = flip_entropy_byte(data, flipped)
    assert SingleDecoder().failure(np.frombuffer(jpeg, np.uint8)) == ""
    run = tmp_path / "run"
    args = [f"--data={data}", *QUICK, "--max_steps_per_epoch=3", "--bad_samples=skip"]
    result = run_cmd("train.py", *args, f"--run={run}", "--epochs=1")
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in (run / "bad_samples.jsonl").read_text().splitlines()]
    assert [(r["sample"], r["shard"], r["key"], r["split"], r["epoch"]) for r in rows] == [
        (bad, shard, f"train_{bad:08d}", "train", 1)]
    assert rows[0]["step"] == step_of(bad, 0) + 1
    # Epoch 2, where the sample comes again, resumed into another directory (--resume=PATH, which carries PATH's
    # rows) and in the same one: each replaces it from the start, without a failure, and lists it once.
    branch = tmp_path / "branch"
    for where, extra in ((branch, [f"--resume={run / 'checkpoint.pt'}"]), (run, [])):
        result = run_cmd("train.py", *args, f"--run={where}", *extra, "--epochs=2")
        assert result.returncode == 0, result.stderr
        epochs = [r for r in map(json.loads, (where / "metrics.jsonl").read_text().splitlines()) if "epoch" in r]
        assert [r["bad_samples"] for r in epochs] == [1, 0]
        assert (where / "bad_samples.jsonl").read_text() == (run / "bad_samples.jsonl").read_text()
        assert len((where / "bad_samples.jsonl").read_text().splitlines()) == 1


@pytest.mark.slow
def test_a_bad_sample_met_by_rank_1_is_listed_by_rank_0(data, tmp_path):
    bad = int(GlobalOrder(TRAIN, 2 * BATCH, 1, 0, 0).permutation(0)[3])  # step 1, rank 1's part of two
    zero_jpeg(data, bad)
    run = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py", "--",
         f"--data={data}", f"--run={run}", *QUICK, f"--batch_size={2 * BATCH}", "--epochs=1",
         "--max_steps_per_epoch=1", "--bad_samples=skip"], cwd=REPO, capture_output=True, text=True, timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [json.loads(line) for line in (run / "bad_samples.jsonl").read_text().splitlines()]
    assert [(r["sample"], r["epoch"], r["step"]) for r in rows] == [(bad, 1, 1)]
    epochs = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "epoch" in r]
    assert [r["bad_samples"] for r in epochs] == [1]


@pytest.mark.slow
def test_a_bad_sample_met_by_rank_1_ends_the_slurm_launcher_with_65(data, tmp_path):
    bad = int(GlobalOrder(TRAIN, 2 * BATCH, 1, 0, 0).permutation(0)[3])  # step 1, rank 1's part of two
    zero_jpeg(data, bad)
    venv_bin = Path(sys.executable).parent  # where torchrun is
    result = subprocess.run(
        [sys.executable, "slurm/torchrun_status.py", "--standalone", "--nproc_per_node=2", "train.py", "--",
         f"--data={data}", f"--run={tmp_path / 'run'}", *QUICK, f"--batch_size={2 * BATCH}", "--epochs=1",
         "--max_steps_per_epoch=1"], cwd=REPO, capture_output=True, text=True, timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PATH": f"{venv_bin}{os.pathsep}{os.environ['PATH']}"})
    assert result.returncode == 65, result.stdout + result.stderr  # torchrun alone would say 1
    assert re.search(r"^bad sample in split 'train': .*\(epoch 1, global step 1\)", result.stderr, re.M), result.stderr


def positions(loader) -> list[list[int]]:
    return [index.tolist() for _, _, index in loader]


def test_substitutes_are_the_same_global_batches_on_one_and_two_ranks(data):
    order = GlobalOrder(TRAIN, BATCH * 2, 1, 0, 0).permutation(0)
    bad = [int(order[1]), int(order[6])]  # in step 0 (rank 1's part on two ranks) and step 1 (rank 0's part)
    for sample in bad:
        zero_jpeg(data, sample)
    options = dict(seed=0, output=Output(with_index=True), reading=TWO_THREADS, bad_samples="skip",
                   steps_per_epoch=3)
    one = train_loader(data, BATCH * 2, **options)
    ranks = [train_loader(data, BATCH * 2, rank=r, world_size=2, **options) for r in (0, 1)]
    single, parts = positions(one), [positions(loader) for loader in ranks]
    assert single == [a + b for a, b in zip(*parts)]  # the same global batches, substitutes included
    expected = [[int(s) for s in order[step * 4:(step + 1) * 4]] for step in range(3)]
    replaced = {s: next(t % TRAIN for t in range(s + 1, s + TRAIN) if t % TRAIN not in bad) for s in bad}
    # .pos is the position in the split, which these shards keep in sample order: the next sample that is not bad
    expected = [[replaced.get(s, s) for s in batch] for batch in expected]
    assert single == expected
    assert sorted(b.sample for b in one.found) == sorted(bad)
    assert sorted(b.sample for loader in ranks for b in loader.found) == sorted(bad)  # each met by its own rank


def test_a_bad_sample_in_evaluation_is_named_with_its_batch(data):
    shard = zero_jpeg(data, 1, "val")
    loader = eval_loader(data, "val", "center", 1, reading=TWO_THREADS)
    with pytest.raises(BadSampleError, match=rf"^bad sample in split 'val': {shard}: val_00000001 \(batch 2\)"):
        for _ in loader:
            pass


def test_the_skip_policy_is_a_choice_the_loader_checks(pristine):
    with pytest.raises(ValueError, match="bad_samples"):
        train_loader(pristine, BATCH, bad_samples="ignore")


# ------------------------------------------------------------------------------------------------ shards
@pytest.mark.parametrize("workers", [0, 2])  # read in this process (an OSError), or in reader workers (an Exception)
def test_a_shard_truncated_during_the_run_is_named_with_split_and_step(data, workers):
    loader = train_loader(data, BATCH, reading=Reading(num_threads=2, reader_workers=workers))
    table = table_of(data)
    victim = table.tars[table.shard[int(loader.order.permutation(0)[6 * BATCH])]]  # a sample of step 7
    os.truncate(victim, 1024)
    start = time.monotonic()
    with pytest.raises(DataError, match=rf"split 'train' \(epoch 1, global step \d+\): shard {victim}: truncated"):
        for _ in loader:
            pass
    assert time.monotonic() - start < 30


def as_unprivileged_user(data: Path, tmp_path: Path) -> tuple[list[str], Path, Path]:
    """(command prefix, data, run) to run a command as `nobody` where the tests run as root, who reads files without
    read permission: a copy of the shards and a run directory it can reach; the test is skipped without setpriv."""
    if os.geteuid() != 0:
        return [], data, tmp_path / "run"
    if not shutil.which("setpriv"):
        pytest.skip("runs as root, who reads any file, and has no setpriv to run train.py as another user")
    reachable = Path(tempfile.mkdtemp(prefix="faults-", dir="/tmp"))
    reachable.chmod(0o777)
    copy = Path(shutil.copytree(data, reachable / "data"))
    for path in [copy, *copy.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"], copy, reachable / "run"


def test_a_missing_shard_is_named_when_the_loader_is_built(data):
    victim = data / "train" / "train-000002.tar"
    victim.unlink()
    with pytest.raises(DataError, match=rf"^shard {victim}: cannot read it or its index .*: No such file"):
        train_loader(data, BATCH, reading=TWO_THREADS)


@pytest.mark.parametrize("damage", ["truncated", "unreadable"])
def test_a_damaged_shard_stops_train_py_in_one_line_naming_it(data, tmp_path, damage):
    prefix, run = [], tmp_path / "run"
    if damage == "unreadable":
        prefix, data, run = as_unprivileged_user(data, tmp_path)
    victim = data / "train" / "train-000002.tar"
    if damage == "truncated":
        os.truncate(victim, victim.stat().st_size // 2)
    else:
        victim.chmod(0)
    result = subprocess.run([*prefix, sys.executable, "train.py", f"--data={data}", f"--run={run}", *QUICK,
                             "--epochs=1"], cwd=REPO, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "MPLCONFIGDIR": str(run.parent / "mpl")})
    if prefix:
        shutil.rmtree(data.parent, ignore_errors=True)
    assert result.returncode == 2, result.stderr
    line = one_line(result.stderr)
    assert line.startswith("error: shard ") and str(victim) in line
    assert {"truncated": "truncated", "unreadable": "Permission denied"}[damage] in line


# ------------------------------------------------------------------------------------------------ checkpoints
@pytest.mark.slow
def test_kill_9_during_a_checkpoint_save_leaves_the_previous_one_loadable(data, tmp_path):
    run = tmp_path / "run"
    args = [f"--data={data}", f"--run={run}", *QUICK, "--max_steps_per_epoch=1", "--epochs=2"]
    process = subprocess.Popen([sys.executable, "train.py", *args], cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 500
    while not ((run / "checkpoint.pt").exists() and list(run.glob("checkpoint.pt.tmp-*"))):  # the second save
        assert process.poll() is None and time.time() < deadline, process.communicate()
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)
    saved = load_checkpoint(run / "checkpoint.pt")  # whole: what a rerun resumes from (test_train.py reruns)
    # Epoch 1's, unless the rename came between seeing the temporary file and the kill (a window of microseconds
    # against the ~0.5 s the write takes): either way a whole checkpoint.
    assert saved["epoch"] in (1, 2) and saved["batches_done"] == 0
    # The half-written one is no .pt file; best.pt (written before checkpoint.pt) is whole too.
    assert sorted(p.name for p in run.glob("*.pt")) == ["best.pt", "checkpoint.pt"]
    assert "model" in load_checkpoint(run / "best.pt")


def tmpfs(path: Path, size: str) -> Path:
    """A small tmpfs at `path` (a full disk on demand), unmounted by the caller; the test is skipped where the
    machine does not let it mount one."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                             text=True) if shutil.which("mount") else None
    if mounted is None or mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs to fill ({mounted.stderr.strip() if mounted else 'no mount command'}): "
                    "needs root in a machine that allows mounts")
    return path


@pytest.fixture
def small_disk(tmp_path):
    mounts = []

    def make(size: str) -> Path:
        mounts.append(tmpfs(tmp_path / f"disk{len(mounts)}", size))
        return mounts[-1]
    yield make
    for path in mounts:
        subprocess.run(["umount", str(path)], check=False)


@pytest.mark.slow
def test_a_full_disk_at_a_checkpoint_save_is_one_line_and_the_previous_checkpoint_stays(data, small_disk):
    # Room for one AlexNet checkpoint (about 460 MB with 4 classes: weights and momentum) and best.pt (weights only,
    # about half), not for the next checkpoint written beside them.
    run = small_disk("760m") / "run"
    result = run_cmd("train.py", f"--data={data}", f"--run={run}", *QUICK, "--max_steps_per_epoch=1", "--epochs=2")
    assert result.returncode == 1, result.stderr
    line = one_line(result.stderr)
    # checkpoint.pt, or best.pt written before it when the epoch is a new best
    assert re.match(rf"error: saving {re.escape(str(run))}/(checkpoint|best)\.pt: No space left on device", line), line
    assert "intact" in line
    assert load_checkpoint(run / "checkpoint.pt")["epoch"] == 1
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint.pt"]


def test_a_full_disk_in_shards_build_is_one_line_and_leaves_no_manifest(tmp_path, small_disk):
    out = small_disk("300k") / "shards"
    raw = tmp_path / "raw"
    for i, (rgb, label) in enumerate(images(40, 2)):
        folder = raw / "train" / f"n{label:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        from PIL import Image
        Image.fromarray(rgb).save(folder / f"img_{i}.png")
    result = subprocess.run([sys.executable, "-m", "shards", "build", f"--raw={raw}", f"--out={out}", "--workers=1"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: No space left on device"), result.stderr
    assert "Traceback" not in result.stderr and not (out / "manifest.json").exists()


# ------------------------------------------------------------------------------------------------ wrong machine
@pytest.mark.skipif(torch.cuda.is_available(), reason="torch sees a GPU here: nothing is invisible")
@pytest.mark.parametrize("script, variable, value", [("train.py", "CUDA_VISIBLE_DEVICES", "0"),
                                                      ("eval.py", "SLURM_JOB_GPUS", "0,1")])
def test_gpus_allocated_but_invisible_stop_with_the_cause(pristine, tmp_path, script, variable, value):
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "SLURM_JOB_GPUS")}
    result = run_cmd(script, f"--data={pristine}", env={**env, variable: value})  # --device=auto, the default
    assert result.returncode == 2, result.stderr
    line = one_line(result.stderr)
    assert f"given GPUs ({variable}={value})" in line and "--device=cpu" in line
    assert ("CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}") in line


def test_what_counts_as_an_allocation():
    assert gpu_allocation({"SLURM_GPUS_ON_NODE": "4", "CUDA_VISIBLE_DEVICES": "0,1,2,3"}) == (
        "SLURM_GPUS_ON_NODE=4, CUDA_VISIBLE_DEVICES=0,1,2,3")
    assert gpu_allocation({"SLURM_JOB_GPUS": "0"}) == "SLURM_JOB_GPUS=0"  # GPU 0
    assert gpu_allocation({"SLURM_GPUS_ON_NODE": "0", "CUDA_VISIBLE_DEVICES": "", "SLURM_STEP_GPUS": "-1"}) == ""
    assert gpu_allocation({}) == ""


# ------------------------------------------------------------------------------------------------ changed data
def test_a_rebuilt_shard_set_refuses_a_mid_epoch_resume(data, tmp_path):
    run = tmp_path / "run"
    args = [f"--data={data}", f"--run={run}", *QUICK, "--max_steps_per_epoch=1"]
    assert run_cmd("train.py", *args, "--epochs=1").returncode == 0
    saved = torch.load(run / "checkpoint.pt", weights_only=True)
    assert saved["dataset"] == dataset_identity(read_manifest(data))
    # As if it had stopped after the first step of epoch 2 (a stop signal at that step does the same).
    saved.update(batches_done=1, step=2)
    torch.save(saved, run / "checkpoint.pt")
    shutil.rmtree(data)
    write_data(data, {"train": images(TRAIN + 1, 7), "val": images(2, 1)}, shard_size=SHARD)  # rebuilt, one more
    result = run_cmd("train.py", *args, "--epochs=2")
    assert result.returncode == 2, result.stderr
    line = one_line(result.stderr)
    assert "stopped in the middle of epoch 2" in line and f"{TRAIN} -> {TRAIN + 1} samples" in line
    assert "other shard checksums" in line and "--resume=false" in line


def test_a_changed_shard_set_at_an_epoch_boundary_goes_on_and_says_so():
    saved = {"split": "train", "num_samples": 10, "shards_sha256": "a" * 64}
    rebuilt = {**saved, "shards_sha256": "b" * 64}
    assert train.check_dataset(saved, saved, Progress(3, 0, 30), "ckpt") == ""
    assert train.check_dataset(None, rebuilt, Progress(3, 5, 35), "ckpt") == ""  # a checkpoint without the record
    assert train.check_dataset(saved, rebuilt, Progress(3, 0, 30), "ckpt") == (
        "; the training set differs from the checkpoint's (other shard checksums): epoch 4 starts on this one")
    with pytest.raises(UsageError, match="^ckpt stopped in the middle of epoch 4, and the training set differs"):
        train.check_dataset(saved, rebuilt, Progress(3, 5, 35), "ckpt")


# ------------------------------------------------------------------------------------------------ options, setup
@pytest.mark.parametrize("option, words", [
    ("--seed=-1", "--seed=-1: expected an integer in"), ("--batch_size=0", "--batch_size=0: expected at least 1"),
    ("--lr=0", "--lr=0.0: expected > 0"), ("--momentum=1", "--momentum=1.0: expected in [0, 1)"),
    ("--dropout=-0.1", "--dropout=-0.1"), ("--epochs=0", "--epochs=0"), ("--log_interval=0", "--log_interval=0"),
    ("--reader_workers=-2", "--reader_workers=-2"), ("--lighting=-1", "--lighting=-1.0")])
def test_out_of_range_options_are_usage_errors_when_parsed(option, words):
    with pytest.raises(UsageError, match=f"^{re.escape(words)}"):
        train.resolve_config([option])


def test_a_negative_seed_fails_before_any_work_in_one_line():
    result = run_cmd("train.py", "--seed=-1", "--data=/nonexistent")
    assert result.returncode == 2 and one_line(result.stderr).startswith("error: --seed=-1: expected")
    result = run_cmd("eval.py", "--batch_size=0")
    assert result.returncode == 2 and one_line(result.stderr).startswith("error: --batch_size=0: expected")


def test_without_dali_the_first_loader_says_how_to_install_it(pristine, tmp_path):
    hide_dali = ("import sys, runpy\n"
                 "class NoDali:\n"
                 "    def find_spec(self, name, path=None, target=None):\n"
                 "        if name.split('.')[0] == 'nvidia':\n"
                 "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
                 "sys.meta_path.insert(0, NoDali())\n"
                 "sys.argv = sys.argv[1:]\n"
                 "runpy.run_path('train.py', run_name='__main__')\n")
    result = subprocess.run([sys.executable, "-c", hide_dali, "train.py", f"--data={pristine}",
                             f"--run={tmp_path / 'run'}", *QUICK], cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2, result.stderr
    line = one_line(result.stderr)
    assert "DALI is not installed" in line and "make setup" in line and ".[cuda130]" in line


def test_out_of_memory_names_the_batch_and_dtype(pristine, tmp_path, monkeypatch, capsys):
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(train, "train_step", out_of_memory)
    with pytest.raises(SystemExit) as end:
        train.main([f"--data={pristine}", f"--run={tmp_path / 'run'}", *QUICK, "--epochs=1"])
    assert end.value.code == 1
    line = one_line(capsys.readouterr().err)
    assert line.startswith("error: out of memory") and f"--batch_size={BATCH}" in line and "--dtype=" in line
