"""Faces drawn on photos (boxes, scores, 5 and 68 landmarks) and PNG files written atomically."""

from __future__ import annotations

import os
from collections.abc import Sequence

import cv2
import numpy as np
from PIL import Image

from facesphere.utils.files import atomic_path

BOX = (0, 200, 0)
POINT_COLOURS = [(255, 60, 60), (60, 60, 255), (255, 220, 0), (255, 0, 255), (0, 220, 255)]
"""Image-left eye, image-right eye, nose, image-left and image-right mouth corner."""
DENSE = (0, 255, 120)


def draw_faces(image: np.ndarray, faces: Sequence) -> np.ndarray:
    """A copy of the RGB ``image`` with each face's box, score, 5 landmarks and (if present) 68 landmarks."""
    canvas = np.ascontiguousarray(image.copy())
    scale = max(1, round(max(image.shape[:2]) / 640))
    for face in faces:
        x1, y1, x2, y2 = (int(round(v)) for v in face.box)
        cv2.rectangle(canvas, (x1, y1), (x2, y2), BOX, 2 * scale)
        cv2.putText(canvas, f"{face.score:.2f}", (x1, max(0, y1 - 4 * scale)), cv2.FONT_HERSHEY_SIMPLEX, 0.5 * scale,
                    BOX, scale, cv2.LINE_AA)
        if getattr(face, "landmarks68", None) is not None:
            for x, y in np.asarray(face.landmarks68):
                cv2.circle(canvas, (int(round(x)), int(round(y))), scale, DENSE, -1, cv2.LINE_AA)
        for (x, y), colour in zip(np.asarray(face.landmarks), POINT_COLOURS):
            cv2.circle(canvas, (int(round(x)), int(round(y))), 2 * scale, colour, -1, cv2.LINE_AA)
    return canvas


def write_png(path: str | os.PathLike, image: np.ndarray) -> None:
    """Write an RGB uint8 image as PNG, atomically."""
    with atomic_path(path) as tmp:
        Image.fromarray(np.ascontiguousarray(image)).save(tmp, format="PNG")


__all__ = ["draw_faces", "write_png"]
