"""Small shard directories for tests, in the docs/FORMAT.md layout, and the helpers the tests share.

Two ways to make one:
- `build_with_shards(tmp, images)`: writes the images as class folders and runs `python -m shards build`, so a
  test covers the whole chain (writer -> pipeline).
- `write_data(tmp, splits)`: writes the tars, DALI indexes, manifest and stats.npz directly (no writer needed):
  for tests of the reading side alone and for shards that must be precisely controlled.

Inputs for the writer: `make_folders` (class folders of small random images), `jpeg_bytes` (an image file).
Reading what it wrote: `all_samples`, `read_samples`, `tree_bytes`. Running it: `run_cli`.
"""
import hashlib
import io
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from shardformat import FORMAT_VERSION, SIZE
from shards.build import BUILD_DIR, BuildConfig
from tests.conftest import REPO


def find_wds2idx() -> Path | None:
    """DALI's `wds2idx`: beside this interpreter (a venv's bin), else on PATH (`pip install --target DIR` puts it in
    DIR/bin, which is not beside the interpreter)."""
    beside = Path(sys.executable).parent / "wds2idx"
    found = beside if beside.exists() else shutil.which("wds2idx")
    return Path(found) if found else None


WDS2IDX = find_wds2idx()
QUALITY = BuildConfig.quality  # what a build writes by default


def noise_rgb(rng: np.random.Generator, height: int = 40, width: int = 60) -> np.ndarray:
    """Random HWC uint8 RGB pixels."""
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


def jpeg_bytes(rgb: np.ndarray, quality: int = 75, *, mode: str = "RGB", fmt: str = "JPEG") -> bytes:
    """The file of HWC uint8 RGB pixels: a JPEG (75: Pillow's default quality), or, for the inputs a build must
    convert, the pixels converted to another `mode` (CMYK, L, RGBA, P) and saved in another `fmt` (PNG, GIF)."""
    out = io.BytesIO()
    Image.fromarray(np.asarray(rgb, dtype=np.uint8)).convert(mode).save(out, format=fmt, quality=quality)
    return out.getvalue()


def decode(jpeg: bytes) -> np.ndarray:
    """HWC uint8 RGB, decoded by libjpeg-turbo (through Pillow)."""
    return np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    tar.addfile(info, io.BytesIO(data))


def write_shard(path: Path, samples: list[tuple[str, bytes, int, int]]) -> None:
    """samples: (key, jpeg bytes, class index, position in split)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for key, jpeg, label, index in samples:
            _add(tar, f"{key}.jpg", jpeg)
            _add(tar, f"{key}.cls", str(label).encode())
            _add(tar, f"{key}.label", np.int32(label).astype("<i4").tobytes())
            _add(tar, f"{key}.pos", np.int32(index).astype("<i4").tobytes())
    if WDS2IDX is None:
        raise FileNotFoundError("DALI's wds2idx is neither beside this Python nor on PATH")
    subprocess.run([str(WDS2IDX), str(path), str(path.with_suffix(".idx"))], check=True, capture_output=True)


def pca_of(images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (descending) and eigenvectors (columns) of the RGB covariance on the [0,1] scale."""
    pixels = np.concatenate([np.asarray(im, np.float64).reshape(-1, 3) / 255 for im in images])
    eigval, eigvec = np.linalg.eigh(np.cov(pixels, rowvar=False))
    order = np.argsort(eigval)[::-1]
    return eigval[order], eigvec[:, order]


def write_data(root: Path, splits: dict[str, list[tuple[np.ndarray, int]]], *, shard_size: int = 8,
               num_classes: int | None = None, mean_image: np.ndarray | None = None,
               eigval=None, eigvec=None) -> Path:
    """A complete DATA directory from {split: [(rgb SIZE x SIZE x 3 uint8, class), ...]}; returns `root`.

    Statistics come from the decoded training JPEGs unless given. Samples keep their order, so a sample's
    `.pos` is its position in the list.
    """
    root = Path(root)
    num_classes = num_classes or 1 + max(c for items in splits.values() for _, c in items)
    manifest = {"format": FORMAT_VERSION, "splits": {}, "rejected": [], "converted": [],
                "classes": [{"index": i, "wnid": f"n{i:08d}", "name": f"class {i}"} for i in range(num_classes)]}
    given = mean_image is not None and eigval is not None and eigvec is not None
    decoded = {}
    for split, items in splits.items():
        shards = []
        jpegs = [jpeg_bytes(rgb, QUALITY) for rgb, _ in items]
        decoded[split] = [] if given else [decode(j) for j in jpegs]
        for start in range(0, len(items), shard_size):
            file = f"{split}/{split}-{start // shard_size:06d}.tar"
            end = min(len(items), start + shard_size)
            chunk = [(f"{split}_{i:08d}", jpegs[i], items[i][1], i) for i in range(start, end)]
            write_shard(root / file, chunk)
            digest = hashlib.sha256((root / file).read_bytes()).hexdigest()
            shards.append({"file": file, "num_samples": len(chunk), "sha256": digest})
        manifest["splits"][split] = {"num_samples": len(items), "shards": shards}
    train = decoded.get("train") or next(iter(decoded.values()))
    if mean_image is None:
        mean_image = np.mean([im.astype(np.float64) for im in train], axis=0)
    if eigval is None or eigvec is None:
        eigval, eigvec = pca_of(train)
    rgb_mean = np.asarray(mean_image, np.float64).reshape(-1, 3).mean(0)
    manifest["stats"] = {"rgb_mean": rgb_mean.tolist(), "pca_eigval": np.asarray(eigval).tolist(),
                         "pca_eigvec": np.asarray(eigvec).tolist(),
                         "num_pixels": SIZE * SIZE * len(splits.get("train") or next(iter(splits.values())))}
    manifest["params"] = {"size": SIZE, "quality": QUALITY, "shard_size": shard_size}
    np.savez(root / "stats.npz", mean_image=np.asarray(mean_image, np.float64), rgb_mean=rgb_mean,
             pca_eigval=np.asarray(eigval, np.float64), pca_eigvec=np.asarray(eigvec, np.float64))
    (root / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return root


def set_stats(root: Path, *, mean_image=None, eigval=None, eigvec=None) -> None:
    """Replace statistics of an existing DATA directory (both manifest.json and stats.npz)."""
    root = Path(root)
    manifest = json.loads((root / "manifest.json").read_text())
    with np.load(root / "stats.npz") as npz:
        arrays = dict(npz)
    if mean_image is not None:
        arrays["mean_image"] = np.asarray(mean_image, np.float64)
        arrays["rgb_mean"] = arrays["mean_image"].reshape(-1, 3).mean(0)
        manifest["stats"]["rgb_mean"] = arrays["rgb_mean"].tolist()
    if eigval is not None:
        arrays["pca_eigval"] = np.asarray(eigval, np.float64)
        manifest["stats"]["pca_eigval"] = arrays["pca_eigval"].tolist()
    if eigvec is not None:
        arrays["pca_eigvec"] = np.asarray(eigvec, np.float64)
        manifest["stats"]["pca_eigvec"] = arrays["pca_eigvec"].tolist()
    np.savez(root / "stats.npz", **arrays)
    (root / "manifest.json").write_text(json.dumps(manifest, indent=1))


def read_samples(root: Path, split: str) -> dict[int, tuple[np.ndarray, int]]:
    """{`.pos`: (decoded JPEG as HWC uint8, class from `.cls`)} for every sample of a split, read by tarfile."""
    manifest = json.loads((Path(root) / "manifest.json").read_text())
    out = {}
    for shard in manifest["splits"][split]["shards"]:
        members = {}
        with tarfile.open(Path(root) / shard["file"]) as tar:
            for m in tar.getmembers():
                key, _, ext = m.name.partition(".")
                members.setdefault(key, {})[ext] = tar.extractfile(m).read()
        for parts in members.values():
            index = int(np.frombuffer(parts["pos"], "<i4")[0])
            out[index] = (decode(parts["jpg"]), int(parts["cls"]))
    return out


def write_class_folders(raw: Path, splits: dict[str, list[tuple[np.ndarray, int]]]) -> Path:
    """`raw/<split>/<wnid>/<split>_<i>.png` (lossless), with WNIDs n00000000, n00000001, ... by class."""
    for split, items in splits.items():
        for i, (rgb, label) in enumerate(items):
            folder = Path(raw) / split / f"n{label:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.asarray(rgb, np.uint8)).save(folder / f"{split}_{i:06d}.png")
    return Path(raw)


def build_with_shards(tmp: Path, splits: dict[str, list[tuple[np.ndarray, int]]], *args: str) -> Path:
    """Class folders under tmp/raw, then `python -m shards build --raw=tmp/raw --out=tmp/data`; returns the DATA dir."""
    raw = write_class_folders(Path(tmp) / "raw", splits)
    out = Path(tmp) / "data"
    run_cli("build", f"--raw={raw}", f"--out={out}", *args)
    return out


def make_folders(root: Path, classes=("n01", "n02", "n03"), train=6, val=2, seed=0, names=None) -> Path:
    """train/<class>/<class>_<i>.JPEG and val/<class>/val_<class>_<i>.JPEG, small random images of varied sizes."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", train), ("val", val)):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                name = f"{c}_{i}.JPEG" if split == "train" else f"val_{c}_{i}.JPEG"
                (d / name).write_bytes(jpeg_bytes(noise_rgb(rng, 30 + 7 * i, 50 + 3 * i)))
    if names:
        (root / "synset_words.txt").write_text("".join(f"{w} {n}\n" for w, n in names.items()))
    return root


def run_cli(*args, check=True) -> subprocess.CompletedProcess:
    """`python -m shards *args` from the repository; an AssertionError with its output when it fails and `check`."""
    proc = subprocess.run([sys.executable, "-m", "shards", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def read_shard(path: Path) -> list[dict]:
    """Samples of a shard in tar order: {"__key__": key, ext: bytes, ...}."""
    samples = []
    with tarfile.open(path) as tar:
        for m in tar:
            key, ext = m.name.split(".", 1)
            if not samples or samples[-1]["__key__"] != key:
                samples.append({"__key__": key})
            samples[-1][ext] = tar.extractfile(m).read()
    return samples


def all_samples(data: Path, split: str) -> list[dict]:
    """Samples of a split in manifest and tar order (see `read_shard`)."""
    manifest = json.loads((data / "manifest.json").read_text())
    return [s for sh in manifest["splits"][split]["shards"] for s in read_shard(data / sh["file"])]


def tree_bytes(data: Path) -> dict[str, bytes]:
    """Every file a build leaves in DATA (not its working files in .build), by relative path: to compare builds."""
    return {str(p.relative_to(data)): p.read_bytes() for p in sorted(data.rglob("*"))
            if p.is_file() and BUILD_DIR not in p.parts}


def shard_files(data: Path) -> dict[str, bytes]:
    """{path under DATA: bytes} of every shard and index."""
    return {str(p.relative_to(data)): p.read_bytes() for p in sorted(data.glob("*/*")) if p.suffix in (".tar", ".idx")}


def assert_same_shard_set(data: Path, reference: Path) -> None:
    """The same manifest, shards, indexes and statistics, byte for byte."""
    assert (data / "manifest.json").read_bytes() == (reference / "manifest.json").read_bytes()
    assert shard_files(data) == shard_files(reference)
    with np.load(data / "stats.npz") as a, np.load(reference / "stats.npz") as b:
        assert sorted(a.files) == sorted(b.files)
        for name in a.files:
            np.testing.assert_array_equal(a[name], b[name])
