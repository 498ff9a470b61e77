"""The three DALI pipelines: `train`, `center`, `ten_crop`, each composed of the small steps below.

All three return `(images, labels, index)`: `index` is the sample's position in its split (its `.pos` member),
which the loaders check and hand on to map results back to files.
- `train` takes its samples from an external source (`order.TrainSource`): the global order of order.py, read
  sample by sample through the shard indexes, with each sample's crop, reflection and lighting already drawn
  (augment.py, in numpy). This pipeline decodes them and applies the augmentation (`augment.apply`).
- `center` and `ten_crop` read the shards in order with DALI's webdataset reader.

Pixel values are 0-255 minus the training set's mean (per pixel, the paper's "mean activity", or per channel);
there is no division by a standard deviation, as in the paper.

The same definitions run on a GPU (`device_id` = local rank; JPEG decoding `device="mixed"`, everything after it
on the GPU) and without one (`device_id=None`, every operator on the CPU). Only the device differs: the GPU
decoder is asked for libjpeg's "fancy" chroma upsampling so that both decode the same pixels up to rounding.
"""
from dataclasses import dataclass, fields

import numpy as np
from nvidia.dali import fn, pipeline_def, types

from pipeline import augment
from pipeline.data import CROP, SIZE

READER = "reader"  # the evaluation reader's name, for the loaders' epoch accounting
TEN_CROP_ORDER = ("top-left", "top-right", "bottom-left", "bottom-right", "center")  # then the same five reflected
_CORNERS = ((0.0, 0.0), (1.0, 0.0), (0.0, 1.0), (1.0, 1.0), (0.5, 0.5))  # normalised (x, y), same order

DALI_DTYPES = {"float32": types.FLOAT, "float16": types.FLOAT16}


@dataclass(frozen=True, eq=False)
class Processing:
    """How a pipeline turns JPEG bytes into the images it outputs; the same for all three pipelines."""
    mean: str  # "pixel": minus mean_image, subtracted before the crop; "channel": minus rgb_mean
    mean_image: np.ndarray | None  # (256, 256, 3) float32, RGB, 0-255 (data.Stats); read for mean="pixel"
    rgb_mean: np.ndarray | None  # (3,) float32, RGB, 0-255 (data.Stats); read for mean="channel"
    gpu: bool = False  # decode on the GPU (DALI's "mixed") and run every step after it there
    dtype: str = "float32"  # of the images: "float32" | "float16" (the loader makes bfloat16 from float32)
    channels_last: bool = False  # HWC images instead of CHW
    hw_decoder_load: float | None = None  # GPU: share of a batch for the hardware JPEG decoder; None: GPU_DECODER's


def read_in_order(tars, indexes, *, shard_id, num_shards, storage):
    """JPEG bytes, int32 label and int32 split position of this rank's samples, in shard order.

    `pad_last_batch` repeats the shard's last sample to fill the final batch, so every epoch starts on a batch
    boundary; `stick_to_shard` keeps each rank on the same samples, so its epoch length never changes. On network
    storage (Lustre, GPFS, NFS) memory-mapped reads turn into page faults, each a small synchronous request:
    plain reads, as DALI recommends there (read_ahead only matters to the mmap reader; docs/HPC.md).
    """
    network = storage == "network"
    jpegs, labels, index = fn.readers.webdataset(
        name=READER, paths=tars, index_paths=indexes, ext=["jpg", "label", "pos"],
        dtypes=[types.UINT8, types.INT32, types.INT32], missing_component_behavior="error",
        shard_id=shard_id, num_shards=num_shards, stick_to_shard=True, pad_last_batch=True,
        random_shuffle=False, dont_use_mmap=network, read_ahead=network)
    return jpegs, fn.reshape(labels, shape=[]), fn.reshape(index, shape=[])


def read_source(source, reader_workers) -> augment.TrainInputs:
    """The training samples of each step and their augmentation, from `source` (see order.TrainSource): one DALI
    input per field of `augment.TrainInputs`, typed by the field and returned under its name.

    With `reader_workers`, the source runs in that many of DALI's Python worker processes (the pipeline's
    `py_num_workers`), each preparing a batch ahead, instead of in the calling thread. Either way DALI reads the
    batch arrays without copying them.
    """
    inputs = fields(augment.TrainInputs)
    # One batch is one task, and DALI keeps at most prefetch_queue_depth of them under way: at least one per worker.
    parallel = dict(parallel=True, prefetch_queue_depth=source_queue_depth(reader_workers)) if reader_workers else {}
    nodes = fn.external_source(
        source=source, num_outputs=len(inputs), batch=True, batch_info=True, no_copy=True,
        dtype=[types.to_dali_type(f.metadata["dtype"]) for f in inputs], ndim=[f.metadata["ndim"] for f in inputs],
        **parallel)
    return augment.TrainInputs(*nodes)


def source_queue_depth(reader_workers: int) -> int:
    """The batches DALI keeps under way in the source's worker processes (none without workers)."""
    return max(2, reader_workers) if reader_workers else 0


# nvJPEG settings for the GPU path, chosen for 256x256 JPEGs:
# - hw_decoder_load: the share of each batch sent to the hardware JPEG engines (A100, H100, H200); the rest is
#   decoded by CUDA kernels after Huffman decoding on the CPU threads. Small images keep the engines' per-image
#   overhead high, and a GPU rank has only a few CPU threads, so both paths are kept busy: 0.75 is the starting
#   point, `python -m bench --device=cuda --hw_decoder_load=...` measures others on the machine at hand.
# - device/host_memory_padding: nvJPEG grows its per-thread buffers to the largest image seen, and growing means a
#   synchronous cudaMalloc / pinned allocation mid-epoch. Every image here is the same size (192 KiB decoded, a
#   few hundred KiB of coefficients), so 8 MiB device and 4 MiB pinned host per thread is generous and allocated
#   once, without pinning the ~140 MB per thread DALI's full-size ImageNet example reserves.
# - preallocate_*_hint: sizes the hardware decoder's buffers for 256x256 up front, for the same reason.
# - jpeg_fancy_upsampling: the chroma upsampling libjpeg-turbo (the CPU path) uses, so both paths decode the same.
GPU_DECODER = dict(hw_decoder_load=0.75, device_memory_padding=8 << 20, host_memory_padding=4 << 20,
                   preallocate_width_hint=SIZE, preallocate_height_hint=SIZE, jpeg_fancy_upsampling=True)


def decoder_options(processing):
    if not processing.gpu:
        return {}
    if processing.hw_decoder_load is None:
        return GPU_DECODER
    return {**GPU_DECODER, "hw_decoder_load": float(processing.hw_decoder_load)}


def decode(jpegs, processing):
    """The full 256x256 image, HWC uint8 RGB."""
    return fn.decoders.image(jpegs, device="mixed" if processing.gpu else "cpu", output_type=types.RGB,
                             **decoder_options(processing))


def decode_crop(jpegs, processing, x, y):
    """Only the 224x224 window at normalised (x, y), HWC uint8 RGB: libjpeg-turbo skips the rows outside it."""
    return fn.decoders.image_crop(jpegs, device="mixed" if processing.gpu else "cpu", output_type=types.RGB,
                                  crop=(CROP, CROP), crop_pos_x=x, crop_pos_y=y, **decoder_options(processing))


def to_output(image, processing, *, mirror=0, offset=0.0, crop=False, x=0.5, y=0.5):
    """Optional crop, reflection and `image - offset` (offset per channel), cast, CHW (or HWC) layout, in one pass."""
    window = dict(crop=(CROP, CROP), crop_pos_x=x, crop_pos_y=y) if crop else {}
    return fn.crop_mirror_normalize(image, mirror=mirror, mean=offset, std=1.0, dtype=DALI_DTYPES[processing.dtype],
                                    output_layout="HWC" if processing.channels_last else "CHW", **window)


def output_labels(labels, gpu):
    labels = fn.cast(labels, dtype=types.INT64)
    return labels.gpu() if gpu else labels


def minus_mean(jpegs, processing, window=None):
    """(image, offset): the decoded image with the mean subtracted so far, and the per-channel offset that
    crop_mirror_normalize still has to subtract.

    Per-pixel mean: the whole decoded image minus the mean image, offset 0. Subtracting before the crop makes the
    mean follow the crop and the reflection by construction; on the CPU this is cheaper than decoding only the
    window and cropping the mean to it (a full float32 copy per image). Per-channel mean: the image as decoded
    (only the window at normalised (x, y) if `window` is given), offset the RGB mean.
    """
    if processing.mean == "pixel":
        mean = types.Constant(np.ascontiguousarray(processing.mean_image, dtype=np.float32), layout="HWC",
                              device="gpu" if processing.gpu else "cpu")
        return decode(jpegs, processing) - mean, 0.0
    image = decode(jpegs, processing) if window is None else decode_crop(jpegs, processing, *window)
    return image, processing.rgb_mean.tolist()


def patch(jpegs, processing, x, y, *, mirror=0, offset=None):
    """The 224x224 window at normalised (x, y), reflected if `mirror`, minus the mean; `offset` (per channel)
    replaces what `minus_mean` leaves to subtract after it (training's, with the lighting folded in: augment.py)."""
    whole = processing.mean == "pixel"  # the per-pixel mean needs the whole image; else decode only the window
    image, mean_offset = minus_mean(jpegs, processing, window=None if whole else (x, y))
    return to_output(image, processing, mirror=mirror, offset=mean_offset if offset is None else offset, crop=whole,
                     x=x, y=y)


@pipeline_def
def train(source, processing, *, reader_workers=0):
    """Random 224x224 crop (33x33 positions), reflection with p=0.5, mean subtraction, PCA lighting (augment.py)."""
    inputs = read_source(source, reader_workers)
    images = augment.apply(inputs, processing)
    return images, output_labels(inputs.labels, processing.gpu), inputs.positions


@pipeline_def
def center(tars, indexes, processing, *, shard_id, num_shards, storage="local"):
    """The central 224x224 patch, mean subtracted, no augmentation."""
    jpegs, labels, index = read_in_order(tars, indexes, shard_id=shard_id, num_shards=num_shards, storage=storage)
    images = patch(jpegs, processing, 0.5, 0.5)
    return images, output_labels(labels, processing.gpu), index


@pipeline_def
def ten_crop(tars, indexes, processing, *, shard_id, num_shards, storage="local"):
    """The four corner patches and the centre patch, then the same five reflected: [10, 3, 224, 224] per image."""
    jpegs, labels, index = read_in_order(tars, indexes, shard_id=shard_id, num_shards=num_shards, storage=storage)
    image, offset = minus_mean(jpegs, processing)
    crops = [to_output(image, processing, mirror=m, offset=offset, crop=True, x=x, y=y)
             for m in (0, 1) for x, y in _CORNERS]
    return fn.stack(*crops), output_labels(labels, processing.gpu), index
