"""Procedural face identities: a labelled face data set that needs no download.

Each identity is a fixed set of parametric traits drawn from ``(seed, identity)``: head shape, skin
tone, eyes (spacing, size, tilt, iris colour), brows, nose, mouth, ears, hair (colour, style,
hairline) and binary traits (glasses, beard, moustache, freckles, mole, blush). Each sample of an
identity is drawn from ``(seed, identity, sample)`` and varies pose (roll, scale, shift, yaw by
cylindrical projection of the features, pitch), expression (smile, open mouth, blinking, brow raise,
gaze), lighting (global gain, colour cast, directional gradient), background, clothing, blur and
noise. Lighting and colour cast are strong enough that the mean colour of an image says little about
who it is, so a recogniser has to look at geometry and traits.

Everything is drawn with anti-aliased OpenCV primitives directly at the output size (sub-pixel
coordinates via fixed-point ``shift``); rendering takes well under a millisecond per 112x112 image.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from facesphere.data.images import to_tensor, to_uint8
from facesphere.data.transforms import SharedEpoch, as_transform, augment_rng

logger = logging.getLogger(__name__)

_IDENTITY_STREAM = 0x1D
_SAMPLE_STREAM = 0x5A
_SHIFT = 4  # fixed-point bits for OpenCV drawing: coordinates are multiplied by 16
_ONE = 1 << _SHIFT
_AA = cv2.LINE_AA

Color = tuple[float, float, float]

_SKIN_TONES = np.array(  # dark -> light, RGB
    [[62, 40, 30], [105, 70, 48], [150, 102, 72], [190, 140, 108], [222, 180, 150], [245, 218, 198]], dtype=np.float64
)
_HAIR_COLORS = np.array(
    [
        [22, 18, 18],  # black
        [55, 38, 28],  # dark brown
        [105, 72, 45],  # brown
        [140, 68, 35],  # auburn
        [205, 170, 110],  # blonde
        [150, 148, 145],  # grey
        [215, 212, 205],  # white
        [90, 40, 110],  # dyed purple
    ],
    dtype=np.float64,
)
_HAIR_WEIGHTS = np.array([0.28, 0.22, 0.16, 0.08, 0.11, 0.08, 0.04, 0.03])
_EYE_COLORS = np.array(
    [[70, 42, 25], [40, 28, 20], [70, 115, 165], [75, 115, 70], [115, 125, 135], [125, 95, 50]], dtype=np.float64
)
_FRAME_COLORS = np.array([[20, 20, 20], [90, 55, 30], [170, 170, 175], [140, 30, 30], [30, 40, 110]], dtype=np.float64)


# --------------------------------------------------------------------------------------------- traits


@dataclass(frozen=True, eq=False)
class FaceIdentity:
    """The fixed traits of one identity, in face units (face half-width = 1, y down, origin mid-face)."""

    outline: np.ndarray  # (K, 2) head outline polygon
    beard_shape: np.ndarray | None  # (B, 2) beard polygon, None without a full beard
    skin: Color
    skin_shadow: Color
    blush: Color | None
    lip: Color
    lip_line: Color
    hair: Color
    brow: Color
    lash: Color
    iris: Color
    eye_x: float
    eye_y: float
    eye_w: float
    eye_h: float
    eye_tilt: float  # degrees, positive = outer corner up
    iris_r: float
    brow_gap: float
    brow_len: float
    brow_thick: float
    brow_arch: float
    brow_slant: float
    nose_y: float
    nose_w: float
    nose_side: float  # +1 / -1: which side the bridge shadow is drawn
    mouth_y: float
    mouth_w: float
    lip_thick: float
    mouth_curve: float
    ear_size: float
    ear_y: float
    top: float  # head top at y = -top
    chin_y: float
    hair_style: int  # 0 shaved, 1 crop, 2 side part, 3 long, 4 curly, 5 receding
    hairline: float
    hair_volume: float
    hair_part: float
    glasses: int  # 0 none, 1 round, 2 rectangular
    frame: Color
    frame_thick: int
    goatee: bool
    moustache: bool
    freckles: np.ndarray  # (F, 2) positions, possibly empty
    mole: tuple[float, float] | None


def _mix(a: np.ndarray, b: np.ndarray, t: float) -> np.ndarray:
    return a + (b - a) * t


def _tone(palette: np.ndarray, t: float) -> np.ndarray:
    """Piecewise-linear interpolation along a palette, t in [0, 1]."""
    position = t * (len(palette) - 1)
    i = min(int(position), len(palette) - 2)
    return _mix(palette[i], palette[i + 1], position - i)


def _rgb(values) -> Color:
    r, g, b = (min(255.0, max(0.0, float(v))) for v in values)
    return (r, g, b)


def _outline(rng: np.random.Generator) -> tuple[np.ndarray, float, float]:
    """Head outline: superellipse halves (cranium, jaw) with a jaw that narrows towards the chin."""
    top = rng.uniform(1.22, 1.42)
    bottom = rng.uniform(1.12, 1.36)
    n_top = rng.uniform(2.0, 2.5)
    n_jaw = rng.uniform(1.9, 2.8)
    taper = rng.uniform(0.1, 0.35)
    t = np.linspace(0.0, 2.0 * math.pi, 48, endpoint=False)
    c, s = np.cos(t), np.sin(t)
    lower = s > 0
    exponent = np.where(lower, 2.0 / n_jaw, 2.0 / n_top)
    x = np.sign(c) * np.abs(c) ** exponent
    y = np.sign(s) * np.abs(s) ** exponent
    x = x * (1.0 - taper * np.where(lower, s**2, 0.0))
    y = y * np.where(lower, bottom, top)
    return np.stack([x, y], axis=1), top, bottom


def _beard(outline: np.ndarray, beard_top: float, mouth_y: float) -> np.ndarray:
    """Beard polygon: the jaw outline below ``beard_top`` closed by a curve that dips under the mouth."""
    jaw = outline[outline[:, 1] > beard_top]  # ordered right -> chin -> left
    edge = 0.95 * min(abs(jaw[0, 0]), abs(jaw[-1, 0]))
    x = np.linspace(-edge, edge, 9)
    y = beard_top + (mouth_y + 0.06 - beard_top) * (1.0 - (x / edge) ** 2) ** 0.6
    return np.concatenate([jaw, np.stack([x, y], axis=1)])


@functools.lru_cache(maxsize=16384)
def face_identity(seed: int, identity: int) -> FaceIdentity:
    """The traits of global identity ``identity`` under ``seed`` (pure, cached)."""
    rng = np.random.default_rng([_IDENTITY_STREAM, int(seed), int(identity)])
    outline, top, bottom = _outline(rng)

    skin = _tone(_SKIN_TONES, rng.beta(1.3, 1.3)) * rng.uniform(0.94, 1.06, 3)
    skin[0] += rng.uniform(-6, 12)  # warm/cool undertone
    hair_index = rng.choice(len(_HAIR_COLORS), p=_HAIR_WEIGHTS)
    hair = _HAIR_COLORS[hair_index] * rng.uniform(0.8, 1.2) + rng.normal(0, 6, 3)
    brow = hair * rng.uniform(0.55, 0.9) if hair_index < 4 else _mix(hair, np.array([60, 45, 35.0]), rng.uniform(0.3, 0.8))
    lip = _mix(skin, np.array([175, 70, 75.0]), rng.uniform(0.25, 0.6)) * rng.uniform(0.8, 1.0)
    iris = _EYE_COLORS[rng.integers(len(_EYE_COLORS))] * rng.uniform(0.8, 1.2) + rng.normal(0, 8, 3)

    style = int(rng.choice(6, p=[0.08, 0.27, 0.2, 0.22, 0.11, 0.12]))
    glasses = int(rng.choice(3, p=[0.72, 0.14, 0.14]))
    beard = int(rng.choice(3, p=[0.8, 0.12, 0.08]))  # none, full, goatee
    moustache = bool(rng.random() < (0.6 if beard else 0.1))
    n_freckles = int(rng.integers(10, 30)) if rng.random() < 0.15 else 0
    fx = rng.uniform(0.25, 0.8, n_freckles) * rng.choice([-1.0, 1.0], n_freckles)
    fy = rng.uniform(0.0, 0.5, n_freckles)
    mole = (float(rng.uniform(-0.7, 0.7)), float(rng.uniform(-0.4, 0.9))) if rng.random() < 0.3 else None
    blush = rng.random() < 0.3

    eye_w = rng.uniform(0.14, 0.22)
    mouth_y = rng.uniform(0.72, 0.95)
    beard_top = rng.uniform(0.15, 0.5)
    return FaceIdentity(
        outline=outline,
        beard_shape=_beard(outline, beard_top, mouth_y) if beard == 1 else None,
        skin=_rgb(skin),
        skin_shadow=_rgb(skin * rng.uniform(0.62, 0.78)),
        blush=_rgb(_mix(skin, np.array([215, 110, 110.0]), 0.22)) if blush else None,
        lip=_rgb(lip),
        lip_line=_rgb(lip * 0.55),
        hair=_rgb(hair),
        brow=_rgb(brow),
        lash=_rgb(brow * 0.6),
        iris=_rgb(iris),
        eye_x=rng.uniform(0.34, 0.47),
        eye_y=rng.uniform(-0.3, -0.06),
        eye_w=eye_w,
        eye_h=eye_w * rng.uniform(0.38, 0.62),
        eye_tilt=rng.uniform(-9.0, 9.0),
        iris_r=eye_w * rng.uniform(0.42, 0.55),
        brow_gap=rng.uniform(0.13, 0.28),
        brow_len=rng.uniform(1.05, 1.5),
        brow_thick=rng.uniform(0.035, 0.1),
        brow_arch=rng.uniform(-0.01, 0.1),
        brow_slant=rng.uniform(-0.07, 0.07),
        nose_y=rng.uniform(0.3, 0.55),
        nose_w=rng.uniform(0.11, 0.23),
        nose_side=float(rng.choice([-1.0, 1.0])),
        mouth_y=mouth_y,
        mouth_w=rng.uniform(0.24, 0.42),
        lip_thick=rng.uniform(0.03, 0.085),
        mouth_curve=rng.uniform(-0.03, 0.05),
        ear_size=rng.uniform(0.8, 1.25),
        ear_y=rng.uniform(0.0, 0.2),
        top=top,
        chin_y=bottom,
        hair_style=style,
        hairline=-top * rng.uniform(0.45, 0.75),
        hair_volume=rng.uniform(0.05, 0.35),
        hair_part=rng.uniform(-0.6, 0.6),
        glasses=glasses,
        frame=_rgb(_FRAME_COLORS[rng.integers(len(_FRAME_COLORS))]),
        frame_thick=int(rng.integers(1, 3)),
        goatee=beard == 2,
        moustache=moustache,
        freckles=np.stack([fx, fy], axis=1) if n_freckles else np.zeros((0, 2)),
        mole=mole,
    )


# ------------------------------------------------------------------------------------------ variation


@dataclass(frozen=True)
class FaceVariation:
    """Per-sample conditions: pose, expression, lighting, surroundings and camera degradations."""

    roll: float  # degrees
    scale: float
    shift: tuple[float, float]  # fraction of (W, H)
    yaw: float  # radians
    pitch: float  # face units of vertical feature shift
    smile: float
    mouth_open: float
    eye_open: float
    brow_raise: float
    gaze: tuple[float, float]
    gain: float
    cast: tuple[float, float, float]
    light_angle: float
    light_strength: float
    background: Color
    clutter: tuple[tuple[Any, ...], ...]
    clothing: Color
    glasses_off: bool
    blur: float
    noise: float
    noise_seed: int


def _clip(value: float, lo: float, hi: float) -> float:
    return lo if value < lo else hi if value > hi else value


def face_variation(seed: int, identity: int, sample: int, difficulty: float = 1.0) -> FaceVariation:
    """The conditions of ``sample`` of global ``identity`` (pure); ``difficulty`` scales every spread.

    All randomness comes from two vectorised draws (plain Python floats afterwards), which keeps this
    cheap enough to call for every rendered image."""
    rng = np.random.default_rng([_SAMPLE_STREAM, int(seed), int(identity), int(sample)])
    d = float(difficulty)
    m = min(d, 1.0)
    n = rng.standard_normal(12).tolist()
    u = rng.random(41).tolist()
    background = [128.0 + (20.0 + 215.0 * u[i] - 128.0) * m for i in (0, 1, 2)]
    clutter = []
    for k in range(int(u[3] * 4) if m > 0 else 0):
        base = 4 + 8 * k  # u[4:28]: up to three shapes, 8 numbers each
        color = [bg + (255.0 * u[base + 5 + c] - bg) * 0.6 * m for c, bg in enumerate(background[:3])]
        clutter.append((int(u[base] < 0.5), (u[base + 1], u[base + 2], u[base + 3], u[base + 4]), _rgb(color)))
    clothing = [70.0 + (10.0 + 235.0 * u[28] - 70.0) * m, 80.0 + (10.0 + 235.0 * u[29] - 80.0) * m, 95.0 + (10.0 + 235.0 * u[30] - 95.0) * m]
    return FaceVariation(
        roll=_clip(n[0] * 7.0 * d, -25.0, 25.0),
        scale=math.exp(_clip(n[1] * 0.07 * d, -0.25, 0.25)),
        shift=(n[2] * 0.035 * d, n[3] * 0.035 * d),
        yaw=(2.0 * u[31] - 1.0) * 0.5 * d,
        pitch=(2.0 * u[32] - 1.0) * 0.08 * d,
        smile=n[4] * 0.05 * d,
        mouth_open=max(0.0, n[5] * 0.09 * d - 0.03 * d),
        eye_open=_clip(1.0 - abs(n[6]) * 0.25 * d, 0.05, 1.0),
        brow_raise=n[7] * 0.035 * d,
        gaze=((2.0 * u[33] - 1.0) * 0.35 * d, (2.0 * u[34] - 1.0) * 0.15 * d),
        gain=math.exp(_clip(n[8] * 0.25 * d, -0.7, 0.6)),
        cast=(math.exp(n[9] * 0.1 * d), math.exp(n[10] * 0.1 * d), math.exp(n[11] * 0.1 * d)),
        light_angle=2.0 * math.pi * u[35],
        light_strength=0.9 * m * u[36],
        background=_rgb(background),
        clutter=tuple(clutter),
        clothing=_rgb(clothing),
        glasses_off=u[37] < 0.12 * m,
        blur=1.3 * d * u[38] / 0.6 if u[38] < 0.6 else 0.0,
        noise=6.0 * d * u[39],
        noise_seed=int(u[40] * 2**52),
    )


# ------------------------------------------------------------------------------------------ rendering


class _Canvas:
    """Draws in face units through a similarity transform (pose) onto a uint8 image."""

    def __init__(self, image: np.ndarray, unit: float, center: tuple[float, float], roll_deg: float) -> None:
        self.image = image
        self.unit = unit
        theta = math.radians(roll_deg)
        self.cos, self.sin = math.cos(theta) * unit, math.sin(theta) * unit
        self.cx, self.cy = center
        self.roll = roll_deg
        # Face units -> fixed-point pixels; + 0.5 so that the truncating cast below rounds.
        self._affine = np.array([[self.cos, -self.sin, self.cx + 0.5 / _ONE], [self.sin, self.cos, self.cy + 0.5 / _ONE]]) * _ONE

    def points(self, xy: np.ndarray) -> np.ndarray:
        return cv2.transform(np.ascontiguousarray(xy, dtype=np.float64).reshape(1, -1, 2), self._affine)[0].astype(np.int32)

    def point(self, x: float, y: float) -> tuple[int, int]:
        return (
            int(round((self.cx + self.cos * x - self.sin * y) * _ONE)),
            int(round((self.cy + self.sin * x + self.cos * y) * _ONE)),
        )

    def fill(self, xy: np.ndarray, color: Color) -> None:
        cv2.fillPoly(self.image, [self.points(xy)], color, _AA, _SHIFT)

    def polyline(self, xy: np.ndarray, color: Color, thickness: int = 1, closed: bool = False) -> None:
        cv2.polylines(self.image, [self.points(xy)], closed, color, thickness, _AA, _SHIFT)

    def ellipse(
        self, x: float, y: float, ax: float, ay: float, color: Color, angle: float = 0.0,
        start: float = 0.0, end: float = 360.0, thickness: int = -1,
    ) -> None:
        scale = self.unit * _ONE
        axes = (max(1, int(ax * scale + 0.5)), max(1, int(ay * scale + 0.5)))
        center = (int((self.cx + self.cos * x - self.sin * y) * _ONE + 0.5), int((self.cy + self.sin * x + self.cos * y) * _ONE + 0.5))
        cv2.ellipse(self.image, center, axes, angle + self.roll, start, end, color, thickness, _AA, _SHIFT)

    def line(self, x0: float, y0: float, x1: float, y1: float, color: Color, thickness: int = 1) -> None:
        cv2.line(self.image, self.point(x0, y0), self.point(x1, y1), color, thickness, _AA, _SHIFT)


def _yaw_x(x: np.ndarray | float, yaw: float, depth: float = 1.0):
    """Cylindrical projection: a feature at x on a cylinder of radius ``depth`` seen after turning by ``yaw``.

    Returns the projected x and the local horizontal foreshortening factor."""
    if isinstance(x, (float, int)):
        phi = math.asin(max(-0.999, min(0.999, x / depth)))
        return depth * math.sin(phi + yaw), math.cos(phi + yaw) / math.cos(phi)
    phi = np.arcsin(np.minimum(np.maximum(np.asarray(x, dtype=np.float64) / depth, -0.999), 0.999))
    return depth * np.sin(phi + yaw), np.cos(phi + yaw) / np.cos(phi)


@functools.lru_cache(maxsize=32)
def _grids(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    gy, gx = np.mgrid[0:height, 0:width].astype(np.float32)
    return gx / width - 0.5, gy / height - 0.5


_T9 = np.linspace(-1.0, 1.0, 9)
_T7 = np.linspace(-1.0, 1.0, 7)
_BROW_TAPER = 1.0 - 0.45 * (_T7 + 1.0) / 2.0  # brows thin towards the outer end
_SCLERA = (238.0, 234.0, 228.0)
_PUPIL = (15.0, 12.0, 12.0)
_MOUTH_INSIDE = (70.0, 25.0, 30.0)
_TEETH = (230.0, 225.0, 215.0)
_MOLE = (60.0, 40.0, 35.0)


def _band(x: np.ndarray, y_top: np.ndarray, y_bottom: np.ndarray) -> np.ndarray:
    """Closed polygon between two curves sampled at the same x: top left->right, bottom right->left."""
    n = len(x)
    pts = np.empty((2 * n, 2))
    pts[:n, 0] = x
    pts[:n, 1] = y_top
    pts[n:, 0] = x[::-1]
    pts[n:, 1] = y_bottom[::-1]
    return pts


def _quad(x0: float, y0: float, x1: float, y1: float, x2: float, y2: float, x3: float, y3: float) -> np.ndarray:
    return np.array([[x0, y0], [x1, y1], [x2, y2], [x3, y3]])


def render_face(face: FaceIdentity, var: FaceVariation, image_size: tuple[int, int] = (112, 112)) -> np.ndarray:
    """Render one HxWx3 uint8 RGB image of ``face`` under conditions ``var``."""
    height, width = int(image_size[0]), int(image_size[1])
    image = np.empty((height, width, 3), dtype=np.uint8)
    image[:] = [int(round(v)) for v in var.background]
    for kind, (a, b, c, e), color in var.clutter:
        if kind == 0:
            cv2.rectangle(image, (int(a * width), int(b * height)), (int(c * width), int(e * height)), color, -1)
        else:
            cv2.circle(image, (int(a * width), int(b * height)), int(5 + c * width * 0.4), color, -1, _AA)

    unit = 0.29 * min(width, 0.95 * height) * var.scale
    center = (width * (0.5 + var.shift[0]), height * (0.47 + var.shift[1]))
    cv = _Canvas(image, unit, center, var.roll)
    yaw, pitch = var.yaw, var.pitch

    # Long and curly hair sit behind the head.
    hair_dx = 0.12 * yaw
    if face.hair_style == 3:
        cv.ellipse(hair_dx, 0.25, 1.22 + face.hair_volume * 0.5, 1.75 + face.hair_volume, face.hair)
    elif face.hair_style == 4:
        cv.ellipse(hair_dx, -0.35, 1.25 + face.hair_volume, 1.25 + face.hair_volume, face.hair)

    # Clothing, neck, ears, head.
    cv.ellipse(0.0, face.chin_y + 1.35, 2.3, 0.95, var.clothing)
    cv.fill(_quad(-0.5, 0.6, 0.5, 0.6, 0.55, face.chin_y + 0.75, -0.55, face.chin_y + 0.75), face.skin_shadow)
    for side in (-1.0, 1.0):
        ex = side * (0.98 - 0.45 * yaw * side)
        squash = 1.0 - 0.6 * yaw * side
        cv.ellipse(ex, face.ear_y + pitch, 0.14 * face.ear_size * squash, 0.27 * face.ear_size, face.skin_shadow)
        cv.ellipse(ex + side * 0.02, face.ear_y + pitch, 0.08 * face.ear_size * squash, 0.18 * face.ear_size, face.skin)
    cv.fill(face.outline, face.skin)

    if face.beard_shape is not None:
        cv.fill(face.beard_shape, face.hair)
    elif face.goatee:
        gx, _ = _yaw_x(0.0, yaw, 1.2)
        cv.ellipse(gx, face.chin_y - 0.24, 0.22, 0.2, face.hair)
    _draw_hair(cv, face, yaw)

    if face.blush is not None:
        for side in (-1.0, 1.0):
            bx, bs = _yaw_x(side * 0.55, yaw)
            cv.ellipse(bx, 0.32 + pitch, 0.16 * bs, 0.1, face.blush)
    if len(face.freckles):
        fx, _ = _yaw_x(face.freckles[:, 0], yaw)
        pts = cv.points(np.stack([fx, face.freckles[:, 1] + pitch], axis=1))
        radius = max(1, int(0.022 * unit * _ONE))
        for p in pts.tolist():
            cv2.circle(image, (p[0], p[1]), radius, face.skin_shadow, -1, _AA, _SHIFT)
    if face.mole is not None:
        mx, _ = _yaw_x(face.mole[0], yaw)
        cv.ellipse(mx, face.mole[1] + pitch, 0.03, 0.03, _MOLE)

    _draw_nose(cv, face, yaw, pitch)
    _draw_eyes(cv, face, var, yaw, pitch)
    _draw_brows(cv, face, var, yaw, pitch)
    _draw_mouth(cv, face, var, yaw, pitch)
    if face.glasses and not var.glasses_off:
        _draw_glasses(cv, face, yaw, pitch)
    return _camera(image, var)


def _draw_hair(cv: _Canvas, face: FaceIdentity, yaw: float) -> None:
    if face.hair_style == 0:
        return
    hl = face.hairline
    dx = 0.12 * yaw
    vol = face.hair_volume if face.hair_style != 5 else face.hair_volume * 0.4
    # Cap: the upper half of an ellipse from the hairline to above the skull.
    cv.ellipse(dx, hl, 1.04 + vol * 0.3, (hl + face.top) + vol, face.hair, start=180, end=360)
    for side in (-1.0, 1.0):  # sideburns down the temples
        cv.fill(_quad(side * 1.04, hl - 0.05, side * 0.86, hl - 0.05, side * 0.9, hl + 0.42, side * 1.0, hl + 0.42), face.hair)
    if face.hair_style == 2:  # side part with a fringe sweeping across the forehead
        p = face.hair_part
        px, _ = _yaw_x(p, yaw)
        away = -1.0 if p >= 0 else 1.0
        cv.fill(_quad(px, hl - 0.3, 0.95 * away, hl - 0.1, 0.85 * away, hl + 0.22, px * 0.3, hl + 0.05), face.hair)
    elif face.hair_style == 4:  # curls along the hairline
        xs, _ = _yaw_x(np.linspace(-0.85, 0.85, 7), yaw)
        for x in xs.tolist():
            cv.ellipse(x, hl, 0.15, 0.12, face.hair)
    elif face.hair_style == 5:  # receding: skin bays at the temples
        for side in (-1.0, 1.0):
            rx, _ = _yaw_x(side * 0.42, yaw)
            cv.ellipse(rx, hl, 0.3, 0.28, face.skin, start=180, end=360)
    elif face.hair_style == 3:  # long hair framing the face
        for side in (-1.0, 1.0):
            cv.fill(_quad(side * 1.04, hl, side * 0.88, hl, side * 0.95, 0.5, side * 1.15, 0.9), face.hair)


def _draw_nose(cv: _Canvas, face: FaceIdentity, yaw: float, pitch: float) -> None:
    ny = face.nose_y + pitch * 1.3
    tip, scale = _yaw_x(0.0, yaw, 1.35)
    bridge, _ = _yaw_x(face.nose_side * 0.09, yaw, 1.2)
    cv.line(bridge, face.eye_y + 0.12 + pitch, tip + face.nose_side * face.nose_w * 0.55 * scale, ny - 0.1, face.skin_shadow)
    for side in (-1.0, 1.0):
        nx, ns = _yaw_x(side * face.nose_w * 0.5, yaw, 1.3)
        cv.ellipse(nx, ny, 0.055 * ns, 0.03, face.skin_shadow, angle=side * 20)
    cv.ellipse(tip, ny - 0.03, face.nose_w * 0.45 * scale, 0.07, face.skin_shadow, start=20, end=160)


def _draw_eyes(cv: _Canvas, face: FaceIdentity, var: FaceVariation, yaw: float, pitch: float) -> None:
    ey = face.eye_y + pitch
    h = face.eye_h * var.eye_open
    r = face.iris_r
    for side in (-1.0, 1.0):
        x, s = _yaw_x(side * face.eye_x, yaw)
        w = face.eye_w * s
        tilt = -side * face.eye_tilt
        if var.eye_open < 0.25:  # blink: just the lid line
            cv.ellipse(x, ey, w, max(h, 0.01), face.lash, angle=tilt, start=0, end=180, thickness=1)
            continue
        cv.ellipse(x, ey, w, h, _SCLERA, angle=tilt)
        gx = x + var.gaze[0] * w
        gy = ey + var.gaze[1] * h
        cv.ellipse(gx, gy, r * s, min(r, h * 0.95), face.iris)
        cv.ellipse(gx, gy, r * 0.45 * s, min(r * 0.45, h * 0.8), _PUPIL)
        cv.ellipse(x, ey, w * 1.05, h * 1.05, face.lash, angle=tilt, start=180, end=360, thickness=1)


def _draw_brows(cv: _Canvas, face: FaceIdentity, var: FaceVariation, yaw: float, pitch: float) -> None:
    base = face.eye_y + pitch - face.eye_h - face.brow_gap - var.brow_raise
    half = face.eye_w * face.brow_len
    half_thick = 0.5 * face.brow_thick * _BROW_TAPER
    y = base - face.brow_arch * (1 - _T7**2) - face.brow_slant * _T7  # _T7: -1 inner end, +1 outer end
    for side in (-1.0, 1.0):
        px, _ = _yaw_x(side * (face.eye_x + _T7 * half), yaw)
        cv.fill(_band(px, y - half_thick, y + half_thick), face.brow)


def _draw_mouth(cv: _Canvas, face: FaceIdentity, var: FaceVariation, yaw: float, pitch: float) -> None:
    t = _T9
    my = face.mouth_y + pitch * 0.8
    curve = face.mouth_curve + var.smile
    width = face.mouth_w * (1.0 + 0.6 * max(var.smile, 0.0))
    x, _ = _yaw_x(t * width, yaw, 1.15)
    arch = 1 - t**2
    seam = my - curve * t**2
    lips = face.lip_thick * (1 - 0.5 * t**2)
    opening = seam + var.mouth_open * arch
    upper = seam - lips - var.mouth_open * 0.2 * arch
    if var.mouth_open > 0.01:
        cv.fill(_band(x, seam, opening), _MOUTH_INSIDE)
        if var.mouth_open > 0.04:
            cv.fill(_band(x, seam, seam + min(var.mouth_open, 0.06) * arch), _TEETH)
    cv.fill(_band(x, upper, seam), face.lip)
    cv.fill(_band(x, opening, opening + 1.3 * lips), face.lip)
    cv.polyline(np.stack([x, seam], axis=1), face.lip_line)
    if face.moustache:
        mx = x[::2] * (1.0 + 0.05 / width)
        bottom = upper[::2] - 0.01 + 0.04 * np.abs(t[::2])
        top = np.maximum(bottom - 0.12, face.nose_y + pitch * 1.3 + 0.06)  # follows the lip, stays below the nose
        cv.fill(_band(mx, top, bottom), face.hair)


def _draw_glasses(cv: _Canvas, face: FaceIdentity, yaw: float, pitch: float) -> None:
    ey = face.eye_y + pitch
    r = face.eye_w * 1.45
    inner = []
    for side in (-1.0, 1.0):
        x, s = _yaw_x(side * face.eye_x, yaw)
        if face.glasses == 1:
            cv.ellipse(x, ey, r * s, r * 0.85, face.frame, thickness=face.frame_thick)
        else:
            box = _quad(x - r * s, ey - r * 0.7, x + r * s, ey - r * 0.7, x + r * s, ey + r * 0.6, x - r * s, ey + r * 0.6)
            cv.polyline(box, face.frame, face.frame_thick, closed=True)
        inner.append(x - side * r * s)
    cv.line(inner[0], ey - 0.05, inner[1], ey - 0.05, face.frame, face.frame_thick)


_NOISE_BANK_SIZE = 1 << 19


@functools.lru_cache(maxsize=1)
def _noise_bank() -> np.ndarray:
    """A fixed block of standard normals; per-sample noise is a slice at a seeded offset (much cheaper
    than drawing fresh normals for every image, and just as deterministic)."""
    return np.random.default_rng(0x4E015E).standard_normal(_NOISE_BANK_SIZE, dtype=np.float32)


def _camera(image: np.ndarray, var: FaceVariation) -> np.ndarray:
    """Lighting (gain, colour cast, directional gradient), blur and sensor noise, done with OpenCV
    arithmetic because numpy broadcasting over 3 channels is several times slower at this size."""
    height, width = image.shape[:2]
    gx, gy = _grids(height, width)
    s = var.light_strength
    field = cv2.addWeighted(gx, s * math.cos(var.light_angle), gy, s * math.sin(var.light_angle), 1.0)
    gain = [var.gain * c for c in var.cast]
    multiplier = cv2.merge([field * np.float32(g) for g in gain])
    out = cv2.multiply(image, multiplier, dtype=cv2.CV_32F)
    if var.blur > 0.25:
        out = cv2.GaussianBlur(out, (0, 0), var.blur)
    if var.noise > 0:
        n = out.size
        if n <= _NOISE_BANK_SIZE // 2:
            offset = var.noise_seed % (_NOISE_BANK_SIZE - n)
            noise = _noise_bank()[offset : offset + n].reshape(out.shape)
        else:
            noise = np.random.default_rng(var.noise_seed).standard_normal(out.shape, dtype=np.float32)
        out = cv2.scaleAdd(noise, var.noise, out)
    return cv2.add(out, 0.0, dtype=cv2.CV_8U)  # rounds and saturates to 0..255


# -------------------------------------------------------------------------------------------- dataset


class SyntheticFaces(Dataset):
    """A labelled data set of procedural faces, rendered lazily and deterministically.

    Index ``i`` is sample ``i % samples_per_identity`` of identity ``i // samples_per_identity``; the
    label is that identity's index within this data set, while its appearance comes from the global
    identity ``identity_offset + label``. Held-out identities therefore come from a disjoint
    ``identity_offset`` range with the same ``seed``. ``augment`` (an ``AugmentConfig``, dict or
    ``(image, rng)`` callable) adds epoch-dependent augmentation on top of the fixed per-sample variation.
    """

    def __init__(
        self,
        num_identities: int,
        samples_per_identity: int,
        image_size: tuple[int, int] = (112, 112),
        seed: int = 0,
        identity_offset: int = 0,
        augment: Any = None,
        difficulty: float = 1.0,
    ) -> None:
        if num_identities < 1 or samples_per_identity < 1:
            raise ValueError("num_identities and samples_per_identity must be >= 1")
        if identity_offset < 0 or seed < 0:
            raise ValueError("seed and identity_offset must be >= 0")
        if difficulty < 0:
            raise ValueError(f"difficulty must be >= 0, got {difficulty}")
        height, width = int(image_size[0]), int(image_size[1])
        if height < 16 or width < 16:
            raise ValueError(f"image_size must be at least 16x16, got {image_size}")
        self.num_identities = int(num_identities)
        self.samples_per_identity = int(samples_per_identity)
        self.image_size = (height, width)
        self.seed = int(seed)
        self.identity_offset = int(identity_offset)
        self.difficulty = float(difficulty)
        self.augment = augment
        self._transform = as_transform(augment)
        self._epoch = SharedEpoch(0)
        self.num_classes = self.num_identities
        self.labels = np.repeat(np.arange(self.num_identities, dtype=np.int64), self.samples_per_identity)
        self.identities = list(range(self.identity_offset, self.identity_offset + self.num_identities))

    def __len__(self) -> int:
        return self.num_identities * self.samples_per_identity

    @property
    def epoch(self) -> int:
        return self._epoch.get()

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation of ``epoch``; visible to persistent DataLoader workers too."""
        self._epoch.set(epoch)

    def render(self, identity: int, sample: int) -> np.ndarray:
        """The un-augmented HxWx3 uint8 RGB image of ``sample`` of local ``identity``."""
        if not 0 <= identity < self.num_identities:
            raise IndexError(f"identity {identity} out of range [0, {self.num_identities})")
        gid = self.identity_offset + identity
        face = face_identity(self.seed, gid)
        variation = face_variation(self.seed, gid, sample, self.difficulty)
        return render_face(face, variation, self.image_size)

    def load_uint8(self, index: int) -> np.ndarray:
        """Sample ``index`` as HxWx3 uint8 RGB, augmented for the current epoch (what ``__getitem__`` normalises)."""
        index = self._check_index(index)
        identity, sample = divmod(index, self.samples_per_identity)
        image = self.render(identity, sample)
        if self._transform is not None:
            image = self._transform(image, augment_rng(self.seed, self.epoch, index))
        return image

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        index = self._check_index(index)
        return to_tensor(self.load_uint8(index)), int(self.labels[index])

    def _check_index(self, index: int) -> int:
        index = int(index)
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for {n} samples")
        return index

    def __repr__(self) -> str:
        return (
            f"SyntheticFaces(num_identities={self.num_identities}, samples_per_identity={self.samples_per_identity}, "
            f"image_size={self.image_size}, seed={self.seed}, identity_offset={self.identity_offset}, "
            f"difficulty={self.difficulty})"
        )


# ------------------------------------------------------------------------------------------- export


def write_image_folder(
    dataset: Dataset,
    root: str | os.PathLike,
    ext: str = "png",
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
    log_every: float = 10.0,
) -> int:
    """Write ``dataset`` as ``root/<identity>/<sample>.<ext>``, readable by ``ImageFolderDataset``.

    Folders are named by the global identity (``dataset.identities`` if present, else the label),
    zero-padded to at least 5 digits so name order equals label order; files are numbered per
    identity (4 digits). Each file is encoded in memory, written to a hidden temporary file and
    renamed, so an interrupted run never leaves a half-written image; with ``overwrite=False``
    existing files are kept, which makes re-running resume. ``progress(done, total)`` is called after
    every image, and progress is logged every ``log_every`` percent. Returns the number of files written.
    """
    ext = ext.lower().lstrip(".")
    if ext not in ("png", "jpg", "jpeg", "bmp", "webp"):
        raise ValueError(f"unsupported image extension {ext!r}")
    root = Path(root)
    labels = np.asarray(getattr(dataset, "labels"))
    names = getattr(dataset, "identities", None) or list(range(int(labels.max()) + 1 if len(labels) else 0))
    width = max(5, len(str(max(names)))) if len(names) else 5
    total = len(labels)
    counts: dict[int, int] = {}
    written = 0
    next_log = log_every
    params = [cv2.IMWRITE_JPEG_QUALITY, 95] if ext in ("jpg", "jpeg") else []
    for index in range(total):
        label = int(labels[index])
        number = counts.get(label, 0)
        counts[label] = number + 1
        folder = root / f"{int(names[label]):0{width}d}"
        target = folder / f"{number:04d}.{ext}"
        if overwrite or not target.exists():
            if hasattr(dataset, "load_uint8"):
                image = dataset.load_uint8(index)
            else:
                image = to_uint8(dataset[index][0])
            ok, encoded = cv2.imencode(f".{ext}", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), params)
            if not ok:
                raise OSError(f"could not encode {target}")
            folder.mkdir(parents=True, exist_ok=True)
            tmp = folder / f".{target.name}.{os.getpid()}.tmp"
            try:
                tmp.write_bytes(encoded.tobytes())
                os.replace(tmp, target)
            finally:
                if tmp.exists():
                    tmp.unlink()
            written += 1
        done = index + 1
        if progress is not None:
            progress(done, total)
        if total and 100.0 * done / total >= next_log:
            logger.info("wrote %d/%d images (%.0f%%) to %s", done, total, 100.0 * done / total, root)
            next_log += log_every
    return written


def contact_sheet(dataset: SyntheticFaces, identities: int = 6, samples: int = 6, gap: int = 2) -> np.ndarray:
    """A grid image, one row per identity and one column per sample, for eyeballing the generator."""
    height, width = dataset.image_size
    rows = min(identities, dataset.num_identities)
    cols = min(samples, dataset.samples_per_identity)
    sheet = np.full((rows * (height + gap) + gap, cols * (width + gap) + gap, 3), 255, dtype=np.uint8)
    for r in range(rows):
        for c in range(cols):
            y, x = gap + r * (height + gap), gap + c * (width + gap)
            sheet[y : y + height, x : x + width] = dataset.load_uint8(r * dataset.samples_per_identity + c)
    return sheet
