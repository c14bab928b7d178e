"""The 5-point alignment templates recognition models are trained on, by name and by crop size.

Points are (x, y) pixels of the image-left eye, image-right eye, nose tip, image-left and
image-right mouth corners in a crop of ``size`` = (H, W). Templates are named as model cards name
them (``ModelCard.alignment``):

* ``sphereface_112x96``: the 96-wide, 112-high template of SphereFace (Liu et al., arXiv 1704.08063),
  the points of its repository's ``preprocess/code/face_align_demo.m``; CosFace uses it too.
* ``arcface_112x112``: InsightFace's template (``insightface/python-package/insightface/utils/face_align.py``,
  ``arcface_dst``), the same points shifted 8 px right, i.e. 8 px of width added on each side.
* ``arcface_{s}x{s}``: the ArcFace template scaled by s/112 for any other square crop: what an ArcFace
  112x112 crop becomes when it is resized to s x s, as facesphere's loaders resize training crops to a
  backbone's input size (so a network trained at 64x64 on ArcFace crops is deployed on ``arcface_64x64``).

:func:`template_for_size` is the one rule from a crop size to its template (model cards, alignment
and the evaluation protocols all use it); :func:`get_template` is its inverse by name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np


def _frozen(points) -> np.ndarray:
    array = np.array(points, dtype=np.float64)
    array.flags.writeable = False
    return array


SPHEREFACE_POINTS_112x96 = _frozen(
    [[30.2946, 51.6963], [65.5318, 51.5014], [48.0252, 71.7366], [33.5493, 92.3655], [62.7299, 92.2041]]
)
ARCFACE_POINTS_112 = _frozen(SPHEREFACE_POINTS_112x96 + np.array([8.0, 0.0]))


@dataclass(frozen=True)
class Template:
    """Landmark positions ``points`` (5, 2), (x, y) pixels, of a crop of ``size`` = (H, W), named ``name``."""

    name: str
    size: tuple[int, int]
    points: np.ndarray


TEMPLATES: dict[str, Template] = {
    "arcface_112x112": Template("arcface_112x112", (112, 112), ARCFACE_POINTS_112),
    "sphereface_112x96": Template("sphereface_112x96", (112, 96), SPHEREFACE_POINTS_112x96),
}
"""The named templates; :func:`template_for_size` adds the scaled ArcFace squares."""

_SCALED_ARCFACE = re.compile(r"^arcface_(\d+)x(\d+)$")


def _known() -> str:
    return ", ".join(f"{t.name} ({t.size[0]}x{t.size[1]})" for t in TEMPLATES.values()) + \
        ", arcface_NxN (the ArcFace template scaled to N x N)"


def template_for_size(size: tuple[int, int]) -> Template:
    """The template of a crop of ``size`` (H, W): 112x112 -> arcface_112x112, 112x96 -> sphereface_112x96,
    another s x s square -> arcface_{s}x{s} (the ArcFace points times s/112). ValueError for any other size."""
    h, w = int(size[0]), int(size[1])
    for template in TEMPLATES.values():
        if template.size == (h, w):
            return template
    if h == w and h > 0:
        return Template(f"arcface_{h}x{w}", (h, w), _frozen(ARCFACE_POINTS_112 * (h / 112.0)))
    raise ValueError(f"no alignment template for a {h}x{w} crop; known: {_known()}")


def get_template(name: str) -> Template:
    """The template called ``name`` (a named one, or ``arcface_NxN``: the ArcFace template scaled to N x N)."""
    if name in TEMPLATES:
        return TEMPLATES[name]
    match = _SCALED_ARCFACE.match(name)
    if match and match.group(1) == match.group(2) and int(match.group(1)) > 0:
        return template_for_size((int(match.group(1)), int(match.group(2))))
    raise ValueError(f"unknown alignment template {name!r}; known: {_known()}")


__all__ = ["ARCFACE_POINTS_112", "SPHEREFACE_POINTS_112x96", "TEMPLATES", "Template", "get_template",
           "template_for_size"]
