"""The built-in sample ImageNet: archive layout, devkit metadata, oddities, determinism, CLI errors."""
import io
import re
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import scipy.io
from PIL import Image, ImageOps

from shards.image import ORIENTATION_TAG
from shards.sample import (CLASSES, DEVKIT_ARCHIVE, DEVKIT_DATA, ROTATED_90_CW, TRAIN_ARCHIVE, VAL_ARCHIVE,
                           SampleConfig, draw_image, encode, write_sample)
from tests.conftest import REPO

TRAIN_PER_CLASS = 9  # enough for one image with a shorter side below 256 per class
VAL_PER_CLASS = 3
NUM_CLASSES = len(CLASSES)
# What the real devkit's meta.mat holds per synset, in its order: written out here, the format the sample imitates.
SYNSET_FIELDS = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children", "wordnet_height",
                 "num_train_images"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def sample_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("sample-raw")
    write_sample(SampleConfig(out=str(out), seed=0, train_per_class=TRAIN_PER_CLASS, val_per_class=VAL_PER_CLASS))
    return out


@pytest.fixture(scope="module")
def train_files(sample_dir) -> dict[str, dict[str, bytes]]:
    """{class tar name: {image name: file bytes}}, read from the nested training archive."""
    files = {}
    with tarfile.open(sample_dir / TRAIN_ARCHIVE) as outer:
        for member in outer.getmembers():
            with tarfile.open(fileobj=outer.extractfile(member)) as inner:
                files[member.name] = {m.name: inner.extractfile(m).read() for m in inner.getmembers()}
    return files


@pytest.fixture(scope="module")
def val_files(sample_dir) -> dict[str, bytes]:
    with tarfile.open(sample_dir / VAL_ARCHIVE) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


@pytest.fixture(scope="module")
def devkit(sample_dir) -> dict[str, bytes]:
    with tarfile.open(sample_dir / DEVKIT_ARCHIVE) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


@pytest.fixture(scope="module")
def synsets(devkit):
    meta = io.BytesIO(devkit[f"{DEVKIT_DATA}/meta.mat"])
    return scipy.io.loadmat(meta, squeeze_me=True)["synsets"]


@pytest.fixture(scope="module")
def ground_truth(devkit) -> list[int]:
    return [int(line) for line in devkit[f"{DEVKIT_DATA}/ILSVRC2012_validation_ground_truth.txt"].split()]


def decoded(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def test_train_archive_is_one_tar_per_class_of_wnid_named_jpegs(train_files, synsets):
    leaf_wnids = {s["WNID"] for s in synsets if s["num_children"] == 0}
    assert {name.removesuffix(".tar") for name in train_files} == leaf_wnids
    for class_tar, images in train_files.items():
        wnid = class_tar.removesuffix(".tar")
        assert len(images) == TRAIN_PER_CLASS
        assert all(re.fullmatch(rf"{wnid}_\d+\.JPEG", name) for name in images), list(images)


def test_val_archive_is_flat_and_numbered_from_one(val_files, ground_truth):
    expected = [f"ILSVRC2012_val_{i:08d}.JPEG" for i in range(1, NUM_CLASSES * VAL_PER_CLASS + 1)]
    assert list(val_files) == expected
    assert len(ground_truth) == len(val_files)
    assert sorted(set(ground_truth)) == list(range(1, NUM_CLASSES + 1))
    assert all(ground_truth.count(i) == VAL_PER_CLASS for i in range(1, NUM_CLASSES + 1))


def test_meta_mat_reads_like_the_real_devkit(synsets):
    assert list(synsets.dtype.names) == SYNSET_FIELDS
    leaves = [s for s in synsets if s["num_children"] == 0]
    internal = [s for s in synsets if s["num_children"] > 0]
    assert sorted(int(s["ILSVRC2012_ID"]) for s in leaves) == list(range(1, NUM_CLASSES + 1))
    assert all(re.fullmatch(r"n\d{8}", s["WNID"]) and s["words"] and s["gloss"] for s in synsets)
    assert all(int(s["num_train_images"]) == TRAIN_PER_CLASS for s in leaves)
    by_id = [s["WNID"] for s in sorted(leaves, key=lambda s: int(s["ILSVRC2012_ID"]))]
    assert by_id != sorted(by_id), "IDs in sorted-WNID order would hide label-mapping bugs"
    assert internal, "the real meta.mat lists internal synsets too"
    for synset in internal:
        children = np.atleast_1d(synset["children"])
        assert int(synset["ILSVRC2012_ID"]) > NUM_CLASSES
        assert len(children) == synset["num_children"]
        assert set(children.tolist()) <= set(range(1, NUM_CLASSES + 1))


def test_every_image_decodes_with_imagenet_like_sizes(train_files, val_files):
    all_files = [data for images in train_files.values() for data in images.values()] + list(val_files.values())
    sizes = [ImageOps.exif_transpose(decoded(data)).size for data in all_files]
    short_sides = [min(size) for size in sizes]
    aspects = [width / height for width, height in sizes]
    assert 100 <= min(short_sides) < 256 <= max(short_sides) <= 500
    assert 0.49 <= min(aspects) and max(aspects) <= 2.51
    assert min(aspects) < 1 < max(aspects)


def test_training_set_has_imagenets_oddities(train_files):
    found = set()
    for images in train_files.values():
        for data in images.values():
            image = decoded(data)
            if data.startswith(PNG_MAGIC):
                found.add("png")
            if image.mode == "CMYK":
                found.add("cmyk")
            if image.mode == "L":
                found.add("greyscale")
            if image.getexif().get(ORIENTATION_TAG) == ROTATED_90_CW:
                found.add("exif_rotated")
                assert ImageOps.exif_transpose(image).size == image.size[::-1]
    assert found == {"png", "cmyk", "greyscale", "exif_rotated"}


def test_exif_rotated_image_is_upright_once_the_tag_is_applied():
    upright = draw_image(CLASSES[0], np.random.default_rng(0))
    stored = decoded(encode(upright, "exif_rotated", quality=95))
    assert stored.size == upright.size[::-1]
    shown = np.asarray(ImageOps.exif_transpose(stored), np.float32)
    assert np.abs(shown - np.asarray(upright, np.float32)).mean() < 5


def mean_colour_thumbnail(data: bytes) -> np.ndarray:
    return np.asarray(ImageOps.exif_transpose(decoded(data)).convert("RGB").resize((4, 4)), np.float32).ravel()


def test_ground_truth_matches_the_pictures(train_files, val_files, ground_truth, synsets):
    """Nearest class centroid of 4x4 thumbnails: the classes are easy to tell apart, and labelled right.

    Mismatched labels would score about 1 in 10; the threshold leaves room for the colour jitter."""
    id_of = {s["WNID"]: int(s["ILSVRC2012_ID"]) for s in synsets}
    centroids = {id_of[name.removesuffix(".tar")]: np.mean([mean_colour_thumbnail(d) for d in images.values()], 0)
                 for name, images in train_files.items()}
    predicted = [min(centroids, key=lambda i: np.linalg.norm(mean_colour_thumbnail(d) - centroids[i]))
                 for d in val_files.values()]
    accuracy = np.mean(np.array(predicted) == np.array(ground_truth))
    assert accuracy >= 0.5, accuracy


def test_same_seed_gives_identical_archives(sample_dir, tmp_path):
    write_sample(SampleConfig(out=str(tmp_path), seed=0, train_per_class=TRAIN_PER_CLASS, val_per_class=VAL_PER_CLASS))
    for path in sample_dir.iterdir():
        assert (tmp_path / path.name).read_bytes() == path.read_bytes(), path.name


def test_other_seed_gives_other_images(sample_dir, tmp_path):
    write_sample(SampleConfig(out=str(tmp_path), seed=1, train_per_class=2, val_per_class=1))
    first_val = "ILSVRC2012_val_00000001.JPEG"
    with tarfile.open(tmp_path / VAL_ARCHIVE) as other, tarfile.open(sample_dir / VAL_ARCHIVE) as seed_0:
        assert other.extractfile(first_val).read() != seed_0.extractfile(first_val).read()


@pytest.mark.parametrize("args", [
    ["--out={tmp}/a_file"],
    ["--out={tmp}", "--val_per_class=0"],
    ["--out={tmp}", "--colour=blue"],
])
def test_cli_rejects_bad_input_with_one_line(tmp_path, args):
    (tmp_path / "a_file").write_text("not a directory")
    result = subprocess.run([sys.executable, "-m", "shards", "sample", *(a.format(tmp=tmp_path) for a in args)],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert not (tmp_path / TRAIN_ARCHIVE).exists()
