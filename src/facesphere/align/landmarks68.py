"""68-point facial landmarks (iBUG/300W layout) with PFLD, and the 5 alignment points derived from them.

PFLD (Guo et al. 2019, "PFLD: A Practical Facial Landmark Detector") regresses the 68 points from a
112x112 crop. The model run here is the public ONNX export of cunjian/pytorch_face_landmark (see its
SOURCE.txt); its input contract, reproduced exactly:

* crop: a square of side ``1.1 * max(w, h)`` centred on the face box, zero outside the image,
  resized to 112x112 (bilinear, OpenCV pixel-centre convention, like ``cv2.resize`` of the cut crop);
* pixels: RGB, ``x / 255``, no mean/std;
* output: 136 values, 68 (x, y) pairs in [0, 1] of the crop, so ``point = value * side + crop_origin``.

The crop and the resize are one ``cv2.warpAffine`` per face, and all faces of an image run as one batch.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import cv2
import numpy as np

from facesphere.align.landmarkers import LANDMARKERS

logger = logging.getLogger(__name__)

CROP_SIZE = 112
CROP_SCALE = 1.1
"""Crop side = CROP_SCALE * the longer side of the face box (the model's training crop)."""

LEFT_EYE = slice(36, 42)
"""iBUG points 36-41: the subject's right eye, on the image's left in a frontal face."""
RIGHT_EYE = slice(42, 48)
NOSE_TIP = 30
MOUTH_LEFT = 48
MOUTH_RIGHT = 54


FGNET_TO_IBUG: dict[int, int] = {27: 36, 29: 39, 34: 42, 32: 45, 67: 30, 7: 8, **{i: i for i in range(48, 60)}}
"""FG-NET index -> iBUG index, for the points both 68-point layouts define alike (0-based).

FG-NET's manual points follow Cootes' AAM markup, not iBUG/300W's: 0-14 jaw (15 points), 15-20 and
21-26 the eyebrows (image-right, image-left; 6 points each), 27-30 the image-left eye's outer corner,
top, inner corner, bottom, 31 its pupil, 32-35 / 36 the same for the image-right eye, 37-47 the nose
(46, 47 nostrils), 48-59 the outer lips as in iBUG, 60-66 inside the lips, 67 the nose tip. Shared:
the four eye corners, the nose tip, the chin (FG-NET 7 = iBUG 8) and the 12 outer-lip points.
``evaluate.age.fgnet_five_points`` takes FG-NET's pupils (31, 36) as eye centres, where
:func:`five_from_68` takes eye-contour means: on FG-NET's manual points the two differ by 2.4 % of the
outer-eye-corner distance on average (7.7 % at most).
"""


class LandmarkInputError(ValueError):
    """An image or face boxes the landmark model cannot take; the message says what was passed."""


def five_from_68(points68: np.ndarray) -> np.ndarray:
    """(N, 68, 2) or (68, 2) iBUG points -> (N, 5, 2) InsightFace-order points (or (5, 2) for one face).

    Order: image-left eye centre (mean of points 36-41), image-right eye centre (42-47), nose tip (30),
    image-left mouth corner (48), image-right mouth corner (54), 0-based indices.
    """
    p = np.asarray(points68, dtype=np.float64)
    single = p.ndim == 2
    if single:
        p = p[None]
    if p.ndim != 3 or p.shape[1:] != (68, 2):
        raise LandmarkInputError(f"expected (N, 68, 2) or (68, 2) landmarks, got shape {np.shape(points68)}")
    five = np.stack([p[:, LEFT_EYE].mean(axis=1), p[:, RIGHT_EYE].mean(axis=1), p[:, NOSE_TIP], p[:, MOUTH_LEFT],
                     p[:, MOUTH_RIGHT]], axis=1)
    return five[0] if single else five


def _check_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) == 0:
        raise LandmarkInputError(f"expected an HxWx3 uint8 RGB image, got {image.dtype} array of shape {image.shape}")
    return image


def _check_boxes(boxes: np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
    b = np.asarray(boxes, dtype=np.float64)
    if b.ndim == 1 and b.size == 0:
        b = b.reshape(0, 4)
    if b.ndim != 2 or b.shape[1] < 4:
        raise LandmarkInputError(f"expected face boxes (N, 4) as x1, y1, x2, y2, got shape {b.shape}")
    b = b[:, :4]  # detectors often append a score
    bad = ~np.isfinite(b).all(axis=1) | (b[:, 2] <= b[:, 0]) | (b[:, 3] <= b[:, 1])
    if bad.any():
        raise LandmarkInputError(f"face box {int(np.argmax(bad))} is not x1 < x2, y1 < y2 and finite: "
                                 f"{b[int(np.argmax(bad))].tolist()}")
    return b


def crop_squares(boxes: np.ndarray, scale: float = CROP_SCALE) -> tuple[np.ndarray, np.ndarray]:
    """(origin (N, 2), side (N,)) of the square crops: side ``scale * max(w, h)``, centred on each box."""
    b = _check_boxes(boxes)
    side = scale * np.maximum(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1])
    centre = np.stack([(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2], axis=1)
    return centre - side[:, None] / 2, side


def crop_faces(image: np.ndarray, origins: np.ndarray, sides: np.ndarray, size: int = CROP_SIZE) -> np.ndarray:
    """Square crops (origin, side) of ``image`` resized to size x size, zero outside the image: (N, size, size, 3)."""
    image = _check_image(image)
    out = np.zeros((len(sides), size, size, 3), dtype=np.uint8)
    for i, ((x0, y0), side) in enumerate(zip(origins, sides)):
        k = size / side
        # cv2.resize's mapping of the cut crop: dst + 0.5 = k * (src - origin + 0.5)
        matrix = np.array([[k, 0.0, k * (0.5 - x0) - 0.5], [0.0, k, k * (0.5 - y0) - 0.5]])
        out[i] = cv2.warpAffine(image, matrix, (size, size), flags=cv2.INTER_LINEAR,
                                borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0))
    return out


class PFLD68:
    """The PFLD 68-point ONNX model: ``landmarks(image, boxes)`` -> (N, 68, 2) image pixels (x, y).

    ``path``: the ONNX file (``pfld68_cunjian_onnx/pfld.onnx``); ``providers``/``threads`` as for
    ``utils.onnxrt.make_session``. Registered as landmarker ``pfld68``; as a pipeline stage it adds the
    per-face output ``landmarks68``.
    """

    name = "pfld68"
    phase = "landmarks"
    outputs = ("landmarks68",)

    def __init__(self, path: str | os.PathLike, providers: Sequence[str] | None = None,
                 threads: int | None = None) -> None:
        from facesphere.utils.onnxrt import make_session

        self.path = os.fspath(path)
        self.session = make_session(self.path, providers=providers, threads=threads)
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or list(inputs[0].shape[1:]) != [3, CROP_SIZE, CROP_SIZE] or outputs[0].shape[-1] != 136:
            raise LandmarkInputError(f"{self.path}: not a PFLD 68-point model (input {inputs[0].shape}, "
                                     f"output {outputs[0].shape}; expected (N, 3, 112, 112) -> (N, 136))")
        self._input = inputs[0].name
        self._output = outputs[0].name

    def crops(self, image: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(112x112 uint8 RGB crops (N, 112, 112, 3), crop origins (N, 2), crop sides (N,)) for ``boxes``."""
        origins, sides = crop_squares(boxes)
        return crop_faces(image, origins, sides), origins, sides

    def landmarks(self, image: np.ndarray, boxes: np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
        """68 landmarks per face box (x1, y1, x2, y2 in pixels) of an HxWx3 uint8 RGB image: (N, 68, 2) float64."""
        crops, origins, sides = self.crops(_check_image(image), boxes)
        if len(crops) == 0:
            return np.zeros((0, 68, 2))
        batch = np.ascontiguousarray(crops.transpose(0, 3, 1, 2), dtype=np.float32) / np.float32(255.0)
        out = self.session.run([self._output], {self._input: batch})[0]
        points = np.asarray(out, dtype=np.float64).reshape(len(crops), 68, 2)
        return points * sides[:, None, None] + origins[:, None, :]

    def run(self, image: np.ndarray, boxes: np.ndarray) -> dict[str, np.ndarray]:
        """The landmarker contract (``align.landmarkers.Landmarker``): ``{"landmarks68": (N, 68, 2)}``."""
        return {"landmarks68": self.landmarks(image, boxes)}

    def __repr__(self) -> str:
        return f"PFLD68({self.path!r}, providers={self.session.get_providers()})"


@LANDMARKERS.register("pfld68", "pfld")
def _pfld68(weights_path: str | os.PathLike, providers: Sequence[str] | None = None,
            threads: int | None = None) -> PFLD68:
    return PFLD68(weights_path, providers=providers, threads=threads)


__all__ = ["CROP_SCALE", "CROP_SIZE", "PFLD68", "LandmarkInputError", "crop_faces", "crop_squares", "five_from_68"]
