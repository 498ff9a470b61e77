"""predict.py from the outside: its probabilities against eval.py's pipeline on the sample's validation images, and
one line per file it cannot classify."""
import json
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import eval as evaluation
import predict
import train
from config import parse_config
from model import AlexNet
from pipeline import Output, eval_loader, read_manifest
from runtime import UsageError
from tests.conftest import REPO

NUM_CLASSES = 10  # the built-in sample's


def call_predict(capsys, *args) -> tuple[int, str, str]:
    """predict.main in this process: (exit status, stdout, stderr)."""
    try:
        predict.main(list(map(str, args)))
    except SystemExit as e:
        code = e.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err


def run_predict(*args):
    return subprocess.run([sys.executable, "predict.py", *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


def discerning_network() -> AlexNet:
    """Untrained, but its probabilities differ from image to image: the paper's initialisation (weights 0.01, biases
    1) gives every image nearly the same output. He initialisation without biases, fc8 scaled down so that the logits
    vary by a few units over the images."""
    torch.manual_seed(0)
    model = AlexNet(num_classes=NUM_CLASSES).eval()
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
                layer.bias.zero_()
        model.classifier.fc8.weight.mul_(0.1)
    return model


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    """The built-in sample (small), its shards, its validation JPEGs as files, and a weights-only checkpoint with
    the class list and mean image train.py writes."""
    root = tmp_path_factory.mktemp("sample")
    raw, data, images = root / "raw", root / "data", root / "val-images"
    for command in (["sample", f"--out={raw}", "--train_per_class=2", "--val_per_class=1"],
                    ["build", f"--raw={raw}", f"--out={data}"]):
        subprocess.run([sys.executable, "-m", "shards", *command], cwd=REPO, check=True, capture_output=True,
                       timeout=300)
    with tarfile.open(raw / "ILSVRC2012_img_val.tar") as tar:
        tar.extractall(images, filter="data")
    manifest = read_manifest(data)
    model = discerning_network()
    checkpoint = root / "best.pt"
    torch.save({"model": model.state_dict(), "num_classes": NUM_CLASSES,
                **train.inference_metadata(train.TrainConfig(data=str(data)), manifest)}, checkpoint)
    return {"data": data, "images": images, "checkpoint": checkpoint, "model": model, "manifest": manifest}


def eval_probabilities(sample, crops: str) -> dict[str, torch.Tensor]:
    """File stem -> probabilities, as eval.py computes them: its DALI loader of the shards, its ten-crop average."""
    keys = evaluation.split_keys(sample["data"], sample["manifest"], "val")
    loader = eval_loader(sample["data"], "val", crops, batch_size=4, output=Output(with_index=True))
    result = {}
    with torch.no_grad():
        for images, _, index in loader:
            if crops == "ten":
                probs = evaluation.ten_crop_probabilities(sample["model"], images)
            else:
                probs = sample["model"](images).softmax(dim=1)
            result.update({keys[i]: p for i, p in zip(index.tolist(), probs)})
    return result


def predicted_probabilities(stdout: str) -> dict[str, torch.Tensor]:
    result = {}
    for line in stdout.splitlines():
        row = json.loads(line)
        probs = torch.zeros(NUM_CLASSES)
        for entry in row["top"]:
            probs[entry["index"]] = entry["probability"]
        result[row["file"].rsplit("/", 1)[-1].removesuffix(".JPEG")] = probs
    return result


@pytest.mark.parametrize("crops", [pytest.param("ten", marks=pytest.mark.slow), "center"])
def test_probabilities_agree_with_eval_on_the_sample_validation_images(sample, crops):
    result = run_predict(f"--checkpoint={sample['checkpoint']}", "--json", f"--top={NUM_CLASSES}",
                         f"--crops={crops}", "--device=cpu", sample["images"])
    assert result.returncode == 0, result.stderr
    ours, theirs = predicted_probabilities(result.stdout), eval_probabilities(sample, crops)
    assert sorted(ours) == sorted(theirs) and len(ours) == NUM_CLASSES  # one validation image per class
    confident = 0
    for key, reference in theirs.items():
        torch.testing.assert_close(ours[key], reference, atol=2e-3, rtol=0, msg=key)
        confident += bool(reference.max() > 2 / NUM_CLASSES)
    assert confident >= NUM_CLASSES // 2  # not a comparison of flat distributions
    assert len({int(p.argmax()) for p in theirs.values()}) > 1  # nor of one answer for every image


def test_text_output_lists_wnid_words_and_probability(sample, capsys):
    image = sorted(sample["images"].iterdir())[0]
    code, out, err = call_predict(capsys, f"--checkpoint={sample['checkpoint']}", "--device=cpu", "--top=3", image)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == str(image) and len(lines) == 4
    wnids = {c["wnid"]: c["name"] for c in sample["manifest"]["classes"]}
    shares = []
    for line in lines[1:]:
        share, wnid, words = line.split(maxsplit=2)
        assert wnids[wnid] == words
        shares.append(float(share.rstrip("%")))
    assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 100.01


def test_every_file_gets_a_result_or_one_line_and_the_others_still_run(sample, tmp_path, capsys):
    rgb = np.asarray(Image.open(sorted(sample["images"].iterdir())[0]).convert("RGB"))
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    Image.fromarray(rgb).convert("CMYK").save(inputs / "cmyk.jpg")
    Image.fromarray(rgb).convert("L").save(inputs / "grey.jpg")
    Image.fromarray(rgb).save(inputs / "photo.png")
    (inputs / "notes.jpg").write_text("not an image")
    (inputs / "README.txt").write_text("a folder's other files are not images to classify")
    truncated = inputs / "truncated.jpg"
    Image.fromarray(rgb).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:300])
    missing = tmp_path / "missing.jpg"
    code, out, err = call_predict(capsys, f"--checkpoint={sample['checkpoint']}", "--device=cpu", "--json", inputs,
                                  missing)
    assert code == 1
    rows = {json.loads(line)["file"].rsplit("/", 1)[-1]: json.loads(line) for line in out.splitlines()}
    assert sorted(rows) == ["cmyk.jpg", "grey.jpg", "photo.png"]
    assert rows["cmyk.jpg"]["converted"] == ["CMYK->RGB"] and rows["grey.jpg"]["converted"] == ["greyscale->RGB"]
    assert all(len(r["top"]) == 5 for r in rows.values())
    errors = [json.loads(line) for line in err.splitlines()]
    assert sorted(e["file"].rsplit("/", 1)[-1] for e in errors) == ["missing.jpg", "notes.jpg", "truncated.jpg"]
    assert "not an image" in next(e["error"] for e in errors if e["file"].endswith("notes.jpg"))


@pytest.mark.parametrize("problem, words", [
    ("old", "carries no class list or mean image"),
    ("missing", "does not exist"),
    ("no_files", "no image files or folders given"),
])
def test_usage_errors_are_one_line(sample, tmp_path, problem, words):
    checkpoint = sample["checkpoint"]
    if problem == "old":  # a checkpoint of a train.py before checkpoints carried the classes
        checkpoint = tmp_path / "old.pt"
        torch.save({"model": sample["model"].state_dict(), "num_classes": NUM_CLASSES}, checkpoint)
    if problem == "missing":
        checkpoint = tmp_path / "nothing.pt"
    files = [] if problem == "no_files" else [str(sample["images"])]
    with pytest.raises(UsageError) as error:  # run_main prints it as one line `error: ...`, exit status 2
        predict.main([f"--checkpoint={checkpoint}", "--device=cpu", *files])
    assert words in str(error.value) and "\n" not in str(error.value)


def test_options_take_their_value_either_way_and_files_are_the_rest():
    argv = ["--checkpoint", "a.pt", "--top=2", "x.jpg", "--json", "--crops", "center", "photos/", "--", "--odd.jpg"]
    files = []
    cfg = parse_config(predict.PredictConfig, argv, positional=files)
    assert (cfg.checkpoint, cfg.top, cfg.json, cfg.crops) == ("a.pt", 2, True, "center")
    assert files == ["x.jpg", "photos/", "--odd.jpg"]
    with pytest.raises(UsageError, match=r"^--top=0: expected at least 1$"):
        parse_config(predict.PredictConfig, ["--top=0"], positional=[])
