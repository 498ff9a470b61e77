"""Bad input accounting, statistics, array-task split and merge, resume after an interruption, verify."""
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shards import build, image, verify
from tests.conftest import REPO
from tests.shardkit import all_samples, jpeg_bytes, make_folders, noise_rgb, run_cli, tree_bytes


def exif_rotated_jpeg() -> bytes:
    """Stored 80x40 with the left half red; orientation 6 shows it 40x80 with the top half red."""
    pixels = np.zeros((40, 80, 3), np.uint8)
    pixels[:, :40] = (255, 0, 0)
    pixels[:, 40:] = (0, 0, 255)
    exif = Image.Exif()
    exif[image.ORIENTATION_TAG] = 6
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", exif=exif, quality=95)
    return out.getvalue()


def png16() -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.arange(40 * 50, dtype=np.uint16).reshape(40, 50) * 30).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def bad_build(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    raw = make_folders(root / "raw", classes=("a", "b"), train=3, val=1)
    rng = np.random.default_rng(5)
    good = jpeg_bytes(noise_rgb(rng, 64, 64))
    odd = {
        "train/a/empty.JPEG": b"",
        "train/a/truncated.JPEG": good[: len(good) // 2],
        "train/a/header_only.JPEG": good[:20],
        "train/a/notes.JPEG": b"these are not pixels\n" * 10,
        "train/b/README.txt": b"stray file\n",
        "train/a/png_named.JPEG": jpeg_bytes(noise_rgb(rng), fmt="PNG"),
        "train/b/cmyk.JPEG": jpeg_bytes(noise_rgb(rng), mode="CMYK"),
        "train/b/grey.JPEG": jpeg_bytes(noise_rgb(rng), mode="L"),
        "train/b/rotated.JPEG": exif_rotated_jpeg(),
        "train/b/alpha.png": jpeg_bytes(noise_rgb(rng), mode="RGBA", fmt="PNG"),
        "train/a/deep.png": png16(),
        "train/a/palette.gif": jpeg_bytes(noise_rgb(rng), mode="P", fmt="GIF"),
        "val/a/val_empty.JPEG": b"",
        "train/loose.JPEG": good,
    }
    for name, data in odd.items():
        (raw / name).write_bytes(data)
    data = root / "data"
    proc = run_cli("build", f"--raw={raw}", f"--out={data}", "--shard_size=4")
    return data, proc, json.loads((data / "manifest.json").read_text())


def test_bad_inputs_are_rejected_with_reasons_and_counted(bad_build):
    data, proc, manifest = bad_build
    reasons = {Path(r["source"]).name: r["reason"] for r in manifest["rejected"]}
    assert set(reasons) == {"empty.JPEG", "truncated.JPEG", "header_only.JPEG", "notes.JPEG", "README.txt",
                            "val_empty.JPEG", "loose.JPEG"}
    assert reasons["loose.JPEG"] == "not inside a class folder"
    assert "empty" in reasons["empty.JPEG"] and "not an image" in reasons["notes.JPEG"]
    assert "truncated" in reasons["truncated.JPEG"]
    train, val = manifest["splits"]["train"], manifest["splits"]["val"]
    assert (train["num_inputs"], train["num_samples"], train["num_rejected"]) == (6 + 13, 6 + 13 - 6, 6)
    assert (val["num_inputs"], val["num_samples"], val["num_rejected"]) == (3, 2, 1)
    assert "train: 19 inputs = 13 written + 6 rejected" in proc.stderr
    assert "val: 3 inputs = 2 written + 1 rejected" in proc.stderr
    for split, entry in manifest["splits"].items():
        assert len(all_samples(data, split)) == entry["num_samples"] == sum(s["num_samples"] for s in entry["shards"])


def test_convertible_inputs_are_converted_and_listed(bad_build):
    data, _, manifest = bad_build
    what = {Path(c["source"]).name: c["what"] for c in manifest["converted"]}
    assert what == {"png_named.JPEG": "PNG->JPEG", "cmyk.JPEG": "CMYK->RGB", "grey.JPEG": "greyscale->RGB",
                    "rotated.JPEG": "EXIF orientation 6 applied", "alpha.png": "PNG->JPEG, RGB+alpha->RGB",
                    "deep.png": "PNG->JPEG, I;16->RGB", "palette.gif": "GIF->JPEG, palette->RGB"}
    samples = {s["__key__"]: s for s in all_samples(data, "train")}
    rotated = np.asarray(Image.open(io.BytesIO(samples["rotated"]["jpg"])))
    assert rotated[20, 128, 0] > 200 and rotated[20, 128, 2] < 60  # top: red
    assert rotated[236, 128, 2] > 200 and rotated[236, 128, 0] < 60  # bottom: blue
    for key in ("cmyk", "grey", "png_named", "deep", "palette", "alpha"):
        im = Image.open(io.BytesIO(samples[key]["jpg"]))
        assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (256, 256))


def test_statistics_equal_a_direct_numpy_computation(bad_build):
    """Exact sums in the build == float64 NumPy over the stacked pixels of every written training image."""
    data, _, manifest = bad_build
    raw = Path(manifest["params"]["raw"])
    rejected = {r["source"] for r in manifest["rejected"]}
    sources = sorted(p for p in (raw / "train").rglob("*") if p.is_file() and str(p.relative_to(raw)) not in rejected)
    pixels = np.stack([image.decoded_pixels(image.prepare(p.read_bytes())[0]) for p in sources]).astype(np.float64)
    assert len(pixels) == manifest["splits"]["train"]["num_samples"]
    flat = pixels.reshape(-1, 3) / 255.0
    eigval, eigvec = np.linalg.eigh(np.cov(flat, rowvar=False, bias=True))
    eigval, eigvec = eigval[::-1], eigvec[:, ::-1]
    with np.load(data / "stats.npz") as z:
        np.testing.assert_allclose(z["mean_image"], pixels.mean(0), rtol=0, atol=1e-9)
        np.testing.assert_allclose(z["rgb_mean"], flat.mean(0) * 255, rtol=1e-12)
        np.testing.assert_allclose(z["pca_eigval"], eigval, rtol=1e-9)
        np.testing.assert_allclose(np.abs(z["pca_eigvec"].T @ eigvec), np.eye(3), atol=1e-6)  # up to sign
        np.testing.assert_allclose(manifest["stats"]["pca_eigval"], z["pca_eigval"], rtol=1e-12)
    # Those are the pixels a reader decodes from the shards.
    decoded = np.mean([np.asarray(Image.open(io.BytesIO(s["jpg"])), np.float64) for s in all_samples(data, "train")], 0)
    np.testing.assert_allclose(decoded, pixels.mean(0), rtol=0, atol=1e-9)


# --- array tasks, merge, resume ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Small class folders and their single-process build."""
    root = tmp_path_factory.mktemp("tasks")
    raw = make_folders(root / "raw", classes=("c0", "c1", "c2", "c3"), train=5, val=2, seed=3)
    data = root / "single"
    build.build(build.BuildConfig(raw=str(raw), out=str(data), shard_size=3, workers=2))
    return raw, data


def test_array_tasks_then_merge_give_the_same_bytes(reference, tmp_path):
    raw, single = reference
    out = tmp_path / "tasks"
    cfg = lambda i: build.BuildConfig(raw=str(raw), out=str(out), shard_size=3, workers=1, task_index=i,  # noqa: E731
                                      num_tasks=3)
    written = set()
    for i in range(3):
        assert build.build(cfg(i)) is None
        mine = {str(p.relative_to(out)) for p in out.glob("*/*.tar")} - written
        assert mine and not (mine & written)  # each task writes a disjoint set of shards
        written |= mine
        assert not (out / "manifest.json").exists()
        if i == 1:
            with pytest.raises(ValueError, match="not complete"):
                build.merge(out)
    run_cli("merge", f"--out={out}")
    assert tree_bytes(out) == tree_bytes(single)


def test_rerun_after_interruption_redoes_only_missing_shards(reference, tmp_path, monkeypatch):
    raw, single = reference
    out = tmp_path / "resumed"
    real_write = build.write_shard
    calls = []

    def write_then_die(*args, **kwargs):
        if len(calls) == 3:
            tar = args[0] / args[1].file  # half a shard on disk, as a kill leaves it
            tar.parent.mkdir(parents=True, exist_ok=True)
            tar.with_name(f"{tar.name}.tmp-node7-4242").write_bytes(b"\0" * 1000)
            raise KeyboardInterrupt
        calls.append(args[1].name)
        return real_write(*args, **kwargs)

    monkeypatch.setattr(build, "write_shard", write_then_die)
    cfg = build.BuildConfig(raw=str(raw), out=str(out), shard_size=3, workers=1)
    with pytest.raises(KeyboardInterrupt):
        build.build(cfg)
    assert not (out / "manifest.json").exists()
    finished = list(out.glob("*/*.tar"))  # the half-written shard is not among them
    assert len(finished) == 3 and list(out.glob("*/*.tar.tmp-*"))
    monkeypatch.setattr(build, "write_shard", lambda *a, **k: calls.append(a[1].name) or real_write(*a, **k))
    build.build(cfg)
    assert len(calls) == len(set(calls)) == 7 + 3  # 10 shards in all, each written once
    assert not list(out.glob("*/*.tar.tmp-*"))
    assert tree_bytes(out) == tree_bytes(single)


def test_rerun_with_other_parameters_is_refused(reference):
    raw, single = reference
    with pytest.raises(ValueError, match="seed"):
        build.build(build.BuildConfig(raw=str(raw), out=str(single), shard_size=3, workers=1, seed=7))


def test_every_image_rejected_or_shards_inside_raw_are_one_line_errors(tmp_path):
    raw = tmp_path / "raw"
    for wnid in ("n01", "n02"):
        (raw / "train" / wnid).mkdir(parents=True)
        (raw / "train" / wnid / f"{wnid}_0.JPEG").write_text("not a JPEG")
    result = run_cli("build", f"--raw={raw}", f"--out={tmp_path / 'out'}", "--workers=1", check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "every training image was rejected (train/n01/n01_0.JPEG: not an image" in result.stderr.splitlines()[-1]
    result = run_cli("build", f"--raw={raw}", f"--out={raw / 'shards'}", check=False)
    assert result.returncode == 2 and result.stderr.strip().endswith("lies inside --raw=" + str(raw) +
                                                                     ": write the shards elsewhere"), result.stderr


@pytest.mark.slow
def test_killed_build_resumes_to_identical_bytes(reference, tmp_path):
    raw, single = reference
    out = tmp_path / "killed"
    args = [sys.executable, "-m", "shards", "build", f"--raw={raw}", f"--out={out}", "--shard_size=3", "--workers=1"]
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 60
    while time.time() < deadline and not list(out.glob("train/*.tar")) and proc.poll() is None:
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists()  # killed part-way
    run_cli("build", *args[4:])
    assert tree_bytes(out) == tree_bytes(single)


# --- verify --------------------------------------------------------------------------------------------------------

def test_verify_names_missing_truncated_and_altered_shards(reference, tmp_path):
    raw, single = reference
    data = tmp_path / "copy"
    build.build(build.BuildConfig(raw=str(raw), out=str(data), shard_size=3, workers=1))
    assert verify.verify(data) == []
    assert run_cli("verify", f"--data={data}").returncode == 0
    manifest = json.loads((data / "manifest.json").read_text())
    entries = manifest["splits"]["train"]["shards"]
    assert all(verify.verify_shard(data / e["file"], e) is None for e in entries)
    (data / entries[0]["file"]).unlink()
    truncated = data / entries[1]["file"]
    truncated.write_bytes(truncated.read_bytes()[:2000])
    altered = bytearray((data / entries[2]["file"]).read_bytes())
    altered[1200] ^= 0xFF  # inside the first JPEG
    (data / entries[2]["file"]).write_bytes(bytes(altered))
    problems = verify.verify(data)
    assert len(problems) == 3
    assert "missing" in problems[0] and entries[0]["file"] in problems[0]
    assert entries[1]["file"] in problems[1] and "truncated" in problems[1]
    assert entries[2]["file"] in problems[2] and "altered" in problems[2]
    proc = run_cli("verify", f"--data={data}", check=False)
    assert proc.returncode == 1
    assert all(e["file"] in proc.stderr for e in entries[:3])
    idx = (data / entries[3]["file"]).with_suffix(".idx")
    idx.write_text(idx.read_text().replace("jpg 512", "jpg 1024"))
    assert "index" in verify.verify_shard(data / entries[3]["file"], entries[3])


# --- resampling quality ---------------------------------------------------------------------------------------------

def lanczos_matrix(in_size: int, out_size: int, lo: float, hi: float, a: int = 3) -> np.ndarray:
    """Rows of float64 LANCZOS weights (antialiased: the kernel widens by the reduction factor), Pillow's geometry."""
    scale = (hi - lo) / out_size
    widen = max(scale, 1.0)
    centers = lo + (np.arange(out_size) + 0.5) * scale
    t = (np.arange(in_size) + 0.5 - centers[:, None]) / widen
    w = np.where(np.abs(t) < a, np.sinc(t) * np.sinc(t / a), 0.0)
    return w / w.sum(1, keepdims=True)


def exact_patch(data: bytes) -> np.ndarray:
    """The central 256x256 of an exact float64 separable LANCZOS resize (shorter side 256), clipped, not rounded."""
    im, box, _ = image.decode(data)
    pixels = np.asarray(im, np.float64)
    rows = lanczos_matrix(pixels.shape[0], 256, box[1], box[3])
    cols = lanczos_matrix(pixels.shape[1], 256, box[0], box[2])
    return np.clip(np.einsum("xw,ywc->yxc", cols, np.einsum("yh,hwc->ywc", rows, pixels)), 0, 255)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return 10 * np.log10(255.0 ** 2 / np.mean((np.asarray(a, np.float64) - b) ** 2))


@pytest.mark.slow
def test_the_build_resamples_as_well_as_resizing_the_whole_image(imagenet_sample_dir):
    """The build resamples only the central box: its pixels are as close to an exact float LANCZOS of the paper's
    geometry as those of the straightforward way (resize the whole image, then crop)."""
    from bench.naive import SIZE
    picked = [f for f in sorted(imagenet_sample_dir.glob("*.JPEG"))
              if f.name.startswith(("n02091032_Italian", "n01440764", "n01871265"))]  # largest, typical, smallest
    for path in picked:
        data = path.read_bytes()
        im, box, _ = image.decode(data)
        build = np.asarray(im.resize((SIZE, SIZE), Image.Resampling.LANCZOS, box=box))
        resized, _ = image.crop_geometry(*im.size)
        left, top = (resized[0] - SIZE) // 2, (resized[1] - SIZE) // 2
        whole = np.asarray(im.resize(resized, Image.Resampling.LANCZOS).crop((left, top, left + SIZE, top + SIZE)))
        exact = exact_patch(data)
        assert psnr(build, exact) > 50 and psnr(build, exact) > psnr(whole, exact) - 0.1, path.name


def test_reference_resampling_matches_pillow_lanczos_geometry():
    y, x = np.mgrid[0:300, 0:420]
    smooth = np.stack([128 + 100 * np.sin(x / 9.0), 128 + 100 * np.cos(y / 7.0), np.full(x.shape, 90.0)], -1)
    out = io.BytesIO()
    Image.fromarray(smooth.astype(np.uint8)).save(out, format="PNG")
    im, box, _ = image.decode(out.getvalue())
    build = np.asarray(im.resize((256, 256), Image.Resampling.LANCZOS, box=box), np.float64)
    # Only Pillow's 8-bit rounding (after each of its two passes) separates it from the exact reference.
    assert np.abs(build - exact_patch(out.getvalue())).max() <= 1.5
    shifted = lanczos_matrix(300, 256, 1.0, 301.0)  # a one-pixel shift of the box would show
    assert np.abs(shifted - lanczos_matrix(300, 256, 0.0, 300.0)).max() > 0.1
