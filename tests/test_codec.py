"""PXZ, the default shard image codec: lossless on every shape, strip boundary and channel count; malformed bytes
raise a named error, never a crash or a silent wrong image; decode_image reads it."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from segda import codec
from segda.data.transforms import DecodeError, decode_image


@pytest.mark.parametrize("shape", [(1, 1, 3), (127, 5, 3), (128, 64, 3), (129, 64, 3), (300, 257, 3), (70, 33)])
def test_round_trip_is_exact(shape):
    image = np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8)
    decoded = codec.decode(codec.encode(image))
    assert decoded.shape == (shape[0], shape[1], shape[2] if len(shape) == 3 else 1)
    np.testing.assert_array_equal(decoded.reshape(image.shape), image)


@pytest.mark.parametrize("filter", [codec.NONE, codec.UP, codec.COLOUR_UP])
def test_every_filter_and_strip_height_round_trips(filter):
    image = np.random.default_rng(filter).integers(0, 256, (45, 31, 3), dtype=np.uint8)
    for rows in (1, 7, 45, 1000):
        np.testing.assert_array_equal(codec.decode(codec.encode(image, filter=filter, strip_rows=rows)), image)


def test_smooth_images_shrink_like_png():
    """A photograph-like gradient with noise: the filters must make PXZ about PNG's size, not raw pixels' size."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:256, 0:384]
    image = np.stack([(x / 2 + y / 3) % 256, (y / 1.5) % 256, (x / 3 + 60) % 256], -1)
    image = np.clip(image + rng.normal(0, 2, image.shape), 0, 255).astype(np.uint8)
    pxz, png = len(codec.encode(image)), len(cv2.imencode(".png", image)[1])
    assert pxz < 1.35 * png and pxz < 0.6 * image.nbytes, (pxz, png)


def test_malformed_bytes_raise_a_named_error():
    blob = codec.encode(np.random.default_rng(1).integers(0, 256, (300, 40, 3), dtype=np.uint8))
    head = 4 + codec._HEAD.size
    broken = {
        "truncated": blob[:-10],
        "header only": blob[:head],
        "not pxz": b"PNG!" + blob[4:],
        "inconsistent header": blob[:4] + bytes(codec._HEAD.size) + blob[head:],
        "corrupt strip": blob[:head + 12] + bytes(64) + blob[head + 76:],
        "too many pixels": blob[:4] + codec._HEAD.pack(1 << 16, 1 << 16, 3, 2, 128, 512) + blob[head:],
        "zero height": blob[:4] + codec._HEAD.pack(0, 40, 3, 2, 128, 0) + blob[head:],
        "two channels": blob[:4] + codec._HEAD.pack(300, 40, 2, 1, 128, 3) + blob[head:],
        "huge strips": blob[:4] + codec._HEAD.pack(1, 40, 3, 2, 65535, 1) + blob[head:],
    }
    for what, data in broken.items():
        with pytest.raises(codec.PxzError):
            codec.decode(data)
        if what != "not pxz":
            with pytest.raises(DecodeError):
                decode_image(data)


def test_a_header_promising_too_many_pixels_or_a_strip_holding_more_rows_is_refused():
    import struct

    huge = codec.MAGIC + codec._HEAD.pack(65536, 65536, 3, 2, 65535, 2) + struct.pack("<2I", 1, 1) + b"xx"
    with pytest.raises(codec.PxzError, match="inconsistent"):
        codec.decode(huge)
    image = np.random.default_rng(3).integers(0, 256, (256, 8, 3), dtype=np.uint8)
    blob = codec.encode(image, strip_rows=256)  # one strip of 256 rows, relabelled as 128 rows
    head = 4 + codec._HEAD.size
    lying = blob[:4] + codec._HEAD.pack(128, 8, 3, 2, 128, 1) + blob[head:]
    with pytest.raises(codec.PxzError, match="rows its header promises"):
        codec.decode(lying)


def test_encode_refuses_what_decode_would_refuse():
    for image in (np.zeros((4, 4, 2), np.uint8), np.zeros((0, 4, 3), np.uint8)):
        with pytest.raises(codec.PxzError):
            codec.encode(image)


def test_decode_image_reads_pxz_and_png_alike():
    image = np.random.default_rng(2).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    png = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))[1].tobytes()
    np.testing.assert_array_equal(decode_image(codec.encode(image)), decode_image(png))
    grey = image[..., 0].copy()
    np.testing.assert_array_equal(decode_image(codec.encode(grey)), np.repeat(grey[..., None], 3, -1))
