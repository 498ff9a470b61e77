"""The three DALI pipelines: `train`, `center`, `ten_crop`, each composed of the small steps below.

All three read `.jpg`, `.label` and `.pos` from the shards and return `(images, labels, index)`: `index` is
the sample's position in its split (`.pos`), which the loaders check and hand on to map results back to files.

Pixel values are 0-255 minus the training set's mean (per pixel, the paper's "mean activity", or per channel);
there is no division by a standard deviation, as in the paper.

The same definitions run on a GPU (`device_id` = local rank; JPEG decoding `device="mixed"`, everything after it
on the GPU) and without one (`device_id=None`, every operator on the CPU). Only the device differs: the GPU
decoder is asked for libjpeg's "fancy" chroma upsampling so that both decode the same pixels up to rounding.

PCA lighting (Krizhevsky et al. 2012, section 4.1): to every pixel add `eigvec @ (alpha * eigval)`,
`alpha ~ N(0, sigma^2)` per image and per epoch. `eigval`/`eigvec` are those of the RGB covariance on the [0,1]
scale, so the shift is multiplied by 255 for our 0-255 pixels. This follows fb.resnet.torch (and most
reproductions): the eigenvalues themselves scale alpha. cuda-convnet, the paper's own code, scales by the square
root of the eigenvalues (the standard deviations along the components); that reading gives a roughly 5x stronger
shift for ImageNet's spectrum at the same sigma. We keep the widely reproduced one; `sigma=0` turns lighting off.
"""
import numpy as np
from nvidia.dali import fn, pipeline_def, types

from pipeline.data import CROP, SIZE

READER = "reader"  # the reader's name, for the loaders' epoch accounting
OFFSETS = SIZE - CROP  # 32: a crop may start at 0..32 in x and y
TEN_CROP_ORDER = ("top-left", "top-right", "bottom-left", "bottom-right", "center")  # then the same five reflected
_CORNERS = ((0.0, 0.0), (1.0, 0.0), (0.0, 1.0), (1.0, 1.0), (0.5, 0.5))  # normalised (x, y), same order

DALI_DTYPES = {"float32": types.FLOAT, "float16": types.FLOAT16}


def read(tars, indexes, *, shard_id, num_shards, shuffle, shuffle_buffer, seed, dont_use_mmap, read_ahead):
    """JPEG bytes, int32 label and int32 split position of this rank's samples.

    `pad_last_batch` repeats the shard's last sample to fill the final batch, so every epoch starts on a batch
    boundary; `stick_to_shard` keeps each rank on the same samples, so its epoch length never changes.
    """
    jpegs, labels, index = fn.readers.webdataset(
        name=READER, paths=tars, index_paths=indexes, ext=["jpg", "label", "pos"],
        dtypes=[types.UINT8, types.INT32, types.INT32], missing_component_behavior="error",
        shard_id=shard_id, num_shards=num_shards, stick_to_shard=True, pad_last_batch=True,
        random_shuffle=shuffle, initial_fill=shuffle_buffer, seed=seed,
        dont_use_mmap=dont_use_mmap, read_ahead=read_ahead)
    return jpegs, fn.reshape(labels, shape=[]), fn.reshape(index, shape=[])


def read_in_order(tars, indexes, **options):
    """`read` for evaluation: shard order, no shuffling."""
    return read(tars, indexes, shuffle=False, shuffle_buffer=1, seed=0, **options)


def random_crop_position():
    """Normalised crop anchors: x, y drawn uniformly from the 33 integer offsets 0..32 (k/32 * 32 == k exactly)."""
    positions = [k / OFFSETS for k in range(OFFSETS + 1)]
    return fn.random.uniform(values=positions), fn.random.uniform(values=positions)


def random_mirror():
    """1 with probability 0.5: reflect the crop horizontally."""
    return fn.random.coin_flip(probability=0.5, dtype=types.INT32)


# nvJPEG settings for the GPU path, chosen for 256x256 JPEGs:
# - hw_decoder_load: the share of each batch sent to the hardware JPEG engines (A100, H100, H200); the rest is
#   decoded by CUDA kernels after Huffman decoding on the CPU threads. Small images keep the engines' per-image
#   overhead high, and a GPU rank has only a few CPU threads, so both paths are kept busy: 0.75 is the starting
#   point, `python -m pipeline.speed --device=cuda` sweeps it on the machine at hand.
# - device/host_memory_padding: nvJPEG grows its per-thread buffers to the largest image seen, and growing means a
#   synchronous cudaMalloc / pinned allocation mid-epoch. Every image here is the same size (192 KiB decoded, a
#   few hundred KiB of coefficients), so 8 MiB device and 4 MiB pinned host per thread is generous and allocated
#   once, without pinning the ~140 MB per thread DALI's full-size ImageNet example reserves.
# - preallocate_*_hint: sizes the hardware decoder's buffers for 256x256 up front, for the same reason.
# - jpeg_fancy_upsampling: the chroma upsampling libjpeg-turbo (the CPU path) uses, so both paths decode the same.
GPU_DECODER = dict(hw_decoder_load=0.75, device_memory_padding=8 << 20, host_memory_padding=4 << 20,
                   preallocate_width_hint=SIZE, preallocate_height_hint=SIZE, jpeg_fancy_upsampling=True)


def decode(jpegs, gpu):
    """The full 256x256 image, HWC uint8 RGB."""
    extra = GPU_DECODER if gpu else {}
    return fn.decoders.image(jpegs, device="mixed" if gpu else "cpu", output_type=types.RGB, **extra)


def decode_crop(jpegs, gpu, x, y):
    """Only the 224x224 window at normalised (x, y), HWC uint8 RGB: libjpeg-turbo skips the rows outside it."""
    extra = GPU_DECODER if gpu else {}
    return fn.decoders.image_crop(jpegs, device="mixed" if gpu else "cpu", output_type=types.RGB,
                                  crop=(CROP, CROP), crop_pos_x=x, crop_pos_y=y, **extra)


def lighting_shift(sigma, eigval, eigvec):
    """Per-image RGB shift, 0-255 scale: eigvec @ (alpha * eigval) * 255, alpha ~ N(0, sigma^2) (CPU, shape (3,))."""
    alpha = fn.random.normal(shape=[3], stddev=float(sigma))
    weights = [alpha[j] * float(eigval[j] * 255) for j in range(3)]
    return sum(w * types.Constant(eigvec[:, j].astype(np.float32)) for j, w in enumerate(weights))


def to_output(image, *, mirror=0, offset=0.0, crop=None, x=0.5, y=0.5, dtype="float32", channels_last=False):
    """Optional crop, reflection and `image - offset` (offset per channel), cast, CHW (or HWC) layout, in one pass."""
    window = dict(crop=(CROP, CROP), crop_pos_x=x, crop_pos_y=y) if crop else {}
    return fn.crop_mirror_normalize(image, mirror=mirror, mean=offset, std=1.0, dtype=DALI_DTYPES[dtype],
                                    output_layout="HWC" if channels_last else "CHW", **window)


def output_labels(labels, gpu):
    labels = fn.cast(labels, dtype=types.INT64)
    return labels.gpu() if gpu else labels


def patch(jpegs, gpu, x, y, *, mirror=0, shift=None, mean, mean_image, rgb_mean, dtype, channels_last):
    """The 224x224 window at normalised (x, y), reflected if `mirror`, minus the mean, plus `shift`: the output.

    Per-pixel mean: the whole image is decoded and the mean image subtracted before the crop, so the mean is
    cropped and reflected together with the image by construction. On the CPU this is cheaper than decoding only
    the window and cropping the mean to it (a full float32 copy per image, see pipeline/README.md).
    Per-channel mean: only the window is decoded, and the one crop_mirror_normalize pass subtracts the mean.
    """
    if mean == "pixel":
        image = decode(jpegs, gpu) - constant_image(mean_image, gpu)
        offset = 0.0 if shift is None else -shift
        return to_output(image, mirror=mirror, offset=offset, crop=True, x=x, y=y, dtype=dtype,
                         channels_last=channels_last)
    image = decode_crop(jpegs, gpu, x, y)
    offset = rgb_mean.tolist() if shift is None else types.Constant(rgb_mean.astype(np.float32)) - shift
    return to_output(image, mirror=mirror, offset=offset, dtype=dtype, channels_last=channels_last)


@pipeline_def
def train(tars, indexes, *, shard_id, num_shards, mean_image, rgb_mean, eigval, eigvec, lighting=0.1,
          mean="pixel", shuffle_buffer=4096, reader_seed=0, dont_use_mmap=False, read_ahead=False,
          gpu=False, dtype="float32", channels_last=False):
    """Random 224x224 crop (33x33 positions), reflection with p=0.5, mean subtraction, PCA lighting."""
    jpegs, labels, index = read(tars, indexes, shard_id=shard_id, num_shards=num_shards, shuffle=True,
                                shuffle_buffer=shuffle_buffer, seed=reader_seed, dont_use_mmap=dont_use_mmap,
                                read_ahead=read_ahead)
    x, y = random_crop_position()
    shift = lighting_shift(lighting, eigval, eigvec) if lighting > 0 else None
    images = patch(jpegs, gpu, x, y, mirror=random_mirror(), shift=shift, mean=mean, mean_image=mean_image,
                   rgb_mean=rgb_mean, dtype=dtype, channels_last=channels_last)
    return images, output_labels(labels, gpu), index


@pipeline_def
def center(tars, indexes, *, shard_id, num_shards, mean_image, rgb_mean, mean="pixel", dont_use_mmap=False,
           read_ahead=False, gpu=False, dtype="float32", channels_last=False):
    """The central 224x224 patch, mean subtracted, no augmentation."""
    jpegs, labels, index = read_in_order(tars, indexes, shard_id=shard_id, num_shards=num_shards,
                                         dont_use_mmap=dont_use_mmap, read_ahead=read_ahead)
    images = patch(jpegs, gpu, 0.5, 0.5, mean=mean, mean_image=mean_image, rgb_mean=rgb_mean, dtype=dtype,
                   channels_last=channels_last)
    return images, output_labels(labels, gpu), index


@pipeline_def
def ten_crop(tars, indexes, *, shard_id, num_shards, mean_image, rgb_mean, mean="pixel", dont_use_mmap=False,
             read_ahead=False, gpu=False, dtype="float32", channels_last=False):
    """The four corner patches and the centre patch, then the same five reflected: [10, 3, 224, 224] per image."""
    jpegs, labels, index = read_in_order(tars, indexes, shard_id=shard_id, num_shards=num_shards,
                                         dont_use_mmap=dont_use_mmap, read_ahead=read_ahead)
    image = decode(jpegs, gpu)
    if mean == "pixel":
        image, offset = image - constant_image(mean_image, gpu), 0.0
    else:
        offset = rgb_mean.tolist()
    crops = [to_output(image, mirror=m, offset=offset, crop=True, x=x, y=y, dtype=dtype, channels_last=channels_last)
             for m in (0, 1) for x, y in _CORNERS]
    return fn.stack(*crops), output_labels(labels, gpu), index


def constant_image(mean_image, gpu):
    """The 256x256 per-pixel mean as a constant HWC float tensor, on the pipeline's device."""
    return types.Constant(np.ascontiguousarray(mean_image, dtype=np.float32), layout="HWC",
                          device="gpu" if gpu else "cpu")
