"""How synthetic Cityscapes looks next to synthetic GTA5: `target_style(gap)`.

The target look has three parts, each scaled by `gap`:

- **The camera** (global, mild): every colour duller and darker, plus the photo effects, the other camera, traffic and
  crowds of the city style. One colour statistic of a frame describes this part, so test-time colour matching
  (`segda evaluate --colour-match`) and colour transfer during training undo most of it.
- **The materials** (class by class): each material's colour turns by its own angle around the grey axis and
  changes its own brightness (`MATERIAL_SHIFTS`): asphalt, foliage, facades, sky and car paint each change
  hue by a different amount and in its own direction. No map applied to a whole frame undoes
  this (`tests/test_synth.py` fits the best affine colour map and checks what is left); a model learns it only
  from target frames, which is what self-training's pseudo-labels give it. Each instance carries one of six
  levels of its material's shift, from none to all of it (`SHIFT_LEVELS`), so the source model is right on part
  of every class.
- **The surfaces** (class by class, target only): the game draws its ground and walls flat; the city has cobbled
  roads, slabbed sidewalks, rough grass, brick courses and dappled foliage (`segda.shards.surfaces`). The ground's are
  laid in metres, so they fade with distance: the far road is untextured, the near one cobbled. No colour
  statistic of a frame sees a texture, and the labelled source crops ClassMix pastes never carry one: only the
  teacher's pseudo-labels of target pixels teach them (`tests/test_synth.py`; the gain per class in the README).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from segda.shards.scene import _CITY, _GTA5, _GTA5_COLOURS, _Style

DEFAULT_GAP = 0.75
"""How far synthetic Cityscapes sits from synthetic GTA5: 0 is the game's look, 1 the full shift (camera,
materials and surfaces, module docstring). Measured by `segda demo --oracle` (README, "The synthetic gap")."""
DESATURATION, DARKENING = 0.35, 0.15
"""The camera at gap 1 (mild): every colour keeps 65% of its saturation and 85% of its brightness."""
HUE_TURN_DEGREES, BRIGHTNESS_CHANGE = (90.0, 180.0), 0.35
"""The materials at gap 1: each turns by 90-180 degrees around the grey axis (67-135 at the demo's gap 0.75),
clockwise or not, and changes its brightness by up to 35% either way, on the instances at the full level
(`SHIFT_LEVELS`). With 60-120 degrees on two thirds of the instances and none on the rest (and a first version of
the surfaces) the source teacher labelled half the target's pixels wrong (pixel accuracy 47.5%) and its
pseudo-labels added 0.2-0.8 mIoU (seed 0, README "The synthetic gap"): a teacher must be right on part of every
class for its labels to teach, which the levels between none and the full turn give it."""
SHIFT_LEVELS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
"""Each material instance (a car, a facade, a frame's road) carries one of these shares of its material's turn and
brightness change, drawn evenly: the near levels keep the source model right on part of every class, so the
teacher is right but unsure on the class rather than wrong, and the far ones only target frames teach."""


def _material_shifts() -> dict[str, tuple[float, float]]:
    """(hue turn in degrees, brightness factor) per material at gap 1, fixed for every release: drawn once from a
    seeded generator in name order, directions alternating so that the frame's mean hue barely moves (a global
    statistic sees little of this part)."""
    rng = np.random.default_rng(20261205)
    shifts = {}
    for i, name in enumerate(sorted(_GTA5_COLOURS)):
        turn = rng.uniform(*HUE_TURN_DEGREES) * (1 if i % 2 else -1)
        shifts[name] = (turn, 1 + rng.uniform(-BRIGHTNESS_CHANGE, BRIGHTNESS_CHANGE))
    return shifts


MATERIAL_SHIFTS = _material_shifts()


def _turn(colour: np.ndarray, degrees: float) -> np.ndarray:
    """Rotate an RGB colour around the grey axis (Rodrigues): its hue moves, its grey level and saturation stay."""
    k = np.ones(3) / np.sqrt(3)
    t = np.radians(degrees)
    return colour * np.cos(t) + np.cross(k, colour) * np.sin(t) + k * (k @ colour) * (1 - np.cos(t))


def _city_colour(material: str, colour: tuple, gap: float, level: float = 1.0) -> tuple:
    """The material as the city has it (`level` of its own turn and brightness change), then as the camera renders
    it."""
    turn, brightness = MATERIAL_SHIFTS[material]
    shift = gap * level
    return _camera_colour(_turn(np.asarray(colour, np.float64), turn * shift) * (1 + (brightness - 1) * shift), gap)


def _camera_colour(colour, gap: float) -> tuple:
    c = np.asarray(colour, np.float64)
    grey = c.mean()
    c = (grey + (c - grey) * (1 - DESATURATION * gap)) * (1 - DARKENING * gap)
    return tuple(int(round(v)) for v in np.clip(c, 0, 255))


def _between(a, b, t: float):
    """a at t=0, b at t=1: numbers and (low, high) ranges alike; counts stay whole."""
    if isinstance(a, tuple):
        return tuple(_between(x, y, t) for x, y in zip(a, b))
    value = a + (b - a) * t
    return int(round(value)) if isinstance(a, int) and isinstance(b, int) else value


def target_style(gap: float) -> _Style:
    """The Cityscapes look `gap` of the way from GTA5's: the game's materials as the city has them and a camera
    renders them, with the camera, traffic, crowds and photo effects of the city style."""
    if not 0.0 <= gap <= 1.0:
        raise ValueError(f"gap must be between 0 and 1, got {gap}")
    if gap == 0.0:
        return _GTA5
    # Each instance draws one colour of its material's list: every game colour at every shift level.
    colours = {k: [_city_colour(k, c, gap, level) for level in SHIFT_LEVELS for c in v]
               for k, v in _GTA5_COLOURS.items()}
    rest = [_between(getattr(_GTA5, f), getattr(_CITY, f), gap) for f in list(_Style.__dataclass_fields__)[1:]]
    # the surfaces are synthetic Cityscapes' own: the other camera-styled sets (ACDC, folder) draw _CITY flat
    return replace(_Style(colours, *rest), surfaces=gap)
