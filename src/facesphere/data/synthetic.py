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


@dataclass(frozen=True)
class FaceIdentity:
    """The fixed traits of one identity, in face units (face half-width = 1, y down, origin mid-face)."""

    outline: np.ndarray  # (K, 2) head outline polygon
    skin: Color
    skin_shadow: Color
    lip: Color
    hair: Color
    brow: Color
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
    chin_y: float
    hair_style: int  # 0 shaved, 1 crop, 2 side part, 3 long, 4 curly, 5 receding
    hairline: float
    hair_volume: float
    hair_part: float
    glasses: int  # 0 none, 1 round, 2 rectangular
    frame: Color
    frame_thick: int
    beard: int  # 0 none, 1 full, 2 goatee
    beard_top: float
    moustache: bool
    freckles: np.ndarray  # (F, 2) positions, possibly empty
    mole: tuple[float, float] | None
    blush: bool


def _mix(a: np.ndarray, b: np.ndarray, t: float) -> np.ndarray:
    return a + (b - a) * t


def _tone(palette: np.ndarray, t: float) -> np.ndarray:
    """Piecewise-linear interpolation along a palette, t in [0, 1]."""
    position = t * (len(palette) - 1)
    i = min(int(position), len(palette) - 2)
    return _mix(palette[i], palette[i + 1], position - i)


def _rgb(values: np.ndarray) -> Color:
    clipped = np.clip(values, 0, 255)
    return (float(clipped[0]), float(clipped[1]), float(clipped[2]))


def _outline(rng: np.random.Generator) -> tuple[np.ndarray, float, float]:
    """Head outline: a superellipse top with a tapered jaw and a chin of random width and depth."""
    top = rng.uniform(1.22, 1.45)
    bottom = rng.uniform(1.12, 1.38)
    square = rng.uniform(2.0, 3.0)
    taper = rng.uniform(0.12, 0.38)
    chin_width = rng.uniform(0.25, 0.6)
    t = np.linspace(0.0, 2.0 * math.pi, 48, endpoint=False)
    c, s = np.cos(t), np.sin(t)
    x = np.sign(c) * np.abs(c) ** (2.0 / square)
    y = np.sign(s) * np.abs(s) ** (2.0 / square)
    lower = s > 0
    # Narrow the jaw progressively towards the chin, flattening the chin by chin_width.
    narrow = 1.0 - taper * np.where(lower, np.abs(s) ** 1.5, 0.0)
    x = x * narrow
    x = np.where(lower & (np.abs(x) < chin_width * 0.5), x * 0.9, x)
    y = np.where(lower, y * bottom, y * top)
    return np.stack([x, y], axis=1), top, bottom


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
    beard = int(rng.choice(3, p=[0.8, 0.12, 0.08]))
    moustache = bool(rng.random() < (0.6 if beard else 0.1))
    n_freckles = int(rng.integers(10, 30)) if rng.random() < 0.15 else 0
    fx = rng.uniform(0.25, 0.8, n_freckles) * rng.choice([-1.0, 1.0], n_freckles)
    fy = rng.uniform(0.0, 0.5, n_freckles)
    mole = (float(rng.uniform(-0.7, 0.7)), float(rng.uniform(-0.4, 0.9))) if rng.random() < 0.3 else None

    eye_w = rng.uniform(0.14, 0.22)
    return FaceIdentity(
        outline=outline,
        skin=_rgb(skin),
        skin_shadow=_rgb(skin * rng.uniform(0.62, 0.78)),
        lip=_rgb(lip),
        hair=_rgb(hair),
        brow=_rgb(brow),
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
        mouth_y=rng.uniform(0.72, 0.95),
        mouth_w=rng.uniform(0.24, 0.42),
        lip_thick=rng.uniform(0.03, 0.085),
        mouth_curve=rng.uniform(-0.03, 0.05),
        ear_size=rng.uniform(0.8, 1.25),
        ear_y=rng.uniform(0.0, 0.2),
        chin_y=bottom,
        hair_style=style,
        hairline=-top * rng.uniform(0.45, 0.75),
        hair_volume=rng.uniform(0.05, 0.35),
        hair_part=rng.uniform(-0.6, 0.6),
        glasses=glasses,
        frame=_rgb(_FRAME_COLORS[rng.integers(len(_FRAME_COLORS))]),
        frame_thick=int(rng.integers(1, 3)),
        beard=beard,
        beard_top=rng.uniform(0.2, 0.55),
        moustache=moustache,
        freckles=np.stack([fx, fy], axis=1) if n_freckles else np.zeros((0, 2)),
        mole=mole,
        blush=bool(rng.random() < 0.3),
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


_NEUTRAL_BG = np.array([128.0, 128.0, 128.0])
_NEUTRAL_CLOTHES = np.array([70.0, 80.0, 95.0])


def face_variation(seed: int, identity: int, sample: int, difficulty: float = 1.0) -> FaceVariation:
    """The conditions of ``sample`` of global ``identity`` (pure); ``difficulty`` scales every spread."""
    rng = np.random.default_rng([_SAMPLE_STREAM, int(seed), int(identity), int(sample)])
    d = float(difficulty)
    m = min(d, 1.0)
    u = rng.uniform(-1.0, 1.0, 6)
    n = rng.standard_normal(12)
    background = _mix(_NEUTRAL_BG, rng.uniform(20, 235, 3), m)
    clutter = tuple(
        (int(rng.integers(2)), tuple(rng.uniform(0, 1, 4)), _rgb(_mix(background, rng.uniform(0, 255, 3), 0.6 * m)))
        for _ in range(int(rng.integers(0, 4)) if m > 0 else 0)
    )
    return FaceVariation(
        roll=float(np.clip(n[0] * 7.0 * d, -25, 25)),
        scale=float(math.exp(np.clip(n[1] * 0.07 * d, -0.25, 0.25))),
        shift=(float(n[2] * 0.035 * d), float(n[3] * 0.035 * d)),
        yaw=float(u[0] * 0.5 * d),
        pitch=float(u[1] * 0.08 * d),
        smile=float(n[4] * 0.05 * d),
        mouth_open=float(max(0.0, n[5] * 0.09 * d - 0.03 * d)),
        eye_open=float(np.clip(1.0 - abs(n[6]) * 0.25 * d, 0.05, 1.0)),
        brow_raise=float(n[7] * 0.035 * d),
        gaze=(float(u[2] * 0.35 * d), float(u[3] * 0.15 * d)),
        gain=float(math.exp(np.clip(n[8] * 0.25 * d, -0.7, 0.6))),
        cast=tuple(float(math.exp(v * 0.1 * d)) for v in n[9:12]),
        light_angle=float(rng.uniform(0.0, 2.0 * math.pi)),
        light_strength=float(rng.uniform(0.0, 0.9) * m),
        background=_rgb(background),
        clutter=clutter,
        clothing=_rgb(_mix(_NEUTRAL_CLOTHES, rng.uniform(10, 245, 3), m)),
        glasses_off=bool(rng.random() < 0.12 * m),
        blur=float(rng.uniform(0.0, 1.3 * d) if rng.random() < 0.6 else 0.0),
        noise=float(rng.uniform(0.0, 6.0 * d)),
        noise_seed=int(rng.integers(2**63)),
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

    def points(self, xy: np.ndarray) -> np.ndarray:
        x, y = xy[..., 0], xy[..., 1]
        px = self.cx + self.cos * x - self.sin * y
        py = self.cy + self.sin * x + self.cos * y
        return np.rint(np.stack([px, py], axis=-1) * _ONE).astype(np.int32)

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
        axes = (max(1, int(round(ax * self.unit * _ONE))), max(1, int(round(ay * self.unit * _ONE))))
        cv2.ellipse(self.image, self.point(x, y), axes, angle + self.roll, start, end, color, thickness, _AA, _SHIFT)

    def line(self, x0: float, y0: float, x1: float, y1: float, color: Color, thickness: int = 1) -> None:
        cv2.line(self.image, self.point(x0, y0), self.point(x1, y1), color, thickness, _AA, _SHIFT)


def _yaw_x(x: np.ndarray | float, yaw: float, depth: float = 1.0):
    """Cylindrical projection: a feature at x on a cylinder of radius ``depth`` seen after turning by ``yaw``."""
    u = np.clip(np.asarray(x, dtype=np.float64) / depth, -0.999, 0.999)
    phi = np.arcsin(u)
    return depth * np.sin(phi + yaw), np.cos(phi + yaw) / np.cos(phi)


@functools.lru_cache(maxsize=32)
def _grids(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    gy, gx = np.mgrid[0:height, 0:width].astype(np.float32)
    return gx / width - 0.5, gy / height - 0.5


_T9 = np.linspace(-1.0, 1.0, 9)
_T7 = np.linspace(-1.0, 1.0, 7)


def render_face(face: FaceIdentity, var: FaceVariation, image_size: tuple[int, int] = (112, 112)) -> np.ndarray:
    """Render one HxWx3 uint8 RGB image of ``face`` under conditions ``var``."""
    height, width = int(image_size[0]), int(image_size[1])
    image = np.empty((height, width, 3), dtype=np.uint8)
    image[:] = np.asarray(var.background, dtype=np.float64).round().astype(np.uint8)
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
    neck_w = 0.5
    cv.fill(np.array([[-neck_w, 0.6], [neck_w, 0.6], [neck_w * 1.1, face.chin_y + 0.75], [-neck_w * 1.1, face.chin_y + 0.75]]), face.skin_shadow)
    for side in (-1.0, 1.0):
        ex = side * (0.98 - 0.45 * yaw * side)
        cv.ellipse(ex, face.ear_y + pitch, 0.14 * face.ear_size * (1 - 0.6 * yaw * side), 0.27 * face.ear_size, face.skin_shadow)
        cv.ellipse(ex + side * 0.02, face.ear_y + pitch, 0.08 * face.ear_size * (1 - 0.6 * yaw * side), 0.18 * face.ear_size, face.skin)
    cv.fill(face.outline, face.skin)

    # Beard: the part of the head outline below beard_top, drawn before the mouth.
    if face.beard == 1:
        lower = face.outline[face.outline[:, 1] > face.beard_top]
        cv.fill(lower, face.hair)
    elif face.beard == 2:
        mx, _ = _yaw_x(0.0, yaw, 1.2)
        cv.ellipse(float(mx), face.chin_y - 0.2, 0.28, 0.28, face.hair, start=0, end=180)

    _draw_hair(cv, face, yaw)

    if face.blush:
        for side in (-1.0, 1.0):
            bx, bs = _yaw_x(side * 0.55, yaw)
            cv.ellipse(float(bx), 0.32 + pitch, 0.16 * float(bs), 0.1, _rgb(_mix(np.array(face.skin), np.array([215, 110, 110.0]), 0.22)))
    if len(face.freckles):
        fx, _ = _yaw_x(face.freckles[:, 0], yaw)
        pts = cv.points(np.stack([fx, face.freckles[:, 1] + pitch], axis=1))
        radius = max(1, int(0.022 * unit * _ONE))
        for p in pts:
            cv2.circle(image, (int(p[0]), int(p[1])), radius, face.skin_shadow, -1, _AA, _SHIFT)
    if face.mole is not None:
        mx, _ = _yaw_x(face.mole[0], yaw)
        cv.ellipse(float(mx), face.mole[1] + pitch, 0.03, 0.03, (60.0, 40.0, 35.0))

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
    top = float(-face.outline[:, 1].min())
    hl = face.hairline
    dx = 0.12 * yaw
    vol = face.hair_volume if face.hair_style != 5 else face.hair_volume * 0.4
    # Cap: the upper half of an ellipse from the hairline to above the skull.
    cv.ellipse(dx, hl, 1.04 + vol * 0.3, (hl + top) + vol, face.hair, start=180, end=360)
    # Sideburns down the temples.
    for side in (-1.0, 1.0):
        cv.fill(np.array([[side * 1.04, hl - 0.05], [side * 0.86, hl - 0.05], [side * 0.9, hl + 0.42], [side * 1.0, hl + 0.42]]), face.hair)
    if face.hair_style == 2:  # side part with a fringe sweeping across the forehead
        p = face.hair_part
        px, _ = _yaw_x(p, yaw)
        cv.fill(np.array([[float(px), hl - 0.3], [-0.95 * np.sign(p or 1.0), hl - 0.1], [-0.85 * np.sign(p or 1.0), hl + 0.22], [float(px) * 0.3, hl + 0.05]]), face.hair)
    elif face.hair_style == 4:  # curls along the hairline
        xs, _ = _yaw_x(np.linspace(-0.85, 0.85, 7), yaw)
        for x in xs:
            cv.ellipse(float(x), hl, 0.15, 0.12, face.hair)
    elif face.hair_style == 5:  # receding: skin bays at the temples
        for side in (-1.0, 1.0):
            rx, _ = _yaw_x(side * 0.42, yaw)
            cv.ellipse(float(rx), hl, 0.3, 0.28, face.skin, start=180, end=360)
    elif face.hair_style == 3:  # long hair framing the face
        for side in (-1.0, 1.0):
            cv.fill(np.array([[side * 1.04, hl], [side * 0.88, hl], [side * 0.95, 0.5], [side * 1.15, 0.9]]), face.hair)


def _draw_nose(cv: _Canvas, face: FaceIdentity, yaw: float, pitch: float) -> None:
    ny = face.nose_y + pitch * 1.3
    tip, scale = _yaw_x(0.0, yaw, 1.35)
    tip, scale = float(tip), float(scale)
    bridge, _ = _yaw_x(face.nose_side * 0.09, yaw, 1.2)
    cv.line(float(bridge), face.eye_y + 0.12 + pitch, tip + face.nose_side * face.nose_w * 0.55 * scale, ny - 0.1, face.skin_shadow)
    for side in (-1.0, 1.0):
        nx, ns = _yaw_x(side * face.nose_w * 0.5, yaw, 1.3)
        cv.ellipse(float(nx), ny, 0.055 * float(ns), 0.03, face.skin_shadow, angle=side * 20)
    cv.ellipse(tip, ny - 0.03, face.nose_w * 0.45 * scale, 0.07, face.skin_shadow, start=20, end=160)


def _draw_eyes(cv: _Canvas, face: FaceIdentity, var: FaceVariation, yaw: float, pitch: float) -> None:
    ey = face.eye_y + pitch
    for side in (-1.0, 1.0):
        x, s = _yaw_x(side * face.eye_x, yaw)
        x, s = float(x), float(s)
        w = face.eye_w * s
        h = face.eye_h * var.eye_open
        tilt = -side * face.eye_tilt
        lash = _rgb(np.array(face.brow) * 0.6)
        if var.eye_open < 0.25:
            cv.ellipse(x, ey, w, max(h, 0.01), lash, angle=tilt, start=0, end=180, thickness=1)
            continue
        cv.ellipse(x, ey, w, h, (238.0, 234.0, 228.0), angle=tilt)
        gx = x + var.gaze[0] * w
        gy = ey + var.gaze[1] * h
        r = face.iris_r
        cv.ellipse(gx, gy, r * s, min(r, h * 0.95), face.iris)
        cv.ellipse(gx, gy, r * 0.45 * s, min(r * 0.45, h * 0.8), (15.0, 12.0, 12.0))
        cv.ellipse(x, ey, w * 1.05, h * 1.05, lash, angle=tilt, start=180, end=360, thickness=1)


def _draw_brows(cv: _Canvas, face: FaceIdentity, var: FaceVariation, yaw: float, pitch: float) -> None:
    base = face.eye_y + pitch - face.eye_h - face.brow_gap - var.brow_raise
    half = face.eye_w * face.brow_len
    thick = face.brow_thick * (1.0 - 0.45 * np.clip((_T7 + 1) / 2, 0, 1))  # tapers towards the outer end
    for side in (-1.0, 1.0):
        t = _T7  # -1 inner end, +1 outer end
        x = side * (face.eye_x + t * half)
        y = base - face.brow_arch * (1 - t**2) - face.brow_slant * t
        px, _ = _yaw_x(x, yaw)
        upper = np.stack([px, y - thick / 2], axis=1)
        lower = np.stack([px, y + thick / 2], axis=1)[::-1]
        cv.fill(np.concatenate([upper, lower]), face.brow)


def _draw_mouth(cv: _Canvas, face: FaceIdentity, var: FaceVariation, yaw: float, pitch: float) -> None:
    t = _T9
    my = face.mouth_y + pitch * 0.8
    curve = face.mouth_curve + var.smile
    width = face.mouth_w * (1.0 + 0.6 * max(var.smile, 0.0))
    x, _ = _yaw_x(t * width, yaw, 1.15)
    seam = my - curve * t**2
    lips = face.lip_thick * (1 - 0.5 * t**2)
    upper = seam - lips - var.mouth_open * 0.2 * (1 - t**2)
    opening = seam + var.mouth_open * (1 - t**2)
    lower = opening + 1.3 * lips
    if var.mouth_open > 0.01:
        cv.fill(np.concatenate([np.stack([x, seam], 1), np.stack([x, opening], 1)[::-1]]), (70.0, 25.0, 30.0))
        if var.mouth_open > 0.04:
            teeth = seam + np.minimum(var.mouth_open, 0.06) * (1 - t**2)
            cv.fill(np.concatenate([np.stack([x, seam], 1), np.stack([x, teeth], 1)[::-1]]), (230.0, 225.0, 215.0))
    cv.fill(np.concatenate([np.stack([x, upper], 1), np.stack([x, seam], 1)[::-1]]), face.lip)
    cv.fill(np.concatenate([np.stack([x, opening], 1), np.stack([x, lower], 1)[::-1]]), face.lip)
    cv.polyline(np.stack([x, seam], 1), _rgb(np.array(face.lip) * 0.55))
    if face.moustache:
        mx, _ = _yaw_x(np.array([-1.0, -0.5, 0.0, 0.5, 1.0]) * (width + 0.05), yaw, 1.15)
        top = face.nose_y + pitch * 1.3 + 0.06
        bottom = np.array([upper[0], upper[2], upper[4], upper[6], upper[8]]) - 0.01
        cv.fill(np.concatenate([np.stack([mx, np.full(5, top)], 1), np.stack([mx, bottom + 0.04 * np.abs(np.linspace(-1, 1, 5))], 1)[::-1]]), face.hair)


def _draw_glasses(cv: _Canvas, face: FaceIdentity, yaw: float, pitch: float) -> None:
    ey = face.eye_y + pitch
    r = face.eye_w * 1.45
    inner = []
    for side in (-1.0, 1.0):
        x, s = _yaw_x(side * face.eye_x, yaw)
        x, s = float(x), float(s)
        if face.glasses == 1:
            cv.ellipse(x, ey, r * s, r * 0.85, face.frame, thickness=face.frame_thick)
        else:
            box = np.array([[x - r * s, ey - r * 0.7], [x + r * s, ey - r * 0.7], [x + r * s, ey + r * 0.6], [x - r * s, ey + r * 0.6]])
            cv.polyline(box, face.frame, face.frame_thick, closed=True)
        inner.append(x - side * r * s)
    cv.line(inner[0], ey - 0.05, inner[1], ey - 0.05, face.frame, face.frame_thick)


def _camera(image: np.ndarray, var: FaceVariation) -> np.ndarray:
    """Lighting (gain, colour cast, directional gradient), blur and sensor noise."""
    height, width = image.shape[:2]
    gx, gy = _grids(height, width)
    gain = np.asarray(var.cast, dtype=np.float32) * np.float32(var.gain)
    if var.light_strength > 0:
        field = 1.0 + var.light_strength * (math.cos(var.light_angle) * gx + math.sin(var.light_angle) * gy)
        out = image.astype(np.float32) * field[:, :, None] * gain
    else:
        out = image.astype(np.float32) * gain
    if var.blur > 0.25:
        out = cv2.GaussianBlur(out, (0, 0), var.blur)
    if var.noise > 0:
        noise_rng = np.random.default_rng(var.noise_seed)
        out += noise_rng.standard_normal(out.shape, dtype=np.float32) * np.float32(var.noise)
    np.clip(out, 0.0, 255.0, out=out)
    out += 0.5
    return out.astype(np.uint8)


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
