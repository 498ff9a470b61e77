"""The three DALI pipelines: `train`, `center`, `ten_crop`, each composed of the small steps below.

All three return `(images, labels, index)`: `index` is the sample's position in its split (its `.pos` member),
which the loaders check and hand on to map results back to files.
- `train` takes its samples from an external source (`order.TrainSource`): a fresh global permutation every
  epoch, read sample by sample through the shard indexes, with each sample's crop, reflection and lighting
  already drawn (in numpy, from (seed, epoch, step) alone). This pipeline decodes and applies them.
- `center` and `ten_crop` read the shards in order with DALI's webdataset reader.

Pixel values are 0-255 minus the training set's mean (per pixel, the paper's "mean activity", or per channel);
there is no division by a standard deviation, as in the paper.

The same definitions run on a GPU (`device_id` = local rank; JPEG decoding `device="mixed"`, everything after it
on the GPU) and without one (`device_id=None`, every operator on the CPU). Only the device differs: the GPU
decoder is asked for libjpeg's "fancy" chroma upsampling so that both decode the same pixels up to rounding.
"""
import numpy as np
from nvidia.dali import fn, pipeline_def, types

from pipeline.data import CROP, SIZE

READER = "reader"  # the evaluation reader's name, for the loaders' epoch accounting
TEN_CROP_ORDER = ("top-left", "top-right", "bottom-left", "bottom-right", "center")  # then the same five reflected
_CORNERS = ((0.0, 0.0), (1.0, 0.0), (0.0, 1.0), (1.0, 1.0), (0.5, 0.5))  # normalised (x, y), same order

DALI_DTYPES = {"float32": types.FLOAT, "float16": types.FLOAT16}
# What order.TrainSource returns per sample: JPEG bytes (padded), JPEG size, label, position, crop (x, y),
# mirror, offset (RGB).
SOURCE_TYPES = [types.UINT8, types.INT32, types.INT32, types.INT32, types.FLOAT, types.INT32, types.FLOAT]
SOURCE_NDIM = [1, 1, 0, 0, 1, 0, 1]


def read_in_order(tars, indexes, *, shard_id, num_shards, dont_use_mmap, read_ahead):
    """JPEG bytes, int32 label and int32 split position of this rank's samples, in shard order.

    `pad_last_batch` repeats the shard's last sample to fill the final batch, so every epoch starts on a batch
    boundary; `stick_to_shard` keeps each rank on the same samples, so its epoch length never changes.
    """
    jpegs, labels, index = fn.readers.webdataset(
        name=READER, paths=tars, index_paths=indexes, ext=["jpg", "label", "pos"],
        dtypes=[types.UINT8, types.INT32, types.INT32], missing_component_behavior="error",
        shard_id=shard_id, num_shards=num_shards, stick_to_shard=True, pad_last_batch=True,
        random_shuffle=False, dont_use_mmap=dont_use_mmap, read_ahead=read_ahead)
    return jpegs, fn.reshape(labels, shape=[]), fn.reshape(index, shape=[])


def read_source(source, reader_workers):
    """The training samples of each step and their augmentation, from `source` (see order.TrainSource).

    With `reader_workers`, the source runs in that many of DALI's Python worker processes (the pipeline's
    `py_num_workers`), each preparing a batch ahead, instead of in the calling thread. Either way DALI reads the
    batch arrays without copying them.
    """
    # One batch is one task, and DALI keeps at most prefetch_queue_depth of them under way: at least one per worker.
    parallel = dict(parallel=True, prefetch_queue_depth=max(2, reader_workers)) if reader_workers else {}
    rows, size, labels, index, crop, mirror, offset = fn.external_source(
        source=source, num_outputs=len(SOURCE_TYPES), batch=True, batch_info=True, dtype=SOURCE_TYPES,
        ndim=SOURCE_NDIM, no_copy=True, **parallel)
    jpegs = fn.slice(rows, start=[0], shape=size, axes=[0])  # each row holds more than its JPEG: cut it to size
    return jpegs, labels, index, crop[0], crop[1], mirror, offset


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


def decoder_options(gpu, hw_decoder_load):
    if not gpu:
        return {}
    return GPU_DECODER if hw_decoder_load is None else {**GPU_DECODER, "hw_decoder_load": float(hw_decoder_load)}


def decode(jpegs, gpu, hw_decoder_load=None):
    """The full 256x256 image, HWC uint8 RGB."""
    return fn.decoders.image(jpegs, device="mixed" if gpu else "cpu", output_type=types.RGB,
                             **decoder_options(gpu, hw_decoder_load))


def decode_crop(jpegs, gpu, x, y, hw_decoder_load=None):
    """Only the 224x224 window at normalised (x, y), HWC uint8 RGB: libjpeg-turbo skips the rows outside it."""
    return fn.decoders.image_crop(jpegs, device="mixed" if gpu else "cpu", output_type=types.RGB,
                                  crop=(CROP, CROP), crop_pos_x=x, crop_pos_y=y,
                                  **decoder_options(gpu, hw_decoder_load))


def to_output(image, *, mirror=0, offset=0.0, crop=None, x=0.5, y=0.5, dtype="float32", channels_last=False):
    """Optional crop, reflection and `image - offset` (offset per channel), cast, CHW (or HWC) layout, in one pass."""
    window = dict(crop=(CROP, CROP), crop_pos_x=x, crop_pos_y=y) if crop else {}
    return fn.crop_mirror_normalize(image, mirror=mirror, mean=offset, std=1.0, dtype=DALI_DTYPES[dtype],
                                    output_layout="HWC" if channels_last else "CHW", **window)


def output_labels(labels, gpu):
    labels = fn.cast(labels, dtype=types.INT64)
    return labels.gpu() if gpu else labels


def minus_mean_image(jpegs, gpu, mean_image, hw_decoder_load=None):
    """The whole decoded image minus the per-pixel mean image, float32 HWC.

    Subtracting before the crop makes the mean follow the crop and the reflection by construction. On the CPU
    this is cheaper than decoding only the window and cropping the mean to it (a full float32 copy per image).
    """
    mean = types.Constant(np.ascontiguousarray(mean_image, dtype=np.float32), layout="HWC",
                          device="gpu" if gpu else "cpu")
    return decode(jpegs, gpu, hw_decoder_load) - mean


def patch(jpegs, gpu, x, y, *, mirror=0, offset=None, mean, mean_image, rgb_mean, dtype, channels_last,
          hw_decoder_load=None):
    """The 224x224 window at normalised (x, y), reflected if `mirror`, minus the mean and `offset`.

    Per-pixel mean: the whole image minus the mean image, then one crop_mirror_normalize pass subtracts `offset`
    (default 0). Per-channel mean: only the window is decoded, and crop_mirror_normalize subtracts `offset`
    (default: the RGB mean).
    """
    if mean == "pixel":
        image = minus_mean_image(jpegs, gpu, mean_image, hw_decoder_load)
        return to_output(image, mirror=mirror, offset=0.0 if offset is None else offset, crop=True, x=x, y=y,
                         dtype=dtype, channels_last=channels_last)
    image = decode_crop(jpegs, gpu, x, y, hw_decoder_load)
    return to_output(image, mirror=mirror, offset=rgb_mean.tolist() if offset is None else offset, dtype=dtype,
                     channels_last=channels_last)


@pipeline_def
def train(source, *, mean_image, mean="pixel", reader_workers=0, gpu=False, dtype="float32", channels_last=False,
          hw_decoder_load=None):
    """Random 224x224 crop (33x33 positions), reflection with p=0.5, mean subtraction, PCA lighting.

    The source draws each sample's crop position, reflection and lighting; `offset` is the per-channel value
    subtracted after the (per-pixel) mean: minus the lighting shift, or the RGB mean minus it.
    """
    jpegs, labels, index, x, y, mirror, offset = read_source(source, reader_workers)
    images = patch(jpegs, gpu, x, y, mirror=mirror, offset=offset, mean=mean, mean_image=mean_image,
                   rgb_mean=None, dtype=dtype, channels_last=channels_last, hw_decoder_load=hw_decoder_load)
    return images, output_labels(labels, gpu), index


@pipeline_def
def center(tars, indexes, *, shard_id, num_shards, mean_image, rgb_mean, mean="pixel", dont_use_mmap=False,
           read_ahead=False, gpu=False, dtype="float32", channels_last=False, hw_decoder_load=None):
    """The central 224x224 patch, mean subtracted, no augmentation."""
    jpegs, labels, index = read_in_order(tars, indexes, shard_id=shard_id, num_shards=num_shards,
                                         dont_use_mmap=dont_use_mmap, read_ahead=read_ahead)
    images = patch(jpegs, gpu, 0.5, 0.5, mean=mean, mean_image=mean_image, rgb_mean=rgb_mean, dtype=dtype,
                   channels_last=channels_last, hw_decoder_load=hw_decoder_load)
    return images, output_labels(labels, gpu), index


@pipeline_def
def ten_crop(tars, indexes, *, shard_id, num_shards, mean_image, rgb_mean, mean="pixel", dont_use_mmap=False,
             read_ahead=False, gpu=False, dtype="float32", channels_last=False, hw_decoder_load=None):
    """The four corner patches and the centre patch, then the same five reflected: [10, 3, 224, 224] per image."""
    jpegs, labels, index = read_in_order(tars, indexes, shard_id=shard_id, num_shards=num_shards,
                                         dont_use_mmap=dont_use_mmap, read_ahead=read_ahead)
    if mean == "pixel":
        image, offset = minus_mean_image(jpegs, gpu, mean_image, hw_decoder_load), 0.0
    else:
        image, offset = decode(jpegs, gpu, hw_decoder_load), rgb_mean.tolist()
    crops = [to_output(image, mirror=m, offset=offset, crop=True, x=x, y=y, dtype=dtype, channels_last=channels_last)
             for m in (0, 1) for x, y in _CORNERS]
    return fn.stack(*crops), output_labels(labels, gpu), index
