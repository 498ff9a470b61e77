"""One source image -> the 256x256 RGB JPEG of a sample (the paper's preprocessing), detected by content.

`prepare(data)` resizes the shorter side to SIZE and keeps the central SIZE x SIZE patch, resampling only that
box (`resize(box=...)`) with the geometry of the straightforward way (resize the whole image, then crop): the crop
offset is an integer pixel count in the resized image. The two agree in geometry and in quality, not pixel for
pixel: Pillow resamples in two 8-bit passes, rounding and clipping in between, and orders the passes by the shape of
what it resizes, so a whole portrait image is resampled in the other order than its central box. On the 1000 real
sample images 96% of the pixels are equal and most others differ by 1 level; landscape images differ by at most 2,
at sharp edges in portrait images up to 30. Both are equally close to an exact float64 LANCZOS of the geometry
(56.3 dB PSNR; tests/test_shards_robust.py checks it).

Every image is decoded at full size. libjpeg's reduced-size (DCT-domain) decoding would skip work only where the
shorter side is at least twice the output's, and ImageNet's median shorter side is about 375 px: on the 1000 real
images it would speed the whole build up by at most 3% and cost up to 0.09 dB, so it is not used.
"""
import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from shardformat import SIZE

ORIENTATION_TAG = 0x0112  # EXIF Orientation

# ImageNet's largest images are far below this; a file claiming more is rejected rather than decoded.
Image.MAX_IMAGE_PIXELS = 200_000_000


MODE_NAMES = {"L": "greyscale", "1": "bilevel", "P": "palette", "LA": "greyscale+alpha", "RGBA": "RGB+alpha"}


class Rejected(Exception):
    """This input cannot become a sample; the message is the reason listed in the manifest."""


def crop_geometry(width: int, height: int,
                  size: int = SIZE) -> tuple[tuple[int, int], tuple[float, float, float, float]]:
    """Resized size (shorter side = size) and the central size x size box of it, in source coordinates.

    The box is what resize-then-crop keeps: integer offsets in the resized image, mapped back to the source.
    """
    short = min(width, height)
    resized = (max(size, round(width * size / short)), max(size, round(height * size / short)))
    left, top = (resized[0] - size) // 2, (resized[1] - size) // 2
    sx, sy = width / resized[0], height / resized[1]
    return resized, (left * sx, top * sy, (left + size) * sx, (top + size) * sy)


def open_image(data: bytes) -> Image.Image:
    if not data:
        raise Rejected("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise Rejected(f"not an image (unrecognised content, starts {data[:8].hex()})") from None
    except Image.DecompressionBombError as e:
        raise Rejected(f"too large: {e}") from None
    except Exception as e:  # noqa: BLE001 - a corrupt header can raise almost anything inside a plugin
        raise Rejected(f"unreadable header: {type(e).__name__}: {e}") from None


def to_rgb(im: Image.Image, converted: list[str]) -> Image.Image:
    """Any decoded mode -> RGB, noting what was not already RGB (CMYK, greyscale, palette, alpha, 16-bit)."""
    if im.mode == "RGB":
        return im
    converted.append(f"{MODE_NAMES.get(im.mode, im.mode)}->RGB")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        # Transparent areas become white, as a browser shows them on a page, not the undefined colour under alpha.
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if im.mode.startswith("I;16") or im.mode in ("I", "F"):
        array = np.asarray(im.convert("I") if im.mode.startswith("I;16") else im, dtype=np.float64)
        eight_bit = np.clip(array / 256 if array.max() > 255 else array, 0, 255).astype(np.uint8)
        return Image.fromarray(eight_bit).convert("RGB")
    return im.convert("RGB")


def decode(data: bytes, size: int = SIZE) -> tuple[Image.Image, tuple, list[str]]:
    """Decode `data` (upright, RGB); returns the image, the crop box in its coordinates and the conversions made."""
    converted: list[str] = []
    im = open_image(data)
    try:
        if im.format != "JPEG":
            converted.append(f"{im.format}->JPEG")
        orientation = im.getexif().get(ORIENTATION_TAG, 1) if im.format in ("JPEG", "PNG", "WEBP", "TIFF") else 1
        full = (im.size[1], im.size[0]) if orientation in (5, 6, 7, 8) else im.size
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            im.load()
    except Rejected:
        raise
    except Exception as e:  # noqa: BLE001 - truncated or corrupt data: reject this file, never stop the build
        raise Rejected(f"cannot decode: {type(e).__name__}: {e}") from None
    if orientation in range(2, 9):
        im = ImageOps.exif_transpose(im)
        converted.append(f"EXIF orientation {orientation} applied")
    try:
        im = to_rgb(im, converted)
    except Exception as e:  # noqa: BLE001
        raise Rejected(f"cannot convert {im.mode} to RGB: {type(e).__name__}: {e}") from None
    _, box = crop_geometry(*full, size)
    return im, box, converted


def prepare(data: bytes, quality: int = 90, size: int = SIZE) -> tuple[bytes, list[str]]:
    """Source bytes -> (JPEG bytes of the size x size RGB patch, conversions made).

    Raises Rejected with the reason when the content cannot be decoded. Only the central box is resampled
    (`resize(box=...)`): the geometry of resizing the whole image and cropping afterwards, at a fraction of the
    work (see the module docstring for how the pixels differ).
    """
    im, box, converted = decode(data, size)
    patch = im.resize((size, size), Image.Resampling.LANCZOS, box=box)
    return encode(patch, quality), converted


def decoded_pixels(jpeg: bytes) -> np.ndarray:
    """The uint8 (height, width, 3) RGB pixels a reader gets from `jpeg`: libjpeg-turbo's decode, as DALI's CPU
    decoder does it. The statistics are summed from these, not from the pixels before encoding, because 4:2:0
    chroma subsampling and quantisation change them (the colour variance most): the pipelines subtract the mean
    from decoded pixels."""
    with Image.open(io.BytesIO(jpeg)) as im:
        return np.asarray(im)  # RGB: what `encode` writes


def encode(patch: Image.Image, quality: int) -> bytes:
    out = io.BytesIO()
    # Baseline (not progressive), 4:2:0, no metadata: what every JPEG decoder, DALI's nvJPEG included, handles fastest.
    patch.save(out, format="JPEG", quality=quality, optimize=False, progressive=False)
    return out.getvalue()
