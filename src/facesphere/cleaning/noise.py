"""Per-image noise status codes, and controlled noise injection into a clean labelled set.

IMDb-Face (arXiv 1807.11649) studies two kinds of label noise: *flips* (a photo filed under another
identity of the set) and *outliers* (a photo of nobody in the set). :func:`inject_noise` makes a noisy copy
of a clean set with chosen rates of both, so a detector's precision and recall and a model's accuracy can
be measured against known truth.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import numpy as np

__all__ = ["InjectedNoise", "Status", "inject_noise"]


class Status(IntEnum):
    """What profiling concluded about one image (stored as uint8)."""

    CLEAN = 0
    FLIP = 1  # closer to another identity of the set than to its own
    OUTLIER = 2  # far from every identity of the set
    DUPLICATE = 3  # the same photo (or a near copy) filed again, within or across identities
    UNREADABLE = 4  # could not be read or decoded; reported, never embedded


@dataclass(frozen=True)
class InjectedNoise:
    """A noisy copy of a clean set: its N samples (some relabelled), then K outliers appended.

    ``labels`` (N + K,) are the noisy labels; ``true_labels`` (N + K,) the identities the photos really
    show (-1 for outliers); ``outliers`` (K,) the outlier-pool indices of the appended samples, in order.
    """

    labels: np.ndarray
    true_labels: np.ndarray
    outliers: np.ndarray

    @property
    def kind(self) -> np.ndarray:
        """Status per sample: CLEAN, FLIP (label differs from the truth) or OUTLIER."""
        kind = np.where(self.labels != self.true_labels, Status.FLIP, Status.CLEAN).astype(np.uint8)
        kind[self.true_labels < 0] = Status.OUTLIER
        return kind


def inject_noise(labels, num_classes: int, flip_rate: float, outlier_rate: float, outlier_pool: int,
                 seed: int = 0) -> InjectedNoise:
    """Flip ``flip_rate`` and add ``outlier_rate`` of the resulting set as outliers, both as fractions of it.

    With N clean samples, K = round(outlier_rate · N / (1 − outlier_rate)) outliers drawn without replacement
    from a pool of ``outlier_pool`` photos of people outside the set are appended, each under a uniformly
    chosen identity; then F = round(flip_rate · (N + K)) of the N clean samples, chosen uniformly, move to a
    uniformly chosen *other* identity. Deterministic in ``seed``.
    """
    labels = np.asarray(labels, dtype=np.int64)
    if labels.ndim != 1 or not len(labels):
        raise ValueError("labels must be a non-empty 1-D array")
    if num_classes < 2 or labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}) with num_classes >= 2")
    if not (0 <= flip_rate < 1 and 0 <= outlier_rate < 1 and flip_rate + outlier_rate < 1):
        raise ValueError(f"rates must be in [0, 1) with a sum below 1, got flips {flip_rate}, outliers {outlier_rate}")
    rng = np.random.default_rng(seed)
    n = len(labels)
    k = int(round(outlier_rate * n / (1.0 - outlier_rate)))
    if k > outlier_pool:
        raise ValueError(f"{k} outliers wanted but the outlier pool holds {outlier_pool}")
    f = int(round(flip_rate * (n + k)))
    if f > n:
        raise ValueError(f"{f} flips wanted but the set holds {n} samples")
    noisy = labels.copy()
    flipped = rng.choice(n, size=f, replace=False)
    shift = rng.integers(1, num_classes, size=f)  # never 0: a flip always lands on another identity
    noisy[flipped] = (labels[flipped] + shift) % num_classes
    outliers = rng.choice(outlier_pool, size=k, replace=False).astype(np.int64)
    outlier_labels = rng.integers(0, num_classes, size=k)
    return InjectedNoise(labels=np.concatenate([noisy, outlier_labels]),
                         true_labels=np.concatenate([labels, np.full(k, -1, dtype=np.int64)]),
                         outliers=outliers)
