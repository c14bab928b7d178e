"""Baselines of label-noise detection: the centre-distance rule against brute force, cleanlab's kNN path on known flips."""

from __future__ import annotations

import builtins

import numpy as np
import pytest

from facesphere.cleaning.baselines import (centre_distance_flags, cleanlab_knn_flags, knn_graph,
                                           leave_one_out_centre_cosine)


def _clusters(classes: int, per_class: int, dim: int = 32, spread: float = 0.25, seed: int = 0):
    """Unit embeddings in well separated identity clusters, and their labels."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    labels = np.repeat(np.arange(classes), per_class)
    x = centres[labels] + spread * rng.normal(size=(len(labels), dim)) / np.sqrt(dim)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), labels


def test_centre_cosine_matches_brute_force():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(40, 8)).astype(np.float32)
    labels = rng.integers(0, 6, size=40)
    labels[0], labels[1] = 7, 8  # two identities of one image: no centre
    got = leave_one_out_centre_cosine(x, labels)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    for i in range(len(x)):
        others = [j for j in range(len(x)) if j != i and labels[j] == labels[i]]
        if not others:
            assert np.isnan(got[i])
            continue
        centre = unit[others].mean(axis=0)
        expected = unit[i] @ centre / np.linalg.norm(centre)
        assert got[i] == pytest.approx(expected, abs=1e-5)
    cut = float(np.nanmedian(got))
    flagged, cosine = centre_distance_flags(x, labels, cut)
    np.testing.assert_array_equal(flagged, np.nan_to_num(cosine, nan=9) < cut)
    assert not flagged[:2].any() and flagged.sum() > 0


def test_centre_rule_finds_flips_and_refuses_bad_input():
    x, labels = _clusters(8, 20)
    noisy = labels.copy()
    flips = np.arange(0, 160, 16)
    noisy[flips] = (labels[flips] + 1) % 8
    flagged, _ = centre_distance_flags(x, noisy, cut=0.5)
    assert set(np.flatnonzero(flagged)) == set(flips)
    with pytest.raises(ValueError, match="cut"):
        centre_distance_flags(x, noisy, cut=1.5)
    with pytest.raises(ValueError, match="labels"):
        centre_distance_flags(x, noisy[:-1], cut=0.5)
    with pytest.raises(ValueError, match="nan"):
        centre_distance_flags(np.full((3, 4), np.nan), [0, 0, 1], cut=0.5)


def test_knn_graph_is_the_exact_neighbours_without_self():
    x, _ = _clusters(5, 12, seed=1)
    x = np.concatenate([x, x[:1]])  # an exact duplicate: its twin, not itself, must be its nearest
    k = 4
    graph = knn_graph(x, k)
    assert graph.shape == (len(x), len(x)) and graph.nnz == len(x) * k
    cos = x @ x.T
    np.fill_diagonal(cos, -np.inf)
    for i in range(len(x)):
        row = graph.indices[graph.indptr[i]:graph.indptr[i + 1]]
        dist = graph.data[graph.indptr[i]:graph.indptr[i + 1]]
        assert i not in row
        assert np.all(np.diff(dist) >= -1e-6)
        np.testing.assert_allclose(np.sort(1 - cos[i, row]), np.sort(1 - np.sort(cos[i])[::-1][:k]), atol=1e-5)
    assert graph.indices[graph.indptr[0]] == len(x) - 1
    with pytest.raises(ValueError, match="k must be"):
        knn_graph(x, len(x))


def test_cleanlab_knn_finds_known_flips():
    pytest.importorskip("cleanlab")
    x, labels = _clusters(10, 30, seed=2)
    noisy = labels.copy()
    rng = np.random.default_rng(5)
    flips = rng.choice(len(labels), size=15, replace=False)
    noisy[flips] = (labels[flips] + rng.integers(1, 10, size=15)) % 10
    result = cleanlab_knn_flags(x, noisy, k=10)
    assert set(np.flatnonzero(result.flagged)) == set(flips)
    np.testing.assert_array_equal(result.suggested[flips], labels[flips])
    assert result.quality[flips].max() < np.delete(result.quality, flips).min()
    # labels need not be contiguous: a missing class id changes nothing but the names
    sparse = cleanlab_knn_flags(x, noisy * 3, k=10)
    np.testing.assert_array_equal(sparse.flagged, result.flagged)
    np.testing.assert_array_equal(sparse.suggested, result.suggested * 3)


def test_cleanlab_refuses_dense_sizes_over_the_budget():
    x, labels = _clusters(4, 5)
    with pytest.raises(MemoryError, match="dense 20 x 4"):
        cleanlab_knn_flags(x, labels, k=3, max_dense_bytes=100)


def test_missing_cleanlab_names_the_extra(monkeypatch):
    real_import = builtins.__import__

    def no_cleanlab(name, *args, **kwargs):
        if name == "cleanlab" or name.startswith("cleanlab."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_cleanlab)
    x, labels = _clusters(3, 5)
    with pytest.raises(ImportError, match=r"pip install facesphere\[noise\]") as caught:
        cleanlab_knn_flags(x, labels, k=3)
    assert "\n" not in str(caught.value)
