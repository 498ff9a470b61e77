"""Each input layout (ILSVRC2012 and 2010 archives, Kaggle, class folders), the label mapping via the devkit, and the
archive listing (headers only, unbuffered, kept in DATA/.build for the other array tasks)."""
import errno
import fcntl
import gzip
import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import scipy.io

from shards import build, layouts
from shards.sample import DEVKIT_ARCHIVE, TRAIN_ARCHIVE, VAL_ARCHIVE
from tests.shardkit import all_samples, jpeg_bytes, noise_rgb, run_cli


def tar_bytes(members) -> bytes:
    """An uncompressed tar of [(name, bytes)] (GNU format, as the ImageNet downloads are)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def targz_bytes(members) -> bytes:
    return gzip.compress(tar_bytes(members), mtime=0)


def meta_mat(rows, id_field="ILSVRC2012_ID") -> bytes:
    """A devkit meta.mat: rows of (id, wnid, words, num_children)."""
    fields = [id_field, "WNID", "words", "gloss", "num_children"]
    synsets = np.empty((len(rows), 1), dtype=[(f, object) for f in fields])
    for i, (sid, wnid, words, children) in enumerate(rows):
        synsets[i, 0] = (np.uint16(sid), wnid, words, "", np.uint8(children))
    out = io.BytesIO()
    scipy.io.savemat(out, {"synsets": synsets})
    return out.getvalue()


def labels_by_key(data: Path, split: str) -> dict[str, int]:
    return {s["__key__"]: int(s["cls"]) for s in all_samples(data, split)}


# --- ILSVRC2012 ----------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_ilsvrc2012_archives_from_the_builtin_sample(tmp_path):
    raw, data = tmp_path / "raw", tmp_path / "data"
    run_cli("sample", f"--out={raw}", "--train_per_class=6", "--val_per_class=3")
    proc = run_cli("build", f"--raw={raw}", f"--out={data}", "--shard_size=16")
    manifest = json.loads((data / "manifest.json").read_text())
    assert manifest["params"]["layout"] == "ilsvrc2012"
    assert manifest["splits"]["train"]["num_samples"] == 60 and manifest["splits"]["val"]["num_samples"] == 30
    assert "train: 60 inputs = 60 written + 0 rejected" in proc.stderr
    # Labels, independently: devkit meta.mat + ground truth, ID -> WNID -> position among the sorted train WNIDs.
    with tarfile.open(raw / TRAIN_ARCHIVE) as tar:
        wnids = sorted(Path(m.name).stem for m in tar)
    with tarfile.open(raw / DEVKIT_ARCHIVE) as tar:
        files = {Path(m.name).name: tar.extractfile(m).read() for m in tar if m.isfile()}
    synsets = scipy.io.loadmat(io.BytesIO(files["meta.mat"]), squeeze_me=True)["synsets"]
    id_to_wnid = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets}
    truth = [wnids.index(id_to_wnid[int(v)]) for v in files["ILSVRC2012_validation_ground_truth.txt"].split()]
    val = all_samples(data, "val")
    assert [s["__key__"] for s in val] == [f"ILSVRC2012_val_{i:08d}" for i in range(1, 31)]
    assert [int(s["cls"]) for s in val] == truth
    for key, label in labels_by_key(data, "train").items():
        assert wnids[label] == key.split("_")[0]
    assert [c["wnid"] for c in manifest["classes"]] == wnids
    assert manifest["classes"][wnids.index("n01440764")]["name"].startswith("tench")
    # The sample's oddities are converted by content, and listed.
    what = sorted(c["what"] for c in manifest["converted"])
    assert what == ["CMYK->RGB", "EXIF orientation 6 applied", "PNG->JPEG", "greyscale->RGB"]
    assert manifest["rejected"] == []
    assert run_cli("verify", f"--data={data}").returncode == 0


def mapping_2012(meta_dir: Path) -> list[tuple[int, str]]:
    return [(int(a), b) for a, b in (line.split() for line in (meta_dir / "ILSVRC2012_mapping.txt").open())]


@pytest.mark.slow
def test_ilsvrc2012_real_images_and_devkit_labels(tmp_path, imagenet_sample_dir, imagenet_meta_dir):
    """Real JPEGs as the train archive (one per class), the real ground truth and ID->WNID mapping for val:
    every val label must equal Caffe's val.txt, the standard 0..999 labels."""
    raw = tmp_path / "raw"
    raw.mkdir()
    files = sorted(imagenet_sample_dir.glob("*.JPEG"))
    (raw / "ILSVRC2012_img_train.tar").write_bytes(tar_bytes(
        (f"{f.name.split('_')[0]}.tar", tar_bytes([(f.name, f.read_bytes())])) for f in files))
    numbers = [1, 2, 3, 4, 5, 777, 12345, 25000, 33333, 49999, 50000]
    rng = np.random.default_rng(0)
    (raw / "ILSVRC2012_img_val.tar").write_bytes(tar_bytes(
        (f"ILSVRC2012_val_{n:08d}.JPEG", jpeg_bytes(noise_rgb(rng, 20, 30))) for n in reversed(numbers)))
    words = dict(line.rstrip("\n").split(" ", 1) for line in (imagenet_meta_dir / "synset_words.txt").open())
    rows = [(i, w, words.get(w, w), 0 if i <= 1000 else 3) for i, w in mapping_2012(imagenet_meta_dir)]
    (raw / "ILSVRC2012_devkit_t12.tar.gz").write_bytes(targz_bytes([
        ("ILSVRC2012_devkit_t12/data/meta.mat", meta_mat(rows)),
        ("ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt",
         (imagenet_meta_dir / "ILSVRC2012_validation_ground_truth.txt").read_bytes())]))
    data = tmp_path / "data"
    manifest = build.build(build.BuildConfig(raw=str(raw), out=str(data), shard_size=256))
    caffe = {line.split()[0].split(".")[0]: int(line.split()[1]) for line in (imagenet_meta_dir / "val.txt").open()}
    val = labels_by_key(data, "val")
    assert val == {f"ILSVRC2012_val_{n:08d}": caffe[f"ILSVRC2012_val_{n:08d}"] for n in numbers}
    synset_words = (imagenet_meta_dir / "synset_words.txt").read_text().splitlines()
    assert [f"{c['wnid']} {c['name']}" for c in manifest["classes"]] == synset_words
    for key, label in labels_by_key(data, "train").items():
        assert synset_words[label].split()[0] == key.split("_")[0]
    assert manifest["splits"]["train"]["num_samples"] == 1000
    # 23 greyscale, 1 with EXIF orientation 6; no CMYK or PNG in this sample (see ../shared/data/README.md).
    assert sum("greyscale->RGB" in c["what"] for c in manifest["converted"]) == 23
    rotated = [c["source"] for c in manifest["converted"] if "EXIF orientation 6" in c["what"]]
    assert rotated == ["ILSVRC2012_img_train.tar/n02951585.tar/n02951585_can_opener.JPEG"]
    # The published ImageNet values (Krizhevsky et al.; fb.resnet.torch): eigval 0.2175, 0.0188, 0.0045.
    # On these 1000 images as the shards' JPEGs decode: 0.2045, 0.0168, 0.0042 (before encoding 0.2044, 0.0177,
    # 0.0045: 4:2:0 chroma at 256 px lowers the two small ones by ~5%).
    eigval = np.array(manifest["stats"]["pca_eigval"])
    assert np.allclose(eigval, [0.2175, 0.0188, 0.0045], rtol=0.12), eigval
    published = np.array([[-0.5675, 0.7192, 0.4009], [-0.5808, -0.0045, -0.8140], [-0.5836, -0.6948, 0.4203]])
    eigvec = np.array(manifest["stats"]["pca_eigvec"])
    assert np.all(np.abs(np.sum(eigvec * published, 0)) > 0.99)  # same components, up to sign
    assert np.allclose(manifest["stats"]["rgb_mean"], [124, 116, 104], atol=8)


def ground_truth_labels(text: str, id_to_wnid: dict[int, str], index: dict[str, int]) -> list[int]:
    """Devkit ground truth (one ILSVRC20xx_ID per line, image 1 first) -> class indices, as `layouts` labels val."""
    return [index[id_to_wnid[int(line)]] for line in text.split()]


def test_ilsvrc2012_devkit_ground_truth_maps_to_caffe_labels(imagenet_meta_dir):
    """All 50,000 val labels: devkit ground truth -> ILSVRC2012_ID -> WNID -> sorted position == Caffe's val.txt."""
    id_to_wnid = {i: w for i, w in mapping_2012(imagenet_meta_dir) if i <= 1000}
    index = {w: i for i, w in enumerate(sorted(id_to_wnid.values()))}
    gt = (imagenet_meta_dir / "ILSVRC2012_validation_ground_truth.txt").read_text()
    labels = ground_truth_labels(gt, id_to_wnid, index)
    caffe = [int(line.split()[1]) for line in (imagenet_meta_dir / "val.txt").open()]
    assert len(labels) == 50000 and labels == caffe


# --- ILSVRC2010 ----------------------------------------------------------------------------------------------------

def read_2010_meta(devkit_dir: Path) -> dict[int, str]:
    synsets = scipy.io.loadmat(devkit_dir / "meta.mat", squeeze_me=True)["synsets"]
    return {int(s["ILSVRC2010_ID"]): str(s["WNID"]) for s in synsets if int(s["num_children"]) == 0}


def test_ilsvrc2010_meta_mat(ilsvrc2010_devkit_dir):
    ids, names = layouts.read_meta((ilsvrc2010_devkit_dir / "meta.mat").read_bytes())
    assert sorted(ids) == list(range(1, 1001))
    assert ids[1] == "n07711080" and "french fries" in names["n07711080"]
    gt = (ilsvrc2010_devkit_dir / "ILSVRC2010_validation_ground_truth.txt").read_text()
    index = {w: i for i, w in enumerate(sorted(ids.values()))}
    labels = ground_truth_labels(gt, ids, index)
    assert len(labels) == 50000 and np.bincount(labels).tolist() == [50] * 1000


def test_ilsvrc2010_archives_with_test_split(tmp_path, ilsvrc2010_devkit_dir):
    """The real devkit-1.0 meta.mat and validation ground truth; train holds the classes of val images 1..6."""
    ids = read_2010_meta(ilsvrc2010_devkit_dir)
    gt = [int(v) for v in (ilsvrc2010_devkit_dir / "ILSVRC2010_validation_ground_truth.txt").read_text().split()]
    val_wnids = [ids[v] for v in gt[:6]]
    train_wnids = sorted(set(val_wnids) | {ids[1], ids[500]})
    rng = np.random.default_rng(0)
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "ILSVRC2010_images_train.tar").write_bytes(tar_bytes(
        (f"{w}.tar", tar_bytes([(f"{w}_{i}.JPEG", jpeg_bytes(noise_rgb(rng, 30, 40))) for i in range(2)]))
        for w in train_wnids))
    (raw / "ILSVRC2010_images_val.tar").write_bytes(tar_bytes(
        (f"val/ILSVRC2010_val_{n:08d}.JPEG", jpeg_bytes(noise_rgb(rng, 30, 40))) for n in range(1, 7)))
    (raw / "ILSVRC2010_images_test.tar").write_bytes(tar_bytes(
        (f"test/ILSVRC2010_test_{n:08d}.JPEG", jpeg_bytes(noise_rgb(rng, 30, 40))) for n in range(1, 4)))
    test_ids = [1, 500, gt[0]]
    (raw / "ILSVRC2010_test_ground_truth.txt").write_text("".join(f"{v}\n" for v in test_ids))
    devkit = ilsvrc2010_devkit_dir
    (raw / "ILSVRC2010_devkit-1.0.tar.gz").write_bytes(targz_bytes([
        ("devkit-1.0/data/meta.mat", (devkit / "meta.mat").read_bytes()),
        ("devkit-1.0/data/ILSVRC2010_validation_ground_truth.txt",
         (devkit / "ILSVRC2010_validation_ground_truth.txt").read_bytes())]))
    data = tmp_path / "data"
    manifest = build.build(build.BuildConfig(raw=str(raw), out=str(data), workers=1))
    assert manifest["params"]["layout"] == "ilsvrc2010"
    assert [c["wnid"] for c in manifest["classes"]] == train_wnids
    assert "french fries" in manifest["classes"][train_wnids.index("n07711080")]["name"]
    assert labels_by_key(data, "val") == {f"ILSVRC2010_val_{n:08d}": train_wnids.index(val_wnids[n - 1])
                                          for n in range(1, 7)}
    assert labels_by_key(data, "test") == {f"ILSVRC2010_test_{n:08d}": train_wnids.index(ids[v])
                                           for n, v in enumerate(test_ids, start=1)}
    assert [s["file"] for s in manifest["splits"]["test"]["shards"]] == ["test/test-000000.tar"]


# --- Kaggle and folders --------------------------------------------------------------------------------------------

def test_kaggle_layout(tmp_path):
    rng = np.random.default_rng(0)
    raw = tmp_path / "raw"
    wnids = ["n02", "n01", "n03"]
    for w in wnids:
        d = raw / "ILSVRC/Data/CLS-LOC/train" / w
        d.mkdir(parents=True)
        for i in range(2):
            (d / f"{w}_{i}.JPEG").write_bytes(jpeg_bytes(noise_rgb(rng)))
    val = raw / "ILSVRC/Data/CLS-LOC/val"
    val.mkdir(parents=True)
    truth = {1: "n03", 2: "n01", 3: "n03", 4: "n02"}
    for n in truth:
        (val / f"ILSVRC2012_val_{n:08d}.JPEG").write_bytes(jpeg_bytes(noise_rgb(rng)))
    (raw / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n" + "".join(
        f"ILSVRC2012_val_{n:08d},{w} 1 2 30 40 {w} 5 6 7 8 \n" for n, w in truth.items()))
    (raw / "LOC_synset_mapping.txt").write_text("n01 one, uno\nn02 two\nn03 three\n")
    data = tmp_path / "data"
    manifest = build.build(build.BuildConfig(raw=str(raw), out=str(data), workers=1))
    assert manifest["params"]["layout"] == "kaggle"
    assert [(c["wnid"], c["name"]) for c in manifest["classes"]] == [("n01", "one, uno"), ("n02", "two"),
                                                                    ("n03", "three")]
    assert labels_by_key(data, "val") == {f"ILSVRC2012_val_{n:08d}": int(w[-1]) - 1 for n, w in truth.items()}
    assert {k: v for k, v in labels_by_key(data, "train").items()} == {
        f"{w}_{i}": int(w[-1]) - 1 for w in wnids for i in range(2)}


def test_val_class_missing_from_train_is_an_error(tmp_path):
    rng = np.random.default_rng(0)
    for split, c in (("train", "a"), ("val", "a"), ("val", "zz")):
        (tmp_path / split / c).mkdir(parents=True, exist_ok=True)
        (tmp_path / split / c / "x.jpg").write_bytes(jpeg_bytes(noise_rgb(rng)))
    with pytest.raises(layouts.LayoutError, match="zz"):
        layouts.detect(tmp_path)


def test_flat_val_folder_is_an_error_not_a_silent_skip(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "train/a").mkdir(parents=True)
    (tmp_path / "train/a/x.jpg").write_bytes(jpeg_bytes(noise_rgb(rng)))
    (tmp_path / "val").mkdir()
    (tmp_path / "val/ILSVRC2012_val_00000001.JPEG").write_bytes(jpeg_bytes(noise_rgb(rng)))
    with pytest.raises(layouts.LayoutError, match="no class folders"):
        layouts.detect(tmp_path)


def test_archives_without_devkit_are_named(tmp_path):
    (tmp_path / "ILSVRC2012_img_val.tar").write_bytes(tar_bytes([]))
    with pytest.raises(layouts.LayoutError, match="devkit"):
        layouts.detect(tmp_path)


# --- listing archives ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sample_raw(tmp_path_factory):
    raw = tmp_path_factory.mktemp("listing") / "raw"
    run_cli("sample", f"--out={raw}", "--train_per_class=2", "--val_per_class=1")
    return raw


def bytes_read() -> int:
    """What this process's read system calls have returned so far (Linux)."""
    return int(dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())["rchar"])


def test_listing_an_archive_reads_its_headers_and_nothing_more(tmp_path):
    """A buffered file would read a whole buffer per header: the filesystem's block size, 4 KiB here, 1-16 MiB on
    Lustre or GPFS."""
    images = [(f"n01_{i}.JPEG", bytes(300_000)) for i in range(4)]
    archive = tmp_path / "train.tar"
    archive.write_bytes(tar_bytes([("n01.tar", tar_bytes(images)), ("n02.tar", tar_bytes(images))]))
    before = bytes_read()
    classes = layouts.list_train_archive(archive, workers=1)
    read = bytes_read() - before
    assert {name: [m[0] for m in members] for name, members in classes.items()} == {
        "n01.tar": [n for n, _ in images], "n02.tar": [n for n, _ in images]}
    assert read < 20 * 512, read  # 2 + 2 x 4 headers of 512 bytes (and end-of-archive blocks) out of 2.4 MB


def test_array_tasks_list_each_archive_once_and_again_when_it_changes(sample_raw, tmp_path, monkeypatch):
    raw, cache = tmp_path / "raw", tmp_path / "data" / ".build"
    shutil.copytree(sample_raw, raw)
    without_cache = layouts.detect(raw)
    listed = []
    members = layouts.tar_members
    monkeypatch.setattr(layouts, "tar_members", lambda path, *window: listed.append(Path(path).name) or
                        members(path, *window))

    first = layouts.detect(raw, cache=cache)  # the first task lists and keeps the listing
    assert set(listed) == {TRAIN_ARCHIVE, VAL_ARCHIVE}
    listed.clear()
    second = layouts.detect(raw, cache=cache)  # the others load it
    assert listed == []
    assert first.splits == second.splits == without_cache.splits

    train = raw / TRAIN_ARCHIVE
    os.utime(train, ns=(train.stat().st_atime_ns, train.stat().st_mtime_ns + 10**9))  # replaced since
    assert layouts.detect(raw, cache=cache).splits == without_cache.splits
    assert set(listed) == {TRAIN_ARCHIVE}


def test_listing_cache_works_without_flock(sample_raw, tmp_path, monkeypatch):
    """Lustre mounted without flock: each task lists for itself, and the listing is still shared."""
    def no_flock(*args):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    cache = tmp_path / ".build"
    assert layouts.detect(sample_raw, cache=cache).splits == layouts.detect(sample_raw, cache=cache).splits
    assert (cache / f"listing-{TRAIN_ARCHIVE}.json").is_file()
