"""Decoding and joint image/label augmentation for segmentation, on uint8 numpy arrays.

The training path is crop-first: the random rescale and the random crop are one `cv2.warpAffine` that produces
only the crop, ~5x cheaper than resizing the whole 2-megapixel frame and then cropping, with the same result
(the same half-pixel-centre mapping as `cv2.resize`). Images stay uint8; normalisation happens on the device.
"""

from __future__ import annotations

import contextlib
import io

import cv2
import numpy as np

from segda import codec
from segda.classes import IGNORE

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
"""ImageNet statistics, as SegFormer's image processor uses (on 0..1 pixel values)."""


class DecodeError(Exception):
    """A member of a sample could not be decoded; the message says which."""


MAX_IMAGE_PIXELS = 64 << 20
"""No image or label larger than this (67 megapixels; a Cityscapes frame has 2) is decoded: its header is read
first, so a small file declaring a huge image costs nothing (segda's one image policy: `image_size`)."""


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) of encoded image bytes as segda shows them, upright: EXIF orientation applied (a JPEG
    whose camera was turned is stored sideways with a tag saying so; OpenCV's decoder and segda's creator turn it).
    Read from the header alone; DecodeError for bytes that are no image or an image over MAX_IMAGE_PIXELS."""
    from PIL import Image, UnidentifiedImageError

    if codec.is_pxz(data):
        try:
            width, height = codec.size(data)
        except codec.PxzError as err:
            raise DecodeError(str(err)) from None
    else:
        try:
            with _unlimited_header(), Image.open(io.BytesIO(data)) as im:  # the size limit is ours, below
                (width, height), turned = im.size, exif_orientation(im) in (5, 6, 7, 8)
        except (UnidentifiedImageError, OSError, ValueError) as err:
            raise DecodeError(f"not a readable image ({type(err).__name__})") from None
        if turned:
            width, height = height, width
    if width * height > MAX_IMAGE_PIXELS:
        raise DecodeError(f"image of {width}x{height} pixels: more than the {MAX_IMAGE_PIXELS >> 20} megapixels segda "
                          "decodes")
    return width, height


@contextlib.contextmanager
def _unlimited_header():
    """PIL refuses to even name the size of a header over its own limit; segda reads the size and applies its own."""
    from PIL import Image

    limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def exif_orientation(im) -> int:
    """The EXIF orientation tag (1-8; 1: upright) of an open PIL image, 1 when it has none."""
    try:
        value = im.getexif().get(0x0112, 1)
    except Exception:  # a broken EXIF block is no orientation
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def upright(pixels: np.ndarray, orientation: int) -> np.ndarray:
    """Pixels decoded as stored, turned as their EXIF orientation (1-8) says they are to be seen."""
    ops = {2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
           5: lambda a: a.swapaxes(0, 1), 6: lambda a: a.swapaxes(0, 1)[:, ::-1],
           7: lambda a: a.swapaxes(0, 1)[::-1, ::-1], 8: lambda a: a.swapaxes(0, 1)[::-1]}
    return np.ascontiguousarray(ops[orientation](pixels)) if orientation in ops else pixels


def decode_image(data: bytes) -> np.ndarray:
    """Encoded PXZ/PNG/JPEG/WebP/BMP bytes -> (H, W, 3) RGB uint8, upright (EXIF applied), size checked first."""
    image_size(data)
    if codec.is_pxz(data):
        try:
            pixels = codec.decode(data)
        except codec.PxzError as err:
            raise DecodeError(str(err)) from None
        return pixels if pixels.shape[2] == 3 else cv2.cvtColor(pixels, cv2.COLOR_GRAY2RGB)
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise DecodeError("image bytes could not be decoded")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def decode_label(data: bytes) -> np.ndarray:
    """Single-channel train-id PNG -> (H, W) uint8, read as raw indices (never through an RGB decoder)."""
    image_size(data)
    label = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if label is None:
        raise DecodeError("label bytes could not be decoded")
    if label.ndim != 2 or label.dtype != np.uint8:
        raise DecodeError(f"label must be a single-channel uint8 PNG, got shape {label.shape} {label.dtype}")
    return label


def rescale_factor(height: int, width: int, base_size, ratio: float) -> float:
    """mmseg's keep-ratio Resize: fit the frame into base_size x ratio (long side to long, short to short)."""
    target_long, target_short = max(base_size) * ratio, min(base_size) * ratio
    return min(target_long / max(height, width), target_short / min(height, width))


def warp_crop(array: np.ndarray, scale: float, x0: int, y0: int, out_w: int, out_h: int, nearest: bool,
              border) -> np.ndarray:
    """The (out_h, out_w) window at (x0, y0) of `array` resized by `scale`, without resizing the whole frame.
    Pixel centres map as cv2.resize maps them: dst = scale * (src + 0.5) - 0.5. Nearest (labels) picks source
    pixel floor((dst + 0.5) / scale) exactly, in numpy: OpenCV's fixed-point nearest warp rounds such ties
    differently from one version to the next."""
    if nearest:
        rows = np.floor((np.arange(out_h) + y0 + 0.5) / scale).astype(np.int64)
        cols = np.floor((np.arange(out_w) + x0 + 0.5) / scale).astype(np.int64)
        out = np.full((out_h, out_w) + array.shape[2:], border, array.dtype)
        r_ok, c_ok = (rows >= 0) & (rows < array.shape[0]), (cols >= 0) & (cols < array.shape[1])
        out[np.ix_(r_ok, c_ok)] = array[np.ix_(rows[r_ok], cols[c_ok])]
        return out
    shift = 0.5 * scale - 0.5
    matrix = np.array([[scale, 0, shift - x0], [0, scale, shift - y0]], dtype=np.float64)
    return cv2.warpAffine(array, matrix, (out_w, out_h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                          borderValue=border)


RARE_CLASS_CROP_SHARE = 0.0057
"""A rare-class draw's crop is retried until the class covers this share of it (DAFormer: 1,500 px of 512x512)."""


def random_scale_crop(image: np.ndarray, label: np.ndarray, rng: np.random.Generator, base_size, scale_range,
                      crop_wh, cat_max_ratio: float, want: int | None = None
                      ) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """Random rescale + random crop (+ mmseg's cat_max_ratio retries, and for a rare-class draw, retries until
    class `want` covers RARE_CLASS_CROP_SHARE of the crop), padded to crop_wh (width, height) with 0 / IGNORE.
    Returns (image, label, (rows, columns) of the crop that hold the frame: the padding is below and right)."""
    height, width = label.shape
    scale = rescale_factor(height, width, base_size, rng.uniform(*scale_range))
    new_h, new_w = int(height * scale + 0.5), int(width * scale + 0.5)
    crop_w, crop_h = crop_wh
    out_h, out_w = min(crop_h, new_h), min(crop_w, new_w)
    for _ in range(10):
        y0 = int(rng.integers(0, new_h - out_h + 1))
        x0 = int(rng.integers(0, new_w - out_w + 1))
        label_crop = warp_crop(label, scale, x0, y0, out_w, out_h, True, IGNORE)
        holds = want is None or np.count_nonzero(label_crop == want) >= RARE_CLASS_CROP_SHARE * crop_w * crop_h
        if holds and (cat_max_ratio >= 1.0 or _class_balance_ok(label_crop, cat_max_ratio)):
            break
    image_crop = warp_crop(image, scale, x0, y0, out_w, out_h, False, (0, 0, 0))
    if (out_h, out_w) != (crop_h, crop_w):
        image_crop = _pad(image_crop, crop_h, crop_w, 0)
        label_crop = _pad(label_crop, crop_h, crop_w, IGNORE)
    return image_crop, label_crop, (out_h, out_w)


def _class_balance_ok(label: np.ndarray, cat_max_ratio: float) -> bool:
    counts = np.bincount(label.ravel(), minlength=256)[:IGNORE]
    counts = counts[counts > 0]
    return len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio


def _pad(array: np.ndarray, height: int, width: int, value: int) -> np.ndarray:
    pad = [(0, height - array.shape[0]), (0, width - array.shape[1])] + [(0, 0)] * (array.ndim - 2)
    return np.pad(array, pad, constant_values=value)


def random_flip(image: np.ndarray, label: np.ndarray, rng: np.random.Generator
                ) -> tuple[np.ndarray, np.ndarray, bool]:
    """Horizontal flip with probability 0.5; the third value says whether it happened."""
    if rng.random() < 0.5:
        return np.ascontiguousarray(image[:, ::-1]), np.ascontiguousarray(label[:, ::-1]), True
    return image, label, False


def photometric_distortion(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """mmseg's PhotoMetricDistortion: brightness, contrast (before or after), saturation, hue; each with p=0.5."""
    img = image.astype(np.float32)
    if rng.random() < 0.5:
        img += rng.uniform(-32, 32)
    contrast_first = rng.random() < 0.5
    if contrast_first and rng.random() < 0.5:
        img *= rng.uniform(0.5, 1.5)
    img = np.clip(img, 0, 255).astype(np.uint8)
    do_sat, do_hue = rng.random() < 0.5, rng.random() < 0.5
    if do_sat or do_hue:
        hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)  # uint8: hue in 0..179
        if do_sat:
            hsv[..., 1] = np.clip(hsv[..., 1] * rng.uniform(0.5, 1.5), 0, 255).astype(np.uint8)
        if do_hue:
            hsv[..., 0] = ((hsv[..., 0].astype(np.int16) + int(rng.integers(-18, 19))) % 180).astype(np.uint8)
        img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    if not contrast_first and rng.random() < 0.5:
        img = np.clip(img.astype(np.float32) * rng.uniform(0.5, 1.5), 0, 255).astype(np.uint8)
    return img


def resize_image(image: np.ndarray, size_wh) -> np.ndarray:
    """Resize an RGB frame to (width, height) for whole-image inference (labels are never resized)."""
    if (image.shape[1], image.shape[0]) == tuple(size_wh):
        return image
    return cv2.resize(image, tuple(size_wh), interpolation=cv2.INTER_LINEAR)
