"""Controlled noise injection: exact rates, flips onto another identity, outliers without replacement, determinism."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from facesphere.cleaning.noise import Status, inject_noise


@given(n=st.integers(1, 400), classes=st.integers(2, 30), flip=st.floats(0, 0.6), outlier=st.floats(0, 0.35),
       seed=st.integers(0, 2**32 - 1))
def test_rates_kinds_and_pool(n, classes, flip, outlier, seed):
    labels = np.random.default_rng(seed).integers(0, classes, size=n)
    k = int(round(outlier * n / (1 - outlier)))
    f = int(round(flip * (n + k)))
    if f > n:
        with pytest.raises(ValueError, match="flips wanted"):
            inject_noise(labels, classes, flip, outlier, outlier_pool=k, seed=seed)
        return
    pool = k + 7
    noise = inject_noise(labels, classes, flip, outlier, outlier_pool=pool, seed=seed)
    total = n + k
    assert noise.labels.shape == noise.true_labels.shape == (total,)
    kind = noise.kind
    # counts are exactly the rounded rates of the noisy set
    assert (kind == Status.OUTLIER).sum() == k == len(noise.outliers)
    assert (kind == Status.FLIP).sum() == f
    assert abs(k / total - outlier) <= 0.5 / total + 1e-12
    assert abs(f / total - flip) <= 0.5 / total + 1e-12
    # the first n are the clean samples, in order, with their true labels; outliers appended with truth -1
    np.testing.assert_array_equal(noise.true_labels[:n], labels)
    assert (noise.true_labels[n:] == -1).all()
    # a flip always lands on another identity of the set; every label stays a valid identity
    flipped = kind == Status.FLIP
    assert (noise.labels[flipped] != noise.true_labels[flipped]).all()
    assert noise.labels.min() >= 0 and noise.labels.max() < classes
    assert (noise.labels[:n][~flipped[:n]] == labels[~flipped[:n]]).all()
    # outliers: pool indices, distinct (drawn without replacement)
    assert len(set(noise.outliers.tolist())) == k
    assert ((noise.outliers >= 0) & (noise.outliers < pool)).all()


def test_flip_targets_spread_over_every_other_identity():
    labels = np.zeros(3000, dtype=np.int64)
    noise = inject_noise(labels, 4, 0.5, 0.0, outlier_pool=0, seed=1)
    targets = noise.labels[noise.kind == Status.FLIP]
    counts = np.bincount(targets, minlength=4)
    assert counts[0] == 0 and counts[1:].min() > 400  # uniform over 1..3 (~500 each)


def test_outliers_can_take_the_whole_pool():
    noise = inject_noise(np.arange(10) % 2, 2, 0.0, 0.5, outlier_pool=10, seed=0)
    assert sorted(noise.outliers.tolist()) == list(range(10))


def test_deterministic_in_seed():
    labels = np.arange(500) % 17
    a = inject_noise(labels, 17, 0.2, 0.1, outlier_pool=200, seed=11)
    b = inject_noise(labels, 17, 0.2, 0.1, outlier_pool=200, seed=11)
    c = inject_noise(labels, 17, 0.2, 0.1, outlier_pool=200, seed=12)
    for field in ("labels", "true_labels", "outliers"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert not np.array_equal(a.labels, c.labels)


@pytest.mark.parametrize("labels, classes, flip, outlier, pool, message", [
    ([], 3, 0.1, 0.1, 10, "non-empty"),
    ([[0, 1]], 3, 0.1, 0.1, 10, "1-D"),
    ([0, 1, 3], 3, 0.1, 0.1, 10, r"\[0, 3\)"),
    ([0, -1], 3, 0.1, 0.1, 10, r"\[0, 3\)"),
    ([0, 0], 1, 0.1, 0.1, 10, "num_classes >= 2"),
    ([0, 1], 2, -0.1, 0.1, 10, "rates"),
    ([0, 1], 2, 0.6, 0.5, 10, "sum below 1"),
    ([0, 1], 2, 0.1, 1.0, 10, "rates"),
    ([0, 1] * 10, 2, 0.0, 0.5, 5, "outlier pool holds 5"),
])
def test_refusals(labels, classes, flip, outlier, pool, message):
    with pytest.raises(ValueError, match=message):
        inject_noise(labels, classes, flip, outlier, outlier_pool=pool)
