"""Rendering procedural faces (:mod:`facesphere.data.face_traits`) to images.

Everything is drawn with anti-aliased OpenCV primitives directly at the output size (sub-pixel
coordinates via fixed-point ``shift``); rendering takes well under a millisecond per 112x112 image.
"""

from __future__ import annotations

import functools
import math

import cv2
import numpy as np

from facesphere.data.face_traits import Color, FaceIdentity, FaceVariation

_SHIFT = 4  # fixed-point bits for OpenCV drawing: coordinates are multiplied by 16
_ONE = 1 << _SHIFT
_AA = cv2.LINE_AA


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
    if face.wrinkles > 0:
        _draw_wrinkles(cv, face, yaw, pitch)

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


def _draw_wrinkles(cv: _Canvas, face: FaceIdentity, yaw: float, pitch: float) -> None:
    """Age lines at fixed places, their colour moving from skin to skin shadow with ``face.wrinkles``."""
    w = face.wrinkles
    color = _rgb_mix(face.skin, face.skin_shadow, w)
    brow_top = face.eye_y + pitch - face.eye_h - face.brow_gap - face.brow_thick - max(face.brow_arch, 0.0) - abs(face.brow_slant)
    for k in range(3):  # forehead lines, the upper ones fainter
        y = brow_top - 0.1 - 0.085 * k
        x, _ = _yaw_x(_T9 * (0.5 - 0.06 * k), yaw)
        cv.polyline(np.stack([x, y + 0.025 * _T9**2], axis=1), _rgb_mix(face.skin, color, 1.0 - 0.25 * k))
    ey = face.eye_y + pitch
    ny = face.nose_y + pitch * 1.3
    my = face.mouth_y + pitch * 0.8
    for side in (-1.0, 1.0):
        corner = side * (face.eye_x + face.eye_w + 0.03)
        for dy in (-0.05, 0.0, 0.05):  # crow's feet fanning out from the outer eye corner
            x0, _ = _yaw_x(corner, yaw)
            x1, _ = _yaw_x(corner + side * 0.11, yaw)
            cv.line(x0, ey + dy * 0.4, x1, ey + dy * 1.6, color)
        t = np.linspace(0.0, 1.0, 6)  # nasolabial fold: nose wing to beyond the mouth corner
        fx, _ = _yaw_x(side * (face.nose_w * 0.5 + 0.07 + (face.mouth_w - face.nose_w * 0.5) * t + 0.05 * np.sin(math.pi * t)), yaw)
        cv.polyline(np.stack([fx, ny - 0.02 + (my + 0.04 - ny) * t], axis=1), color)
        bx, bs = _yaw_x(side * face.eye_x, yaw)  # under-eye line
        cv.ellipse(bx, ey + face.eye_h * 0.6, face.eye_w * 0.8 * bs, face.eye_h, color, start=30, end=150, thickness=1)


def _rgb_mix(a: Color, b: Color, t: float) -> Color:
    return (a[0] + (b[0] - a[0]) * t, a[1] + (b[1] - a[1]) * t, a[2] + (b[2] - a[2]) * t)


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
