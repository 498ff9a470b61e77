"""The trained network leaving train.py: best.pt, kept epochs, --resume=PATH, --init=PATH, changed options on resume,
and the safetensors export that model.load_exported reads."""
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open

import eval as evaluation
import train
from model import AlexNet, load_exported
from model.export import read_inference, start_from_weights
from rundir import RunDirectory
from runtime import UsageError
from tests.conftest import REPO
from tests.shardkit import write_data
from tests.test_train import smooth_images

# One step of 4 images per epoch, no dropout: an epoch is mostly its validation and its checkpoint.
QUICK = ["--batch_size=4", "--max_steps_per_epoch=1", "--log_interval=1", "--num_threads=1", "--device=cpu",
         "--dropout=0"]


def call_main(*args) -> int:
    try:
        train.main(list(map(str, args)))
    except SystemExit as e:
        return e.code or 0
    return 0


def load(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)  # as every reader of checkpoints loads them


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def epoch_rows(run) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "epoch" in r]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("export-data")
    return write_data(root / "data", {"train": smooth_images(8, 4), "val": smooth_images(6, 4, seed=1)}, shard_size=5)


@pytest.fixture(scope="module")
def lineage(data, tmp_path_factory):
    """Two epochs, each kept (--keep_every=1)."""
    run = tmp_path_factory.mktemp("lineage") / "run"
    result = subprocess.run([sys.executable, "train.py", f"--data={data}", f"--run={run}", "--epochs=2",
                             "--keep_every=1", *QUICK], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return run


def test_checkpoints_carry_the_class_list_and_the_training_mean(lineage, data):
    checkpoint = load(lineage / "checkpoint.pt")
    manifest = json.loads((data / "manifest.json").read_text())
    assert checkpoint["classes"] == manifest["classes"]
    preprocessing = checkpoint["preprocessing"]
    assert (preprocessing["size"], preprocessing["crop"], preprocessing["mean"]) == (256, 224, "pixel")
    assert preprocessing["jpeg_quality"] == manifest["params"]["quality"]
    with np.load(data / "stats.npz") as stats:
        expected = torch.from_numpy(stats["mean_image"]).float()
    assert torch.equal(preprocessing["mean_image"], expected)


def test_best_pt_holds_the_weights_of_the_epoch_with_the_lowest_val_error(lineage):
    rows = epoch_rows(lineage)
    errors = [r["val_top1_err"] for r in rows]
    best_epoch = errors.index(min(errors)) + 1  # the first of equals: a later one is no improvement
    best = load(lineage / "best.pt")
    assert best["epoch"] == best_epoch and best["metrics"]["val_top1_err"] == min(errors)
    assert not {"optimizer", "scheduler", "rng"} & best.keys()  # weights only
    assert_same_weights(best["model"], load(lineage / f"epoch-{best_epoch:03d}.pt")["model"])
    assert (lineage / "best.pt").stat().st_size < 0.55 * (lineage / "checkpoint.pt").stat().st_size
    classes = best["classes"]
    evaluation.load_model(lineage / "best.pt", classes, torch.device("cpu"))  # eval.py reads it
    other = [*classes[:-1], {**classes[-1], "wnid": "n99999999"}]
    with pytest.raises(UsageError, match=r"trained on other classes than the shards': 1 of 4 differ \(class 3: "):
        evaluation.load_model(lineage / "best.pt", other, torch.device("cpu"))


def test_keep_every_keeps_each_epochs_resumable_checkpoint(lineage):
    kept = sorted(p.name for p in lineage.glob("epoch-*.pt"))
    assert kept == ["epoch-001.pt", "epoch-002.pt"]
    assert [load(lineage / name)["epoch"] for name in kept] == [1, 2]
    assert_same_weights(load(lineage / "epoch-002.pt")["model"], load(lineage / "checkpoint.pt")["model"])
    assert "optimizer" in load(lineage / "epoch-001.pt")


@pytest.mark.slow
def test_resume_from_a_path_continues_exactly_and_a_rerun_goes_on_from_the_run(lineage, data, tmp_path, capsys):
    run, source = tmp_path / "branch", lineage / "epoch-001.pt"
    assert call_main(f"--data={data}", f"--run={run}", f"--resume={source}", "--epochs=2", *QUICK) == 0
    assert f"resuming from {source}: epoch 1 done" in capsys.readouterr().out
    assert_same_weights(load(run / "checkpoint.pt")["model"], load(lineage / "epoch-002.pt")["model"])
    # The same command again (as a requeued job runs it): RUN/checkpoint.pt started from PATH, so it goes on from there.
    assert call_main(f"--data={data}", f"--run={run}", f"--resume={source}", "--epochs=2", *QUICK) == 0
    assert f"resuming from {run / 'checkpoint.pt'}: epoch 2 done" in capsys.readouterr().out


@pytest.mark.slow
def test_a_new_lr_on_resume_takes_effect_from_the_resumed_step_and_is_said(lineage, data, tmp_path, capsys):
    run = tmp_path / "run"
    assert call_main(f"--data={data}", f"--run={run}", f"--resume={lineage / 'epoch-001.pt'}", "--epochs=2",
                     "--lr=0.005", *QUICK) == 0
    out = capsys.readouterr().out
    assert "--lr 0.01 -> 0.005" in out and "in effect from step 2" in out, out
    steps = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "epoch" not in r]
    assert [(r["step"], r["lr"]) for r in steps] == [(1, 0.01), (2, 0.005)]  # the source's row, then the new lr
    assert [g["lr"] for g in load(run / "checkpoint.pt")["optimizer"]["param_groups"]] == [0.005, 0.005]


def test_starting_over_removes_the_previous_runs_checkpoints_but_not_the_init_weights(lineage, data, tmp_path,
                                                                                       capsys):
    run = tmp_path / "run"
    shutil.copytree(lineage, run)
    assert call_main(f"--data={data}", f"--run={run}", "--resume=false", f"--init={run / 'best.pt'}", "--epochs=1",
                     *QUICK) == 0
    out = capsys.readouterr().out
    assert f"removed from {run} the checkpoints of the run it held before: checkpoint.pt, epoch-001.pt, " \
           "epoch-002.pt" in out, out
    assert not list(run.glob("epoch-*.pt"))
    assert load(run / "checkpoint.pt")["epoch"] == 1 and load(run / "best.pt")["epoch"] == 1  # the new run's
    assert len(epoch_rows(run)) == 1


@pytest.mark.slow
def test_resume_from_a_path_into_a_directory_of_another_run_replaces_that_run(lineage, data, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(lineage, run)  # a run of its own in RUN: its checkpoints and rows must not mix with the branch
    (run / "bad_samples.jsonl").write_text('{"split": "train", "sample": 3, "key": "train_00000003"}\n')
    source = lineage / "epoch-001.pt"
    assert call_main(f"--data={data}", f"--run={run}", f"--resume={source}", "--epochs=2", *QUICK) == 0
    assert "the checkpoints of the run it held before: checkpoint.pt, best.pt, epoch-001.pt, epoch-002.pt" in \
        capsys.readouterr().out
    assert sorted(p.name for p in run.glob("*.pt")) == ["best.pt", "checkpoint.pt"] or \
        sorted(p.name for p in run.glob("*.pt")) == ["checkpoint.pt"]  # best.pt only if epoch 2 beat epoch 1
    assert_same_weights(load(run / "checkpoint.pt")["model"], load(lineage / "epoch-002.pt")["model"])
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows == [json.loads(line) for line in (lineage / "metrics.jsonl").read_text().splitlines()
                    if json.loads(line)["step"] <= 1] + rows[-2:]  # the source's rows to its step, then the branch's
    assert not (run / "bad_samples.jsonl").exists()  # the stale list was RUN's, not the source's


@pytest.mark.parametrize("case, words", [
    ("weights_only", "holds weights only (no optimizer state): --init="),
    ("mid_epoch_batch_size", "stopped in the middle of epoch 2 with another --batch_size"),
    ("missing", "no such checkpoint"),
    ("both", "a run starts from one of them"),
])
def test_what_resume_refuses_is_one_line(lineage, data, tmp_path, case, words):
    source = {"weights_only": lineage / "best.pt", "missing": tmp_path / "none.pt"}.get(case, lineage / "epoch-001.pt")
    args = [f"--data={data}", f"--run={tmp_path / 'run'}", *QUICK, "--epochs=2"]
    if case == "mid_epoch_batch_size":  # a checkpoint written by a stop signal one step into epoch 2
        stopped = load(source) | {"batches_done": 1, "step": 2}
        source = tmp_path / "stopped.pt"
        torch.save(stopped, source)
        args.append("--batch_size=8")
    if case == "both":
        args.append(f"--init={lineage / 'best.pt'}")
    with pytest.raises(UsageError) as error:
        train.main([*args, f"--resume={source}"])
    assert words in str(error.value) and "\n" not in str(error.value)


@pytest.mark.slow
def test_init_starts_a_new_run_from_the_weights_with_a_fresh_fc8_for_other_classes(lineage, tmp_path, capsys):
    three = write_data(tmp_path / "three", {"train": smooth_images(4, 3), "val": smooth_images(3, 3, seed=2)})
    run = tmp_path / "run"
    # lr 1e-20 (0 is refused): the one step moves every weight by far less than 1e-12, so they stay where the run
    # started, while fresh and trained weights differ by about 0.01.
    assert call_main(f"--data={three}", f"--run={run}", f"--init={lineage / 'best.pt'}", "--epochs=1", "--lr=1e-20",
                     *QUICK) == 0
    assert "fc8 fresh: this data's 3 classes, not the 4 it was trained on" in capsys.readouterr().out
    started, trained = load(run / "checkpoint.pt"), load(lineage / "best.pt")["model"]
    assert started["epoch"] == 1 and started["step"] == 1  # a new run, not a continued one
    torch.manual_seed(0)  # --seed=0: the initialisation a new run draws
    fresh = AlexNet(num_classes=3).state_dict()
    for key, value in started["model"].items():
        expected = fresh[key] if key.startswith("classifier.fc8.") else trained[key]
        assert torch.allclose(value, expected, rtol=0, atol=1e-12), key


def test_export_round_trip_gives_the_same_logits(lineage, tmp_path):
    out = tmp_path / "alexnet.safetensors"
    result = subprocess.run([sys.executable, "-m", "model.export", f"--checkpoint={lineage / 'best.pt'}",
                             f"--out={out}"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and not result.stderr, result.stderr
    best = load(lineage / "best.pt")
    reference = AlexNet(num_classes=4).eval()
    reference.load_state_dict(best["model"])
    exported = load_exported(out)
    assert not exported.training
    images = torch.randn(3, 3, 224, 224) * 60
    with torch.no_grad():
        assert torch.equal(exported(images), reference(images))
    with safe_open(str(out), framework="pt") as f:
        metadata = f.metadata()
    assert json.loads(metadata["classes"]) == best["classes"]
    assert "two towers" in metadata["architecture"] and "not torchvision's alexnet" in metadata["architecture"]
    inference = read_inference(out)
    assert torch.equal(torch.from_numpy(inference.preprocessing.mean_image), best["preprocessing"]["mean_image"])
    assert inference.preprocessing.jpeg_quality == best["preprocessing"]["jpeg_quality"]
    assert out.stat().st_size < 1.01 * (lineage / "best.pt").stat().st_size


def test_which_checkpoint_resume_continues_from(tmp_path):
    """auto/true/false/PATH, and a rerun of --resume=PATH going on from RUN/checkpoint.pt that started from PATH."""
    run, elsewhere = RunDirectory(str(tmp_path / "run")), tmp_path / "other" / "epoch-030.pt"
    elsewhere.parent.mkdir()
    torch.save({"model": {}, "epoch": 30}, elsewhere)
    assert run.resume_from("auto") is None and run.resume_from(str(elsewhere))[0] == elsewhere
    with pytest.raises(FileNotFoundError, match="there is no .*checkpoint.pt to continue from"):
        run.resume_from("true")  # asked for: never a new run instead
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        run.resume_from(str(tmp_path / "none.pt"))
    run.path.mkdir()
    torch.save({"model": {}, "epoch": 31, "origin": run.origin(elsewhere, {})}, run.checkpoint)  # continued from it
    for choice in ("auto", "true", "True", str(elsewhere), str(run.checkpoint)):
        path, checkpoint = run.resume_from(choice)
        assert (path, checkpoint["epoch"]) == (run.checkpoint, 31), choice
    assert run.resume_from("false") is None
    assert run.origin(run.checkpoint, load(run.checkpoint)) == str(elsewhere.resolve())  # carried on
    torch.save({"model": {}, "epoch": 5}, run.checkpoint)  # a run of its own: --resume=PATH goes back to PATH
    assert run.resume_from(str(elsewhere))[1]["epoch"] == 30


def test_init_weights_keep_fc8_only_for_the_same_class_list(tmp_path):
    classes = [{"index": i, "wnid": f"n{i:08d}", "name": f"class {i}"} for i in range(4)]
    torch.manual_seed(1)
    trained = AlexNet(num_classes=4)
    path = tmp_path / "best.pt"
    torch.save({"model": trained.state_dict(), "num_classes": 4, "classes": classes}, path)
    for ours, kept in ((classes, True), ([*classes[:3], {**classes[3], "wnid": "n99999999"}], False)):
        torch.manual_seed(0)
        fresh = AlexNet(num_classes=4).state_dict()
        torch.manual_seed(0)
        network = AlexNet(num_classes=4)  # as a new run initialises it
        note = start_from_weights(network, path, ours)
        assert ("fc8 fresh" not in note) == kept
        for key, value in network.state_dict().items():
            expected = fresh[key] if key.startswith("classifier.fc8.") and not kept else trained.state_dict()[key]
            assert torch.equal(value, expected), key
    other = tmp_path / "other.pt"
    torch.save({"model": {k: v for k, v in trained.state_dict().items() if "conv1" not in k}}, other)
    with pytest.raises(ValueError, match="holds another network"):
        start_from_weights(AlexNet(num_classes=4), other, classes)


@pytest.mark.slow
def test_onnx_export_gives_torchs_logits_and_carries_the_class_list(lineage, tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
    pytest.importorskip("onnxscript", reason="the onnx extra is not installed")
    out = tmp_path / "alexnet.safetensors"
    result = subprocess.run([sys.executable, "-m", "model.export", f"--checkpoint={lineage / 'best.pt'}",
                             f"--out={out}", "--onnx"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and "onnxruntime's logits within" in result.stdout, result.stderr[-2000:]
    session = onnxruntime.InferenceSession(str(out.with_suffix(".onnx")), providers=["CPUExecutionProvider"])
    images = torch.randn(3, 3, 224, 224) * 60  # another batch size than the export's example
    with torch.no_grad():
        expected = load_exported(out)(images)
    got = torch.from_numpy(session.run(["logits"], {"images": images.numpy()})[0])
    torch.testing.assert_close(got, expected, atol=1e-4 * float(expected.abs().max()), rtol=0)
    metadata = session.get_modelmeta().custom_metadata_map
    assert json.loads(metadata["classes"]) == load(lineage / "best.pt")["classes"]
