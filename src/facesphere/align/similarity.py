"""5-point similarity alignment onto the crop templates recognition models are trained with.

A face is aligned by the least-squares similarity transform (rotation, uniform scale, translation;
Umeyama 1991, IEEE TPAMI 13(4), eqs. 40-42) that maps its 5 landmarks (image-left eye, image-right eye,
nose tip, image-left and image-right mouth corners) onto a template (``facesphere.align.templates``),
then warped to the template's crop size. Templates are named as model cards name them
(``ModelCard.alignment``), so a model's card picks its crop.
"""

from __future__ import annotations

import cv2
import numpy as np

from facesphere.align.templates import get_template, template_for_size

def umeyama(src, dst, estimate_scale: bool = True) -> np.ndarray:
    """Least-squares similarity (Umeyama 1991) mapping ``src`` onto ``dst`` points, as a 3x3 matrix.

    ``dst ≈ (T @ [src, 1]ᵀ)ᵀ[:, :2]`` minimising the summed squared error; a reflection is never used.
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[0] < 2:
        raise ValueError(f"src and dst must both be (N >= 2, D), got {src.shape} and {dst.shape}")
    if not (np.isfinite(src).all() and np.isfinite(dst).all()):
        raise ValueError("landmarks must be finite")
    n, dim = src.shape
    mu_s, mu_d = src.mean(axis=0), dst.mean(axis=0)
    sc, dc = src - mu_s, dst - mu_d
    var_s = float((sc**2).sum() / n)
    if var_s <= 1e-12:
        raise ValueError("source points are degenerate (all equal)")
    cov = dc.T @ sc / n
    u, sing, vt = np.linalg.svd(cov)
    d = np.ones(dim)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        d[-1] = -1.0
    rot = u @ np.diag(d) @ vt
    scale = float((sing * d).sum() / var_s) if estimate_scale else 1.0
    out = np.eye(dim + 1)
    out[:dim, :dim] = scale * rot
    out[:dim, dim] = mu_d - scale * rot @ mu_s
    return out


def align_similarity(image: np.ndarray, points, template=None, size: tuple[int, int] = (112, 112),
                     border_value: int = 0) -> np.ndarray:
    """Warp ``image`` so its 5 ``points`` land on ``template`` (default: the template of ``size``); (H, W) = ``size``."""
    template = template_for_size(size).points if template is None else np.asarray(template, dtype=np.float64)
    points = np.asarray(points, dtype=np.float64)
    if points.shape != template.shape:
        raise ValueError(f"points {points.shape} do not match the template {template.shape}")
    matrix = umeyama(points, template)[:2]
    return cv2.warpAffine(np.ascontiguousarray(image), matrix, (int(size[1]), int(size[0])),
                          flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                          borderValue=(border_value,) * 3)


def align_faces(image: np.ndarray, landmarks: np.ndarray, alignment: str = "arcface_112x112") -> np.ndarray:
    """Crops (N, H, W, 3) of every face in ``image`` given its 5 landmarks (N, 5, 2), on a named template."""
    template = get_template(alignment)
    landmarks = np.asarray(landmarks, dtype=np.float64).reshape(-1, 5, 2)
    h, w = template.size
    crops = np.zeros((len(landmarks), h, w, 3), dtype=np.uint8)
    for i, points in enumerate(landmarks):
        crops[i] = align_similarity(image, points, template.points, template.size)
    return crops


__all__ = ["align_faces", "align_similarity", "umeyama"]
