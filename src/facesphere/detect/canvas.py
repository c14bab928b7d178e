"""Placing a photo of any size on a detector's input canvas, and mapping coordinates back.

Two modes: *letterbox* (``input_size=(W, H)``): the photo is shrunk, keeping its aspect ratio, to
fit the canvas (enlarged too with ``upscale=True``) and pasted at the top-left corner, so every image
of a batch has the same canvas; *native* (``input_size=None``): the photo keeps its pixels and is
padded at the bottom and right up to a multiple of the network's largest stride. Padding is filled
with the colour the network reads as "nothing" (its mean colour when it subtracts one). Top-left
placement means a canvas point (x, y) is the photo point (x / sx, y / sy) with the per-axis scales
of the resize, exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np


@dataclass(frozen=True)
class Placement:
    """Where a photo sits on its canvas: per-axis scale and the canvas size (height, width)."""

    scale_x: float
    scale_y: float
    canvas: tuple[int, int]

    def to_image(self, points: np.ndarray) -> np.ndarray:
        """Canvas (..., 2k) x, y, x, y ... coordinates -> photo coordinates (a new float32 array)."""
        out = np.array(points, dtype=np.float32, copy=True)
        out[..., 0::2] /= self.scale_x
        out[..., 1::2] /= self.scale_y
        return out


def canvas_shape(height: int, width: int, input_size: tuple[int, int] | None, multiple: int) -> tuple[int, int]:
    """(height, width) of the canvas a ``height`` x ``width`` photo is placed on."""
    if input_size is not None:
        return int(input_size[1]), int(input_size[0])
    return math.ceil(height / multiple) * multiple, math.ceil(width / multiple) * multiple


def place(image: np.ndarray, input_size: tuple[int, int] | None, multiple: int,
          fill: tuple[int, int, int], upscale: bool = False) -> tuple[np.ndarray, Placement]:
    """The HxWx3 uint8 canvas holding ``image`` at the top-left, and its :class:`Placement`."""
    height, width = image.shape[:2]
    canvas_h, canvas_w = canvas_shape(height, width, input_size, multiple)
    if input_size is None:
        new_w, new_h = width, height
        resized = image
    else:
        scale = min(canvas_w / width, canvas_h / height)
        if not upscale:
            scale = min(scale, 1.0)
        new_w = min(canvas_w, max(1, round(width * scale)))
        new_h = min(canvas_h, max(1, round(height * scale)))
        interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
        resized = image if (new_w, new_h) == (width, height) else cv2.resize(image, (new_w, new_h),
                                                                              interpolation=interpolation)
    canvas = cv2.copyMakeBorder(resized, 0, canvas_h - new_h, 0, canvas_w - new_w, cv2.BORDER_CONSTANT,
                                value=tuple(int(v) for v in fill))
    return canvas, Placement(new_w / width, new_h / height, (canvas_h, canvas_w))
