"""1:1 verification metrics on pair scores: k-fold accuracy, ROC, TAR@FAR, VAL@FAR, AUC, EER.

Everything here is pure numpy and works on *similarity* scores (higher means "same identity"). A pair
is accepted as genuine when ``score >= threshold``. Distances can be used by negating them.

The k-fold accuracy follows the LFW protocol (Huang et al. 2007, UMass Amherst TR 07-49, "View 2";
the evaluation section of http://vis-www.cs.umass.edu/lfw/README.txt): for each fold the threshold that
maximises accuracy on the other folds is applied to the held-out fold. Instead of sweeping a fixed
grid (insightface: ``np.arange(0, 4, 0.01)``; SphereFace: [-1, 1] step 1e-4) every distinct
decision is evaluated exactly: the candidates are -inf, the midpoints between consecutive sorted
unique training scores, and +inf. A fixed grid can only tie or lose against this set on the
training folds, so results may differ from the reference scripts by a fraction of a percent.

Tie rule: when several candidates reach the maximal training accuracy, the lower median of the
maximising candidates (in ascending order) is chosen. Like SphereFace's "mean of the maximising
thresholds" it sits in the middle of the maximising set, but it is always itself a maximiser (the
mean of a disjoint maximising set can land in a worse gap) and never averages with an infinity.

The ROC points, TAR@FAR and the threshold at a FAR are ``facesphere.utils.roc`` (deployment
calibrates its thresholds with them too); they are re-exported here.

VAL@FAR follows insightface's ``calculate_val`` (``recognition/arcface_torch/eval/verification.py``):
for each of the k folds, the threshold giving the target FAR on the other folds is found by
*linear interpolation* between the two ROC vertices bracketing the target, then VAL (TAR) and FAR
are measured on the held-out fold; the report gives their means and the VAL std. insightface
interpolates over a fixed grid of squared-L2 distances (``np.arange(0, 4, 0.001)``); here the
vertices are the exact training impostor scores (impostor score m_k, the k-th highest, is the
threshold at which FAR = k/N), which is the limit of that grid. Departures: pairs are accepted when
``score >= threshold`` (insightface: ``dist < threshold``), and a target below 1/N training impostors
gives ``None`` instead of insightface's reject-all threshold 0. The plain TAR@FAR values of
``verification_report`` (one exact ROC over all pairs, no interpolation) are reported alongside.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from facesphere.utils.roc import DEFAULT_FAR_TARGETS, at_far, check_scores, roc, tar_at_far, threshold_at_far

logger = logging.getLogger(__name__)


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
    "val_at_far",
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
    s, y = check_scores(scores, same, require_both=False)
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
    s, y = check_scores(scores, same)
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


# --------------------------------------------------------------------------- ROC family (points: facesphere.utils.roc)


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


# --------------------------------------------------------------------------- VAL@FAR (insightface)


def _interpolated_threshold(scores: np.ndarray, same: np.ndarray, far_target: float) -> float | None:
    """Score threshold at ``far_target`` on these pairs, interpolated between impostor scores (module doc)."""
    imp = np.sort(scores[~same])[::-1]  # m_1 >= m_2 >= ...: accepting >= m_k gives FAR k/N
    n = imp.size
    x = far_target * n * (1.0 + 1e-12)
    if n == 0 or x < 1.0:
        return None
    k = int(math.floor(x))
    if k >= n:
        return float(imp[-1])
    frac = x - k
    upper, lower = imp[k - 1], imp[k]  # vertices (k/N, m_k) and ((k+1)/N, m_{k+1})
    return float(upper + frac * (lower - upper)) if frac > 1e-9 else float(upper)


def val_at_far(scores, same, far_target: float = 1e-3, n_folds: int = 10, folds=None) -> dict:
    """insightface-style VAL@FAR: per-fold interpolated threshold from the other folds (module doc).

    Returns ``far_target``, ``val_mean``, ``val_std`` (population), ``far_mean`` and per-fold
    ``thresholds``; the three figures are None when a training split has fewer than 1/far_target
    impostor pairs, or when a held-out fold lacks genuine or impostor pairs.
    """
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(same, dtype=bool)
    ids = _fold_ids(s.size, n_folds, folds)
    vals, fars, thresholds = [], [], []
    for fold in range(int(ids.max()) + 1):
        test = ids == fold
        thr = _interpolated_threshold(s[~test], y[~test], far_target)
        thresholds.append(thr)
        if thr is None or not y[test].any() or y[test].all():
            vals = fars = None
            continue
        if vals is not None:
            accept = s[test] >= thr
            vals.append(float(np.mean(accept[y[test]])))
            fars.append(float(np.mean(accept[~y[test]])))
    return {
        "far_target": float(far_target),
        "val_mean": None if vals is None else float(np.mean(vals)),
        "val_std": None if vals is None else float(np.std(vals)),
        "far_mean": None if fars is None else float(np.mean(fars)),
        "thresholds": thresholds,
    }


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
    s, y = check_scores(scores, same)
    kf = kfold_accuracy(s, y, n_folds=n_folds, folds=folds)
    thr, acc = _pick_threshold(*_accuracy_curve(s, y))
    at_targets = at_far(s, y, far_targets)
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
        "tar_at_far": {_far_key(t): (None if v is None else v[0]) for t, v in at_targets.items()},
        "threshold_at_far": {_far_key(t): (None if v is None else _json_float(v[1])) for t, v in at_targets.items()},
    }
