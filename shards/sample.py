"""The built-in sample ImageNet: ten procedurally drawn classes in the official ILSVRC2012 archive layout.

    python -m shards sample --out=data/sample-raw [--seed=0] [--train_per_class=40] [--val_per_class=10]

writes into --out, exactly as the real download names them:

    ILSVRC2012_img_train.tar        <wnid>.tar per class, each holding <wnid>_<n>.JPEG
    ILSVRC2012_img_val.tar          ILSVRC2012_val_00000001.JPEG ... (classes interleaved)
    ILSVRC2012_devkit_t12.tar.gz    ILSVRC2012_devkit_t12/data/meta.mat and .../ILSVRC2012_validation_ground_truth.txt

Each class is a texture with its own colour scheme (stripes, checkerboard, rings, ...), varied per image in
position, scale, colour and noise, so that AlexNet learns it on a CPU in minutes. Image sizes and aspect ratios
vary like ImageNet's, and the training set carries ImageNet's oddities: a CMYK JPEG, a PNG named .JPEG, a
greyscale JPEG and an EXIF-rotated JPEG. The same seed gives byte-identical archives.
"""
import gzip
import io
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from config import parse_config
from runtime import usage_errors, write_atomically
from shards.image import ORIENTATION_TAG

TRAIN_ARCHIVE = "ILSVRC2012_img_train.tar"
VAL_ARCHIVE = "ILSVRC2012_img_val.tar"
DEVKIT_ARCHIVE = "ILSVRC2012_devkit_t12.tar.gz"
DEVKIT_DATA = "ILSVRC2012_devkit_t12/data"

ARCHIVE_MTIME = 1338508800  # seconds since 1970 (2012-06-01): fixed, so that the archives are byte-identical
ROTATED_90_CW = 6  # EXIF orientation: turn the stored pixels 90 degrees clockwise to display them upright
SHORT_SIDE_PX = (256, 500)  # shorter side of most images; ImageNet's are mostly 333..500
SMALL_SHORT_SIDE_PX = (100, 255)  # shorter side of every SMALL_EVERY-th image, which shard writing must upscale
SMALL_EVERY = 8
ASPECT_RANGE = (0.5, 2.5)  # width / height, drawn log-uniformly
JPEG_QUALITY_RANGE = (70, 95)
TRAIN_NUMBER_RANGE = (1, 20000)  # the <n> of <wnid>_<n>.JPEG: sparse and of varying digit counts, like ImageNet's


@dataclass
class SampleConfig:
    out: str = "data/sample-raw"  # directory for the three archives (created if missing)
    seed: int = 0  # the same seed gives byte-identical archives
    train_per_class: int = 40  # training images per class
    val_per_class: int = 10  # validation images per class


@dataclass(frozen=True)
class SampleClass:
    ilsvrc_id: int  # ILSVRC2012_ID in meta.mat: in the real devkit's relative order, not sorted by WNID
    wnid: str
    words: str
    gloss: str
    pattern: str  # key of PATTERNS
    foreground_rgb: tuple[int, int, int]  # 0-255
    background_rgb: tuple[int, int, int]  # 0-255


CLASSES = (
    SampleClass(1, "n02102040", "English springer, English springer spaniel", "a breed of springer spaniel",
                "blobs", (120, 72, 40), (236, 228, 214)),
    SampleClass(2, "n03417042", "garbage truck, dustcart", "a truck for collecting domestic refuse",
                "dots", (240, 120, 170), (20, 80, 50)),
    SampleClass(3, "n03394916", "French horn, horn", "a brass musical instrument consisting of a conical tube "
                "that is coiled into a spiral and played by means of valves", "rings", (240, 150, 30), (90, 40, 120)),
    SampleClass(4, "n03000684", "chain saw, chainsaw", "portable power saw; teeth linked to form an endless chain",
                "stripes", (230, 200, 40), (30, 40, 110)),
    SampleClass(5, "n01440764", "tench, Tinca tinca", "freshwater dace-like game fish of Europe and western Asia "
                "noted for ability to survive outside water", "waves", (20, 50, 150), (200, 225, 160)),
    SampleClass(6, "n03425413", "gas pump, gasoline pump, petrol pump, island dispenser", "a pump in a service "
                "station that draws gasoline from underground storage tanks", "gradient", (210, 40, 200),
                (30, 150, 140)),
    SampleClass(7, "n03028079", "church, church building", "a place for public (especially Christian) worship",
                "checkerboard", (200, 40, 40), (230, 230, 230)),
    SampleClass(8, "n03445777", "golf ball", "a small hard ball used in playing golf; dimpled to reduce wind "
                "resistance", "disk", (245, 245, 235), (60, 140, 40)),
    SampleClass(9, "n02979186", "cassette player", "electronic equipment for playing cassettes",
                "grid", (25, 25, 25), (170, 220, 60)),
    SampleClass(10, "n03888257", "parachute, chute", "rescue equipment consisting of a device that fills with air "
                "and retards your fall", "spokes", (40, 200, 210), (110, 20, 40)),
)

# Internal WordNet nodes, as the real meta.mat lists after the leaves: (wnid, words, gloss, wordnet_height, child wnids)
INTERNAL_SYNSETS = (
    ("n00015388", "animal, animate being, beast, brute, creature, fauna",
     "a living organism characterized by voluntary movement", 13, ("n02102040", "n01440764")),
    ("n00021939", "artifact, artefact", "a man-made object taken as a whole", 11,
     ("n03417042", "n03394916", "n03000684", "n03425413", "n03028079", "n03445777", "n02979186", "n03888257")),
)

# One oddity each, on the first training image of these classes: (oddity, class index in CLASSES, description)
ODDITIES = (
    ("cmyk", 1, "CMYK JPEG"),
    ("png", 2, "PNG named .JPEG"),
    ("greyscale", 3, "greyscale JPEG"),
    ("exif_rotated", 4, "EXIF-rotated JPEG (orientation 6)"),
)


# ---- patterns: each maps centred coordinates (in units of the shorter side) to a foreground weight in [0, 1]

def rotated(y, x, angle_deg):
    theta = np.deg2rad(angle_deg)
    return x * np.cos(theta) + y * np.sin(theta), -x * np.sin(theta) + y * np.cos(theta)


def stripes(rng, y, x):
    u, _ = rotated(y, x, rng.uniform(20, 50))
    return np.sin(2 * np.pi * u / rng.uniform(0.08, 0.16) + rng.uniform(0, 2 * np.pi)) > 0


def checkerboard(rng, y, x):
    u, v = rotated(y, x, rng.uniform(-10, 10))
    cell = rng.uniform(0.08, 0.16)
    return (np.floor(u / cell) + np.floor(v / cell)) % 2 == 1


def rings(rng, y, x):
    radius = np.hypot(y - rng.uniform(-0.15, 0.15), x - rng.uniform(-0.15, 0.15))
    return np.sin(2 * np.pi * radius / rng.uniform(0.06, 0.12) + rng.uniform(0, 2 * np.pi)) > 0


def blobs(rng, y, x):
    extent_y, extent_x = np.abs(y).max(), np.abs(x).max()
    field = np.zeros((y.size, x.size), np.float32)
    for _ in range(rng.integers(8, 16)):
        centre_y, centre_x = rng.uniform(-extent_y, extent_y), rng.uniform(-extent_x, extent_x)
        sigma = rng.uniform(0.06, 0.14)
        field += np.exp(-((y - centre_y) ** 2 + (x - centre_x) ** 2) / (2 * sigma ** 2))
    return np.clip(2 * field - 0.5, 0, 1)


def disk(rng, y, x):
    radius = np.hypot(y - rng.uniform(-0.1, 0.1), x - rng.uniform(-0.1, 0.1))
    return np.clip((rng.uniform(0.25, 0.4) - radius) / 0.01, 0, 1)  # a soft edge one hundredth of the side wide


def dots(rng, y, x):
    u, v = rotated(y, x, rng.uniform(-15, 15))
    period = rng.uniform(0.1, 0.18)
    distance = np.hypot(u / period % 1 - 0.5, v / period % 1 - 0.5)
    return distance < rng.uniform(0.25, 0.35)


def spokes(rng, y, x):
    angle = np.arctan2(y - rng.uniform(-0.1, 0.1), x - rng.uniform(-0.1, 0.1))
    return np.sin(rng.integers(6, 13) * angle + rng.uniform(0, 2 * np.pi)) > 0


def waves(rng, y, x):
    u, v = rotated(y, x, rng.uniform(-10, 10))
    wobble = rng.uniform(0.03, 0.08) * np.sin(2 * np.pi * u / rng.uniform(0.3, 0.6) + rng.uniform(0, 2 * np.pi))
    return np.sin(2 * np.pi * (v + wobble) / rng.uniform(0.1, 0.18) + rng.uniform(0, 2 * np.pi)) > 0


def grid(rng, y, x):
    u, v = rotated(y, x, rng.uniform(-10, 10))
    period, line_width = rng.uniform(0.12, 0.22), rng.uniform(0.12, 0.2)
    return (u / period % 1 < line_width) | (v / period % 1 < line_width)


def gradient(rng, y, x):
    u, _ = rotated(y, x, rng.uniform(0, 360))
    return np.clip(0.5 + u / rng.uniform(0.8, 1.6), 0, 1)


PATTERNS = {f.__name__: f for f in (stripes, checkerboard, rings, blobs, disk, dots, spokes, waves, grid, gradient)}


# ---- images

def image_rng(seed: int, split: str, class_index: int, position: int) -> np.random.Generator:
    """An independent generator per image, so that any image can be drawn without drawing the ones before it."""
    return np.random.default_rng([seed, ("train", "val").index(split), class_index, position])


def image_size(rng, small: bool) -> tuple[int, int]:
    """(height, width) with ImageNet-like shorter sides and aspect ratios."""
    short_side = rng.integers(*(SMALL_SHORT_SIDE_PX if small else SHORT_SIDE_PX), endpoint=True)
    aspect = np.exp(rng.uniform(np.log(ASPECT_RANGE[0]), np.log(ASPECT_RANGE[1])))
    if aspect >= 1:
        return int(short_side), int(round(short_side * aspect))
    return int(round(short_side / aspect)), int(short_side)


def jittered(rgb, rng, amount=30):
    """`rgb` moved by up to `amount` (0-255 scale) per channel, so no two pictures share exact colours."""
    return np.clip(np.asarray(rgb, np.float32) + rng.uniform(-amount, amount, 3), 0, 255)


def draw_image(sample_class: SampleClass, rng, small: bool = False) -> Image.Image:
    """One RGB picture of the class: its pattern in jittered colours, with a brightness change and noise."""
    height, width = image_size(rng, small)
    short_side = min(height, width)
    y = ((np.arange(height, dtype=np.float32) - height / 2) / short_side)[:, None]
    x = ((np.arange(width, dtype=np.float32) - width / 2) / short_side)[None, :]
    weight = np.asarray(PATTERNS[sample_class.pattern](rng, y, x), np.float32)[..., None]
    foreground = jittered(sample_class.foreground_rgb, rng)
    background = jittered(sample_class.background_rgb, rng)
    pixels = background + (foreground - background) * weight
    pixels *= rng.uniform(0.8, 1.2)
    pixels += rng.standard_normal(pixels.shape, dtype=np.float32) * rng.uniform(2, 12)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def encode(image: Image.Image, oddity: str | None, quality: int) -> bytes:
    """The file bytes of `image`: a plain RGB JPEG, or one of ImageNet's oddities."""
    buffer = io.BytesIO()
    if oddity is None:
        image.save(buffer, "JPEG", quality=quality)
    elif oddity == "cmyk":
        image.convert("CMYK").save(buffer, "JPEG", quality=quality)
    elif oddity == "png":
        image.save(buffer, "PNG")
    elif oddity == "greyscale":
        image.convert("L").save(buffer, "JPEG", quality=quality)
    elif oddity == "exif_rotated":
        exif = Image.Exif()
        exif[ORIENTATION_TAG] = ROTATED_90_CW
        # Stored turned 90 degrees anticlockwise, so that the clockwise turn the tag asks for makes it upright.
        image.transpose(Image.Transpose.ROTATE_90).save(buffer, "JPEG", quality=quality, exif=exif.tobytes())
    else:
        raise ValueError(f"unknown oddity {oddity!r}")
    return buffer.getvalue()


def image_file(seed: int, split: str, class_index: int, position: int, oddity: str | None = None) -> bytes:
    rng = image_rng(seed, split, class_index, position)
    image = draw_image(CLASSES[class_index], rng, small=position % SMALL_EVERY == 1)
    return encode(image, oddity, quality=int(rng.integers(*JPEG_QUALITY_RANGE, endpoint=True)))


# ---- archives

def tar_member(name: str, data: bytes | None = None) -> tuple[tarfile.TarInfo, io.BytesIO | None]:
    """A file member (or a directory when `data` is None) with fixed owner and time, so archives are reproducible."""
    info = tarfile.TarInfo(name)
    info.mtime = ARCHIVE_MTIME
    if data is None:
        info.type, info.mode = tarfile.DIRTYPE, 0o755
        return info, None
    info.size, info.mode = len(data), 0o644
    return info, io.BytesIO(data)


def tar_bytes(members: list[tuple[str, bytes | None]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members:
            tar.addfile(*tar_member(name, data))
    return buffer.getvalue()


def train_archive(cfg: SampleConfig) -> bytes:
    oddity_of = {class_index: oddity for oddity, class_index, _ in ODDITIES}
    class_tars = []
    for class_index, sample_class in enumerate(CLASSES):
        numbers = np.random.default_rng([cfg.seed, class_index]).choice(
            np.arange(*TRAIN_NUMBER_RANGE), size=cfg.train_per_class, replace=False)
        images = []
        for position, number in enumerate(numbers):
            oddity = oddity_of.get(class_index) if position == 0 else None
            images.append((f"{sample_class.wnid}_{number}.JPEG",
                           image_file(cfg.seed, "train", class_index, position, oddity)))
        class_tars.append((f"{sample_class.wnid}.tar", tar_bytes(images)))
    return tar_bytes(class_tars)


def val_classes(cfg: SampleConfig) -> list[int]:
    """The class index of each validation image, in file order: every class val_per_class times, shuffled."""
    classes = np.repeat(np.arange(len(CLASSES)), cfg.val_per_class)
    return [int(c) for c in np.random.default_rng([cfg.seed, len(CLASSES)]).permutation(classes)]


def val_archive(cfg: SampleConfig, classes: list[int]) -> bytes:
    positions = [0] * len(CLASSES)
    members = []
    for file_number, class_index in enumerate(classes, start=1):
        members.append((f"ILSVRC2012_val_{file_number:08d}.JPEG",
                        image_file(cfg.seed, "val", class_index, positions[class_index])))
        positions[class_index] += 1
    return tar_bytes(members)


def meta_mat(train_per_class: int) -> bytes:
    """meta.mat as the real devkit has it: a (N, 1) struct array `synsets`, leaves first with IDs 1..K."""
    import scipy.io  # only here: keeps every `python -m shards` command, which imports this module, quick to start

    ids = {c.wnid: c.ilsvrc_id for c in CLASSES}
    rows = [(c.ilsvrc_id, c.wnid, c.words, c.gloss, 0, np.zeros((1, 0), np.uint8), 0, train_per_class)
            for c in sorted(CLASSES, key=lambda c: c.ilsvrc_id)]
    for offset, (wnid, words, gloss, height, children) in enumerate(INTERNAL_SYNSETS, start=1):
        child_ids = np.array([[ids[child] for child in children]], np.uint16)
        rows.append((len(CLASSES) + offset, wnid, words, gloss, len(children), child_ids, height, 0))
    fields = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children", "wordnet_height",
              "num_train_images"]
    synsets = np.empty((len(rows), 1), dtype=[(field, object) for field in fields])
    for i, (synset_id, wnid, words, gloss, num_children, children, height, num_train) in enumerate(rows):
        synsets[i, 0] = (np.uint16(synset_id), wnid, words, gloss, np.uint8(num_children), children,
                         np.uint8(height), np.uint16(num_train))
    buffer = io.BytesIO()
    scipy.io.savemat(buffer, {"synsets": synsets})
    # savemat stamps the creation time into the 116-byte text header; a fixed text keeps the file reproducible.
    header = b"MATLAB 5.0 MAT-file, written by python -m shards sample".ljust(116)
    return header + buffer.getvalue()[116:]


def devkit_archive(cfg: SampleConfig, classes: list[int]) -> bytes:
    ground_truth = "".join(f"{CLASSES[c].ilsvrc_id}\n" for c in classes).encode()
    tar = tar_bytes([
        ("ILSVRC2012_devkit_t12", None),
        ("ILSVRC2012_devkit_t12/data", None),
        (f"{DEVKIT_DATA}/ILSVRC2012_validation_ground_truth.txt", ground_truth),
        (f"{DEVKIT_DATA}/meta.mat", meta_mat(cfg.train_per_class)),
    ])
    # mtime=0 and no file name in the gzip header: tarfile's "w:gz" would stamp the current time.
    buffer = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, mtime=0) as gz:
        gz.write(tar)
    return buffer.getvalue()


def check_config(cfg: SampleConfig) -> None:
    """NotADirectoryError or ValueError naming the option when `cfg` describes no sample to write."""
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out={cfg.out} exists and is not a directory")
    if cfg.train_per_class < 1 or cfg.val_per_class < 1:
        raise ValueError("--train_per_class and --val_per_class must be at least 1")
    if cfg.train_per_class > TRAIN_NUMBER_RANGE[1] - TRAIN_NUMBER_RANGE[0]:
        raise ValueError(f"--train_per_class={cfg.train_per_class}: at most {TRAIN_NUMBER_RANGE[1] - 1}")


def write_sample(cfg: SampleConfig) -> dict[str, Path]:
    """Write the three archives into cfg.out; returns their paths by role (train, val, devkit)."""
    check_config(cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    classes = val_classes(cfg)
    paths = {"train": out / TRAIN_ARCHIVE, "val": out / VAL_ARCHIVE, "devkit": out / DEVKIT_ARCHIVE}
    # The training archive last: the Makefile takes its presence to mean that the whole sample is there.
    write_atomically(paths["devkit"], devkit_archive(cfg, classes))
    write_atomically(paths["val"], val_archive(cfg, classes))
    write_atomically(paths["train"], train_archive(cfg))
    return paths


def sample_main(argv: list[str]) -> None:
    cfg = parse_config(SampleConfig, argv, description=__doc__)
    with usage_errors():  # an error while writing keeps its traceback
        check_config(cfg)
    paths = write_sample(cfg)
    num_train, num_val = len(CLASSES) * cfg.train_per_class, len(CLASSES) * cfg.val_per_class
    oddities = ", ".join(description for _, _, description in ODDITIES)
    print(f"wrote {paths['train']}: {len(CLASSES)} classes x {cfg.train_per_class} = {num_train} images "
          f"(including one each: {oddities})")
    print(f"wrote {paths['val']}: {len(CLASSES)} classes x {cfg.val_per_class} = {num_val} images")
    print(f"wrote {paths['devkit']}: meta.mat ({len(CLASSES)} classes, {len(INTERNAL_SYNSETS)} internal synsets), "
          f"validation ground truth ({num_val} lines)")
    print("classes (ILSVRC2012_ID wnid pattern): " + ", ".join(f"{c.ilsvrc_id} {c.wnid} {c.pattern}" for c in CLASSES))
