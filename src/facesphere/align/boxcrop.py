"""Box-only face crops: a square cut from the detector's box, without landmarks.

What a pipeline gets when it has a face box but no (usable) landmarks: the crop follows the box, so
the head's roll stays and the face's scale and position follow the detector's box instead of the eyes
and mouth. The misalignment benchmark measures what this costs a recogniser trained on landmark-aligned
crops, and what a rectifier recovers (arXiv 1808.06210).
"""

from __future__ import annotations

import numpy as np

from facesphere.align.landmarks68 import crop_faces, crop_squares

BOX_CROP_SCALE = 1.0
"""Default crop side / the box's longer side: the scale at which the 5 landmarks of a box crop land, in the
least-squares sense, where the 112x112 ArcFace template puts them. Measured with RetinaFace (MobileNet-0.25)
boxes by ``benchmarks/gridface_misalign.py``: 0.99 on CACD-VS (800 photos), 1.01 on FG-NET (1,002). The
crop stays centred on the box, although the template's points sit ~7 px (6 %) lower than a box-centred
crop puts them: a box-only crop is the misaligned input as pipelines without landmarks make it."""


def box_crop(image: np.ndarray, box, size: tuple[int, int] = (112, 112), scale: float = BOX_CROP_SCALE) -> np.ndarray:
    """The square crop of side ``scale * max(w, h)`` centred on ``box`` (x1, y1, x2, y2[, score]) of an RGB
    uint8 ``image``, resized to ``size`` (H, W; square), black outside the image. No landmarks are used."""
    height, width = int(size[0]), int(size[1])
    if height != width or height < 1:
        raise ValueError(f"box crops are square; got size {size}")
    if not (np.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive number, got {scale}")
    origins, sides = crop_squares(np.asarray(box, dtype=np.float64)[None], scale)
    return crop_faces(image, origins, sides, height)[0]


__all__ = ["BOX_CROP_SCALE", "box_crop"]
