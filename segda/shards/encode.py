"""Turn one raw (image, label) pair into shard members, or say precisely why it cannot be used.

Runs in the creator's worker processes. The image is stored as PXZ by default (`segda.codec`: lossless, about
PNG's size, ~8x faster to decode), or keeps its original bytes (`keep`), or is re-encoded in another format; the
label is remapped from
label ids to train ids with a 256-entry lookup table (`cv2.LUT`, ~5x faster than numpy indexing) and stored as a
single-channel PNG.
"""

from __future__ import annotations

import io
import json
import os
import stat
from dataclasses import dataclass, field

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from segda import codec
from segda.classes import IGNORE, MAX_LABEL_ID, NUM_CLASSES, label_id_lut, synthia_lut
from segda.colourstats import frame_stats
from segda.data.transforms import DecodeError, exif_orientation, image_size, upright
from segda.shards.layouts import RawSample

IMAGE_FORMATS = ("pxz", "keep", "png", "bmp", "jpg", "webp")
_LUT = label_id_lut()
# Labels are flat regions: without PNG's row filters they encode ~4x and decode ~2x faster, for ~15 KB more per
# 2-megapixel label (beside a ~3 MB frame). The label is re-encoded anyway, so this cost is the creator's floor.
_LABEL_PNG = [cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_NONE]


class BadSample(Exception):
    """The sample cannot be used; the message says why (it goes into the report and the manifest)."""

    def __init__(self, reason: str, which: str = "image"):
        super().__init__(reason)
        self.which = which
        """Which file of the pair is at fault ("image" or "label"): the report names that file."""


@dataclass(frozen=True)
class EncodeOptions:
    dataset: str
    split: str
    resize: tuple[int, int] | None = None
    """(width, height) to store frames at (DAFormer stores GTA5 at 1280x720, Cityscapes at 1024x512)."""
    image_format: str = "pxz"
    """pxz: lossless, ~0.9x PNG's bytes on photographs, ~6x faster to decode (segda.codec); keep: the original bytes
    (PNG stays PNG); png: lossless re-encode; bmp: lossless and uncompressed, ~20x faster to decode than PNG at
    ~1.6x its size; jpg/webp: lossy, ~7x faster to decode and ~10x smaller."""
    quality: int = 90
    """JPEG/WebP quality for the lossy formats."""
    id_map: dict | None = None
    """folder datasets: {"ids": [[label value, train id], ...], "others": "error" | "ignore"} (see load_id_map)."""


@dataclass
class Encoded:
    key: str
    members: list[tuple[str, bytes]]
    class_pixels: np.ndarray = field(repr=False)
    ignore_pixels: int = 0
    colour: list = field(default_factory=list, repr=False)
    """The frame's YCbCr statistics (segda.colourstats.frame_stats), summed into the manifest's colour_stats."""


def encode_sample(sample: RawSample, opts: EncodeOptions) -> Encoded:
    """Validate, remap and encode one sample; raise BadSample naming the problem."""
    image_bytes = _read(sample.image, "image")
    image_size, pixels, turned = _check_image(image_bytes, sample, opts)
    train_ids = None if sample.label is None else _train_ids(sample, opts)
    if train_ids is not None and (train_ids.shape[1], train_ids.shape[0]) != image_size:
        raise BadSample(f"image is {image_size[0]}x{image_size[1]} but label is "
                        f"{train_ids.shape[1]}x{train_ids.shape[0]}")
    ext = _image_ext(sample, opts, turned)
    if opts.resize is not None or opts.image_format != "keep" or turned:  # turned: store the upright pixels
        image_bytes = _reencode(pixels, opts, ext)
    size = list(opts.resize) if opts.resize is not None else list(image_size)
    meta = {
        "key": sample.key, "dataset": opts.dataset, "split": opts.split,
        "image_file": sample.rel(sample.image), "label_file": sample.rel(sample.label),
        "original_size": list(image_size), "size": size, "image_format": ext,
    }
    if sample.group is not None:
        meta["condition"] = sample.group
    members = [(f"{sample.key}.{ext}", image_bytes)]
    counts = np.zeros(256, np.int64)
    if train_ids is not None:
        if opts.resize is not None:
            train_ids = cv2.resize(train_ids, opts.resize, interpolation=cv2.INTER_NEAREST)
        counts = cv2.calcHist([train_ids], [0], None, [256], [0, 256]).ravel().astype(np.int64)  # 4x np.bincount
        ok, label_png = cv2.imencode(".png", train_ids, _LABEL_PNG)
        assert ok, "cv2 failed to encode a uint8 label"
        members.append((f"{sample.key}.label.png", label_png.tobytes()))
    members.append((f"{sample.key}.json", json.dumps(meta, sort_keys=True).encode()))
    return Encoded(sample.key, members, counts[:NUM_CLASSES].astype(np.int64), int(counts[IGNORE]),
                   frame_stats(_as_bgr8(pixels)[..., ::-1]))


def _train_ids(sample: RawSample, opts: EncodeOptions) -> np.ndarray:
    """The sample's label as uint8 train ids (0-18, IGNORE), read the way its dataset stores it."""
    if opts.dataset in ("gta5", "cityscapes"):
        ids = _read_label_indices(sample)
        if int(ids.max()) > MAX_LABEL_ID:
            bad = np.unique(ids[ids > MAX_LABEL_ID])[:5].tolist()
            raise BadSample(f"label ids {bad} are outside the Cityscapes table (0..{MAX_LABEL_ID})", "label")
        return cv2.LUT(ids, _LUT)
    if opts.dataset == "acdc":  # *_gt_labelTrainIds.png: already train ids
        ids = _read_label_indices(sample)
        bad = np.setdiff1d(np.unique(ids), _TRAIN_ID_VALUES)
        if bad.size:
            raise BadSample(f"label values {bad[:5].tolist()} are not train ids (0-18, 255): is this the "
                            "_gt_labelTrainIds.png file?", "label")
        return ids
    if opts.dataset == "folder":
        raw = _read_label_indices(sample, sixteen_bit=True)
        lut, strict = _id_map_lut(opts.id_map)
        if strict:
            bad = np.unique(raw)[lut[np.unique(raw)] == _UNMAPPED]
            if bad.size:
                raise BadSample(f"label values {bad[:5].tolist()} are not in the id map (add them, or set "
                                "`others: ignore` to map every unlisted value to 255)", "label")
        return np.where(lut[raw] == _UNMAPPED, IGNORE, lut[raw]).astype(np.uint8)
    raw = _read_label_unchanged(sample)
    if opts.dataset == "synthia":  # 16-bit PNG whose first (R) channel holds the class id; cv2 reads BGR
        if raw.ndim != 3 or raw.shape[2] < 3:
            raise BadSample(f"SYNTHIA label must be a 3-channel PNG with the class id in R, got shape {raw.shape}",
                            "label")
        return _SYNTHIA_LUT[raw[..., 2]]
    raise BadSample(f"dataset {opts.dataset!r} has no labels", "label")


def _label_file(sample: RawSample) -> None:
    _regular(sample.label, "label")
    if os.path.getsize(sample.label) == 0:
        raise BadSample("empty label file (0 bytes)", "label")


def _read_label_indices(sample: RawSample, sixteen_bit: bool = False) -> np.ndarray:
    """A single-channel label's indices: palette or 8-bit grey (GTA5 stores label ids as palette indices; converting
    to RGB would lose them), and with `sixteen_bit` also 16-bit grey (folder datasets)."""
    _label_file(sample)
    try:
        with Image.open(sample.label) as im:
            mode = im.mode
            if mode in ("P", "L"):
                return np.ascontiguousarray(np.asarray(im), dtype=np.uint8)
            if sixteen_bit and mode.startswith("I"):  # 16-bit grey (I;16) or 32-bit integers holding 16-bit values
                values = np.asarray(im)
                if values.min() < 0 or values.max() >= 1 << 16:
                    raise BadSample("label values must be 0-65535", "label")
                return values.astype(np.uint16)
    except BadSample:
        raise
    except Exception as err:  # PIL raises a zoo of types for broken files
        raise BadSample(f"unreadable label ({type(err).__name__}: {err})", "label") from err
    accepted = "palette, 8- or 16-bit grey" if sixteen_bit else "palette or 8-bit grey"
    raise BadSample(f"label has mode {mode}; expected single-channel label values ({accepted})", "label")


def _read_label_unchanged(sample: RawSample) -> np.ndarray:
    """Multi-channel or 16-bit labels (SYNTHIA), as cv2 reads them: BGR order."""
    _label_file(sample)
    raw = cv2.imread(str(sample.label), cv2.IMREAD_UNCHANGED)
    if raw is None or raw.dtype not in (np.uint8, np.uint16):
        raise BadSample("unreadable label: not an 8- or 16-bit PNG", "label")
    return raw


_TRAIN_ID_VALUES = np.array([*range(NUM_CLASSES), IGNORE])
_SYNTHIA_LUT = synthia_lut()
_UNMAPPED = 1 << 15  # outside every train id, in the int32 tables of id maps
_ID_MAPS: dict[str, tuple[np.ndarray, bool]] = {}


def _id_map_lut(id_map: dict | None) -> tuple[np.ndarray, bool]:
    if not id_map:
        raise BadSample("a folder dataset needs an id map (--id-map ids.yaml)", "label")
    key = json.dumps(id_map, sort_keys=True)
    if key not in _ID_MAPS:
        lut = np.full(1 << 16, _UNMAPPED, dtype=np.int32)
        for value, train_id in id_map["ids"]:
            lut[value] = train_id
        _ID_MAPS[key] = (lut, id_map.get("others", "error") == "error")
    return _ID_MAPS[key]


def load_id_map(path) -> dict:
    """Read a folder dataset's id map: YAML `ids: {label value: train id}` and `others: error | ignore`.

        ids: {0: 255, 1: 0, 2: 1, 7: 13}   # label value (0-65535) -> train id (0-18, or 255 to leave out)
        others: error                        # a value not listed: error (the sample is skipped) or ignore (255)
    """
    from segda.configfile import read_yaml
    from segda.log import SegdaError

    try:
        data = read_yaml(path, "id map")
    except OSError as err:
        raise SegdaError(f"cannot read the id map {path}: {err.strerror}") from err
    if not isinstance(data, dict) or not isinstance(data.get("ids"), dict) or not data["ids"]:
        raise SegdaError(f"{path}: expected `ids: {{label value: train id, ...}}` (and optionally "
                         "`others: error | ignore`)")
    pairs = []
    for value, train_id in data["ids"].items():
        if isinstance(value, str) and value.strip().isascii() and value.strip().isdigit():
            value = int(value)  # JSON, which is YAML too, only has string keys
        whole = [isinstance(v, int) and not isinstance(v, bool) for v in (value, train_id)]
        if not all(whole) or not 0 <= value < 1 << 16 or not (0 <= train_id < NUM_CLASSES or train_id == IGNORE):
            raise SegdaError(f"{path}: ids entry {value!r}: {train_id!r} must map a label value (0-65535) to a "
                             f"train id (0-{NUM_CLASSES - 1}, or {IGNORE} to leave it out)")
        pairs.append([value, train_id])
    others = data.get("others", "error")
    if others not in ("error", "ignore") or set(data) - {"ids", "others"}:
        raise SegdaError(f"{path}: only `ids` and `others` (error or ignore) are allowed")
    return {"ids": sorted(pairs), "others": others}


def _read(path, what: str) -> bytes:
    _regular(path, what)
    try:
        return path.read_bytes()
    except OSError as err:
        raise BadSample(f"cannot read {what}: {err.strerror}", what) from err


def _regular(path, what: str) -> None:
    """Only regular files are read: opening a FIFO would block the creator forever, a device would never end."""
    try:
        mode = os.stat(path).st_mode
    except OSError as err:
        raise BadSample(f"cannot read {what}: {err.strerror}", what) from err
    if not stat.S_ISREG(mode):
        raise BadSample(f"{what} is not a regular file (a FIFO, socket or device)", what)


IMAGE_MODES = ("RGB", "RGBA", "L", "LA", "P", "PA", "CMYK", "YCbCr", "1", "I", "I;16", "I;16B", "I;16L")
"""PIL modes of the images segda takes (as `predict` does): colour, grey, palette, CMYK, with or without alpha,
8 or 16 bit; each becomes 8-bit RGB."""


def _check_image(data: bytes, sample: RawSample, opts: EncodeOptions) -> tuple[tuple[int, int], np.ndarray, bool]:
    """Return (width, height), the decoded pixels and whether they were turned upright. Sizes are checked from the
    header before anything is decoded; then the image is decoded in full, as training will decode it (a file whose
    chunks are intact but whose compressed pixels are corrupt fails here and is not counted). Pixels and sizes are
    upright: EXIF orientation applied, as every reader of segda applies it (segda.data.transforms.image_size)."""
    if not data:
        raise BadSample("unreadable image: the file is empty (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as im:
            mode, orientation = im.mode, exif_orientation(im)
    except UnidentifiedImageError:
        raise BadSample(f"unreadable image: not in a known image format ({len(data)} bytes)") from None
    except Exception as err:  # PIL raises a zoo of types for broken files
        raise BadSample(f"unreadable image ({type(err).__name__}: {err})") from err
    if mode not in IMAGE_MODES:
        raise BadSample(f"image mode {mode} is not a colour or grey image")
    try:
        size = image_size(data)
    except DecodeError as err:
        raise BadSample(f"unreadable image: {err}") from None
    pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    pixels = None if pixels is None else upright(pixels, orientation)
    if pixels is None or (pixels.shape[1], pixels.shape[0]) != size:
        raise BadSample("unreadable image: its data is corrupt or truncated (the pixels do not decode)")
    return size, pixels, orientation != 1


def _image_ext(sample: RawSample, opts: EncodeOptions, turned: bool = False) -> str:
    if opts.image_format == "keep":  # an image stored sideways (EXIF) is kept losslessly, upright, as PNG
        return "png" if turned else sample.image.suffix.lower().lstrip(".").replace("jpeg", "jpg")
    return opts.image_format


def _reencode(pixels: np.ndarray, opts: EncodeOptions, ext: str) -> bytes:
    bgr = _as_bgr8(pixels)
    if opts.resize is not None:
        bgr = cv2.resize(bgr, opts.resize, interpolation=cv2.INTER_AREA)
    if ext == "pxz":  # stored in RGB, the order the loader wants: no colour conversion when decoding
        try:
            return codec.encode(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
        except codec.PxzError as err:
            raise BadSample(f"cannot store the image as pxz: {err}; use --resize") from None
    params = {"png": [cv2.IMWRITE_PNG_COMPRESSION, 1], "bmp": [], "jpg": [cv2.IMWRITE_JPEG_QUALITY, opts.quality],
              "webp": [cv2.IMWRITE_WEBP_QUALITY, opts.quality]}[ext]
    ok, buf = cv2.imencode("." + ext, bgr, params)
    if not ok:
        raise BadSample(f"could not encode the image as {ext}")
    return buf.tobytes()


def _as_bgr8(pixels: np.ndarray) -> np.ndarray:
    """cv2's IMREAD_UNCHANGED pixels (grey, BGR, BGRA; 8 or 16 bit) as 8-bit BGR, as IMREAD_COLOR would give."""
    if pixels.dtype == np.uint16:
        pixels = (pixels >> 8).astype(np.uint8)
    if pixels.ndim == 2:
        return cv2.cvtColor(pixels, cv2.COLOR_GRAY2BGR)
    if pixels.shape[2] == 4:
        return cv2.cvtColor(pixels, cv2.COLOR_BGRA2BGR)
    return pixels
