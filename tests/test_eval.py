"""eval.py: ten-crop scoring, top-k errors, exact counting over ranks, the user-facing CLI."""
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from sklearn.metrics import top_k_accuracy_score

import eval as evaluation
from model import AlexNet
from pipeline import Output, eval_loader
from pipeline.pipelines import TEN_CROP_ORDER
from runtime import TOP_K, topk_correct
from tests.conftest import REPO
from tests.shardkit import read_samples, write_class_folders, write_data

CROP = 224


def run_eval(*args, nproc: int = 1):
    if nproc == 1:
        command = [sys.executable, "eval.py", *args]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                   "eval.py", *args]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)


def save_checkpoint(path, num_classes: int, seed: int = 0):
    torch.manual_seed(seed)
    model = AlexNet(num_classes=num_classes)
    torch.save({"model": model.state_dict(), "num_classes": num_classes, "epoch": 0}, path)
    return model


def random_images(count: int, num_classes: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    smooth = [rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for _ in range(count)]
    return [(np.asarray(Image.fromarray(s).resize((256, 256), Image.BILINEAR)), i % num_classes)
            for i, s in enumerate(smooth)]


@pytest.fixture(scope="module")
def seven_images(tmp_path_factory):
    """A val split of 7 samples in 3 shards: 7 divides by neither 2 nor 3 ranks."""
    root = tmp_path_factory.mktemp("seven")
    return write_data(root / "data", {"train": random_images(4, 3), "val": random_images(7, 3, seed=1)},
                      shard_size=3)


def test_topk_errors_agree_with_sklearn():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(200, 10))
    labels = rng.integers(0, 10, 200)
    correct = topk_correct(torch.from_numpy(scores), torch.from_numpy(labels))
    for k, c in zip(TOP_K, correct.tolist()):
        assert c / 200 == pytest.approx(top_k_accuracy_score(labels, scores, k=k, labels=range(10)))


def test_ten_crop_averages_probabilities_not_logits():
    # Patch 1 is sure of class 0; patch 2 prefers classes 1 and 2 by a little and class 0 not at all.
    # Mean logits rank classes 1/2 first; mean probabilities rank class 0 first (about 0.5 against 0.25).
    patch_logits = torch.tensor([[10.0, 0.0, 0.0], [-12.0, 2.0, 2.0]])
    model = lambda patches: patch_logits[patches.flatten(1)[:, 0].long()]  # noqa: E731 (patch i -> logits i)
    patches = torch.arange(2.0).view(1, 2, 1, 1, 1).expand(1, 2, 3, 4, 4)
    probabilities = evaluation.ten_crop_probabilities(model, patches)
    assert probabilities.argmax().item() == 0
    assert patch_logits.mean(0).argmax().item() != 0
    assert probabilities.sum().item() == pytest.approx(1.0)


def reference_ten_crop_probabilities(model, decoded: np.ndarray, mean_image: np.ndarray) -> torch.Tensor:
    """Independent of DALI: Pillow crops and reflections of the decoded 256x256 image, minus the mean image."""
    image = Image.fromarray(decoded)
    mean = mean_image.astype(np.float32)
    corners = {"top-left": (0, 0), "top-right": (32, 0), "bottom-left": (0, 32), "bottom-right": (32, 32),
               "center": (16, 16)}
    patches = []
    for flip in (False, True):
        for name in TEN_CROP_ORDER:
            x, y = corners[name]
            patch = image.crop((x, y, x + CROP, y + CROP))
            mean_patch = mean[y:y + CROP, x:x + CROP]
            if flip:
                patch, mean_patch = ImageOps.mirror(patch), mean_patch[:, ::-1]
            patches.append(np.asarray(patch, np.float32) - mean_patch)
    batch = torch.from_numpy(np.stack(patches)).permute(0, 3, 1, 2).contiguous()
    with torch.no_grad():
        return model(batch).softmax(dim=1).mean(dim=0)


@pytest.mark.slow
def test_ten_crop_on_real_images_matches_a_pillow_reference(tmp_path, imagenet_sample_dir):
    sources = sorted(imagenet_sample_dir.glob("*.JPEG"))[:: 200][:5]
    raw = tmp_path / "raw"
    for split in ("train", "val"):
        for path in sources:
            folder = raw / split / path.name.split("_")[0]
            folder.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, folder / path.name.replace("'", ""))
    data = tmp_path / "data"
    subprocess.run([sys.executable, "-m", "shards", "build", f"--raw={raw}", f"--out={data}"], cwd=REPO,
                   check=True, capture_output=True, timeout=300)
    torch.manual_seed(0)
    model = AlexNet(num_classes=len(sources)).eval()
    with torch.no_grad():  # sharper than the paper's initialisation, so that probabilities differ between images
        model.classifier[-1].weight.mul_(300)
    with np.load(data / "stats.npz") as stats:
        mean_image = stats["mean_image"]
    samples = read_samples(data, "val")

    loader = eval_loader(data, "val", "ten", batch_size=2, output=Output(with_index=True))
    seen = 0
    for images, labels, index in loader:
        with torch.no_grad():
            probabilities = evaluation.ten_crop_probabilities(model, images)
        for row, i in enumerate(index.tolist()):
            decoded, label = samples[i]
            reference = reference_ten_crop_probabilities(model, decoded, mean_image)
            assert labels[row].item() == label
            assert reference.max() > 2 / len(sources)  # the check below is not between two flat distributions
            torch.testing.assert_close(probabilities[row], reference, atol=2e-3, rtol=0)
            seen += 1
    assert seen == len(sources)


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2, 3])
def test_every_image_is_counted_exactly_once_over_ranks(tmp_path, seven_images, nproc):
    checkpoint = tmp_path / "checkpoint.pt"
    save_checkpoint(checkpoint, num_classes=3)
    result = run_eval(f"--data={seven_images}", f"--checkpoint={checkpoint}", f"--batch_size={2 * nproc}",
                      "--save_predictions", nproc=nproc)  # 2 images per rank per batch: partial batches everywhere
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / "eval-val.json").read_text())
    assert report["n"] == 7 and report["split"] == "val" and report["world_size"] == nproc
    for name in ("ten_crop", "center"):
        assert set(report[name]) == {"top1_err", "top5_err"}
        assert 0 <= report[name]["top1_err"] <= 100 and report[name]["top5_err"] == 0.0  # 3 classes: always in top 5
    predictions = json.loads((tmp_path / "predictions-val.json").read_text())
    assert sorted(p["key"] for p in predictions) == [f"val_{i:08d}" for i in range(7)]
    per_class = json.loads((tmp_path / "per-class-val.json").read_text())
    assert sum(c["n"] for c in per_class) == 7
    assert "ILSVRC-2012 val" in result.stdout and "ten patches" in result.stdout


def test_results_are_the_same_for_any_rank_count(tmp_path, seven_images):
    """The single-process errors equal a direct computation over the loader: nothing dropped, nothing twice."""
    checkpoint = tmp_path / "checkpoint.pt"
    model = save_checkpoint(checkpoint, num_classes=3).eval()
    result = run_eval(f"--data={seven_images}", f"--checkpoint={checkpoint}", "--batch_size=3")
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / "eval-val.json").read_text())
    samples = read_samples(seven_images, "val")
    with np.load(seven_images / "stats.npz") as stats:
        mean_image = stats["mean_image"]
    scores = torch.stack([reference_ten_crop_probabilities(model, samples[i][0], mean_image) for i in range(7)])
    labels = np.array([samples[i][1] for i in range(7)])
    expected = 100 * (1 - top_k_accuracy_score(labels, scores.numpy(), k=1, labels=range(3)))
    assert report["ten_crop"]["top1_err"] == pytest.approx(expected)


@pytest.mark.parametrize("problem, words", [
    ("classes", "has 5 classes but the shards have 3"),
    ("split", "split 'test' is not in"),
    ("corrupt", "is unreadable or not written by train.py"),
    ("missing", "does not exist"),
    ("no_data", "no manifest"),
])
def test_user_errors_are_one_line(tmp_path, seven_images, problem, words):
    checkpoint = tmp_path / "checkpoint.pt"
    save_checkpoint(checkpoint, num_classes=5 if problem == "classes" else 3)
    args = [f"--data={seven_images}", f"--checkpoint={checkpoint}"]
    if problem == "split":
        args.append("--split=test")
    if problem == "corrupt":
        checkpoint.write_bytes(checkpoint.read_bytes()[:1000])
    if problem == "missing":
        checkpoint.unlink()
    if problem == "no_data":
        args[0] = f"--data={tmp_path}"
    result = run_eval(*args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], result.stderr


def test_a_rejected_input_leaves_a_gap_that_evaluation_handles(tmp_path):
    """A corrupt validation file is rejected by `make shards`; evaluation still counts every written image once."""
    raw = write_class_folders(tmp_path / "raw", {"train": random_images(4, 2), "val": random_images(5, 2, seed=2)})
    (raw / "val" / "n00000000" / "val_000000.png").write_bytes(b"not an image at all")  # sorts first: position 0
    data = tmp_path / "data"
    subprocess.run([sys.executable, "-m", "shards", "build", f"--raw={raw}", f"--out={data}"], cwd=REPO,
                   check=True, capture_output=True, timeout=300)
    split = json.loads((data / "manifest.json").read_text())["splits"]["val"]
    assert split["num_samples"] == 4 and split["num_rejected"] == 1
    checkpoint = tmp_path / "checkpoint.pt"
    save_checkpoint(checkpoint, num_classes=2)
    result = run_eval(f"--data={data}", f"--checkpoint={checkpoint}", "--batch_size=3", "--save_predictions")
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((tmp_path / "eval-val.json").read_text())["n"] == 4
    keys = sorted(p["key"] for p in json.loads((tmp_path / "predictions-val.json").read_text()))
    assert keys == [f"val_{i:06d}" for i in range(1, 5)]


def test_each_crop_pass_shows_its_progress_in_images(tmp_path, seven_images):
    checkpoint = tmp_path / "checkpoint.pt"
    save_checkpoint(checkpoint, num_classes=3)
    result = run_eval(f"--data={seven_images}", f"--checkpoint={checkpoint}", "--batch_size=3",
                      "--progress_interval", "0")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "\r" not in result.stderr  # not a terminal: plain lines
    for crops in ("ten", "center"):
        lines = [" ".join(line.split("[")[0].split()) for line in result.stderr.splitlines()
                 if line.startswith(f"{crops}-crop val:")]
        assert lines == [f"{crops}-crop val: 43% 3/7", f"{crops}-crop val: 86% 6/7", f"{crops}-crop val: 100% 7/7"]
