"""1:1 verification metrics on pair scores: k-fold accuracy, ROC, TAR@FAR, AUC, EER.

Everything here is pure numpy and works on *similarity* scores (higher means "same identity"). A pair
is accepted as genuine when ``score >= threshold``. Distances can be used by negating them.

The k-fold accuracy follows the LFW protocol (papers.md §12): for each fold the threshold that
maximises accuracy on the other folds is applied to the held-out fold. Instead of sweeping a fixed
grid (insightface: ``np.arange(0, 4, 0.01)``; SphereFace: [-1, 1] step 1e-4) every distinct
decision is evaluated exactly: the candidates are -inf, the midpoints between consecutive sorted
unique training scores, and +inf. A fixed grid can only tie or lose against this set on the
training folds, so results may differ from the reference scripts by a fraction of a percent
(papers.md §12 quotes ~0.1% between recipes).

Tie rule: when several candidates reach the maximal training accuracy, the lower median of the
maximising candidates (in ascending order) is chosen. Like SphereFace's "mean of the maximising
thresholds" it sits in the middle of the maximising set, but it is always itself a maximiser (the
mean of a disjoint maximising set can land in a worse gap) and never averages with an infinity.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

logger = logging.getLogger(__name__)

DEFAULT_FAR_TARGETS: tuple[float, ...] = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6)

__all__ = [
    "DEFAULT_FAR_TARGETS",
    "KFoldResult",
    "auc",
    "best_threshold",
    "eer",
    "kfold_accuracy",
    "roc",
    "tar_at_far",
    "threshold_at_far",
    "verification_report",
]


@dataclass(frozen=True)
class KFoldResult:
    """Outcome of :func:`kfold_accuracy`: mean/std (population, ddof=0) over folds plus per-fold detail."""

    accuracy_mean: float
    accuracy_std: float
    accuracies: np.ndarray  # (n_folds,) held-out accuracy of each fold
    thresholds: np.ndarray  # (n_folds,) threshold chosen on the other folds

    def to_dict(self) -> dict:
        """JSON-serialisable view (arrays become lists of floats)."""
        d = asdict(self)
        d["accuracies"] = [float(a) for a in self.accuracies]
        d["thresholds"] = [float(t) for t in self.thresholds]
        return d


# --------------------------------------------------------------------------- validation


def _validate(scores, same, *, require_both: bool = True) -> tuple[np.ndarray, np.ndarray]:
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


# --------------------------------------------------------------------------- thresholds


def _accuracy_curve(scores: np.ndarray, same: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Accuracy of every candidate threshold, vectorised.

    Candidates are ``[-inf, midpoints of consecutive unique scores..., +inf]`` (ascending). With
    unique values u_0 < ... < u_{K-1}, candidate c_k (k = 0..K) accepts exactly the scores >= u_k, so
    correct(k) = #genuine with score >= u_k + #impostor with score < u_k, read off cumulative counts.
    """
    uniq, inv = np.unique(scores, return_inverse=True)
    pos_per = np.bincount(inv, weights=same, minlength=uniq.size)
    neg_per = np.bincount(inv, weights=~same, minlength=uniq.size)
    pos_below = np.concatenate(([0.0], np.cumsum(pos_per)))
    neg_below = np.concatenate(([0.0], np.cumsum(neg_per)))
    correct = (pos_below[-1] - pos_below) + neg_below
    mids = uniq[:-1] / 2.0 + uniq[1:] / 2.0  # halves first: no overflow near float max
    candidates = np.concatenate(([-np.inf], mids, [np.inf]))
    return candidates, correct / scores.size


def _pick_threshold(candidates: np.ndarray, accuracy: np.ndarray) -> tuple[float, float]:
    """Apply the module's tie rule: lower median of the maximising candidates."""
    best = accuracy.max()
    idx = np.flatnonzero(accuracy == best)
    chosen = idx[(idx.size - 1) // 2]
    return float(candidates[chosen]), float(best)


def best_threshold(scores, same) -> tuple[float, float]:
    """Threshold maximising accuracy on these pairs (tie rule in the module docstring) and that accuracy."""
    s, y = _validate(scores, same, require_both=False)
    return _pick_threshold(*_accuracy_curve(s, y))


def _fold_ids(n: int, n_folds: int, folds) -> np.ndarray:
    """Fold id of every pair: contiguous near-equal blocks in order by default, else the given ids."""
    if folds is None:
        if not isinstance(n_folds, (int, np.integer)) or n_folds < 2:
            raise ValueError(f"n_folds must be an integer >= 2, got {n_folds!r}")
        if n_folds > n:
            raise ValueError(f"n_folds={n_folds} exceeds the number of pairs ({n})")
        sizes = np.full(n_folds, n // n_folds)
        sizes[: n % n_folds] += 1  # like np.array_split: the first folds take the remainder
        return np.repeat(np.arange(n_folds), sizes)
    f = np.asarray(folds)
    if f.shape != (n,):
        raise ValueError(f"folds must have one id per pair: shape {f.shape}, expected ({n},)")
    _, ids = np.unique(f, return_inverse=True)
    if ids.max() < 1:
        raise ValueError("folds must contain at least 2 distinct fold ids")
    return ids


def kfold_accuracy(scores, same, n_folds: int = 10, folds: Sequence[int] | np.ndarray | None = None) -> KFoldResult:
    """k-fold verification accuracy with the threshold chosen on the other folds (LFW protocol).

    Args:
        scores: (N,) similarities, higher = same identity.
        same: (N,) bool, True for genuine pairs.
        n_folds: number of contiguous, in-order folds (LFW pairs.txt: 10 blocks of 600). Ignored when
            ``folds`` is given.
        folds: optional (N,) fold id per pair; fold order follows the sorted unique ids.
    """
    s, y = _validate(scores, same)
    ids = _fold_ids(s.size, n_folds, folds)
    k = int(ids.max()) + 1
    accs = np.empty(k)
    thrs = np.empty(k)
    for fold in range(k):
        test = ids == fold
        thr, _ = _pick_threshold(*_accuracy_curve(s[~test], y[~test]))
        accs[fold] = np.mean((s[test] >= thr) == y[test])
        thrs[fold] = thr
    result = KFoldResult(float(accs.mean()), float(accs.std()), accs, thrs)
    logger.debug("k-fold accuracy %.5f ± %.5f over %d folds", result.accuracy_mean, result.accuracy_std, k)
    return result


# --------------------------------------------------------------------------- ROC family


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
    s, y = _validate(scores, same)
    fp, tp, thresholds = _roc_counts(s, y)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    return fp / n_neg, tp / n_pos, thresholds


def _allowed_false_accepts(far_target: float, n_neg: int) -> int:
    """Largest integer count of false accepts whose FAR is <= far_target (tolerant to float rounding)."""
    if not (0.0 <= far_target <= 1.0) or math.isnan(far_target):
        raise ValueError(f"FAR targets must lie in [0, 1], got {far_target}")
    return int(math.floor(far_target * n_neg * (1.0 + 1e-9)))


def _at_far(s: np.ndarray, y: np.ndarray, far_targets) -> dict[float, tuple[float, float] | None]:
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
    s, y = _validate(scores, same)
    return {t: (None if v is None else v[0]) for t, v in _at_far(s, y, far_targets).items()}


def threshold_at_far(scores, same, far_target: float) -> float | None:
    """Lowest score threshold whose FAR <= far_target (None when the target is below 1/num_negatives).

    Useful to calibrate a deployment threshold from labelled pairs; accept pairs with score >= it.
    """
    s, y = _validate(scores, same)
    v = _at_far(s, y, [far_target])[float(far_target)]
    return None if v is None else v[1]


def auc(scores, same) -> float:
    """Area under the exact ROC (trapezoidal; ties count one half, as in the Mann–Whitney U)."""
    far, tar, _ = roc(scores, same)
    return float(np.sum(np.diff(far) * (tar[1:] + tar[:-1]) / 2.0))


def eer(scores, same) -> float:
    """Equal error rate: FAR = FRR, linearly interpolated between the two ROC points bracketing it."""
    far, tar, _ = roc(scores, same)
    diff = (1.0 - tar) - far  # FRR - FAR: +1 at the first point, -1 at the last, non-increasing
    k = int(np.argmax(diff <= 0))
    if diff[k] == 0:
        return float(far[k])
    d0, d1 = diff[k - 1], diff[k]
    t = d0 / (d0 - d1)
    return float(far[k - 1] + t * (far[k] - far[k - 1]))


# --------------------------------------------------------------------------- report


def _json_float(x: float | None) -> float | None:
    """Strict-JSON float: an infinite threshold (accept all / reject all) becomes None."""
    return None if x is None or not math.isfinite(x) else float(x)


def _far_key(target: float) -> str:
    """Stable JSON key for a FAR target, e.g. 0.001 -> '0.001', 1e-06 -> '1e-06'."""
    return format(target, "g")


def verification_report(
    scores, same, n_folds: int = 10, far_targets: Sequence[float] = DEFAULT_FAR_TARGETS, folds=None
) -> dict:
    """All verification numbers for one pair set as a JSON-serialisable dict.

    Keys: num_pairs, num_genuine, num_impostor, accuracy_mean, accuracy_std, fold_accuracies,
    fold_thresholds, best_threshold and best_accuracy (one threshold fitted on all pairs, i.e. an
    optimistic upper bound), auc, eer, tar_at_far and threshold_at_far (keys like "0.001"; None when
    unavailable). Infinite thresholds (accept/reject everything) are written as None so the dict
    passes ``json.dumps(..., allow_nan=False)``.
    """
    s, y = _validate(scores, same)
    kf = kfold_accuracy(s, y, n_folds=n_folds, folds=folds)
    thr, acc = _pick_threshold(*_accuracy_curve(s, y))
    at_far = _at_far(s, y, far_targets)
    n_pos = int(y.sum())
    return {
        "num_pairs": int(y.size),
        "num_genuine": n_pos,
        "num_impostor": int(y.size - n_pos),
        "accuracy_mean": kf.accuracy_mean,
        "accuracy_std": kf.accuracy_std,
        "fold_accuracies": [float(a) for a in kf.accuracies],
        "fold_thresholds": [_json_float(t) for t in kf.thresholds],
        "best_threshold": _json_float(thr),
        "best_accuracy": acc,
        "auc": auc(s, y),
        "eer": eer(s, y),
        "tar_at_far": {_far_key(t): (None if v is None else v[0]) for t, v in at_far.items()},
        "threshold_at_far": {_far_key(t): (None if v is None else _json_float(v[1])) for t, v in at_far.items()},
    }
