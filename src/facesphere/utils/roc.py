"""ROC points, TAR@FAR and the threshold for a target FAR, from similarity scores of labelled pairs.

Pure numpy, on *similarity* scores (higher means "same identity"); a pair is accepted as genuine
when ``score >= threshold``. Every distinct threshold is evaluated exactly (no grid, no
interpolation): sorting the scores in descending order, accepting the k highest gives one ROC
point, and ties are accepted together. Deployment calibrates its decision threshold with
:func:`threshold_at_far` (``facesphere.pipeline.threshold``); evaluation reports
(``facesphere.evaluate.verification``) use the same functions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

DEFAULT_FAR_TARGETS: tuple[float, ...] = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6)

__all__ = ["DEFAULT_FAR_TARGETS", "at_far", "check_scores", "decide", "roc", "tar_at_far", "threshold_at_far"]


def check_scores(scores, same, *, require_both: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Return (float64 scores, bool labels) as 1-D arrays, or raise ValueError with the reason."""
    s = np.asarray(scores)
    y = np.asarray(same)
    if s.ndim != 1 or y.ndim != 1:
        raise ValueError(f"scores and same must be 1-D, got shapes {s.shape} and {y.shape}")
    if s.shape[0] != y.shape[0]:
        raise ValueError(f"scores and same must have equal lengths, got {s.shape[0]} and {y.shape[0]}")
    if s.shape[0] == 0:
        raise ValueError("scores and same are empty")
    if not (np.issubdtype(s.dtype, np.number) and not np.iscomplexobj(s)) or s.dtype == np.bool_:
        raise ValueError(f"scores must be real numbers, got dtype {s.dtype}")
    s = s.astype(np.float64, copy=False)
    if not np.all(np.isfinite(s)):
        bad = int(np.count_nonzero(~np.isfinite(s)))
        raise ValueError(f"scores must be finite; found {bad} NaN/inf value(s)")
    if y.dtype != np.bool_:
        if not np.issubdtype(y.dtype, np.number) or not np.all((y == 0) | (y == 1)):
            raise ValueError("same must be boolean (or 0/1) labels: True for genuine pairs")
        y = y.astype(bool)
    if require_both:
        n_pos = int(np.count_nonzero(y))
        if n_pos == 0 or n_pos == y.shape[0]:
            raise ValueError(
                f"both classes must be present: got {n_pos} genuine and {y.shape[0] - n_pos} impostor pairs"
            )
    return s, y


def _roc_counts(s: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(false accepts, true accepts, thresholds) at +inf and at every unique score, descending."""
    order = np.argsort(-s, kind="stable")
    s_sorted = s[order]
    y_sorted = y[order]
    tp = np.cumsum(y_sorted)
    fp = np.cumsum(~y_sorted)
    # keep the last position of each run of equal scores: accepting a score accepts all its ties
    last = np.flatnonzero(np.r_[s_sorted[1:] != s_sorted[:-1], True])
    fp = np.r_[0, fp[last]]
    tp = np.r_[0, tp[last]]
    thresholds = np.r_[np.inf, s_sorted[last]]
    return fp, tp, thresholds


def roc(scores, same) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact ROC: (far, tar, thresholds), one point per distinct threshold, far ascending.

    ``thresholds[0] = +inf`` gives the (0, 0) point; point k accepts the pairs with score >= thresholds[k].
    """
    s, y = check_scores(scores, same)
    fp, tp, thresholds = _roc_counts(s, y)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    return fp / n_neg, tp / n_pos, thresholds


def _allowed_false_accepts(far_target: float, n_neg: int) -> int:
    """Largest integer count of false accepts whose FAR is <= far_target (tolerant to float rounding)."""
    if not (0.0 <= far_target <= 1.0) or math.isnan(far_target):
        raise ValueError(f"FAR targets must lie in [0, 1], got {far_target}")
    return int(math.floor(far_target * n_neg * (1.0 + 1e-9)))


def at_far(s: np.ndarray, y: np.ndarray, far_targets) -> dict[float, tuple[float, float] | None]:
    """(TAR, threshold) at each FAR target for checked scores/labels (``check_scores``); None below 1/impostors."""
    fp, tp, thresholds = _roc_counts(s, y)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    out: dict[float, tuple[float, float] | None] = {}
    for target in far_targets:
        allowed = _allowed_false_accepts(float(target), n_neg)
        if allowed < 1:
            # FAR below 1/num_negatives cannot be measured on this set: report nothing rather than guess
            out[float(target)] = None
            continue
        k = int(np.searchsorted(fp, allowed, side="right")) - 1  # fp is non-decreasing: last point within budget
        out[float(target)] = (float(tp[k] / n_pos), float(thresholds[k]))
    return out


def tar_at_far(scores, same, far_targets: Sequence[float] = DEFAULT_FAR_TARGETS) -> dict[float, float | None]:
    """Highest TAR among thresholds whose FAR <= target, for each target (exact, no interpolation).

    A target below 1/num_negatives maps to ``None``: such a FAR cannot be measured on this pair set.
    """
    s, y = check_scores(scores, same)
    return {t: (None if v is None else v[0]) for t, v in at_far(s, y, far_targets).items()}


def threshold_at_far(scores, same, far_target: float) -> float | None:
    """Lowest score threshold whose FAR <= far_target (None when the target is below 1/num_negatives).

    Useful to calibrate a deployment threshold from labelled pairs; accept pairs with score >= it.
    """
    s, y = check_scores(scores, same)
    v = at_far(s, y, [far_target])[float(far_target)]
    return None if v is None else v[1]


def decide(scores, threshold: float | None):
    """The one verification decision: same person iff cosine >= ``threshold`` (None: no decision).

    A scalar score gives a bool, an array of scores a boolean array."""
    if threshold is None:
        return None
    same = np.asarray(scores, dtype=np.float64) >= float(threshold)
    return bool(same) if same.ndim == 0 else same
