"""The face-detector contract: a batch of RGB photos of any size -> per photo boxes, scores, 5 landmarks.

A :class:`Detector` subclass only turns a batch of same-size uint8 canvases into scored candidates in
canvas pixels (:meth:`Detector._predict`). Everything the models share lives here: input checks,
placing each photo on the canvas (:mod:`facesphere.detect.canvas`), grouping photos into batches,
mapping coordinates back to the photo, minimum face size, NMS and the face cap.

Landmark order is InsightFace's: left eye, right eye, nose, left mouth corner, right mouth corner,
where "left" is image-left (the subject's right), i.e. the first point has the smaller x on a
frontal face, as the ArcFace alignment template expects.
"""

from __future__ import annotations

import abc
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from facesphere.detect.boxes import nms
from facesphere.detect.canvas import Placement, canvas_shape, place
from facesphere.registry import Registry

logger = logging.getLogger(__name__)

Candidates = tuple[np.ndarray, ...]
"""(boxes (K, 4), scores (K,), landmarks (K, 5, 2)[, extras]) of one canvas, float32, canvas pixels.

A detector with further per-face outputs appends a dict name -> (K, ...) array; those it names in
``Detector.point_extras`` are (x, y) points and are mapped back to photo pixels like the landmarks.
"""


class DetectorInputError(ValueError):
    """An input a detector cannot take (not an HxWx3 uint8 array, a bad threshold); the message says which."""


class DetectorWeightsError(ValueError):
    """A weights file that does not fit the detector; the message names the file."""


@dataclass
class Detections:
    """The faces found in one image: ``boxes`` (N, 4) x1, y1, x2, y2, ``scores`` (N,), ``landmarks`` (N, 5, 2).

    Coordinates are pixels of the input image (continuous: the image spans [0, W] x [0, H]); boxes are
    not clipped to the image. Faces are sorted by decreasing score.

    ``extras`` holds further NAMED per-face outputs (68 or dense landmarks, pose, 3DMM parameters, ...),
    each an array whose first axis is the face, so :meth:`select` keeps them in step with the boxes
    through NMS, filtering, the face cap and sorting. Names follow ``facesphere.pipeline.stages``.
    """

    boxes: np.ndarray
    scores: np.ndarray
    landmarks: np.ndarray
    extras: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.boxes = np.asarray(self.boxes, dtype=np.float32).reshape(-1, 4)
        self.scores = np.asarray(self.scores, dtype=np.float32).reshape(-1)
        self.landmarks = np.asarray(self.landmarks, dtype=np.float32).reshape(-1, 5, 2)
        if not len(self.boxes) == len(self.scores) == len(self.landmarks):
            raise ValueError(f"Detections: {len(self.boxes)} boxes, {len(self.scores)} scores and "
                             f"{len(self.landmarks)} landmark sets")
        self.extras = {name: check_per_face(name, values, len(self.scores)) for name, values in self.extras.items()}

    @classmethod
    def empty(cls) -> Detections:
        return cls(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros((0, 5, 2), np.float32))

    def __len__(self) -> int:
        return len(self.scores)

    def select(self, index) -> Detections:
        """The faces at ``index`` (indices or a boolean mask), in that order, extras included."""
        return Detections(self.boxes[index], self.scores[index], self.landmarks[index],
                          {name: values[index] for name, values in self.extras.items()})

    def with_extras(self, extras: dict[str, np.ndarray]) -> Detections:
        """These faces with more named per-face outputs (first axis = faces; a name given twice is refused)."""
        clash = sorted(set(extras) & set(self.extras))
        if clash:
            raise ValueError(f"per-face output(s) {', '.join(clash)} already present")
        return Detections(self.boxes, self.scores, self.landmarks, {**self.extras, **extras})


def check_per_face(name: str, values, faces: int) -> np.ndarray:
    """``values`` as an array with one entry per face along its first axis; ValueError naming ``name`` otherwise."""
    array = np.asarray(values)
    if array.ndim == 0 or len(array) != faces:
        raise ValueError(f"per-face output {name!r} must have one entry per face ({faces}) along its first axis, "
                         f"got shape {array.shape}")
    return array


def image_problem(image) -> str | None:
    """Why ``image`` is not an HxWx3 uint8 RGB array with H, W >= 1 (a one-line reason), or None when it is."""
    if not isinstance(image, np.ndarray):
        return f"expected an HxWx3 uint8 RGB numpy array, got {type(image).__name__}"
    if image.dtype != np.uint8:
        return f"expected dtype uint8 (RGB 0..255), got {image.dtype} {image.shape}"
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] < 1 or image.shape[1] < 1:
        return f"expected shape (H, W, 3) with H, W >= 1, got {image.shape}"
    return None


def check_images(images: Sequence[np.ndarray]) -> list[np.ndarray]:
    """The images as C-contiguous HxWx3 uint8 arrays; :class:`DetectorInputError` naming the first bad one.

    A detector's batch is all or nothing; :class:`facesphere.pipeline.FaceAnalyzer` checks each photo first
    (:func:`image_problem`) and gives a bad one an error entry of its own, so the rest of its batch is analysed."""
    if isinstance(images, np.ndarray) and images.ndim == 3:
        raise DetectorInputError(f"detect() takes a sequence of images, got one array of shape {images.shape}; "
                                 "wrap a single image in a list")
    checked = []
    for i, image in enumerate(images):
        problem = image_problem(image)
        if problem is not None:
            raise DetectorInputError(f"images[{i}]: {problem}")
        checked.append(np.ascontiguousarray(image))
    return checked


def _check_options(score_threshold, nms_threshold, min_face_size, max_faces) -> None:
    if not 0.0 <= score_threshold <= 1.0:
        raise DetectorInputError(f"score_threshold must lie in [0, 1], got {score_threshold}")
    if not 0.0 < nms_threshold <= 1.0:
        raise DetectorInputError(f"nms_threshold must lie in (0, 1], got {nms_threshold}")
    if not min_face_size >= 0:
        raise DetectorInputError(f"min_face_size must be >= 0 pixels, got {min_face_size}")
    if max_faces is not None and max_faces < 1:
        raise DetectorInputError(f"max_faces must be None or >= 1, got {max_faces}")


class Detector(abc.ABC):
    """Face detector over batches of HxWx3 uint8 RGB photos of any size.

    Options (defaults for :meth:`detect`, which may override the first four per call):
      score_threshold: keep candidates scoring at least this; nms_threshold: IoU above which the
      lower-scoring of two boxes is dropped; min_face_size: drop faces whose box is narrower or shorter
      than this many photo pixels; max_faces: keep at most this many (highest scores) per photo;
      input_size: (W, H) letterbox canvas, or None to run each photo at its own size (padded to a
      multiple of 32); upscale: also enlarge photos smaller than the letterbox canvas (off by default:
      enlarging photos whose face fills the frame pushes it past the largest anchors); batch_size: photos per forward pass (photos sharing a canvas size are batched);
      pre_nms_top_k: candidates per photo kept for NMS.
    """

    default_score_threshold: ClassVar[float] = 0.5
    default_nms_threshold: ClassVar[float] = 0.4
    fill_rgb: ClassVar[tuple[int, int, int]] = (0, 0, 0)
    """Padding colour of the canvas: what the network reads as background."""
    size_multiple: ClassVar[int] = 32
    """Canvas sides must be multiples of this (the largest feature stride)."""
    point_extras: ClassVar[frozenset[str]] = frozenset()
    """Names of this detector's extra outputs that are (..., 2) points in canvas pixels."""

    def __init__(self, *, input_size: tuple[int, int] | None = (640, 640), score_threshold: float | None = None,
                 nms_threshold: float | None = None, min_face_size: float = 0.0, max_faces: int | None = None,
                 upscale: bool = False, batch_size: int = 8, pre_nms_top_k: int = 5000) -> None:
        if input_size is not None:
            input_size = (int(input_size[0]), int(input_size[1]))
            if min(input_size) < self.size_multiple or any(s % self.size_multiple for s in input_size):
                raise DetectorInputError(f"input_size must be two multiples of {self.size_multiple} "
                                         f"(width, height), got {input_size}")
        if batch_size < 1 or pre_nms_top_k < 1:
            raise DetectorInputError(f"batch_size and pre_nms_top_k must be >= 1, got {batch_size}, {pre_nms_top_k}")
        self.input_size = input_size
        self.upscale = bool(upscale)
        self.score_threshold = self.default_score_threshold if score_threshold is None else float(score_threshold)
        self.nms_threshold = self.default_nms_threshold if nms_threshold is None else float(nms_threshold)
        self.min_face_size = float(min_face_size)
        self.max_faces = max_faces
        self.batch_size = int(batch_size)
        self.pre_nms_top_k = int(pre_nms_top_k)
        _check_options(self.score_threshold, self.nms_threshold, self.min_face_size, self.max_faces)

    @abc.abstractmethod
    def _predict(self, canvases: np.ndarray, score_threshold: float) -> list[Candidates]:
        """Candidates of each canvas of ``canvases`` (N, H, W, 3) uint8 RGB scoring >= ``score_threshold``.

        Coordinates are canvas pixels; at most ``self.pre_nms_top_k`` highest-scoring candidates per canvas.
        """

    def detect(self, images: Sequence[np.ndarray], score_threshold: float | None = None,
               nms_threshold: float | None = None, min_face_size: float | None = None,
               max_faces: int | None = None) -> list[Detections]:
        """One :class:`Detections` per image, in input order; ``None`` options take the detector's defaults."""
        images = check_images(images)
        score_threshold = self.score_threshold if score_threshold is None else float(score_threshold)
        nms_threshold = self.nms_threshold if nms_threshold is None else float(nms_threshold)
        min_face_size = self.min_face_size if min_face_size is None else float(min_face_size)
        max_faces = self.max_faces if max_faces is None else max_faces
        _check_options(score_threshold, nms_threshold, min_face_size, max_faces)
        results: list[Detections | None] = [None] * len(images)
        for batch in self._batches(images):
            placed = [place(images[i], self.input_size, self.size_multiple, self.fill_rgb, self.upscale) for i in batch]
            candidates = self._predict(np.stack([canvas for canvas, _ in placed]), score_threshold)
            for i, (_, placement), found in zip(batch, placed, candidates):
                results[i] = self._finish(found, placement, nms_threshold, min_face_size, max_faces)
        return results

    def _batches(self, images: list[np.ndarray]) -> list[list[int]]:
        """Indices of the images grouped by canvas size, in chunks of at most ``batch_size``."""
        groups: dict[tuple[int, int], list[int]] = {}
        for i, image in enumerate(images):
            groups.setdefault(canvas_shape(*image.shape[:2], self.input_size, self.size_multiple), []).append(i)
        return [members[s : s + self.batch_size] for members in groups.values()
                for s in range(0, len(members), self.batch_size)]

    @classmethod
    def _finish(cls, found: Candidates, placement: Placement, nms_threshold: float, min_face_size: float,
                max_faces: int | None) -> Detections:
        """Canvas candidates -> the photo's faces: map back, drop small faces, NMS, cap the count."""
        boxes, scores, landmarks = found[:3]
        if len(scores) == 0:
            return Detections.empty()
        extras = {name: placement.to_image(np.asarray(values).reshape(len(scores), -1)).reshape(np.shape(values))
                  if name in cls.point_extras else values for name, values in (found[3] if len(found) > 3 else {}).items()}
        faces = Detections(placement.to_image(boxes), scores,
                           placement.to_image(np.asarray(landmarks).reshape(-1, 10)).reshape(-1, 5, 2), extras)
        if min_face_size > 0:
            boxes = faces.boxes
            faces = faces.select(np.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]) >= min_face_size)
        keep = nms(faces.boxes, faces.scores, nms_threshold)
        return faces.select(keep if max_faces is None else keep[:max_faces])

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(input_size={self.input_size}, score_threshold={self.score_threshold}, "
                f"nms_threshold={self.nms_threshold}, min_face_size={self.min_face_size}, max_faces={self.max_faces})")


DETECTORS: Registry[Detector] = Registry("detector")


def build_detector(name: str, weights_path: str | os.PathLike, **kwargs) -> Detector:
    """Build a registered detector by name, e.g. ``build_detector("scrfd", "scrfd_500m_bnkps.onnx", threads=2)``."""
    import facesphere.detect  # noqa: F401  (registers the detectors)

    return DETECTORS.build(name, weights_path=weights_path, **kwargs)


def top_candidates(scores: np.ndarray, score_threshold: float, top_k: int) -> np.ndarray:
    """Indices of the at most ``top_k`` highest ``scores`` that are >= ``score_threshold``, best first."""
    index = np.flatnonzero(scores >= score_threshold)
    if len(index) > top_k:
        index = index[np.argpartition(-scores[index], top_k - 1)[:top_k]]
    return index[np.argsort(-scores[index], kind="stable")]
