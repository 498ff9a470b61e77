"""The data-loading rows: this project's pipelines and the loaders a user would pick instead, on the same shards.

Each function returns a `work(n)` for harness.measure: n batches of `batch` training images (224x224 random crops
of the 256x256 shard images, reflected with p=0.5), as tensors on `device`.
  pipeline             train_loader: the global order, per-pixel mean, PCA lighting (the paper)
  pipeline_latency     the same, reading the shards through a FUSE mount that adds a fixed delay to every read
                       (bench/latencyfs.py): network scratch without a cache
  pipeline_webdataset  the same augmentation read by DALI's webdataset reader with a 4,096-sample shuffle buffer
                       (this project's previous design, nearly the same order every epoch)
  dali_stock           DALI as NVIDIA's examples write it: webdataset reader, random window decode,
                       crop_mirror_normalize with a per-channel mean and std, no PCA lighting
  ffcv                 FFCV 1.0.2's ImageNet loader (random crop, flip, normalise) over a .beton written from the
                       same 256x256 images (JPEG, quality 90)
  alternative          torch DataLoader + the webdataset library + Pillow crop/flip/per-pixel mean (no lighting)
  tencrop              eval_loader(crops="ten"): one image = ten 224x224 patches
  source               the training pipeline's sample source (order.TrainSource) alone in this process, one read
                       at a time: the samples per second it hands DALI (order, reads, augmentation draws)
  source_latency       the same with train_loader's reads in flight, through the latency mount: the reads per
                       second one rank gets from slow storage
  limit                libjpeg-turbo (Pillow) decoding the shard JPEGs to RGB in `threads` processes, nothing else:
                       the ceiling for anything that decodes every pixel on the CPU (a window decode may exceed it)
"""
import io
import itertools
import math
import multiprocessing
import tarfile

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types

from bench.harness import batches_work, endless
from bench.training import loader_output
from pipeline import Reading, eval_loader, pipelines, train_loader
from pipeline.augment import Augment
from pipeline.data import CROP, SIZE, read_split, read_stats
from pipeline.order import GlobalOrder, TrainSource, read_table
from runtime import limit_threads

IMAGENET_MEAN = [0.485 * 255, 0.456 * 255, 0.406 * 255]  # what NVIDIA's and FFCV's examples normalise with
IMAGENET_STD = [0.229 * 255, 0.224 * 255, 0.225 * 255]
SHUFFLE_BUFFER = 4096  # samples: the webdataset reader's buffer in the previous design and in DALI's examples


def pipeline(data, batch, device, threads, hw_decoder_load=None, reader_workers=None, reads_in_flight=None):
    reading = Reading(num_threads=threads, reader_workers=reader_workers, hw_decoder_load=hw_decoder_load,
                      reads_in_flight=reads_in_flight)
    loader = train_loader(data, batch, output=loader_output(device), reading=reading)
    return batches_work(endless(loader))


def source(data, batch, reads_in_flight=1):
    """The source as train_loader runs it in the calling thread: `reads_in_flight` reads at once, reading ahead
    as many batches as that takes."""
    split, stats = read_split(data, "train"), read_stats(data)
    table = read_table(split.tars, split.indexes)
    train_source = TrainSource(GlobalOrder(len(table), batch, 1, 0, 0), table, 0,
                               augment=Augment.of(0.1, stats, "pixel"), keep_batches=0,
                               reads_in_flight=reads_in_flight, read_ahead=math.ceil(reads_in_flight / batch) - 1)
    iterations = itertools.count()

    def work(n: int) -> int:
        for _ in range(n):
            train_source(types.BatchInfo(next(iterations), 0))
        return n * batch
    return work


def tencrop(data, batch, device, threads):
    return batches_work(endless(eval_loader(data, "val", "ten", batch, output=loader_output(device),
                                            reading=Reading(num_threads=threads))))


# ---------------------------------------------------------------------------------------------------- DALI peers
def webdataset_reader(tars, indexes):
    return fn.readers.webdataset(paths=tars, index_paths=indexes, ext=["jpg", "label"],
                                 dtypes=[types.UINT8, types.INT32], random_shuffle=True,
                                 initial_fill=SHUFFLE_BUFFER, pad_last_batch=True)


@pipeline_def
def previous_train(tars, indexes, mean_image, eigval, eigvec, gpu, channels_last):
    """The paper's augmentation drawn by DALI's random operators over its shuffling webdataset reader."""
    jpegs, labels = webdataset_reader(tars, indexes)
    positions = [k / (SIZE - CROP) for k in range(SIZE - CROP + 1)]
    x, y = fn.random.uniform(values=positions), fn.random.uniform(values=positions)
    alpha = fn.random.normal(shape=[3], stddev=0.1)
    shift = sum(alpha[j] * float(eigval[j] * 255) * types.Constant(eigvec[:, j].astype(np.float32))
                for j in range(3))
    processing = pipelines.Processing(mean="pixel", mean_image=mean_image, rgb_mean=None, gpu=gpu,
                                      channels_last=channels_last)
    images = pipelines.patch(jpegs, processing, x, y, mirror=fn.random.coin_flip(dtype=types.INT32), offset=-shift)
    return images, labels


@pipeline_def
def stock_train(tars, indexes, gpu, channels_last):
    """NVIDIA's example pipeline for 256x256 images: a random 224x224 window, reflection, mean/std normalisation."""
    jpegs, labels = webdataset_reader(tars, indexes)
    images = fn.decoders.image_crop(jpegs, device="mixed" if gpu else "cpu", output_type=types.RGB,
                                    crop=(CROP, CROP), crop_pos_x=fn.random.uniform(range=[0.0, 1.0]),
                                    crop_pos_y=fn.random.uniform(range=[0.0, 1.0]))
    images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="HWC" if channels_last else "CHW",
                                      mean=IMAGENET_MEAN, std=IMAGENET_STD, mirror=fn.random.coin_flip())
    return images, labels


def dali_batches(pipe, device: torch.device, channels_last: bool):
    """Endless (images, labels) of a pipeline, handed to torch as the loaders do (DLPack, torch's stream)."""
    pipe.build()
    stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
    while True:
        images, labels = pipe.run(stream)
        with torch.device(device):
            x = torch.from_dlpack(images.as_tensor())
        if device.type == "cuda":
            x = x.to(torch.bfloat16)
        yield (x.movedim(-1, -3) if channels_last else x), labels


def dali_peer(kind, data, batch, device, threads):
    split, stats = read_split(data, "train"), read_stats(data)
    gpu, channels_last = device.type == "cuda", device.type == "cuda"
    options = dict(batch_size=batch, num_threads=threads, device_id=device.index if gpu else None, seed=1,
                   prefetch_queue_depth=2, exec_dynamic=True)
    if kind == "pipeline_webdataset":
        pipe = previous_train(split.tars, split.indexes, stats.mean_image, stats.pca_eigval, stats.pca_eigvec, gpu,
                              channels_last, **options)
    else:
        pipe = stock_train(split.tars, split.indexes, gpu, channels_last, **options)
    return batches_work(dali_batches(pipe, device, channels_last))


# ---------------------------------------------------------------------------------------------------- DataLoader
class PillowTrainTransform:
    """What the train pipeline does, minus lighting, in Pillow + NumPy: crop, reflect, subtract the mean, CHW."""

    def __init__(self, mean_image: np.ndarray):
        self.mean_image = mean_image.astype(np.float32)
        self.rng = np.random.default_rng()

    def __call__(self, jpeg: bytes):
        from PIL import Image
        image = Image.open(io.BytesIO(jpeg)).convert("RGB")
        x, y = self.rng.integers(0, SIZE - CROP + 1, size=2)
        patch = image.crop((x, y, x + CROP, y + CROP))
        mean = self.mean_image[y:y + CROP, x:x + CROP]
        if self.rng.random() < 0.5:
            patch, mean = patch.transpose(Image.Transpose.FLIP_LEFT_RIGHT), mean[:, ::-1]
        return (np.asarray(patch, np.float32) - mean).transpose(2, 0, 1).copy()


def one_thread_per_worker(_):
    limit_threads(1)


def alternative(data, batch, device, threads):
    """torch DataLoader with `threads` workers over the shards through the webdataset library."""
    import webdataset as wds

    split = read_split(data, "train")
    dataset = (wds.WebDataset(split.tars, shardshuffle=False, nodesplitter=wds.single_node_only, empty_check=False)
               .shuffle(1000).to_tuple("jpg", "cls").map_tuple(PillowTrainTransform(read_stats(data).mean_image), int)
               .batched(batch, partial=True))
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=threads, persistent_workers=True,
                                         prefetch_factor=4, pin_memory=device.type == "cuda",
                                         worker_init_fn=one_thread_per_worker)
    return batches_work((torch.as_tensor(x).to(device, non_blocking=True), y) for x, y in endless(loader))


# ---------------------------------------------------------------------------------------------------- FFCV
def ffcv_available() -> bool:
    try:
        import ffcv  # noqa: F401
    except ImportError:
        return False
    return True


def write_beton(data, path) -> None:
    """The training split's 256x256 images (decoded from the shards) as an FFCV dataset of quality-90 JPEGs."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter
    from PIL import Image

    class Images(torch.utils.data.Dataset):
        def __init__(self):
            self.samples = [(tar, m.offset_data, m.size) for tar in read_split(data, "train").tars
                            for m in tarfile.open(tar) if m.name.endswith(".jpg")]

        def __len__(self):
            return len(self.samples)

        def __getitem__(self, i):
            tar, offset, size = self.samples[i]
            with open(tar, "rb") as f:
                f.seek(offset)
                return np.asarray(Image.open(io.BytesIO(f.read(size))).convert("RGB")), 0

    path.parent.mkdir(parents=True, exist_ok=True)
    writer = DatasetWriter(str(path), {"image": RGBImageField(write_mode="jpg", max_resolution=SIZE,
                                                              jpeg_quality=90), "label": IntField()},
                           num_workers=1)
    writer.from_indexed_dataset(Images())


def ffcv(data, batch, device, threads, beton):
    from ffcv.fields.decoders import IntDecoder, RandomResizedCropRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import NormalizeImage, RandomHorizontalFlip, Squeeze, ToDevice, ToTensor, ToTorchImage

    if not beton.exists():
        write_beton(data, beton)
    side = CROP / SIZE  # a plain random 224x224 window of a 256x256 image: one scale, aspect ratio 1
    image = [RandomResizedCropRGBImageDecoder((CROP, CROP), scale=(side ** 2, side ** 2), ratio=(1.0, 1.0)),
             RandomHorizontalFlip(),
             # Before ToTensor: after it, on the CPU, FFCV 1.0.2's loader hangs while it builds its pipeline.
             NormalizeImage(np.array(IMAGENET_MEAN), np.array(IMAGENET_STD), np.float32),
             ToTensor(), ToTorchImage()]
    label = [IntDecoder(), ToTensor(), Squeeze()]
    if device.type == "cuda":
        image.insert(-1, ToDevice(device, non_blocking=True))
        label.append(ToDevice(device, non_blocking=True))
    loader = Loader(str(beton), batch_size=batch, num_workers=threads, order=OrderOption.RANDOM, os_cache=True,
                    drop_last=True, pipelines={"image": image, "label": label})
    return batches_work(endless(loader))


# ---------------------------------------------------------------------------------------------------- the limit
_JPEGS: list[bytes] = []  # set before the pool forks, so that workers inherit the bytes instead of receiving them


def _decode_part(part: tuple[int, int, int]) -> int:
    """Decode `count` JPEGs: every `step`-th from `first`, wrapping around the list."""
    from PIL import Image
    first, count, step = part
    for k in range(count):
        with Image.open(io.BytesIO(_JPEGS[(first + k * step) % len(_JPEGS)])) as im:
            im.convert("RGB").load()
    return count


def train_jpegs(data, limit: int) -> list[bytes]:
    out = []
    for tar_path in read_split(data, "train").tars:
        with tarfile.open(tar_path) as tar:
            for member in tar:
                if member.name.endswith(".jpg"):
                    out.append(tar.extractfile(member).read())
                    if len(out) >= limit:
                        return out
    return out


def limit(data, batch, threads):
    """Pillow decoding of `batch` shard JPEGs per unit, split over `threads` forked processes."""
    global _JPEGS
    _JPEGS = train_jpegs(data, 4096)
    pool = multiprocessing.get_context("fork").Pool(threads, one_thread_per_worker, (None,))
    cursor = [0]

    def work(n: int) -> int:
        images, first = n * batch, cursor[0]
        cursor[0] += images
        return sum(pool.map(_decode_part, [(first + i, len(range(i, images, threads)), threads)
                                           for i in range(threads)]))
    return work
