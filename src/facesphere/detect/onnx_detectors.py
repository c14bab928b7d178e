"""ONNX Runtime face detectors with 5 landmarks: SCRFD (InsightFace) and YuNet (libfacedetection).

Both run three feature levels at strides 8, 16 and 32 with outputs flattened row-major per level,
one named output per (quantity, stride); decoding is vectorised numpy.

* SCRFD (Guo et al., "Sample and Computation Redistribution for Efficient Face Detection", 2105.04714):
  input RGB, (x - 127.5) / 128; outputs ``score_s`` (sigmoid), ``bbox_s`` (distances left, top, right,
  bottom in units of s), ``kps_s`` (5 offsets in units of s); 2 anchors per location at (j*s, i*s).
* YuNet (Wu et al., "YuNet: A Tiny Millisecond-level Face Detector", 2023): input BGR 0..255 as float,
  sides divisible by 32; outputs ``cls_s``, ``obj_s`` (sigmoided), ``bbox_s`` (centre offset and log
  size in units of s), ``kps_s``; one anchor-free point per location at (j*s, i*s). The score is
  sqrt(cls * obj), the geometric mean OpenCV's FaceDetectorYN reports: a monotone function of
  cls * obj (same ranking and NMS), on a scale comparable with the other detectors' thresholds.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from facesphere.detect.base import (
    DETECTORS,
    Candidates,
    Detector,
    DetectorWeightsError,
    top_candidates,
)
from facesphere.utils.onnxrt import make_session

logger = logging.getLogger(__name__)

STRIDES = (8, 16, 32)


@functools.lru_cache(maxsize=64)
def grid_points(height: int, width: int, stride: int, per_location: int = 1) -> np.ndarray:
    """Anchor points (rows*cols*per_location, 2) at (j*stride, i*stride), row-major, repeated per anchor.

    Cached per canvas size; the returned array is read-only.
    """
    ys, xs = np.mgrid[: height // stride, : width // stride]
    points = np.stack([xs, ys], axis=-1).reshape(-1, 2).astype(np.float32) * stride
    points = np.repeat(points, per_location, axis=0)
    points.flags.writeable = False
    return points


class OnnxDetector(Detector):
    """A detector whose network is an ONNX file run by ONNX Runtime; subclasses name outputs and decode.

    ``providers``: ONNX Runtime providers in order of preference (e.g. ``["cuda", "cpu"]``; default CPU);
    a requested provider that is unavailable is logged as a warning, never silently replaced.
    ``threads``: ONNX Runtime intra-op threads.
    """

    output_kinds: tuple[str, ...] = ()

    def __init__(self, weights_path: str | os.PathLike, *, providers: Sequence[str] | str | None = None,
                 threads: int | None = None, **options) -> None:
        super().__init__(**options)
        self.path = Path(weights_path)
        self.session = make_session(self.path, providers=providers, threads=threads)
        inputs = self.session.get_inputs()
        if len(inputs) != 1 or len(inputs[0].shape) != 4:
            raise DetectorWeightsError(f"{self.path}: expected one NCHW input, got "
                                       f"{[(i.name, i.shape) for i in inputs]}")
        self.input_name = inputs[0].name
        names = [o.name for o in self.session.get_outputs()]
        expected = [f"{kind}_{s}" for kind in self.output_kinds for s in STRIDES]
        missing = [n for n in expected if n not in names]
        if missing:
            raise DetectorWeightsError(f"{self.path}: not a {type(self).__name__} model, outputs {missing} are "
                                       f"missing (has {names})")
        self.output_names = expected

    def _blob(self, canvases: np.ndarray) -> np.ndarray:
        """(N, H, W, 3) uint8 RGB -> the network's (N, 3, H, W) float32 input."""
        raise NotImplementedError

    def _decode(self, outputs: dict[str, np.ndarray], index: int, height: int, width: int,
                score_threshold: float) -> Candidates:
        raise NotImplementedError

    def _predict(self, canvases: np.ndarray, score_threshold: float) -> list[Candidates]:
        values = self.session.run(self.output_names, {self.input_name: self._blob(canvases)})
        outputs = dict(zip(self.output_names, values))
        height, width = canvases.shape[1:3]
        return [self._decode(outputs, i, height, width, score_threshold) for i in range(len(canvases))]

    def _gather(self, per_level: list[tuple[np.ndarray, np.ndarray, np.ndarray]], score_threshold: float) -> Candidates:
        """Concatenate the levels' (scores, boxes, landmarks) and keep the best candidates over the threshold."""
        scores = np.concatenate([s for s, _, _ in per_level])
        keep = top_candidates(scores, score_threshold, self.pre_nms_top_k)
        boxes = np.concatenate([b for _, b, _ in per_level])[keep]
        points = np.concatenate([p for _, _, p in per_level])[keep]
        return boxes.astype(np.float32), scores[keep].astype(np.float32), points.reshape(-1, 5, 2).astype(np.float32)

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", model={self.path.name}, providers={self.session.get_providers()})"


@DETECTORS.register("scrfd", "scrfd_500m")
class SCRFDDetector(OnnxDetector):
    """SCRFD with 5 keypoints (e.g. ``scrfd_500m_bnkps.onnx``); default canvas 640x640 letterbox."""

    output_kinds = ("score", "bbox", "kps")
    default_score_threshold = 0.5
    default_nms_threshold = 0.4

    def _blob(self, canvases: np.ndarray) -> np.ndarray:
        return ((canvases.astype(np.float32) - 127.5) / 128.0).transpose(0, 3, 1, 2)

    def _decode(self, outputs, index, height, width, score_threshold) -> Candidates:
        per_level = []
        for s in STRIDES:
            scores = outputs[f"score_{s}"][index].reshape(-1)
            cells = (height // s) * (width // s)
            if len(scores) % cells:
                raise DetectorWeightsError(f"{self.path}: score_{s} has {len(scores)} entries for {cells} locations")
            anchors = grid_points(height, width, s, len(scores) // cells)
            distance = outputs[f"bbox_{s}"][index].reshape(-1, 4) * s
            boxes = np.concatenate([anchors - distance[:, :2], anchors + distance[:, 2:]], axis=1)
            points = np.tile(anchors, 5) + outputs[f"kps_{s}"][index].reshape(-1, 10) * s
            per_level.append((scores, boxes, points))
        return self._gather(per_level, score_threshold)


@DETECTORS.register("yunet", "yunet_n")
class YuNetDetector(OnnxDetector):
    """YuNet (e.g. ``yunet_n_dynamic.onnx``, any input size divisible by 32); default canvas 640x640 letterbox."""

    output_kinds = ("cls", "obj", "bbox", "kps")
    default_score_threshold = 0.5
    default_nms_threshold = 0.4

    def _blob(self, canvases: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(canvases[..., ::-1].transpose(0, 3, 1, 2), dtype=np.float32)

    def _decode(self, outputs, index, height, width, score_threshold) -> Candidates:
        per_level = []
        for s in STRIDES:
            cls = np.clip(outputs[f"cls_{s}"][index].reshape(-1), 0, 1)
            obj = np.clip(outputs[f"obj_{s}"][index].reshape(-1), 0, 1)
            scores = np.sqrt(cls * obj)
            anchors = grid_points(height, width, s)
            if len(anchors) != len(scores):
                raise DetectorWeightsError(f"{self.path}: cls_{s} has {len(scores)} entries for {len(anchors)} locations")
            bbox = outputs[f"bbox_{s}"][index].reshape(-1, 4)
            centre = anchors + bbox[:, :2] * s
            size = np.exp(bbox[:, 2:]) * s
            boxes = np.concatenate([centre - size / 2, centre + size / 2], axis=1)
            points = np.tile(anchors, 5) + outputs[f"kps_{s}"][index].reshape(-1, 10) * s
            per_level.append((scores, boxes, points))
        return self._gather(per_level, score_threshold)
