"""train.py from the outside: files written, exact resume, preemption, divergence, DDP data split."""
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import train
from model import AlexNet, recipe
from rundir import Progress
from runtime import Rank, UsageError
from tests.conftest import REPO
from tests.shardkit import write_data

# Tiny steps: full AlexNet at 224x224 costs about a second per 4 images on two cores.
QUICK = ["--batch_size=4", "--epochs=2", "--max_steps_per_epoch=3", "--log_interval=1", "--num_threads=1",
         "--device=cpu"]


def smooth_images(count: int, num_classes: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [(np.asarray(Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((256, 256),
                                                                                                  Image.BILINEAR)),
             i % num_classes) for i in range(count)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("train-data")
    return write_data(root / "data", {"train": smooth_images(16, 4), "val": smooth_images(6, 4, seed=1)}, shard_size=5)


def run_train(*args, timeout=600):
    return subprocess.run([sys.executable, "train.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def call_main(*args) -> int:
    """train.main in this process; returns its exit status."""
    try:
        train.main(list(args))
    except SystemExit as e:
        return e.code or 0
    return 0


def checkpoint(run) -> dict:
    """As eval.py and --resume load it: weights_only, so train.py must write nothing else."""
    return torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)


def weights(run) -> dict:
    return checkpoint(run)["model"]


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def metrics(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """Two epochs without a break."""
    run = tmp_path_factory.mktemp("reference") / "run"
    result = run_train(f"--data={data}", f"--run={run}", *QUICK)
    assert result.returncode == 0, result.stderr
    return run


def test_writes_config_metrics_curves_and_a_checkpoint_eval_can_load(reference):
    config = json.loads((reference / "config.json").read_text())
    assert config["lr"] == 0.01 and config["momentum"] == 0.9 and config["batch_size"] == 4
    rows = metrics(reference)
    steps, epochs = [r for r in rows if "epoch" not in r], [r for r in rows if "epoch" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    assert all({"loss", "lr", "images_per_s"} <= r.keys() for r in steps)
    assert [r["epoch"] for r in epochs] == [1, 2]
    for r in epochs:
        assert {"train_loss", "train_top1_err", "val_top1_err", "val_top5_err", "epoch_time_s"} <= r.keys()
        assert r["val_samples"] == 6 and 0 <= r["val_top1_err"] <= 1
    assert (reference / "curves.png").read_bytes()[:4] == b"\x89PNG"
    ckpt = checkpoint(reference)
    assert ckpt["epoch"] == 2 and ckpt["batches_done"] == 0 and ckpt["config"]["epochs"] == 2
    assert {"optimizer", "scheduler", "rng"} <= ckpt.keys()
    assert [g["weight_decay"] for g in ckpt["optimizer"]["param_groups"]] == [5e-4, 0.0]  # weights, biases
    AlexNet(num_classes=ckpt["num_classes"]).load_state_dict(ckpt["model"])  # what eval.py does
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["model"])


@pytest.mark.slow
def test_one_epoch_then_resume_equals_two_epochs(data, reference, tmp_path):
    run = tmp_path / "run"
    assert call_main(f"--data={data}", f"--run={run}", *QUICK, "--epochs=1") == 0
    assert checkpoint(run)["epoch"] == 1
    assert call_main(f"--data={data}", f"--run={run}", *QUICK) == 0  # same RUN, more epochs: continues
    assert_same_weights(weights(run), weights(reference))
    assert [r["step"] for r in metrics(run)] == [r["step"] for r in metrics(reference)]


@pytest.mark.slow
def test_sigterm_checkpoints_exits_75_and_the_rerun_continues_exactly(data, reference, tmp_path):
    run = tmp_path / "run"
    args = [f"--data={data}", f"--run={run}", *QUICK]
    process = subprocess.Popen([sys.executable, "train.py", *args], cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not ((run / "metrics.jsonl").exists() and (run / "metrics.jsonl").read_text()):
        assert process.poll() is None and time.time() < deadline, process.communicate()
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=300)
    assert process.returncode == train.EXIT_STOPPED_EARLY == 75, err  # stopped early: rerun to resume
    assert any(line.startswith("preempted:") for line in out.splitlines()), out
    ckpt = checkpoint(run)
    assert (ckpt["epoch"], ckpt["batches_done"]) < (2, 0)  # stopped before the end
    AlexNet(num_classes=ckpt["num_classes"]).load_state_dict(ckpt["model"])
    result = run_train(*args)
    assert result.returncode == 0, result.stderr
    assert "resuming" in result.stdout
    assert_same_weights(weights(run), weights(reference))


def test_a_nan_loss_stops_the_run_with_a_message(data, tmp_path, capsys):
    run = tmp_path / "run"
    code = call_main(f"--data={data}", f"--run={run}", *QUICK, "--lr=1e30", "--epochs=1")
    assert code == 1
    assert "diverged" in capsys.readouterr().err
    assert not (run / "checkpoint.pt").exists()
    assert not all(math.isfinite(r["loss"]) for r in metrics(run))


@pytest.mark.parametrize("decay_biases", [False, True])
def test_weight_decay_shrinks_the_weights_and_only_optionally_the_biases(decay_biases):
    """Zero loss gradients: what moves the parameters is the decay alone, through SGD with momentum."""
    torch.manual_seed(0)
    model = AlexNet(num_classes=10)
    groups = recipe.parameter_groups(model, weight_decay=5e-4, decay_biases=decay_biases)
    grouped = [p for g in groups for p in g["params"]]
    assert len(grouped) == len({id(p) for p in grouped}) == len(list(model.parameters()))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.SGD(groups, lr=0.01, momentum=0.9)
    lr, momentum, decay, factor, velocity = 0.01, 0.9, 5e-4, 1.0, 0.0
    for _ in range(5):
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        optimizer.step()
        velocity = momentum * velocity + decay * factor  # the update rule per unit of initial value
        factor -= lr * velocity
    assert factor < 1 - 1e-5
    for name, p in model.named_parameters():
        decayed = name.endswith(".weight") or decay_biases
        torch.testing.assert_close(p.detach(), before[name] * (factor if decayed else 1.0), rtol=1e-6, atol=0)
        if not decayed:
            assert torch.equal(p.detach(), before[name]), name


def test_lr_divided_by_ten_when_val_error_stops_improving_at_most_three_times():
    sgd = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.01)
    schedule = recipe.DropOnPlateau(sgd, patience=2, max_drops=3)
    lrs = []
    for error in [0.9, 0.8, 0.8, 0.85, 0.7, 0.7, 0.7, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6]:
        schedule.step(error)
        lrs.append(sgd.param_groups[0]["lr"])
    assert lrs[:3] == [0.01] * 3 and lrs[3] == pytest.approx(1e-3)  # two epochs without a new best
    assert lrs[6] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-5) and lrs[-1] == lrs[9]
    restored = recipe.DropOnPlateau(sgd, patience=2, max_drops=3)
    restored.load_state_dict(schedule.state_dict())
    assert restored.state_dict() == schedule.state_dict() == {"best": 0.6, "bad_epochs": 4, "drops": 3}


def test_defaults_are_the_papers_recipe_and_the_demo_preset_yields_to_explicit_options():
    cfg = train.resolve_config([])
    assert (cfg.batch_size, cfg.lr, cfg.momentum, cfg.weight_decay, cfg.epochs, cfg.max_lr_drops,
            cfg.dropout, cfg.decay_biases) == (128, 0.01, 0.9, 5e-4, 90, 3, 0.5, False)
    demo = train.resolve_config(["--preset=demo"])
    assert all(getattr(demo, k) == v for k, v in train.DEMO.items())
    assert train.resolve_config(["--preset=demo", "--epochs=3"]).epochs == 3
    with pytest.raises(UsageError):
        train.main(["--data=/nonexistent/shards"])


def test_each_rank_trains_on_its_own_part_of_every_global_batch(tmp_path):
    """train.py's loaders on two ranks: per step, disjoint halves that together are the one-rank batch."""
    # One training image per class: a label names the sample it came with.
    data = write_data(tmp_path / "data", {"train": smooth_images(8, 8), "val": smooth_images(2, 8, seed=1)},
                      shard_size=3)
    cfg = train.TrainConfig(data=str(data), batch_size=4, num_threads=1, reader_workers=0, device="cpu")

    def labels_per_step(rank: int, world_size: int) -> list[list[int]]:
        where = Rank(rank, world_size, 1, torch.device("cpu"))
        setup = train.Setup(cfg, where, train.training_numerics(cfg, where.device), run=None, num_classes=8,
                            inference={}, dataset={}, origin=None)
        loader, _ = train.make_loaders(setup, Progress())
        return [labels.tolist() for _, labels in loader]

    whole, first, second = labels_per_step(0, 1), labels_per_step(0, 2), labels_per_step(1, 2)
    assert len(whole) == len(first) == len(second) == 2
    for batch, mine, theirs in zip(whole, first, second):
        assert len(mine) == len(theirs) == 2 and not set(mine) & set(theirs)
        assert mine + theirs == batch
    assert sorted(sum(whole, [])) == list(range(8))


@pytest.mark.slow
def test_torchrun_two_cpu_ranks_validate_every_sample_once(tmp_path):
    data = write_data(tmp_path / "data", {"train": smooth_images(8, 8), "val": smooth_images(5, 8, seed=1)},
                      shard_size=3)
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py", "--",
         f"--data={data}", f"--run={run}", "--batch_size=4", "--epochs=1", "--num_threads=1", "--device=cpu",
         "--log_interval=1"], cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    epoch = [r for r in metrics(run) if "epoch" in r]
    assert epoch[0]["val_samples"] == 5  # 3 + 2 over the ranks, none twice, none padded
    assert [r["step"] for r in metrics(run) if "epoch" not in r] == [1, 2]  # 2 steps of 2 images per rank
    assert checkpoint(run)["world_size"] == 2


def torchrun_train(data, run, *args, wait=True):
    """Two ranks through slurm/torchrun_status.py, the launcher of the Slurm jobs, which passes on status 75 (torchrun
    alone reports any non-zero worker status as 1)."""
    command = [sys.executable, "slurm/torchrun_status.py", "--standalone", "--nproc_per_node=2", "train.py", "--",
               f"--data={data}", f"--run={run}", "--batch_size=4", "--epochs=1", "--num_threads=1", "--device=cpu",
               "--log_interval=1", "--max_steps_per_epoch=4", *args]
    venv_bin = Path(sys.executable).parent  # where torchrun is
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PATH": f"{venv_bin}{os.pathsep}{os.environ['PATH']}"}
    if wait:
        return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    return subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


@pytest.mark.slow
def test_two_rank_stop_mid_epoch_then_resume_gives_the_same_epoch(data, tmp_path):
    """Weights and the epoch's train loss/error (summed over both ranks) equal an uninterrupted run's."""
    reference = tmp_path / "reference"
    assert torchrun_train(data, reference).returncode == 0
    run = tmp_path / "run"
    process = torchrun_train(data, run, wait=False)
    deadline = time.time() + 300
    while not ((run / "metrics.jsonl").exists() and (run / "metrics.jsonl").read_text()):
        assert process.poll() is None and time.time() < deadline, process.communicate()
        time.sleep(0.05)
    workers = subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True, text=True).stdout.split()
    os.kill(int(workers[0]), signal.SIGUSR1)  # one rank only: the ranks agree at the next log interval
    out, err = process.communicate(timeout=300)
    assert process.returncode == 75 and "preempted:" in out, out + err
    assert checkpoint(run)["batches_done"] < 4
    resumed = torchrun_train(data, run)
    assert resumed.returncode == 0 and "resuming" in resumed.stdout, resumed.stderr
    assert_same_weights(weights(run), weights(reference))
    (expected,), (got,) = ([r for r in metrics(x) if "epoch" in r] for x in (reference, run))
    for key in ("train_loss", "train_top1_err", "val_loss", "val_top1_err"):
        assert got[key] == pytest.approx(expected[key], rel=1e-9), key


@pytest.mark.gpu
def test_float32_on_a_gpu_means_float32_not_tf32(data, tmp_path):
    code = call_main(f"--data={data}", f"--run={tmp_path / 'run'}", "--device=cuda", "--dtype=float32", "--epochs=1",
                     "--max_steps_per_epoch=1", "--batch_size=4", "--num_threads=1", "--log_interval=1")
    assert code == 0
    assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32


@pytest.mark.slow
def test_compiled_training_writes_a_plain_checkpoint(data, tmp_path):
    run = tmp_path / "run"
    result = run_train(f"--data={data}", f"--run={run}", "--compile", "--epochs=1", "--max_steps_per_epoch=2",
                       "--batch_size=4", "--log_interval=1", "--num_threads=1", "--device=cpu")
    assert result.returncode == 0, result.stderr[-3000:]
    AlexNet(num_classes=4).load_state_dict(weights(run))  # no `_orig_mod.` prefixes: eval.py can load it


def launch(ranks: int, data, run, *args, wait=True):
    """train.py on `ranks` CPU processes (torchrun for more than one), 4 steps of 4 images, no dropout."""
    if ranks > 1:
        return torchrun_train(data, run, "--dropout=0", *args, wait=wait)
    command = [sys.executable, "train.py", f"--data={data}", f"--run={run}", "--batch_size=4", "--epochs=1",
               "--num_threads=1", "--device=cpu", "--log_interval=1", "--max_steps_per_epoch=4", "--dropout=0", *args]
    if wait:
        return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    return subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def stop_after_first_step(process, run, ranks: int):
    deadline = time.time() + 300
    while not ((run / "metrics.jsonl").exists() and (run / "metrics.jsonl").read_text()):
        assert process.poll() is None and time.time() < deadline, process.communicate()
        time.sleep(0.05)
    if ranks == 1:
        process.send_signal(signal.SIGUSR1)
    else:
        os.kill(int(subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True, text=True)
                    .stdout.split()[0]), signal.SIGUSR1)
    out, err = process.communicate(timeout=300)
    assert process.returncode == train.EXIT_STOPPED_EARLY and "preempted:" in out, out + err


@pytest.mark.slow
@pytest.mark.parametrize("before, after", [(2, 1), (1, 2)])
def test_resume_on_another_number_of_ranks_continues_the_same_batches(data, tmp_path, before, after):
    """Stopped mid-epoch on `before` ranks and resumed on `after`: the run continues at its next global step with
    the same global batches, so the weights equal an uninterrupted run's up to float32 rounding: with two ranks DDP
    averages the two halves' gradients, one rank averages over the whole batch; the same sum in another order."""
    reference = tmp_path / "reference"
    assert launch(before, data, reference).returncode == 0
    run = tmp_path / "run"
    stop_after_first_step(launch(before, data, run, wait=False), run, before)
    done = checkpoint(run)["batches_done"]
    assert 0 < done < 4
    resumed = launch(after, data, run)
    assert resumed.returncode == 0, resumed.stderr
    assert f"ranks {before} -> {after}" in resumed.stdout and f"+{done} batches" in resumed.stdout
    assert [r["step"] for r in metrics(run) if "epoch" not in r] == [1, 2, 3, 4]
    ours, theirs = weights(run), weights(reference)
    for key in theirs:
        assert torch.allclose(ours[key], theirs[key], rtol=1e-4, atol=1e-6), key
    (expected,), (got,) = ([r for r in metrics(x) if "epoch" in r] for x in (reference, run))
    assert got["train_loss"] == pytest.approx(expected["train_loss"], rel=1e-4)


def test_log_rows_carry_step_time_data_wait_and_eta(reference):
    rows = metrics(reference)
    steps, epochs = [r for r in rows if "epoch" not in r], [r for r in rows if "epoch" in r]
    for r in steps + epochs:
        assert 0 <= r["data_wait_s"] <= r["step_time_s"] and 0 <= r["data_wait_share"] <= 1, r
        assert r["data_wait_share"] == pytest.approx(r["data_wait_s"] / r["step_time_s"])
        assert "peak_gpu_mem_gib" not in r  # on a GPU only
    for r in steps:  # one step of 4 images per interval
        assert r["images_per_s"] * r["step_time_s"] == pytest.approx(4)
    # 2 epochs of 3 steps: the steps left after each interval, at that interval's pace
    left_in_epoch, left_in_run = [2, 1, 0, 2, 1, 0], [5, 4, 3, 2, 1, 0]
    for r, epoch_left, run_left in zip(steps, left_in_epoch, left_in_run):
        assert r["eta_epoch_s"] == pytest.approx(epoch_left * r["step_time_s"])
        assert r["eta_run_s"] == pytest.approx(run_left * r["step_time_s"])
    first, last = epochs
    assert first["val_time_s"] > 0
    assert first["eta_run_s"] == pytest.approx(3 * first["step_time_s"] + first["val_time_s"])
    assert last["eta_run_s"] == 0


def test_tensorboard_holds_the_rows_and_progress_is_plain_lines_in_a_file(data, tmp_path):
    pytest.importorskip("tensorboard", reason="TensorBoard is an optional extra: make setup TB=1")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run = tmp_path / "run"
    result = run_train(f"--data={data}", f"--run={run}", *QUICK, "--epochs=1", "--tensorboard",
                       "--progress_interval", "0")
    assert result.returncode == 0, result.stderr
    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    rows = metrics(run)
    for key in ("loss", "lr", "images_per_s", "data_wait_s", "data_wait_share", "step_time_s"):
        scalars = events.Scalars(f"interval/{key}")
        assert [(s.step, s.value) for s in scalars] == [(r["step"], pytest.approx(r[key])) for r in rows[:-1]], key
    for key in ("train_loss", "train_top1_err", "val_top1_err", "val_top5_err", "images_per_s", "data_wait_share"):
        assert [(s.step, s.value) for s in events.Scalars(f"epoch/{key}")] == [(3, pytest.approx(rows[-1][key]))]
    # Not a terminal: a plain line per update (interval 0 s), never a carriage-return frame.
    assert "\r" not in result.stderr
    lines = result.stderr.splitlines()
    assert [" ".join(line.split("[")[0].split()) for line in lines if line.startswith("epoch 1/1:")] == [
        "epoch 1/1: 33% 1/3", "epoch 1/1: 67% 2/3", "epoch 1/1: 100% 3/3"]
    assert any(line.startswith("validation:") for line in lines)
    assert re.search(r"epoch 1 step 3: loss \S+, lr 0.01, \S+ images/s, step \S+ s, data wait \S+ s \(\d+%\), "
                     r"ETA epoch 0:00, run 0:00", result.stdout), result.stdout


def test_the_readme_options_table_lists_every_option():
    import dataclasses
    table = (REPO / "README.md").read_text().split("### train.py options", 1)[1].split("\n#", 1)[0]
    missing = [f.name for f in dataclasses.fields(train.TrainConfig) if f"| `--{f.name}` |" not in table]
    assert not missing, f"README.md's train.py options table lacks {missing}"


def test_the_demo_preset_yields_to_options_in_every_spelling():
    cfg = train.resolve_config(["--preset", "demo", "--epochs", "3", "--no-channels_last", "--lr=0.002"])
    assert (cfg.epochs, cfg.channels_last, cfg.lr, cfg.batch_size) == (3, False, 0.002, train.DEMO["batch_size"])
    with pytest.raises(UsageError, match=r"unknown option --epoch \(did you mean --epochs\?\)"):
        train.resolve_config(["--preset=demo", "--epoch=3"])
