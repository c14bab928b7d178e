"""Controlled misalignment of aligned face crops: random similarity + perspective jitter of named strengths.

A recogniser trained on landmark-aligned crops silently loses accuracy when its input is aligned
differently. This module reproduces that in a controlled, seeded way (the misalignment benchmark and
the rectifier's training data, arXiv 1808.06210 Sec. 4): a homography made of a rotation and a uniform
scale about the image centre, a translation, and an independent shift of the four image corners
(perspective). Every draw comes from the ``np.random.Generator`` given, so a jittered image is a pure
function of the generator's seed.

Homographies follow the rectifier's convention: (3, 3) float64 in pixel coordinates (x right, y down,
pixel centres at integers), mapping an OUTPUT pixel (x, y, 1) to the INPUT pixel it samples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal, get_args

import cv2
import numpy as np


@dataclass(frozen=True)
class MisalignStrength:
    """Bounds of one misalignment level; every parameter is drawn uniformly inside its bound.

    ``rotation``: max in-plane rotation (degrees, uniform in [-r, r]); ``scale``: (lo, hi) range of the
    uniform scale (log-uniform; > 1 samples a larger input region, i.e. the face looks smaller);
    ``translate``: max shift per axis as a share of the image size; ``perspective``: max shift of each
    image corner per axis as a share of the image size (independent per corner, a projective distortion).
    """

    rotation: float
    scale: tuple[float, float]
    translate: float
    perspective: float

    def __post_init__(self) -> None:
        lo, hi = self.scale
        if not (math.isfinite(self.rotation) and 0 <= self.rotation <= 90):
            raise ValueError(f"rotation must be in [0, 90] degrees, got {self.rotation}")
        if not (0 < lo <= 1 <= hi and math.isfinite(hi)):
            raise ValueError(f"scale must satisfy 0 < lo <= 1 <= hi, got {self.scale}")
        if not 0 <= self.translate < 0.5:
            raise ValueError(f"translate must be in [0, 0.5), got {self.translate}")
        if not 0 <= self.perspective < 0.25:
            raise ValueError(f"perspective must be in [0, 0.25), got {self.perspective}")

    def scaled(self, fraction: float) -> "MisalignStrength":
        """This level shrunk by ``fraction`` in [0, 1]: 0 is no jitter, 1 is this level (scale in log space)."""
        if not 0 <= fraction <= 1:
            raise ValueError(f"fraction must be in [0, 1], got {fraction}")
        lo, hi = self.scale
        return replace(self, rotation=self.rotation * fraction, scale=(lo**fraction, hi**fraction),
                       translate=self.translate * fraction, perspective=self.perspective * fraction)


NO_MISALIGNMENT = MisalignStrength(rotation=0.0, scale=(1.0, 1.0), translate=0.0, perspective=0.0)

MISALIGN_STRENGTHS: dict[str, MisalignStrength] = {
    # A good detector's landmark noise (~1-2 px per landmark on a 112-px crop whose eyes are 35 px apart)
    # moves the least-squares similarity by about 2-3 degrees, 3 % in scale and 1-2 px.
    "mild": MisalignStrength(rotation=3.0, scale=(0.97, 1.03), translate=0.02, perspective=0.01),
    # A crop cut from the detector box alone, or aligned to another pipeline's template. Measured between
    # RetinaFace box crops and the 5-point alignment on CACD-VS and FG-NET (benchmarks/gridface_misalign.py):
    # rotation median 4 degrees (90th percentile 11-12), |log scale| median 0.03-0.05 (p90 0.06-0.11),
    # centre shift median 7-8 % of the size (mostly a systematic ~7 px vertical offset, see align.boxcrop).
    "medium": MisalignStrength(rotation=10.0, scale=(0.9, 1.1), translate=0.05, perspective=0.03),
    # Landmarks that failed on a profile or an occlusion: 20 degrees, 20 % scale, 10 % shift and a
    # visible projective skew.
    "strong": MisalignStrength(rotation=20.0, scale=(0.8, 1.2), translate=0.1, perspective=0.06),
}
"""The named misalignment levels of the benchmark and of ``augment.misalign`` in training."""

MisalignLevel = Literal["none", "mild", "medium", "strong"]
"""``augment.misalign`` values: ``none`` or a key of :data:`MISALIGN_STRENGTHS`."""
MISALIGN_LEVELS: tuple[str, ...] = get_args(MisalignLevel)


def get_strength(name: str) -> MisalignStrength:
    """The level called ``name`` (``none`` is no jitter); a ``ValueError`` naming the known levels otherwise."""
    if name == "none":
        return NO_MISALIGNMENT
    try:
        return MISALIGN_STRENGTHS[name]
    except KeyError:
        raise ValueError(f"unknown misalignment strength {name!r}; known: {', '.join(MISALIGN_LEVELS)}") from None


def jitter_homography(strength: MisalignStrength, rng: np.random.Generator,
                      size: tuple[int, int] = (112, 112)) -> np.ndarray:
    """A random (3, 3) float64 homography within ``strength`` for an image of ``size`` = (H, W).

    It maps an output pixel to the input pixel it samples: first each image corner moves by its own
    perspective shift (the projective part, solved exactly from the 4 corner pairs), then the rotation
    and scale about the image centre and the translation. Draws, in order: rotation, log-scale,
    translation (x, y), corner shifts (4 x 2), all uniform; always the same number of draws.
    """
    height, width = int(size[0]), int(size[1])
    if height < 2 or width < 2:
        raise ValueError(f"size must be at least 2x2, got {size}")
    lo, hi = strength.scale
    angle = math.radians(rng.uniform(-strength.rotation, strength.rotation))
    scale = math.exp(rng.uniform(math.log(lo), math.log(hi)))
    shift = rng.uniform(-strength.translate, strength.translate, size=2) * (width, height)
    corner_shift = rng.uniform(-strength.perspective, strength.perspective, size=(4, 2)) * (width, height)

    corners = np.array([[0, 0], [width - 1, 0], [width - 1, height - 1], [0, height - 1]], dtype=np.float64)
    projective = cv2.getPerspectiveTransform(corners.astype(np.float32), (corners + corner_shift).astype(np.float32))
    cx, cy = (width - 1) / 2.0, (height - 1) / 2.0
    cos, sin = scale * math.cos(angle), scale * math.sin(angle)
    similarity = np.array([[cos, -sin, cx + shift[0] - cos * cx + sin * cy],
                           [sin, cos, cy + shift[1] - sin * cx - cos * cy],
                           [0.0, 0.0, 1.0]])
    homography = similarity @ projective.astype(np.float64)
    return homography / homography[2, 2]


def warp_homography(image: np.ndarray, homography: np.ndarray) -> np.ndarray:
    """Resample ``image`` (HxWxC uint8) so output pixel p takes the input at ``homography @ p``; edges replicated."""
    height, width = image.shape[:2]
    return cv2.warpPerspective(np.ascontiguousarray(image), np.asarray(homography, dtype=np.float64), (width, height),
                               flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_REPLICATE)


def misalign(image: np.ndarray, strength: MisalignStrength, rng: np.random.Generator) -> np.ndarray:
    """``image`` (HxWx3 uint8) warped by a random homography within ``strength`` (``jitter_homography``)."""
    if image.ndim != 3 or image.dtype != np.uint8:
        raise ValueError(f"misalign expects an HxWxC uint8 image, got {image.dtype} {image.shape}")
    return warp_homography(image, jitter_homography(strength, rng, image.shape[:2]))


class MisalignJitter:
    """The training transform ``(image, rng) -> image`` of ``augment.misalign``.

    With probability ``share`` a sample is jittered at the level scaled by a fraction drawn uniformly in
    [0, 1] (so every strength up to ``level`` occurs); otherwise it passes unchanged.
    """

    def __init__(self, level: str, share: float = 1.0) -> None:
        if level == "none":
            raise ValueError("MisalignJitter needs a level other than 'none'")
        if not 0 <= share <= 1:
            raise ValueError(f"misalign_share must be in [0, 1], got {share}")
        self.level, self.strength, self.share = level, get_strength(level), float(share)

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return self.with_homography(image, rng)[0]

    def with_homography(self, image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(jittered image, the jitter's homography J): output pixel p of the jittered image shows input pixel J p
        (the identity when the sample is left unchanged). Same draws as calling the transform."""
        jittered, fraction = rng.random() < self.share, rng.random()
        if not jittered:
            return image, np.eye(3)
        homography = jitter_homography(self.strength.scaled(fraction), rng, image.shape[:2])
        return warp_homography(image, homography), homography

    def __repr__(self) -> str:
        return f"MisalignJitter(level={self.level!r}, share={self.share})"


__all__ = ["MISALIGN_LEVELS", "MISALIGN_STRENGTHS", "MisalignJitter", "MisalignLevel", "MisalignStrength",
           "NO_MISALIGNMENT", "get_strength", "jitter_homography", "misalign", "warp_homography"]
