"""Faces drawn on photos (boxes, scores, 5 and 68 landmarks), rectifications drawn beside their crops, and PNG
files written atomically."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from facesphere.utils.files import atomic_path

BOX = (0, 200, 0)
POINT_COLOURS = [(255, 60, 60), (60, 60, 255), (255, 220, 0), (255, 0, 255), (0, 220, 255)]
"""Image-left eye, image-right eye, nose, image-left and image-right mouth corner."""
DENSE = (0, 255, 120)
CELL = (0, 230, 0)
DEGENERATE_CELL = (255, 40, 40)
PICTURE_SCALE = 3
"""How much a rectification picture enlarges the 112x112 crops, so that the grid can be seen."""


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


def draw_rectification(crop: np.ndarray, rectified: np.ndarray, homographies: np.ndarray, degenerate: np.ndarray,
                       grid: int, scale: int = PICTURE_SCALE) -> np.ndarray:
    """[the aligned crop with the grid drawn on it | the rectified crop], each enlarged ``scale`` times (nearest).

    Each cell's output square, mapped through its homography (output pixel -> input pixel, arXiv 1808.06210
    Sec. 3.2), is drawn on the crop: the quad the cell samples from (green, red where ``degenerate``). A quad
    with a corner at infinity or behind the camera is left out."""
    from facesphere.backbones.rectifier import cell_corners

    h, w = crop.shape[:2]

    def enlarge(image: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(cv2.resize(image, (w * scale, h * scale), interpolation=cv2.INTER_NEAREST))

    left, right = enlarge(crop), enlarge(rectified)
    corners = cell_corners(grid, (h, w)).double().numpy()  # (n*n, 4, 2) output pixels
    points = np.concatenate([corners, np.ones_like(corners[..., :1])], axis=-1)
    projected = np.einsum("kij,kpj->kpi", np.asarray(homographies, dtype=np.float64), points)
    for quad, bad in zip(projected, np.asarray(degenerate, dtype=bool)):
        with np.errstate(divide="ignore", invalid="ignore"):
            xy = quad[:, :2] / quad[:, 2:]
        if not (np.isfinite(xy).all() and (quad[:, 2] > 0).all()):
            continue
        xy = np.clip((xy + 0.5) * scale - 0.5, -8 * max(h, w) * scale, 8 * max(h, w) * scale)
        cv2.polylines(left, [np.round(xy * 16).astype(np.int32)], True, DEGENERATE_CELL if bad else CELL, 1,
                      cv2.LINE_AA, shift=4)
    return np.concatenate([left, right], axis=1)


def write_rectification_pictures(analyzer, rectifier, sources: Sequence, out_dir: str | os.PathLike,
                                 scale: int = PICTURE_SCALE) -> tuple[list, list[dict]]:
    """For every face of every photo, ``<index>_<stem>_face<k>.png`` in ``out_dir`` (:func:`draw_rectification`);
    returns the photos' results (``ImageResult``) and JSON entries, each face with its ``rectification`` and
    ``picture`` path.

    ``analyzer`` cuts the aligned crops (without a rectify stage of its own), ``rectifier`` is a
    :class:`facesphere.models.rectifier.RectifyStage`."""
    out_dir = Path(out_dir)
    results, payload = [], []
    for index, source in enumerate(sources):  # one photo at a time: each is decoded once
        result = analyzer.analyze([source], embed=False)[0]
        results.append(result)
        entry = result.to_dict()
        if result.faces:
            done = rectifier.rectify(np.stack([face.crop for face in result.faces]))
            for k, (face, report) in enumerate(zip(result.faces, done.report())):
                path = out_dir / f"{index:05d}_{Path(result.source).stem}_face{k}.png"
                write_png(path, draw_rectification(face.crop, done.crops[k], done.homographies[k],
                                                   done.degenerate[k], rectifier.grid, scale))
                entry["faces"][k].update(rectification=report, picture=str(path))
        payload.append(entry)
    return results, payload


def write_png(path: str | os.PathLike, image: np.ndarray) -> None:
    """Write an RGB uint8 image as PNG, atomically."""
    with atomic_path(path) as tmp:
        Image.fromarray(np.ascontiguousarray(image)).save(tmp, format="PNG")


__all__ = ["PICTURE_SCALE", "draw_faces", "draw_rectification", "write_png", "write_rectification_pictures"]
