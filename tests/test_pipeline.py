"""The pipelines as a black box: shards made from purpose-built images in, tensors out."""
import math
import os
import shutil
import time

import numpy as np
import pytest
import torch

from pipeline import Output, Reading, eval_loader, read_manifest, train_loader
from tests import shardkit

CROP = 224
TWO_THREADS = Reading(num_threads=2)
WITH_INDEX = Output(with_index=True)


def gradient_image() -> np.ndarray:
    """R = x, G = y (0..255), B = 128: every pixel tells where it came from, and JPEG keeps smooth ramps."""
    ramp = np.arange(256, dtype=np.uint8)
    return np.stack([np.broadcast_to(ramp[None, :], (256, 256)), np.broadcast_to(ramp[:, None], (256, 256)),
                     np.full((256, 256), 128, np.uint8)], axis=-1)


def textured(seed: int) -> np.ndarray:
    """A smooth random image (upsampled noise): distinct per seed, no flat or symmetric regions."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (16, 16, 3)).astype(np.float64)
    return np.kron(small, np.ones((16, 16, 1))).astype(np.uint8)


def rng_rotation(seed: int) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    return q


def build(tmp, splits, shard_size=8):
    """Class folders -> `python -m shards build` -> DATA: the writer's output is what the pipelines must read."""
    return shardkit.build_with_shards(tmp, splits, f"--shard_size={shard_size}", "--workers=1")


@pytest.fixture(scope="module")
def textured_data(tmp_path_factory):
    """21 train and 10 val samples (not multiples of the batch sizes used), 3 classes, shards of 8."""
    train = [(textured(i), i % 3) for i in range(21)]
    val = [(textured(100 + i), (i * 2) % 3) for i in range(10)]
    return build(tmp_path_factory.mktemp("textured"), {"train": train, "val": val})


@pytest.fixture(scope="module")
def gradient_data(tmp_path_factory):
    """40 copies of the gradient image; mean zero and lighting off make outputs equal the decoded pixels."""
    items = [(gradient_image(), 0) for _ in range(40)]
    root = build(tmp_path_factory.mktemp("gradient"), {"train": items, "val": items[:4]}, shard_size=16)
    shardkit.set_stats(root, mean_image=np.zeros((256, 256, 3)))
    return root


def collect(loader, epochs=1):
    """(images, labels, positions) of whole epochs as NumPy arrays, checking len() and batch sizes on the way."""
    images, labels, index = [], [], []
    for _ in range(epochs):
        batches = 0
        for x, y, i in loader:
            batches += 1
            assert x.shape[0] == y.shape[0] == i.shape[0] <= loader.per_rank
            images.append(x.float().numpy())
            labels.append(y.numpy())
            index.append(i.numpy())
        assert batches == len(loader)
    return np.concatenate(images), np.concatenate(labels), np.concatenate(index)


@pytest.mark.parametrize("crops", ["center", "ten"])
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_eval_ranks_are_disjoint_and_cover_the_split(textured_data, crops, world_size):
    truth = shardkit.read_samples(textured_data, "val")
    seen = []
    for rank in range(world_size):
        loader = eval_loader(textured_data, "val", crops, batch_size=3 * world_size, rank=rank,
                             world_size=world_size, output=WITH_INDEX, reading=TWO_THREADS)
        x, y, i = collect(loader, epochs=2)
        assert len(i) == 2 * loader.num_samples
        assert x.shape[1:] == ((10, 3, CROP, CROP) if crops == "ten" else (3, CROP, CROP))
        assert [truth[k][1] for k in i] == y.tolist()
        first = i[:loader.num_samples].tolist()
        assert first == i[loader.num_samples:].tolist() == sorted(first), "eval order is the shard order, each epoch"
        seen += first
    assert sorted(seen) == list(range(10))


def crop_geometry(patch: np.ndarray) -> tuple[int, int, bool]:
    """(x offset, y offset, reflected) of a 224x224 CHW patch of the gradient image, from its R and G ramps."""
    r, g = patch[0], patch[1]
    reflected = r[:, 0].mean() > r[:, -1].mean()
    cols = np.arange(CROP)[::-1] if reflected else np.arange(CROP)
    x = np.median(r - cols[None, :])
    y = np.median(g - np.arange(CROP)[:, None])
    return int(round(x)), int(round(y)), bool(reflected)


@pytest.mark.slow
def test_crop_offsets_uniform_and_reflection_redrawn(gradient_data):
    loader = train_loader(gradient_data, 40, lighting=0, seed=1, output=WITH_INDEX, reading=TWO_THREADS)
    xs, ys, flips = [], [], {}
    for _ in range(60):  # 2400 crops
        for x, _, index in loader:
            for patch, k in zip(x.numpy(), index.tolist()):
                cx, cy, reflected = crop_geometry(patch)
                xs.append(cx)
                ys.append(cy)
                flips.setdefault(k, []).append(reflected)
    n = len(xs)
    for offsets in (xs, ys):
        counts = np.bincount(offsets, minlength=33)
        assert len(counts) == 33 and counts.min() > 0, "offsets must be 0..32 and all of them occur"
        expected = n / 33
        chi2 = ((counts - expected) ** 2 / expected).sum()
        assert chi2 < 70, f"offsets not uniform over 0..32 (chi2 {chi2:.1f}, 32 dof, p < 1e-4)"
    assert np.corrcoef(xs, ys)[0, 1] < 0.1
    all_flips = np.concatenate(list(flips.values()))
    assert abs(all_flips.mean() - 0.5) < 4 * 0.5 / math.sqrt(n)
    assert all(0 < np.mean(f) < 1 for f in flips.values()), "each image is reflected in some epochs, not others"


@pytest.mark.slow
def test_lighting_covariance_on_a_flat_image(tmp_path):
    eigval = np.array([0.2, 0.05, 0.01])
    eigvec = rng_rotation(3)
    flat = np.zeros((256, 256, 3), np.uint8) + np.array([120, 130, 140], np.uint8)
    data = build(tmp_path, {"train": [(flat, 0)] * 50}, shard_size=25)
    shardkit.set_stats(data, mean_image=np.zeros((256, 256, 3)), eigval=eigval, eigvec=eigvec)
    decoded = shardkit.read_samples(data, "train")[0][0].astype(np.float64)
    assert np.ptp(decoded, axis=(0, 1)).max() == 0, "a flat colour survives JPEG exactly"
    colour = decoded[0, 0]
    sigma = 0.1
    loader = train_loader(data, 50, lighting=sigma, reading=TWO_THREADS)
    shifts = []
    for _ in range(40):  # 2000 draws
        for x, _ in loader:
            x = x.numpy().astype(np.float64)
            assert np.allclose(x, x[:, :, :1, :1], atol=1e-3), "the shift is the same for every pixel of an image"
            shifts.append(x[:, :, 0, 0] - colour)
    shifts = np.concatenate(shifts)
    expected = eigvec @ np.diag((sigma * eigval * 255) ** 2) @ eigvec.T
    # In the eigenbasis the shifts are independent normals with std sigma * eigval * 255.
    along = shifts @ eigvec
    std = along.std(axis=0)
    assert np.allclose(std, sigma * eigval * 255, rtol=0.08), (std, sigma * eigval * 255)
    assert np.allclose(np.cov(shifts, rowvar=False), expected, atol=0.1 * expected.max())
    assert abs(np.corrcoef(along, rowvar=False)[0, 1]) < 0.1
    assert np.abs(shifts.mean(0)).max() < 4 * std.max() / math.sqrt(len(shifts))


def test_lighting_zero_is_off(gradient_data):
    x, _ = next(iter(train_loader(gradient_data, 8, lighting=0, reading=TWO_THREADS)))
    off = x.numpy()
    # Blue is a flat 128 in the source: only JPEG rounding may move it.
    assert np.abs(off[:, 2] - 128).max() <= 3


def test_mean_subtraction_is_exact_and_follows_crop_and_flip(tmp_path):
    """Two datasets differing only in mean_image: outputs differ by exactly the same crop/flip of the mean."""
    items = [(textured(i), 0) for i in range(12)]
    a = build(tmp_path / "a", {"train": items, "val": items})
    shardkit.set_stats(a, mean_image=np.zeros((256, 256, 3)))
    b = shutil.copytree(a, tmp_path / "b")
    ramp = gradient_image().astype(np.float64) * 0.5 + 0.25  # non-integer, position-revealing
    shardkit.set_stats(b, mean_image=ramp)
    xa, _ = next(iter(train_loader(a, 12, lighting=0, seed=5, reading=TWO_THREADS)))
    xb, _ = next(iter(train_loader(b, 12, lighting=0, seed=5, reading=TWO_THREADS)))
    diff = (xa - xb).numpy().astype(np.float64)
    geometry = set()
    for patch in diff:
        cx, cy, reflected = crop_geometry((patch - 0.25) / 0.5)
        geometry.add((cx, cy, reflected))
        window = ramp[cy:cy + CROP, cx:cx + CROP].transpose(2, 0, 1)
        if reflected:
            window = window[:, :, ::-1]
        assert np.abs(patch - window).max() < 1e-4
    assert len(geometry) > 3, "crops should vary"
    ca, _ = next(iter(eval_loader(a, "val", "center", batch_size=12, reading=TWO_THREADS)))
    cb, _ = next(iter(eval_loader(b, "val", "center", batch_size=12, reading=TWO_THREADS)))
    center = ramp[16:240, 16:240].transpose(2, 0, 1)
    assert np.abs((ca - cb).numpy() - center).max() < 1e-4
    ch, _ = next(iter(eval_loader(b, "val", "center", batch_size=12, output=Output(mean="channel"),
                                  reading=TWO_THREADS)))
    rgb_mean = ramp.reshape(-1, 3).mean(0)
    assert np.abs((ca - ch).numpy() - rgb_mean[None, :, None, None]).max() < 1e-3


def test_each_patch_is_a_window_of_image_minus_mean_reflected_together(gradient_data, tmp_path):
    """The crop and reflection of each patch are read from the image's own pixels (its R = x, G = y ramps, through
    the same data with mean zero); the mean image is not symmetric, so a mean that stays unreflected while the image
    is reflected, or is cropped elsewhere, shows."""
    data = shutil.copytree(gradient_data, tmp_path / "data")
    y, x = np.mgrid[0:256, 0:256].astype(np.float64)
    mean = np.stack([0.3 * x + 0.1 * y + 7 * c + 0.25 + 10 * np.sin(x / 17 + c) for c in range(3)], axis=-1)
    assert np.abs(mean - mean[:, ::-1]).max() > 50 and np.abs(mean - mean[::-1]).max() > 20
    shardkit.set_stats(data, mean_image=mean)
    image = shardkit.read_samples(data, "train")[0][0].astype(np.float64)  # every sample is this image
    plain, _ = next(iter(train_loader(gradient_data, 40, lighting=0, seed=7, reading=TWO_THREADS)))
    centred, _ = next(iter(train_loader(data, 40, lighting=0, seed=7, reading=TWO_THREADS)))
    geometry = set()
    for own, patch in zip(plain.numpy(), centred.numpy().astype(np.float64)):
        cx, cy, reflected = crop_geometry(own)
        geometry.add((cx, cy, reflected))
        window = (image - mean)[cy:cy + CROP, cx:cx + CROP].transpose(2, 0, 1)
        expected = window[:, :, ::-1] if reflected else window
        err = np.abs(patch - expected)
        assert err.mean() < 0.5 and err.max() <= 4, "JPEG decoders may differ by rounding, no more"
        mean_window = mean[cy:cy + CROP, cx:cx + CROP].transpose(2, 0, 1)
        assert np.abs(own - patch - (mean_window[:, :, ::-1] if reflected else mean_window)).max() < 1e-3
    assert {r for _, _, r in geometry} == {False, True} and len(geometry) > 10


def test_center_and_ten_crop_equal_numpy_crops(textured_data):
    truth = shardkit.read_samples(textured_data, "val")
    with np.load(textured_data / "stats.npz") as npz:
        mean = npz["mean_image"]
    corners = [(0, 0), (32, 0), (0, 32), (32, 32), (16, 16)]  # (x, y): TL, TR, BL, BR, centre
    center = eval_loader(textured_data, "val", "center", batch_size=4, output=WITH_INDEX, reading=TWO_THREADS)
    ten = eval_loader(textured_data, "val", "ten", batch_size=4, output=WITH_INDEX, reading=TWO_THREADS)
    for (c, _, ci), (t, _, ti) in zip(center, ten):
        assert ci.tolist() == ti.tolist()
        for k, c1, t1 in zip(ci.tolist(), c.numpy(), t.numpy()):
            image = truth[k][0].astype(np.float64) - mean
            expected = []
            for mirror in (False, True):
                for x, y in corners:
                    patch = image[y:y + CROP, x:x + CROP].transpose(2, 0, 1)
                    expected.append(patch[:, :, ::-1] if mirror else patch)
            for got, want in zip(t1, expected):
                err = np.abs(got - want)
                assert err.mean() < 0.5 and err.max() <= 4, "JPEG decoders may differ by rounding, no more"
            assert np.abs(c1 - expected[4]).max() <= 4
            assert np.array_equal(c1, t1[4])


def test_same_seed_same_augmentation(textured_data):
    def first_epoch(seed):
        loader = train_loader(textured_data, 8, seed=seed, reading=TWO_THREADS)
        return torch.cat([x for x, _ in loader])

    a, b, c = first_epoch(3), first_epoch(3), first_epoch(4)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_truncated_shard_is_named_quickly(tmp_path):
    data = build(tmp_path, {"train": [(textured(i), 0) for i in range(12)]}, shard_size=4)
    bad = data / "train" / "train-000001.tar"
    os.truncate(bad, bad.stat().st_size // 2)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=str(bad)):
        for _ in train_loader(data, 4, reading=TWO_THREADS):
            pass
    assert time.monotonic() - start < 5


def test_index_that_disagrees_with_the_manifest_is_named(tmp_path):
    shardkit.write_data(tmp_path, {"train": [(textured(i), 0) for i in range(8)]}, shard_size=4)
    idx = tmp_path / "train" / "train-000001.idx"
    lines = idx.read_text().splitlines()
    idx.write_text("\n".join([lines[0].replace(" 4", " 3")] + lines[1:-1]) + "\n")
    with pytest.raises(RuntimeError, match=str(idx.with_suffix(".tar"))):
        train_loader(tmp_path, 4, reading=TWO_THREADS)


def test_corrupt_jpeg_is_named(tmp_path):
    data = build(tmp_path, {"train": [(textured(i), 0) for i in range(12)]}, shard_size=4)
    bad = data / "train" / "train-000002.tar"
    fields = bad.with_suffix(".idx").read_text().splitlines()[1].split()
    offset, size = int(fields[1]), int(fields[2])
    content = bytearray(bad.read_bytes())
    content[offset + 2:offset + size] = bytes(size - 2)
    bad.write_bytes(bytes(content))
    with pytest.raises(RuntimeError, match=str(bad)):
        for _ in train_loader(data, 4, reading=TWO_THREADS):
            pass


def test_batches_stay_valid_after_later_batches(textured_data):
    """Batches are handed over without a copy: a kept batch must not be overwritten by the ones after it."""
    loader = train_loader(textured_data, 4, reading=TWO_THREADS)
    kept = [(x, x.clone()) for x, _ in loader]
    for _ in range(2):
        for _ in loader:
            pass
    assert all(torch.equal(x, copy) for x, copy in kept)


def test_network_storage_reads_the_same_batches(textured_data):
    """storage="network" changes only how DALI's reader gets the bytes (plain reads instead of mmap)."""
    local = eval_loader(textured_data, "val", "ten", batch_size=4, output=WITH_INDEX, reading=TWO_THREADS)
    network = eval_loader(textured_data, "val", "ten", batch_size=4, output=WITH_INDEX,
                          reading=Reading(num_threads=2, storage="network"))
    pairs = list(zip(local, network))
    assert len(pairs) == len(local) == 3
    assert all(torch.equal(a, b) for batches in pairs for a, b in zip(*batches))


def test_read_manifest_and_argument_errors(textured_data, tmp_path):
    assert [c["index"] for c in read_manifest(textured_data)["classes"]] == [0, 1, 2]
    with pytest.raises(FileNotFoundError, match="manifest"):
        read_manifest(tmp_path)
    with pytest.raises(ValueError, match="float32"):
        train_loader(textured_data, 4, output=Output(dtype="bfloat16"))
    with pytest.raises(ValueError, match="split evenly over 2 ranks"):
        eval_loader(textured_data, batch_size=3, world_size=2)
    with pytest.raises(ValueError, match="storage"):
        Reading(storage="lustre")
    with pytest.raises(ValueError, match="mean"):
        Output(mean="image")
    with pytest.raises(ValueError, match="crops"):
        eval_loader(textured_data, crops="five")
    with pytest.raises(ValueError, match="split"):
        eval_loader(textured_data, split="test")


def assert_decoders_agree(cpu: torch.Tensor, gpu: torch.Tensor, what: str) -> None:
    """libjpeg-turbo (CPU) and nvJPEG (GPU) decode the same JPEG to pixels that differ by rounding, no more."""
    err = (cpu - gpu.cpu().float()).abs()
    print(f"{what}: mean |CPU - GPU| {err.mean():.4f}, max {err.max():.2f}, "
          f"share of values off by more than 1: {(err > 1).float().mean():.5f}")
    assert err.mean() < 0.5 and err.max() <= 4


@pytest.mark.gpu
@pytest.mark.parametrize("hw_decoder_load", [0.0, 1.0])
@pytest.mark.parametrize("crops", ["center", "ten"])
def test_gpu_matches_cpu(textured_data, crops, hw_decoder_load):
    cpu = eval_loader(textured_data, "val", crops, batch_size=4, output=WITH_INDEX, reading=TWO_THREADS)
    gpu = eval_loader(textured_data, "val", crops, batch_size=4,
                      output=Output(device="cuda", dtype="float32", with_index=True),
                      reading=Reading(num_threads=2, hw_decoder_load=hw_decoder_load))
    pairs = list(zip(cpu, gpu))
    assert len(pairs) == len(cpu)
    for (_, ya, ia), (b, yb, ib) in pairs:
        assert b.device.type == "cuda" and yb.device.type == "cuda" and yb.dtype == torch.int64
        assert torch.equal(ia, ib) and torch.equal(ya, yb.cpu())
    assert_decoders_agree(torch.cat([a for (a, _, _), _ in pairs]), torch.cat([b for _, (b, _, _) in pairs]),
                          f"{crops}, hw_decoder_load={hw_decoder_load}")


@pytest.mark.gpu
@pytest.mark.parametrize("hw_decoder_load", [0.0, 1.0])
def test_gpu_train_batches_match_the_cpu_ones(textured_data, hw_decoder_load):
    """The augmentation is drawn in numpy from (seed, epoch, step): the GPU pipeline must apply the same crops,
    reflections and lighting to the same samples as the CPU pipeline."""
    cpu = train_loader(textured_data, 8, seed=7, output=WITH_INDEX, reading=TWO_THREADS)
    gpu = train_loader(textured_data, 8, seed=7, output=Output(device="cuda", dtype="float32", with_index=True),
                       reading=Reading(num_threads=2, hw_decoder_load=hw_decoder_load))
    pairs = [((a, ia), (b, ib)) for _ in range(2) for (a, _, ia), (b, _, ib) in zip(cpu, gpu)]
    assert all(torch.equal(ia, ib) for (_, ia), (_, ib) in pairs)
    assert_decoders_agree(torch.cat([a for (a, _), _ in pairs]), torch.cat([b for _, (b, _) in pairs]),
                          f"train, hw_decoder_load={hw_decoder_load}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_gpu_train_output_types(textured_data, dtype):
    loader = train_loader(textured_data, 8, output=Output(device="cuda", dtype=dtype, channels_last=True,
                                                          with_index=True), reading=TWO_THREADS)
    seen = []
    for x, y, i in loader:
        assert x.device.type == "cuda" and x.dtype == getattr(torch, dtype) and x.shape[1:] == (3, CROP, CROP)
        assert x.is_contiguous(memory_format=torch.channels_last)
        assert y.dtype == torch.int64 and y.device.type == "cuda"
        seen += i.tolist()
    assert len(seen) == len(set(seen)) == 21 // 8 * 8


@pytest.mark.gpu
def test_gpu_crop_offsets_cover_the_range(gradient_data):
    loader = train_loader(gradient_data, 40, lighting=0, output=Output(device="cuda", dtype="float32"),
                          reading=TWO_THREADS)
    geometry = [crop_geometry(p) for _ in range(10) for x, _ in loader for p in x.cpu().numpy()]
    xs, ys, flips = zip(*geometry)
    assert set(xs) == set(ys) == set(range(33))
    assert 0.4 < np.mean(flips) < 0.6
