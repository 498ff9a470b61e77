"""`python -m shards build` on class folders: files written, manifest, labels, index, determinism, readers."""
import io
import json
import shutil
import subprocess
import tarfile

import numpy as np
import pytest
from PIL import Image

from shards import build, tario
from tests.shardkit import WDS2IDX, all_samples, jpeg_bytes, make_folders, noise_rgb, run_cli, tree_bytes


@pytest.fixture(scope="module")
def folders_build(tmp_path_factory):
    root = tmp_path_factory.mktemp("folders")
    raw = make_folders(root / "raw", names={"n01": "one, first", "n02": "two"})
    data = root / "data"
    proc = run_cli("build", f"--raw={raw}", f"--out={data}", "--shard_size=5", "--workers=2")
    return raw, data, proc


def test_folder_build_writes_the_format(folders_build):
    raw, data, proc = folders_build
    manifest = json.loads((data / "manifest.json").read_text())
    assert manifest["classes"] == [{"index": 0, "wnid": "n01", "name": "one, first"},
                                   {"index": 1, "wnid": "n02", "name": "two"},
                                   {"index": 2, "wnid": "n03", "name": "n03"}]
    train, val = manifest["splits"]["train"], manifest["splits"]["val"]
    assert (train["num_samples"], val["num_samples"]) == (18, 6)
    assert [s["file"] for s in train["shards"]] == [f"train/train-00000{i}.tar" for i in range(4)]
    assert [s["num_samples"] for s in train["shards"]] == [5, 5, 5, 3]
    assert manifest["params"]["shard_size"] == 5 and manifest["params"]["quality"] == build.BuildConfig.quality
    assert manifest["params"]["layout"] == "folders"
    for split in ("train", "val"):
        for sh in manifest["splits"][split]["shards"]:
            assert (data / sh["file"]).with_suffix(".idx").is_file()
    assert "train: 18 inputs = 18 written + 0 rejected" in proc.stderr
    assert "val: 6 inputs = 6 written + 0 rejected" in proc.stderr


def test_samples_have_the_members_and_labels(folders_build):
    raw, data, _ = folders_build
    for split, per_class in (("train", 6), ("val", 2)):
        samples = all_samples(data, split)
        assert len(samples) == 3 * per_class
        for s in samples:
            assert set(s) == {"__key__", "jpg", "cls", "label", "pos"}
            im = Image.open(io.BytesIO(s["jpg"]))
            assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (256, 256))
            assert "progressive" not in im.info
            label = int(s["cls"].decode())
            assert s["cls"] == str(label).encode()  # no newline
            assert np.frombuffer(s["label"], "<i4")[0] == label
            wnid = s["__key__"].split("_")[-2]
            assert label == ["n01", "n02", "n03"].index(wnid)
        assert sorted(np.frombuffer(s["pos"], "<i4")[0] for s in samples) == list(range(len(samples)))
    val = all_samples(data, "val")
    assert [s["__key__"] for s in val] == sorted(s["__key__"] for s in val)  # source order
    assert [np.frombuffer(s["pos"], "<i4")[0] for s in val] == list(range(6))


def test_train_is_shuffled_globally(folders_build):
    _, data, _ = folders_build
    samples = all_samples(data, "train")
    labels = [int(s["cls"]) for s in samples]
    assert labels != sorted(labels)
    assert [np.frombuffer(s["pos"], "<i4")[0] for s in samples] == list(range(18))
    assert len({int(s["cls"]) for s in samples[:6]}) > 1


def test_index_equals_wds2idx(folders_build, tmp_path):
    _, data, _ = folders_build
    if WDS2IDX is None or shutil.which("tar") is None:
        pytest.skip("DALI's wds2idx or GNU tar not installed")
    for tar in sorted(data.glob("*/*.tar")):
        ref = tmp_path / (tar.stem + ".idx")
        subprocess.run([str(WDS2IDX), str(tar), str(ref)], check=True, capture_output=True)
        assert tar.with_suffix(".idx").read_bytes() == ref.read_bytes(), tar.name
        assert tario.index_of_tar(str(tar)) == ref.read_text()


def test_shards_open_with_tar_and_webdataset(folders_build):
    webdataset = pytest.importorskip("webdataset")
    _, data, _ = folders_build
    tar = sorted((data / "train").glob("*.tar"))[0]
    if shutil.which("tar"):
        listing = subprocess.run(["tar", "-tf", str(tar)], check=True, capture_output=True, text=True).stdout.split()
        assert len(listing) == 5 * 4 and listing[0].endswith(".jpg") and listing[1].endswith(".cls")
    # webdataset's default decoders apply as they are: no member name clashes with one they parse as text.
    ds = webdataset.WebDataset(str(tar), shardshuffle=False).decode("pil")
    rows = list(ds.to_tuple("jpg", "cls", "pos"))
    assert len(rows) == 5
    for im, cls, pos in rows:
        assert im.size == (256, 256) and 0 <= cls < 3 and 0 <= np.frombuffer(pos, "<i4")[0] < 18


def test_stats_file(folders_build):
    _, data, _ = folders_build
    manifest = json.loads((data / "manifest.json").read_text())
    with np.load(data / "stats.npz") as z:
        assert z["mean_image"].shape == (256, 256, 3) and z["mean_image"].dtype == np.float64
        assert np.allclose(z["rgb_mean"], manifest["stats"]["rgb_mean"])
        assert np.allclose(z["rgb_mean"], z["mean_image"].mean((0, 1)))
        assert np.all(np.diff(z["pca_eigval"]) <= 0)
        assert np.allclose(z["pca_eigvec"].T @ z["pca_eigvec"], np.eye(3))
    assert manifest["stats"]["num_pixels"] == 18 * 256 * 256


def test_statistics_are_those_of_the_decoded_jpegs_in_the_shards(folders_build):
    """The pipelines subtract the mean from decoded JPEGs: the statistics are of exactly those pixels."""
    _, data, _ = folders_build
    manifest = json.loads((data / "manifest.json").read_text())
    decoded = np.stack([np.asarray(Image.open(io.BytesIO(s["jpg"])).convert("RGB"), np.float64)
                        for s in all_samples(data, "train")])
    flat = decoded.reshape(-1, 3) / 255
    eigval, eigvec = np.linalg.eigh(np.cov(flat, rowvar=False, bias=True))
    eigval, eigvec = eigval[::-1], eigvec[:, ::-1]
    with np.load(data / "stats.npz") as z:
        np.testing.assert_allclose(z["mean_image"], decoded.mean(0), rtol=0, atol=1e-11)
        np.testing.assert_allclose(z["rgb_mean"], decoded.reshape(-1, 3).mean(0), rtol=1e-12)
        np.testing.assert_allclose(z["pca_eigval"], eigval, rtol=1e-10)
        np.testing.assert_allclose(np.abs(z["pca_eigvec"].T @ eigvec), np.eye(3), atol=1e-9)  # up to sign
    np.testing.assert_allclose(manifest["stats"]["pca_eigval"], eigval, rtol=1e-10)
    np.testing.assert_allclose(manifest["stats"]["rgb_mean"], decoded.reshape(-1, 3).mean(0), rtol=1e-12)


def test_same_seed_same_bytes_other_seed_other_order(folders_build, tmp_path):
    raw, data, _ = folders_build
    build.build(build.BuildConfig(raw=str(raw), out=str(tmp_path / "a"), shard_size=5, workers=1))
    assert tree_bytes(tmp_path / "a") == tree_bytes(data)  # 1 worker in-process == 2 worker processes
    build.build(build.BuildConfig(raw=str(raw), out=str(tmp_path / "b"), shard_size=5, workers=1, seed=1))
    keys = lambda d: [s["__key__"] for s in all_samples(d, "train")]  # noqa: E731
    assert keys(tmp_path / "b") != keys(data) and sorted(keys(tmp_path / "b")) == sorted(keys(data))
    assert (tmp_path / "b/val/val-000000.tar").read_bytes() == (data / "val/val-000000.tar").read_bytes()


def test_duplicate_file_names_across_classes_get_unique_keys(tmp_path):
    rng = np.random.default_rng(1)
    for c in ("a", "b"):
        for i in range(2):
            (tmp_path / "raw/train" / c).mkdir(parents=True, exist_ok=True)
            (tmp_path / "raw/train" / c / f"img.{i}.jpg").write_bytes(jpeg_bytes(noise_rgb(rng)))
    build.build(build.BuildConfig(raw=str(tmp_path / "raw"), out=str(tmp_path / "data"), workers=1))
    keys = sorted(s["__key__"] for s in all_samples(tmp_path / "data", "train"))
    assert keys == ["a_img_0", "a_img_1", "b_img_0", "b_img_1"]


def test_unknown_layout_is_a_one_line_error(tmp_path):
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "notes.txt").write_text("hello")
    proc = run_cli("build", f"--raw={tmp_path / 'raw'}", f"--out={tmp_path / 'data'}", check=False)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and "notes.txt" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("build", f"--out={tmp_path / 'data'}", check=False)
    assert proc.returncode == 2 and "--raw" in proc.stderr


def test_member_headers_are_the_ones_pythons_tarfile_writes():
    from shards.tario import member_header

    def tarfile_header(name: str, size: int) -> bytes:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = size, 0, 0o644, 0, 0, "", ""
        return info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict")

    for name in ("a.jpg", "n01440764_10026.jpg", "x" * 96 + ".pos", "ILSVRC2012_val_00000001.label", "é_ü.cls"):
        for size in (0, 1, 4, 511, 512, 12345, 8 ** 11 - 1):
            assert member_header(name, size) == tarfile_header(name, size), (name, size)
    with pytest.raises(ValueError, match="longer than 100"):
        member_header("y" * 101, 1)
