"""The landmarker contract: (RGB photo, face boxes) -> named per-face outputs, and its registry.

A landmarker refines what the detector found: 68 points (PFLD, ``align.landmarks68``), dense points
or 3DMM parameters and pose (PRNet, arXiv 1803.07835; 3DDFA, arXiv 1804.01005 and 2009.09960), each
returned under a documented name (``facesphere.pipeline.stages`` lists the names) with the face on the
first axis. A landmarker is also a pipeline stage of the ``landmarks`` phase (``name``, ``phase``,
``outputs``, ``run``), so ``FaceAnalyzer(..., stages=[landmarker])`` runs it after detection.
"""

from __future__ import annotations

import os
from typing import ClassVar, Protocol, runtime_checkable

import numpy as np

from facesphere.registry import Registry


@runtime_checkable
class Landmarker(Protocol):
    """``run(image, boxes)``: HxWx3 uint8 RGB photo and (N, 4) x1, y1, x2, y2 boxes -> {name: (N, ...) array}."""

    name: str
    phase: ClassVar[str]
    outputs: tuple[str, ...]

    def run(self, image: np.ndarray, boxes: np.ndarray) -> dict[str, np.ndarray]: ...


LANDMARKERS: Registry[Landmarker] = Registry("landmarker")


def build_landmarker(name: str, weights_path: str | os.PathLike, **kwargs) -> Landmarker:
    """A registered landmarker by name, e.g. ``build_landmarker("pfld68", "pfld.onnx", threads=2)``."""
    import facesphere.align.landmarks68  # noqa: F401  (registers PFLD68)

    return LANDMARKERS.build(name, weights_path=weights_path, **kwargs)


__all__ = ["LANDMARKERS", "Landmarker", "build_landmarker"]
