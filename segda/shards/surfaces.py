"""The city's own surfaces, which the game draws flat: `draw_surfaces(canvas, strength)` (issue 21).

Cobbled roads, slabbed sidewalks and rough grass are laid in metres on the ground plane of the canvas's pinhole
camera and fade to the flat colour as a pixel's footprint grows (a far pixel covers many cobbles, so the far road is
untextured); the grass's 8 cm tufts show only within a few metres of the camera, so hardly at the demo's 320x160.
Horizontal brick courses on facades (every 4th image row) and dappled foliage are drawn in image space. Only
synthetic Cityscapes has them (`scene._Style.surfaces`, scaled by the gap in `segda.shards.looks`): no colour
statistic of a frame sees a texture, and ClassMix never pastes a labelled one, so a self-trained model learns them
only from the teacher's pseudo-labels.
"""

from __future__ import annotations

from typing import Protocol

import cv2
import numpy as np

from segda.classes import LABEL_ID_TO_NAME

_ID = {name: label_id for label_id, name in LABEL_ID_TO_NAME.items()}
ROAD, SIDEWALK, BUILDING, VEG, TERRAIN = (_ID[n] for n in ("road", "sidewalk", "building", "vegetation", "terrain"))
SURFACED = (ROAD, SIDEWALK, TERRAIN, BUILDING, VEG)
"""The label ids that carry a surface: every other class keeps its flat look."""


class Canvas(Protocol):
    """What a surface needs of `scene._Canvas`: the image and label drawn so far, and the pinhole camera (focal
    length f and principal point cx, cy in pixels, height cam in metres above the ground plane)."""
    img: np.ndarray
    lab: np.ndarray
    w: int
    h: int
    f: float
    cx: float
    cy: float
    cam: float
    rng: np.random.Generator


def _ground(c: Canvas, ys: np.ndarray, xs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where the pixels (ys, xs) meet the ground plane, in metres: x across the street and z ahead (a pixel at or
    above the horizon gets the farthest ground's values)."""
    below = np.maximum(ys + 0.5 - c.cy, 0.5)
    z = c.f * c.cam / below
    return (xs + 0.5 - c.cx) * z / c.f, z


def _ground_grid(c: Canvas, x: np.ndarray, z: np.ndarray, size_x: float, size_z: float, joint: float, stagger: bool):
    """Each ground point's cell of a size_x by size_z grid (rows staggered by half a cell for cobbles), whether it
    lies on a joint, and the fade of the pattern across and along the street."""
    row = np.floor(z / size_z)
    xs = x / size_x + (0.5 * (row % 2) if stagger else 0)
    col = np.floor(xs)
    on_x = (xs - col) * size_x < joint
    on_z = (z / size_z - row) * size_z < joint
    # a pixel spans z / f metres across the street and z^2 / (f * cam) along it
    fade_x = np.clip(1 - (z / c.f) / size_x, 0, 1)
    fade_z = np.clip(1 - (z * z / (c.f * c.cam)) / size_z, 0, 1)
    return row, col, on_x, on_z, fade_x, fade_z


def _cell_noise(row: np.ndarray, col: np.ndarray, salt: int) -> np.ndarray:
    """A fixed pseudo-random number in [0, 1) per grid cell (integer hashing: same cell, same value, any frame)."""
    h = (row.astype(np.int64) * 73856093) ^ (col.astype(np.int64) * 19349663) ^ (salt * 83492791)
    return ((h * 2654435761) % 4294967296) / 4294967296.0


def _cobbles(c: Canvas, x: np.ndarray, z: np.ndarray) -> np.ndarray:
    row, col, on_x, on_z, fade_x, fade_z = _ground_grid(c, x, z, 0.24, 0.18, 0.045, stagger=True)
    stone = 0.8 + 0.4 * _cell_noise(row, col, 1)
    # staggered rows: a pixel spanning several rows averages their joints away as it does the stones
    fade = np.minimum(fade_x, fade_z)
    return (1 + (stone - 1) * fade) * (1 - 0.55 * fade * np.maximum(on_x, on_z))


def _slabs(c: Canvas, x: np.ndarray, z: np.ndarray) -> np.ndarray:
    row, col, on_x, on_z, fade_x, fade_z = _ground_grid(c, x, z, 0.6, 0.6, 0.04, stagger=False)
    slab = np.where((row + col) % 2 == 0, 1.2, 0.75)
    joints = 1 + 0.3 * np.maximum(on_x * fade_x, on_z * fade_z)
    return (0.975 + (slab - 0.975) * np.minimum(fade_x, fade_z)) * joints


def _tufts(c: Canvas, x: np.ndarray, z: np.ndarray) -> np.ndarray:
    row, col, _, _, fade_x, fade_z = _ground_grid(c, x, z, 0.08, 0.08, 0.0, stagger=False)
    return 1 + (0.6 * _cell_noise(row, col, 2) - 0.3) * np.minimum(fade_x, fade_z)


def draw_surfaces(c: Canvas, strength: float) -> None:
    """Multiply each surfaced pixel of the canvas by its surface's gain, `strength` of the way from flat (0). The
    ground's patterns are computed on their class's pixels only (most of a frame is something else)."""
    lab = c.lab
    gain = np.ones(lab.shape)
    for lid, pattern in ((ROAD, _cobbles), (SIDEWALK, _slabs), (TERRAIN, _tufts)):
        ys, xs = np.nonzero(lab == lid)
        gain[ys, xs] = pattern(c, *_ground(c, ys, xs))
    rows = np.arange(c.h)[:, None]
    gain = np.where(lab == BUILDING, np.where(rows % 4 == 0, 0.6, 1.0), gain)
    blotch = cv2.resize(c.rng.random((c.h // 3 + 1, c.w // 3 + 1)).astype(np.float32), (c.w, c.h),
                        interpolation=cv2.INTER_NEAREST)
    gain = np.where(lab == VEG, np.where(blotch < 0.4, 0.55, 1.15), gain)
    img = c.img.astype(np.float32)
    img *= (1 + strength * (gain - 1))[..., None]
    c.img = np.clip(img, 0, 255).astype(np.uint8)
