"""The procedural street scene behind `segda synth`: one pinhole-camera view of a street (road with lanes,
sidewalks, facades, vegetation, poles, lights, signs, vehicles, people) drawn with cv2 into the image and the label
with the same polygons, so the label is exact. A `_Style` holds what differs between domains: class colours,
texture, noise, blur, vignetting, camera and object statistics; GTA5's is `_GTA5`, Cityscapes' is made by
`segda.shards.looks.target_style(gap)`. `segda.shards.synth` writes the scenes in each dataset's raw layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import cv2
import numpy as np

from segda.shards.surfaces import draw_surfaces

# Cityscapes label ids drawn here (void ones included: they must map to 255 downstream).
(UNLABELED, EGO, STATIC, GROUND, ROAD, SIDEWALK, PARKING, RAIL, BUILDING, WALL, FENCE, GUARD_RAIL, POLE, LIGHT,
 SIGN, VEG, TERRAIN, SKY, PERSON, RIDER, CAR, TRUCK, BUS, CARAVAN, TRAIN, MOTO, BIKE) = (
    0, 1, 4, 6, 7, 8, 9, 10, 11, 12, 13, 14, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 31, 32, 33)

_LAMPS = [(255, 40, 30), (255, 190, 0), (40, 255, 90)]
# Class colours (variants per class, plus per-instance jitter). Synthetic Cityscapes derives its own from GTA5's
# (segda.shards.looks); the second table, a swapped palette, serves the other camera-styled sets (ACDC, folder).
_GTA5_COLOURS = {
    "sky": [(90, 165, 245)], "road": [(125, 100, 145)], "lane": [(250, 250, 250)], "curb": [(235, 235, 240)],
    "sidewalk": [(195, 198, 210)], "building": [(225, 195, 135), (210, 120, 80), (240, 220, 170), (230, 160, 105)],
    "window": [(60, 110, 175)], "wall": [(180, 185, 110)], "fence": [(160, 105, 50)], "pole": [(100, 100, 110)],
    "light": [(240, 195, 30)], "sign": [(30, 90, 235), (235, 40, 40)], "sign_face": [(250, 250, 250)],
    "veg": [(40, 170, 40), (70, 190, 55)], "trunk": [(120, 75, 35)], "terrain": [(160, 215, 70)],
    "skin": [(240, 190, 150)], "cloth": [(225, 35, 45), (40, 60, 210), (245, 205, 30), (35, 35, 40), (245, 245, 245)],
    "car": [(215, 25, 30), (30, 80, 215), (245, 245, 245), (250, 205, 25), (35, 35, 40), (25, 170, 95)],
    "glass": [(35, 55, 85)], "tire": [(25, 25, 25)], "truck": [(240, 125, 25), (245, 245, 240)],
    "bus": [(25, 145, 230), (35, 185, 90)], "train": [(205, 35, 45)], "moto": [(60, 60, 215)],
    "bike": [(225, 30, 130)], "ground": [(160, 125, 85)], "parking": [(160, 140, 160)], "rail": [(120, 95, 80)],
    "guard": [(200, 200, 210)], "static": [(125, 125, 110)], "caravan": [(240, 240, 230)], "ego": [(20, 20, 30)],
}
_CITY_COLOURS = {
    "sky": [(205, 210, 215)], "road": [(98, 88, 74)], "lane": [(190, 190, 180)], "curb": [(150, 150, 145)],
    "sidewalk": [(150, 128, 158)], "building": [(145, 118, 92), (172, 156, 124), (132, 98, 84), (186, 172, 156)],
    "window": [(105, 112, 120)], "wall": [(190, 180, 160)], "fence": [(95, 125, 115)], "pole": [(60, 62, 70)],
    "light": [(40, 50, 45)], "sign": [(215, 215, 60), (70, 110, 175)], "sign_face": [(200, 200, 205)],
    "veg": [(60, 82, 40), (82, 92, 50)], "trunk": [(65, 55, 45)], "terrain": [(130, 120, 70)],
    "skin": [(185, 145, 120)], "cloth": [(55, 55, 65), (100, 88, 78), (38, 45, 62), (135, 45, 45), (165, 165, 165)],
    "car": [(45, 55, 88), (150, 152, 158), (28, 28, 32), (112, 30, 34), (200, 200, 205), (32, 70, 60)],
    "glass": [(25, 30, 38)], "tire": [(18, 18, 18)], "truck": [(200, 200, 192), (85, 100, 112)],
    "bus": [(215, 190, 55), (185, 45, 40)], "train": [(175, 178, 168)], "moto": [(38, 38, 45)],
    "bike": [(45, 48, 55)], "ground": [(115, 105, 90)], "parking": [(120, 110, 105)], "rail": [(80, 72, 65)],
    "guard": [(165, 170, 170)], "static": [(90, 85, 80)], "caravan": [(210, 205, 195)], "ego": [(35, 38, 45)],
}


@dataclass(frozen=True)
class _Style:
    colours: dict
    jitter: float          # per-instance colour spread
    horizon: tuple         # horizon row as a fraction of the height
    focal: float           # focal length as a fraction of the width
    cam_h: tuple           # camera height in metres
    traffic: tuple         # moving vehicles per frame
    parking: float         # chance of a parking lane (full of parked cars) along the right curb
    persons: tuple
    ego: float             # chance the ego hood is visible
    photo: float           # strength of the camera look: texture, cast, vignetting, blur, sensor noise (0: flat)
    surfaces: float = 0.0  # strength of the city's surfaces (segda.shards.surfaces; synthetic Cityscapes only)


_GTA5 = _Style(_GTA5_COLOURS, 6.0, (0.44, 0.52), 0.55, (1.6, 2.1), (3, 8), 0.3, (1, 5), 0.15, 0.0)
_CITY = _Style(_CITY_COLOURS, 16.0, (0.36, 0.44), 0.75, (1.2, 1.4), (1, 5), 0.7, (3, 10), 0.8, 1.0)

# (width, height, length, glass band as fractions of the height, wheel radius), metres.
_VEHICLES = {"car": (1.8, 1.5, 4.3, (0.6, 0.92), 0.32), "truck": (2.5, 3.6, 8.0, (0.0, 0.0), 0.5),
             "bus": (2.55, 3.1, 12.0, (0.45, 0.85), 0.5), "train": (2.65, 3.4, 28.0, (0.45, 0.8), 0.42),
             "caravan": (2.3, 2.6, 6.0, (0.5, 0.7), 0.35)}
# Photo texture amplitude per label id: real asphalt and foliage are grainy, the overcast sky is smooth.
_TEXTURE = np.full(256, 0.06, np.float32)
_TEXTURE[[ROAD, SIDEWALK, PARKING, GROUND]], _TEXTURE[[VEG, TERRAIN]], _TEXTURE[[BUILDING, WALL]] = 0.09, 0.2, 0.1
_TEXTURE[SKY] = 0.02


class _Canvas:
    """An RGB image and a label-id map drawn together: every shape goes to both with the same pixels."""

    def __init__(self, w: int, h: int, style: _Style, rng: np.random.Generator):
        self.w, self.h, self.st, self.rng = w, h, style, rng
        self.f = style.focal * w
        self.cx, self.cy = w * rng.uniform(0.42, 0.58), h * rng.uniform(*style.horizon)
        self.cam = rng.uniform(*style.cam_h)
        self.img = np.zeros((h, w, 3), np.uint8)
        self.lab = np.zeros((h, w), np.uint8)

    def colour(self, material: str, shade: float = 1.0) -> tuple:
        variants = self.st.colours[material]
        base = np.asarray(variants[self.rng.integers(len(variants))], np.float64)
        return tuple(int(v) for v in np.clip((base + self.rng.normal(0, self.st.jitter, 3)) * shade, 0, 255))

    def px(self, x, y, z) -> np.ndarray:
        """World (x right, y up, z ahead; metres) to pixel coordinates, shape (..., 2)."""
        z = np.maximum(np.asarray(z, np.float64), 0.3)
        return np.stack(np.broadcast_arrays(self.cx + self.f * np.asarray(x) / z,
                                            self.cy + self.f * (self.cam - np.asarray(y)) / z), -1)

    def paint(self, paint, lid: int | None, col: tuple, on: int | None = None) -> None:
        """Run paint(target, value) on the image and the label, antialiasing off: identical pixel sets.

        lid None decorates the image only (windows, lane marks, lamps: same class), and only over pixels
        labelled `on`, so a decoration never leaks a pixel onto another class where rounding differs.
        """
        if lid is not None:
            paint(self.img, col)
            paint(self.lab, lid)
        else:
            mask = np.zeros_like(self.lab)
            paint(mask, 1)
            self.img[(mask > 0) & (self.lab == on)] = col

    def polys(self, pts, lid, col, on=None) -> None:
        """Fill polygons given in pixel coordinates."""
        pts = [np.round(p).astype(np.int32).reshape(-1, 2) for p in pts]
        if pts:
            self.paint(lambda target, v: cv2.fillPoly(target, pts, v, cv2.LINE_8), lid, col, on)

    def ground(self, x0, x1, z0, z1, lid, col, on=None) -> None:
        self.polys([self.px([x0, x1, x1, x0], 0, [z0, z0, z1, z1])], lid, col, on)

    def side(self, x, y0, y1, z0, z1, lid, col) -> None:
        """A vertical plane along the street (facade, wall, vehicle flank) at lateral position x."""
        self.polys([self.px(x, [y0, y1, y1, y0], [z0, z0, z1, z1])], lid, col)

    def rect(self, x0, x1, y0, y1, z, lid, col, min_px: int = 1, on=None) -> None:
        """A camera-facing rectangle; at least min_px wide so thin poles survive small frames."""
        (a, top), (b, bot) = self.px(x0, y1, z), self.px(x1, y0, z)
        if b - a < min_px:
            a, b = (a + b - min_px) / 2, (a + b + min_px) / 2
        self.polys([np.array([[a, top], [b - 1, top], [b - 1, bot - 1], [a, bot - 1]])], lid, col, on)

    def ellipse(self, x, y, z, rx, ry, lid, col, thick: float | None = None, on=None) -> None:
        """A camera-facing ellipse, filled or (thick metres) an outline: heads, crowns, wheels, signs."""
        (u, v), s = self.px(x, y, z), self.f / z
        t = -1 if thick is None else max(1, int(round(thick * s)))
        centre, axes = (int(round(u)), int(round(v))), (max(1, int(rx * s)), max(1, int(ry * s)))
        self.paint(lambda target, val: cv2.ellipse(target, centre, axes, 0, 0, 360, val, t, cv2.LINE_8), lid, col, on)

    def line(self, p, q, z, thick, lid, col) -> None:
        a, b = (tuple(np.round(self.px(*pt, z)).astype(int).tolist()) for pt in (p, q))
        t = max(1, int(round(thick * self.f / z)))
        self.paint(lambda target, v: cv2.line(target, a, b, v, t, cv2.LINE_8), lid, col)


def _skyline(c: _Canvas, z: float) -> None:
    """Sky, then blocks and tree groups closing the street at depth z; drawn first as the farthest things."""
    c.img[:], c.lab[:] = c.colour("sky"), SKY
    for x in np.arange(-80, 80, 12):
        if c.rng.random() < 0.7:
            c.rect(x, x + c.rng.uniform(10, 16), 0, c.rng.uniform(4, 30), z, BUILDING, c.colour("building"))
        else:  # the ground plane drawn next hides the lower half of the mound
            c.ellipse(x + 6, 0, z, 7, c.rng.uniform(5, 10), VEG, c.colour("veg"))


def _street(c: _Canvas) -> dict:
    """The skyline, then the ground: road, lane marks, tram tracks, parking, sidewalks, terrain strips."""
    rng, z1 = c.rng, c.rng.uniform(45, 90)
    # lane boundaries in metres; the camera drives in the lane between -1.75 and 1.75
    lanes = [-1.75 - 3.5 * k for k in range(rng.integers(0, 3), -1, -1)] + [1.75 + 3.5 * k for k in
                                                                           range(rng.integers(0, 2) + 1)]
    xl, xr = lanes[0], lanes[-1]
    lay = {"z_end": z1, "lanes": [(a + b) / 2 for a, b in zip(lanes, lanes[1:])]}
    _skyline(c, z1)
    c.ground(-300, 300, 0.5, z1, GROUND, c.colour("ground"))
    c.ground(xl, xr, 0.5, z1, ROAD, c.colour("road"))
    lane_col = c.colour("lane")
    dash = [c.px([x - .08, x + .08, x + .08, x - .08], 0, [z, z, z + 3, z + 3])
            for x in lanes[1:-1] for z in np.arange(rng.uniform(1, 9), z1 - 3, 9)]
    edge = [c.px([x - .1, x + .1, x + .1, x - .1], 0, [0.5, 0.5, z1, z1]) for x in (xl + .3, xr - .3)]
    c.polys(dash + edge, None, lane_col, on=ROAD)
    if rng.random() < 0.3:  # zebra crossing
        zc = rng.uniform(6, 20)
        c.polys([c.px([x, x + .5, x + .5, x], 0, [zc, zc, zc + 3, zc + 3]) for x in np.arange(xl, xr - .5, 1)],
                None, lane_col, on=ROAD)
    if rng.random() < 0.15:  # tram tracks in the leftmost lane, and a tram on them (train is a rare class)
        lay["tram"] = lay["lanes"][0]
        c.ground(lay["tram"] - .85, lay["tram"] + .85, 0.5, z1, RAIL, c.colour("rail"))
    lay["parking"] = rng.random() < c.st.parking  # a void lane between road and sidewalk
    if lay["parking"]:
        c.ground(xr, xr + 2.3, 0.5, z1, PARKING, c.colour("parking"))
        xr += 2.3
    lay["curb"] = (xl, xr)
    for s, x in ((-1, xl), (1, xr)):
        walk = rng.uniform(2.5, 5.5)
        c.ground(x, x + s * walk, 0.5, z1, SIDEWALK, c.colour("sidewalk"))
        c.ground(x, x + s * 0.25, 0.5, z1, None, c.colour("curb"), on=SIDEWALK)
        strip = rng.uniform(2, 8) if rng.random() < 0.5 else 0.0
        if strip:
            c.ground(x + s * walk, x + s * (walk + strip), 0.5, z1, TERRAIN, c.colour("terrain"))
        lay[s] = (x + s * walk, x + s * (walk + strip))
    return lay


def _facades(c: _Canvas, lay: dict) -> None:
    """Buildings with windows along both sides, walls/fences/hedges/guard rails along the sidewalks."""
    rng, z1 = c.rng, lay["z_end"]
    for s in (-1, 1):
        xf, z = lay[s][1] + s * (rng.uniform(0, 3) if rng.random() < 0.3 else 0.0), 0.5
        while z < z1:
            length, height = rng.uniform(8, 30), rng.uniform(6, 28)
            if rng.random() > 0.15:  # else a gap between buildings
                c.side(xf, 0, height, z, z + length, BUILDING, c.colour("building"))
                zz, yy = np.meshgrid(np.arange(z + 1, z + length - 1.5, 3.5), np.arange(2.5, height - 1.7, 3.2))
                zz, yy = zz.ravel()[:, None], yy.ravel()[:, None]
                c.polys(c.px(xf, yy + [0, 1.6, 1.6, 0], zz + [0, 0, 1.4, 1.4]), None, c.colour("window"), on=BUILDING)
            z += length
        for _ in range(rng.integers(0, 3)):  # low structures along the sidewalk's outer edge
            za = rng.uniform(1, z1 * 0.6)
            lid, mat, hgt = [(WALL, "wall", 2.0), (FENCE, "fence", 1.6), (VEG, "veg", 1.3),
                             (GUARD_RAIL, "guard", 0.9)][rng.integers(4)]
            x, zb, hgt = lay[s][0], za + rng.uniform(6, 25), hgt * rng.uniform(0.8, 1.3)
            c.side(x, 0, hgt, za, zb, lid, c.colour(mat))
            if lid == FENCE:  # slats: image only, the label covers the whole fence as in Cityscapes
                col = c.colour("fence", 0.6)
                c.polys([c.px(x, [0, hgt, hgt, 0], [q, q, q + .12, q + .12]) for q in np.arange(za, zb - .12, .5)],
                        None, col, on=FENCE)


def _vehicle(c: _Canvas, x: float, z: float, kind: str, lid: int) -> None:
    w, h, length, (g0, g1), r = _VEHICLES[kind]
    body, glass, tire = c.colour(kind), c.colour("glass"), c.colour("tire")
    flank, back = x - np.sign(x) * w / 2, c.colour(kind, 0.9)
    if kind == "car":  # sloped cabin silhouette on the flank, cabin set back on the rear face
        zs = z + length * np.array([0, 0, .22, .33, .75, .88, 1, 1])
        ys = h * np.array([.2, .6, .62, 1, 1, .62, .6, .2])
        c.polys([c.px(flank, ys, zs)], lid, c.colour(kind, 0.75))
        c.polys([c.px(flank, h * np.array([.64, .94, .94, .64]), z + length * np.array([.25, .35, .73, .85]))],
                lid, glass)
        c.rect(x - .42 * w, x + .42 * w, .6 * h, h, z + .25 * length, lid, back)
        c.rect(x - .36 * w, x + .36 * w, g0 * h, g1 * h - .05, z + .24 * length, lid, glass)
        top = .62 * h
    else:
        c.side(flank, .3, h, z, z + length, lid, c.colour(kind, 0.75))
        if g1 > 0:
            c.side(flank, g0 * h, g1 * h, z + 1, z + length - 1, lid, glass)
        top = h
    for zw in (z + .15 * length, z + .85 * length - 2 * r):
        c.side(flank, 0, 2 * r, zw, zw + 2 * r, lid, tire)
    c.rect(x - w / 2 + .1, x + w / 2 - .1, 0, .4, z, lid, tire)
    c.rect(x - w / 2, x + w / 2, .3, top, z, lid, body)
    if kind != "car" and g1 > 0:
        c.rect(x - .4 * w, x + .4 * w, g0 * h, g1 * h, z, lid, glass)
    lamp = (250, 250, 225) if x < -1.75 else (230, 20, 20)  # oncoming traffic shows headlights
    for xa in (x - w / 2 + .05, x + w / 2 - .3):
        c.rect(xa, xa + .25, .55 * top, .7 * top, z, None, lamp, on=lid)


def _person(c: _Canvas, x: float, z: float, lid: int = PERSON, base: float = 0.0) -> None:
    h = c.rng.uniform(1.55, 1.9)
    pants, shirt = c.colour("cloth", 0.8), c.colour("cloth")
    for dx in (-.11, .11):
        c.rect(x + dx - .08, x + dx + .08, base, base + .48 * h, z, lid, pants)
    c.rect(x - .22, x + .22, base + .45 * h, base + .83 * h, z, lid, shirt)
    c.ellipse(x, base + .9 * h, z, .07 * h, .09 * h, lid, c.colour("skin"))


def _two_wheeler(c: _Canvas, x: float, z: float, moto: bool, rider: bool) -> None:
    """Side view: wheels, frame (or tank), and a rider on the saddle."""
    d, lid = c.rng.choice([-1, 1]), MOTO if moto else BIKE
    col, tire = c.colour("moto" if moto else "bike"), c.colour("tire")
    rear, front, seat = (x - d * .6, .34), (x + d * .6, .34), (x - d * .15, .95)
    for hub in (rear, front):
        c.ellipse(*hub, z, .34, .34, lid, tire, None if moto else .07)
    if moto:
        c.polys([c.px(x + d * np.array([-.5, .45, .35, -.3]), [.4, .45, .95, .9], z)], lid, col)
    for p, q in ((rear, (x, .35)), (rear, seat), (seat, (x, .35)), (seat, (x + d * .4, 1.0)),
                 ((x, .35), (x + d * .4, 1.0)), ((x + d * .4, 1.0), front), ((x + d * .4, 1.0), (x + d * .45, 1.15))):
        c.line(p, q, z, .06, lid, col)
    if rider:
        _person(c, x - d * .1, z - .05, RIDER, base=.1)


def _pole(c: _Canvas, x: float, z: float, s: int) -> None:
    """A plain pole, a street lamp, a traffic light (on top or hanging over the road) or a sign."""
    rng, kind = c.rng, c.rng.choice(["light", "sign", "sign", "lamp", "plain"])
    top = {"light": rng.uniform(3, 6), "sign": rng.uniform(2.2, 3.2), "lamp": rng.uniform(6, 8)}.get(kind, 4)
    c.rect(x - .1, x + .1, 0, top, z, POLE, c.colour("pole"), min_px=2)
    if kind == "lamp" or (kind == "light" and top > 4.5):
        tip = x - s * rng.uniform(2, 4)
        c.line((x, top), (tip, top), z, .12, POLE, c.colour("pole"))
        if kind == "lamp":
            c.rect(tip - .3, tip + .3, top - .25, top, z, POLE, c.colour("pole", 1.2))
            return
        x = tip
    if kind == "light":
        c.rect(x - .22, x + .22, top - 1.0, top, z, LIGHT, c.colour("light"), min_px=2)
        lit = rng.integers(3)
        if .09 * c.f / z >= 1:  # the lit lamp, only where it fits inside the box
            c.ellipse(x, top - .25 - .25 * lit, z, .09, .09, None, _LAMPS[lit], on=LIGHT)
    elif kind == "sign":
        col, face = c.colour("sign"), c.colour("sign_face")
        if rng.random() < 0.5:
            c.ellipse(x, top, z, .38, .38, SIGN, col)
            if .22 * c.f / z >= 2:
                c.ellipse(x, top, z, .22, .22, None, face, on=SIGN)
        else:
            c.rect(x - .35, x + .35, top - .35, top + .35, z, SIGN, col, min_px=2)


def _tree(c: _Canvas, x: float, z: float) -> None:
    r = c.rng.uniform(1.4, 2.6)
    c.rect(x - .15, x + .15, 0, 3, z, VEG, c.colour("trunk"), min_px=2)
    for dx, dy in ((0, 3.2 + r * .6), (-r * .5, 3 + r * .3), (r * .5, 3 + r * .3)):
        c.ellipse(x + dx, dy, z, r * .8, r * .7, VEG, c.colour("veg"))


def _traffic(c: _Canvas, lay: dict) -> list:
    """Moving vehicles in the lanes, a tram on its tracks, cars and caravans in the parking lane."""
    rng, z1, xr, things, used = c.rng, lay["z_end"], lay["curb"][1], [], []
    if "tram" in lay:
        z = rng.uniform(8, 25)
        things.append((z, partial(_vehicle, c, lay["tram"], z, "train", TRAIN)))
        used.append((lay["tram"], z, z + _VEHICLES["train"][2]))
    for _ in range(rng.integers(*c.st.traffic)):
        lane, z = rng.choice(lay["lanes"]), rng.uniform(7, z1 * 0.8)
        kind, lid = [("car", CAR), ("truck", TRUCK), ("bus", BUS)][rng.choice(3, p=[.76, .12, .12])]
        end = z + _VEHICLES[kind][2]
        if any(lane == other and z < b + 3 and a < end + 3 for other, a, b in used):  # no pile-ups
            continue
        used.append((lane, z, end))
        things.append((z, partial(_vehicle, c, lane + rng.uniform(-.3, .3), z, kind, lid)))
    for z in np.arange(rng.uniform(2, 6), z1 * 0.7, 6.0) if lay["parking"] else []:  # caravans are void
        if rng.random() < 0.6:
            kind, lid = ("caravan", CARAVAN) if rng.random() < 0.06 else ("car", CAR)
            things.append((z, partial(_vehicle, c, xr - 1.2, z, kind, lid)))
    return things


def _things(c: _Canvas, lay: dict) -> list:
    """Everything standing on the street, as (depth, draw) so the caller paints far to near."""
    rng, st, z1, things = c.rng, c.st, lay["z_end"], _traffic(c, lay)
    xl, xr = lay["curb"]
    for _ in range(rng.integers(*st.persons)):
        s = rng.choice([-1, 1])
        a, b = (xr, lay[1][0]) if s > 0 else (lay[-1][0], xl)
        z = rng.uniform(3, 35)
        x = rng.uniform(a + .4, b - .4) if rng.random() < 0.85 else rng.uniform(xl, xr)
        things.append((z, partial(_person, c, x, z)))
    for _ in range(rng.integers(0, 3)):  # riders in the right lane, parked bicycles on the sidewalk
        z, moto = rng.uniform(6, 22), rng.random() < 0.4
        things.append((z, partial(_two_wheeler, c, xr - rng.uniform(.8, 2.5), z, moto, True)))
    if rng.random() < 0.4:
        z = rng.uniform(3, 15)
        things.append((z, partial(_two_wheeler, c, xr + rng.uniform(.8, 2), z, False, False)))
    for s, x in ((-1, xl), (1, xr)):
        for z in np.arange(rng.uniform(3, 10), z1 * 0.8, rng.uniform(9, 16)):
            things.append((z, partial(_pole, c, x + s * .5, z, s)))
        for z in np.arange(rng.uniform(4, 12), z1 * 0.8, rng.uniform(7, 14)) if rng.random() < 0.6 else []:
            things.append((z, partial(_tree, c, lay[s][0] + s * rng.uniform(-1.2, 1.2), z)))
        if rng.random() < 0.5:  # a bin or box: static, or left unlabeled
            z, lid = rng.uniform(3, 20), STATIC if rng.random() < 0.6 else UNLABELED
            x0 = x + s * 1.5
            things.append((z, partial(c.rect, x0 - .35, x0 + .35, 0, 1.0, z, lid, c.colour("static"))))
    return things


def _ego(c: _Canvas) -> None:
    """The hood of the recording car, an ellipse rising from the bottom edge (void in both datasets)."""
    rise = c.h * c.rng.uniform(0.06, 0.12)
    centre, axes = (int(c.w * c.rng.uniform(.45, .55)), int(c.h + rise * 2)), (int(c.w * .8), int(rise * 3))
    c.paint(lambda target, v: cv2.ellipse(target, centre, axes, 0, 0, 360, v, -1, cv2.LINE_8), EGO, c.colour("ego"))


def _photo(img: np.ndarray, lab: np.ndarray, rng: np.random.Generator, strength: float = 1.0) -> np.ndarray:
    """Make a flat render look like a camera frame: texture, overcast sky, colour cast, vignette, blur, noise, each
    scaled by `strength`."""
    h, w = lab.shape
    x = img.astype(np.float32)
    low = cv2.resize(rng.standard_normal((h // 6 + 2, w // 6 + 2), np.float32), (w, h), interpolation=cv2.INTER_CUBIC)
    grain = rng.standard_normal((h, w), np.float32)
    x *= (1 + strength * _TEXTURE[lab] * (0.7 * low + 0.5 * grain))[..., None]
    rows = 1 + strength * np.linspace(0.08, -0.08, h, dtype=np.float32)[:, None, None]  # sky bright overhead
    x = np.where((lab == SKY)[..., None], x * rows, x)
    x *= (1 + strength * (rng.uniform(0.9, 1.1, 3) * rng.uniform(0.82, 1.1) - 1)).astype(np.float32)
    yy, xx = np.ogrid[-1:1:h * 1j, -1:1:w * 1j]
    x *= (1 - strength * rng.uniform(0.15, 0.35) * (xx ** 2 + yy ** 2) / 2).astype(np.float32)[..., None]
    x = cv2.GaussianBlur(x, (0, 0), strength * rng.uniform(0.5, 0.9) + 1e-3)
    x += strength * rng.normal(0, rng.uniform(2, 5), x.shape).astype(np.float32)
    return np.clip(x, 0, 255).astype(np.uint8)


def _render(size: tuple[int, int], style: _Style, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    c = _Canvas(*size, style, rng)
    lay = _street(c)
    _facades(c, lay)
    for _, draw in sorted(_things(c, lay), key=lambda t: -t[0]):
        draw()
    if style.surfaces:
        draw_surfaces(c, style.surfaces)
    if rng.random() < style.ego:
        _ego(c)
    return (_photo(c.img, c.lab, rng, style.photo) if style.photo else c.img), c.lab


