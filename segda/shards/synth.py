"""Procedural street scenes written in the raw GTA5 and Cityscapes layouts, for tests, demos and smoke runs.

Real GTA5 and Cityscapes cannot ship with the repo, yet the creators, trainers and evaluator need data that has
their exact file layouts and a real domain gap. Every scene is a pinhole-camera view of a street (road with
lanes, sidewalks, facades, vegetation, poles, lights, signs, vehicles, people) drawn with cv2 into the image and
the label with the same polygons, so the label is exact. The scene and the two domains' looks are in
`segda.shards.scene`; this module writes them in each dataset's raw layout. Run through the CLI:
`segda synth gta5 OUT --num N --size WxH --seed S` or `segda synth cityscapes OUT --split train ...`.
"""

from __future__ import annotations

import io
from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from tqdm import tqdm

from segda import atomic
from segda.classes import (ACDC_CONDITIONS, IGNORE, NUM_CLASSES, SYNTHIA_TO_TRAIN_ID, label_id_lut,
                           label_id_palette)
from segda.shards.looks import DEFAULT_GAP, target_style
from segda.shards.scene import _CITY, _GTA5, _render

CITIES = {"train": ("aachen", "bochum", "bremen"), "val": ("frankfurt", "lindau", "munster"),
          "test": ("berlin", "bielefeld")}
REAL_CITY_FRAMES = {
    "train": {"aachen": 174, "bochum": 96, "bremen": 316, "cologne": 154, "darmstadt": 85, "dusseldorf": 221,
              "erfurt": 109, "hamburg": 248, "hanover": 196, "jena": 119, "krefeld": 99, "monchengladbach": 94,
              "strasbourg": 365, "stuttgart": 196, "tubingen": 144, "ulm": 95, "weimar": 142, "zurich": 122},
    "val": {"frankfurt": 267, "lindau": 59, "munster": 174},
}
"""Frames per city in the real Cityscapes fine splits (2,975 train, 500 val): `segda bench stream` uses them to
make datasets whose shards hold long runs of one city, as the real ones do."""
QUIRK_PERIOD = 20
"""One GTA5 frame in QUIRK_PERIOD has an image a few pixels wider than its label, as in the real release."""

def _check(num: int, size: tuple[int, int]) -> None:
    if num < 0:
        raise ValueError(f"num must be >= 0, got {num}")
    if len(size) != 2 or min(size) < 32:
        raise ValueError(f"size {size} cannot hold a street scene: give (width, height), each >= 32, e.g. (320, 176)")


def _png(array: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", array[..., ::-1] if array.ndim == 3 else array, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    assert ok, "cv2 failed to encode a PNG"
    return buf.tobytes()


def _palette_png(lab: np.ndarray) -> bytes:
    im, out = Image.frombytes("P", lab.shape[::-1], lab.tobytes()), io.BytesIO()
    im.putpalette(label_id_palette())  # indices are label ids, colours as in the GTA5 release
    im.save(out, format="PNG", compress_level=1)
    return out.getvalue()


def synth_gta5(out: str | Path, num: int, size: tuple[int, int] = (320, 176), seed: int = 0,
               quirks: bool = True, progress: bool = False) -> int:
    """Write `num` game-style frames as OUT/images/00001.png (RGB) + OUT/labels/00001.png (palette of label ids).

    With quirks, frame i (0-based) whose i % QUIRK_PERIOD equals a phase drawn from the seed gets an image 2-4 px
    wider than its label, like a handful of real GTA5 frames; the first one is always among the first 20.
    """
    _check(num, size)
    out, phase = Path(out), int(np.random.default_rng([seed, 7919]).integers(QUIRK_PERIOD))
    for i in tqdm(range(num), desc="synth gta5", disable=not progress):
        rng = np.random.default_rng([seed, i, 5])
        img, lab = _render(size, _GTA5, rng)
        if quirks and i % QUIRK_PERIOD == phase:
            img = cv2.resize(img, (img.shape[1] + int(rng.integers(2, 5)), img.shape[0]), interpolation=cv2.INTER_AREA)
        atomic.write_bytes(out / "images" / f"{i + 1:05d}.png", _png(img))
        atomic.write_bytes(out / "labels" / f"{i + 1:05d}.png", _palette_png(lab))
    return num


def synth_cityscapes(out: str | Path, split: str, num: int, size: tuple[int, int] = (320, 160), seed: int = 0,
                     progress: bool = False, real_cities: bool = False, gap: float = DEFAULT_GAP) -> int:
    """Write `num` photo-style frames of one split in the leftImg8bit/gtFine layout (labels: 8-bit label ids),
    `gap` of the way from synthetic GTA5's look to the full shift (`DEFAULT_GAP`, `target_style`).

    Frame i goes to city i % len(cities) with sequence number i // len(cities) and frame number 19 (the annotated
    frame of every real Cityscapes snippet). `real_cities`: the real split's cities and frames per city instead
    (`REAL_CITY_FRAMES`, filled in order; `num` is the real count for a realistic dataset).
    """
    if split not in CITIES:
        raise ValueError(f"unknown Cityscapes split {split!r}; choose one of {', '.join(CITIES)}")
    _check(num, size)
    out, cities = Path(out), CITIES[split]
    names = _real_city_names(split, num) if real_cities else None
    style = target_style(gap)
    for i in tqdm(range(num), desc=f"synth cityscapes {split}", disable=not progress):
        img, lab = _render(size, style, np.random.default_rng([seed, i, 1, list(CITIES).index(split)]))
        city = cities[i % len(cities)]
        name = f"{city}_{i // len(cities):06d}_{19:06d}"
        if names:
            city, name = names[i]
        atomic.write_bytes(out / "leftImg8bit" / split / city / f"{name}_leftImg8bit.png", _png(img))
        atomic.write_bytes(out / "gtFine" / split / city / f"{name}_gtFine_labelIds.png", _png(lab))
    return num


def _real_city_names(split: str, num: int) -> list[tuple[str, str]]:
    """(city, frame name) for `num` frames filling the real cities in order; past the real count, sequence numbers
    go on from 1000 per round."""
    frames = REAL_CITY_FRAMES.get(split)
    if not frames:
        raise ValueError(f"no real city table for split {split!r}; choose one of {', '.join(REAL_CITY_FRAMES)}")
    slots = [(city, seq) for city, count in frames.items() for seq in range(count)]
    named = []
    for i in range(num):
        city, seq = slots[i % len(slots)]
        named.append((city, f"{city}_{seq + 1000 * (i // len(slots)):06d}_{19:06d}"))
    return named


# ---- more domains: SYNTHIA, ACDC, a plain folder (the field's other benchmarks; the creators' tests) --------

_TRAIN_TO_SYNTHIA = {train: synthia for synthia, train in SYNTHIA_TO_TRAIN_ID.items()}
_LABEL_LUT = label_id_lut()


def synthia_label(label_ids: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """SYNTHIA's label encoding of a Cityscapes label-id map: (H, W, 3) uint16 RGB, the class id in R (the file's
    first channel), an instance id in G. Parking becomes SYNTHIA's parking slot (13), other void pixels 0 or
    lane marking (22): ids the train-id table leaves out."""
    train = _LABEL_LUT[label_ids]
    synthia = np.zeros(train.shape, np.uint16)
    for train_id, synthia_id in _TRAIN_TO_SYNTHIA.items():
        synthia[train == train_id] = synthia_id
    synthia[label_ids == 9] = 13
    void = train == IGNORE
    synthia[void & (rng.random(train.shape) < 0.1)] = 22
    instance = rng.integers(0, 300, train.shape, dtype=np.uint16) * (synthia > 0)
    return np.stack([synthia, instance, np.zeros_like(synthia)], axis=-1)


def synth_synthia(out: str | Path, num: int, size: tuple[int, int] = (320, 190), seed: int = 0,
                  progress: bool = False) -> int:
    """Write `num` frames in SYNTHIA-RAND-CITYSCAPES' layout: OUT/RGB/0000000.png + OUT/GT/LABELS/0000000.png."""
    _check(num, size)
    out = Path(out)
    for i in tqdm(range(num), desc="synth synthia", disable=not progress):
        rng = np.random.default_rng([seed, i, 11])
        img, lab = _render(size, _GTA5, rng)
        atomic.write_bytes(out / "RGB" / f"{i:07d}.png", _png(img))
        atomic.write_bytes(out / "GT" / "LABELS" / f"{i:07d}.png", _png(synthia_label(lab, rng)))
    return num


def _weather(img: np.ndarray, condition: str, rng: np.random.Generator) -> np.ndarray:
    x = img.astype(np.float32)
    if condition == "fog":
        x = 0.45 * x + 0.55 * 200
    elif condition == "night":
        x = 0.25 * x + rng.normal(0, 6, x.shape)
    elif condition == "rain":
        x = 0.8 * x + (rng.random(x.shape[:2]) < 0.02)[..., None] * 90
    elif condition == "snow":
        x = 0.7 * x + 70 + (rng.random(x.shape[:2]) < 0.03)[..., None] * 120
    return np.clip(x, 0, 255).astype(np.uint8)


def synth_acdc(out: str | Path, split: str, num: int, size: tuple[int, int] = (320, 160), seed: int = 0,
               conditions: tuple[str, ...] = ACDC_CONDITIONS, progress: bool = False) -> int:
    """Write `num` frames per condition in ACDC's layout: OUT/rgb_anon/<condition>/<split>/<sequence>/
    <name>_rgb_anon.png and OUT/gt/... /<name>_gt_labelTrainIds.png (8-bit train ids)."""
    _check(num, size)
    out = Path(out)
    for c, condition in enumerate(conditions):
        for i in tqdm(range(num), desc=f"synth acdc {condition}", disable=not progress):
            rng = np.random.default_rng([seed, i, 13, c])
            img, lab = _render(size, _CITY, rng)
            sequence = f"GOPR{400 + c * 10 + i % 3:04d}"
            name = f"{sequence}_frame_{i:06d}"
            folder = Path(condition) / split / sequence
            atomic.write_bytes(out / "rgb_anon" / folder / f"{name}_rgb_anon.png", _png(_weather(img, condition, rng)))
            atomic.write_bytes(out / "gt" / folder / f"{name}_gt_labelTrainIds.png", _png(_LABEL_LUT[lab]))
    return num * len(conditions)


FOLDER_OFFSET = 100
"""synth_folder's label values: train id + 100, and 0 for pixels to leave out (its ids.yaml says so)."""


def synth_folder(out: str | Path, num: int, size: tuple[int, int] = (320, 160), seed: int = 0,
                 progress: bool = False) -> int:
    """A team's own data: OUT/images/frame_000.jpg, OUT/labels/frame_000.png (8-bit values of its own) and
    OUT/ids.yaml mapping those values to train ids, for `segda shards folder OUT --id-map OUT/ids.yaml`."""
    _check(num, size)
    out = Path(out)
    for i in tqdm(range(num), desc="synth folder", disable=not progress):
        img, lab = _render(size, _CITY, np.random.default_rng([seed, i, 17]))
        train = _LABEL_LUT[lab]
        values = np.where(train == IGNORE, 0, train.astype(np.int32) + FOLDER_OFFSET).astype(np.uint8)
        ok, jpg = cv2.imencode(".jpg", img[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])
        atomic.write_bytes(out / "images" / f"frame_{i:03d}.jpg", jpg.tobytes())
        atomic.write_bytes(out / "labels" / f"frame_{i:03d}.png", _png(values))
    ids = {0: IGNORE, **{FOLDER_OFFSET + t: t for t in range(NUM_CLASSES)}}
    atomic.write_text(out / "ids.yaml", "# label value -> train id (255: leave out)\nids:\n" +
                      "".join(f"  {value}: {train}\n" for value, train in ids.items()) + "others: error\n")
    return num
