"""Measuring detectors: dlib imglab box files, recall at an IoU, and 5-point error against manual landmarks.

Used by the tests and ``benchmarks/detection.py``. Matching is one-to-one and greedy by IoU (highest
pairs first), as in the usual detection protocols; the landmark error is the mean point distance
divided by the distance between the two annotated eye centres (inter-ocular normalisation).
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from facesphere.detect.base import Detections
from facesphere.detect.boxes import box_iou


class AnnotationError(ValueError):
    """An annotation file that cannot be read; the message names the file."""


def read_imglab_boxes(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """dlib imglab XML (``<image file=...><box top left width height/>``) -> {file: (N, 4) x1, y1, x2, y2}.

    Boxes marked ``ignore='1'`` are left out.
    """
    path = Path(path)
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as error:
        raise AnnotationError(f"{path}: not a readable imglab XML file ({error})") from error
    out = {}
    for image in root.iter("image"):
        boxes = []
        for box in image.iter("box"):
            if box.get("ignore", "0") == "1":
                continue
            try:
                left, top, width, height = (float(box.get(k)) for k in ("left", "top", "width", "height"))
            except (TypeError, ValueError):
                raise AnnotationError(f"{path}: box without numeric left/top/width/height in {image.get('file')}") from None
            boxes.append([left, top, left + width, top + height])
        out[image.get("file")] = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if not out:
        raise AnnotationError(f"{path}: no <image> entries")
    return out


def match_boxes(truth: np.ndarray, found: np.ndarray, iou_threshold: float = 0.5) -> np.ndarray:
    """For each true box the index of its matched found box (-1 if none): one-to-one, greedy by IoU."""
    matches = np.full(len(truth), -1, dtype=np.int64)
    if len(truth) == 0 or len(found) == 0:
        return matches
    iou = box_iou(truth, found)
    pairs = np.argwhere(iou >= iou_threshold)
    used = set()
    for t, f in sorted(pairs.tolist(), key=lambda p: -iou[p[0], p[1]]):
        if matches[t] < 0 and f not in used:
            matches[t] = f
            used.add(f)
    return matches


def recall(truth: list[np.ndarray], detections: list[Detections], iou_threshold: float = 0.5) -> float:
    """Share of the true boxes (all images) matched by a detection at IoU >= ``iou_threshold``."""
    total = sum(len(t) for t in truth)
    if total == 0:
        raise ValueError("recall: no true boxes")
    hits = sum(int((match_boxes(t, d.boxes, iou_threshold) >= 0).sum()) for t, d in zip(truth, detections))
    return hits / total


def face_at(detections: Detections, points: np.ndarray) -> int:
    """Index of the highest-scoring detection whose box contains the centroid of ``points``; -1 if none."""
    cx, cy = np.asarray(points, dtype=np.float64).reshape(-1, 2).mean(axis=0)
    b = detections.boxes
    inside = np.flatnonzero((b[:, 0] <= cx) & (cx <= b[:, 2]) & (b[:, 1] <= cy) & (cy <= b[:, 3]))
    return int(inside[np.argmax(detections.scores[inside])]) if len(inside) else -1


def interocular_error(predicted: np.ndarray, truth: np.ndarray) -> float:
    """Mean distance of the 5 points divided by the distance between the true eye centres (points 0 and 1)."""
    predicted = np.asarray(predicted, dtype=np.float64).reshape(5, 2)
    truth = np.asarray(truth, dtype=np.float64).reshape(5, 2)
    interocular = np.linalg.norm(truth[0] - truth[1])
    if interocular <= 0:
        raise ValueError("interocular_error: the two true eye centres coincide")
    return float(np.linalg.norm(predicted - truth, axis=1).mean() / interocular)


