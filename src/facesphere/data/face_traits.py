"""Procedural face identities and per-sample conditions, drawn as pure functions of seeds.

Each identity is a fixed set of parametric traits drawn from ``(seed, identity)``: head shape, skin
tone, eyes (spacing, size, tilt, iris colour), brows, nose, mouth, ears, hair (colour, style,
hairline) and binary traits (glasses, beard, moustache, freckles, mole, blush). Each sample of an
identity is drawn from ``(seed, identity, sample)`` and varies pose (roll, scale, shift, yaw by
cylindrical projection of the features, pitch), expression (smile, open mouth, blinking, brow raise,
gaze), lighting (global gain, colour cast, directional gradient), background, clothing, blur and
noise. Lighting and colour cast are strong enough that the mean colour of an image says little about
who it is, so a recogniser has to look at geometry and traits. :mod:`facesphere.data.face_render`
draws them.

Ageing (:func:`age_face`) renders an identity at an age in years as a pure, monotone function of the age:
child proportions that grow into the adult ones by 18 (bigger cranium, shorter lower face, larger
eyes set lower), and from the identity's own onsets in adulthood greying hair and brows, wrinkle
lines (forehead, crow's feet, nasolabial folds), a sagging lower face, thinner lips, lower lids,
larger ears and nose and a receding hairline. Each parameter moves one way as the age
rises, so the truth of how a face changes with age is known.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

_IDENTITY_STREAM = 0x1D
_SAMPLE_STREAM = 0x5A
_AGEING_STREAM = 0xA9
_AGE_STREAM = 0xA6

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
    wrinkles: float = 0.0  # strength of the age lines in [0, 1]; 0 draws none (an un-aged face)


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


# -------------------------------------------------------------------------------------------- ageing

ADULT_AGE = 18.0
"""Age (years) by which child proportions have grown into the identity's adult ones."""
_WHITE_HAIR = np.array([232.0, 231.0, 228.0])


@dataclass(frozen=True)
class AgeingTraits:
    """How one identity ages: onsets (years) and rates, drawn from ``(seed, identity)`` on their own stream."""

    grey_onset: float  # hair starts greying
    grey_years: float  # years from onset to white
    wrinkle_onset: float
    wrinkle_years: float
    recede: float  # how far the hairline recedes by old age (face units)
    sag: float  # how much the lower face drops by old age (share of the lower face)


@functools.lru_cache(maxsize=16384)
def ageing_traits(seed: int, identity: int) -> AgeingTraits:
    """The ageing traits of global ``identity`` under ``seed`` (pure, cached; independent of its face traits)."""
    rng = np.random.default_rng([_AGEING_STREAM, int(seed), int(identity)])
    return AgeingTraits(
        grey_onset=float(rng.uniform(28.0, 50.0)),
        grey_years=float(rng.uniform(20.0, 40.0)),
        wrinkle_onset=float(rng.uniform(25.0, 40.0)),
        wrinkle_years=float(rng.uniform(25.0, 40.0)),
        recede=float(rng.uniform(0.0, 0.35) if rng.random() < 0.5 else 0.0),
        sag=float(rng.uniform(0.04, 0.1)),
    )


def _ramp(age: float, onset: float, years: float) -> float:
    """0 before ``onset``, rising linearly to 1 over ``years``."""
    return min(1.0, max(0.0, (age - onset) / years))


def _stretch(xy: np.ndarray | None, up: float, down: float) -> np.ndarray | None:
    """Scale y by ``up`` above the face's origin (y < 0) and by ``down`` below it."""
    if xy is None or not len(xy):
        return xy
    out = np.array(xy, dtype=np.float64)
    out[:, 1] *= np.where(out[:, 1] < 0, up, down)
    return out


def age_face(face: FaceIdentity, traits: AgeingTraits, age: float) -> FaceIdentity:
    """``face`` rendered at ``age`` years; every changed parameter is monotone in ``age``.

    Child (age < :data:`ADULT_AGE`, ``youth`` = 1 at birth, 0 from 18): cranium up to 15% taller,
    lower face up to 22% shorter, eyes up to 20% larger and set lower. Adult, from the identity's onsets
    (:class:`AgeingTraits`): hair, beard and brows mix towards white, wrinkle lines darken from skin to
    skin shadow, the lower face drops by ``sag``, lips thin by 40%, lids lower by 25% (brows stay), ears
    and nose grow by 15% and the hairline recedes by ``recede``, each with ``senior`` (0 at 25 years, 1 at
    80)."""
    if not math.isfinite(age) or age < 0:
        raise ValueError(f"age must be finite and >= 0, got {age}")
    youth = max(0.0, 1.0 - age / ADULT_AGE)
    senior = _ramp(age, 25.0, 55.0)
    grey = _ramp(age, traits.grey_onset, traits.grey_years)
    lid = 1.0 - 0.25 * senior
    up = 1.0 + 0.15 * youth
    down = (1.0 - 0.22 * youth) * (1.0 + traits.sag * senior)
    hair = _mix(np.array(face.hair), _WHITE_HAIR, grey)
    brow = _mix(np.array(face.brow), _WHITE_HAIR, 0.6 * grey)
    eye_h = face.eye_h * (1.0 + 0.2 * youth)
    return replace(
        face,
        outline=_stretch(face.outline, up, down),
        beard_shape=_stretch(face.beard_shape, up, down),
        hair=_rgb(hair),
        brow=_rgb(brow),
        lash=_rgb(_mix(np.array(face.lash), _WHITE_HAIR, 0.3 * grey)),
        eye_y=face.eye_y * up + 0.12 * youth,
        eye_w=face.eye_w * (1.0 + 0.2 * youth),
        eye_h=eye_h * lid,
        iris_r=face.iris_r * (1.0 + 0.2 * youth),
        brow_gap=face.brow_gap + eye_h * (1.0 - lid),  # the brows stay where they were as the lids lower
        nose_y=face.nose_y * down,
        nose_w=face.nose_w * (1.0 + 0.15 * senior),
        mouth_y=face.mouth_y * down,
        lip_thick=face.lip_thick * (1.0 - 0.4 * senior),
        ear_size=face.ear_size * (1.0 - 0.15 * youth) * (1.0 + 0.15 * senior),
        ear_y=face.ear_y * down,
        top=face.top * up,
        chin_y=face.chin_y * down,
        hairline=face.hairline - traits.recede * senior,
        freckles=_stretch(face.freckles, up, down),
        mole=None if face.mole is None else (face.mole[0], face.mole[1] * (up if face.mole[1] < 0 else down)),
        wrinkles=_ramp(age, traits.wrinkle_onset, traits.wrinkle_years),
    )


def sample_age(seed: int, identity: int, sample: int, age_range: tuple[float, float], span: float | None) -> float:
    """The age (years) of ``sample`` of global ``identity``: uniform over a window of ``span`` years that the
    identity draws inside ``age_range`` (``span`` None: the whole range), pure in its arguments."""
    low, high = float(age_range[0]), float(age_range[1])
    width = high - low if span is None else min(float(span), high - low)
    start = low + (high - low - width) * np.random.default_rng([_AGE_STREAM, int(seed), int(identity)]).random()
    return float(start + width * np.random.default_rng([_AGE_STREAM, int(seed), int(identity), int(sample)]).random())


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
