"""Baselines to measure facesphere's label-noise detector against, on the same embeddings.

* :func:`centre_distance_flags`: the plain rule, flag an image whose cosine to its own identity's leave-one-out
  mean centre is below a cut (give it the calibrated verification threshold so it is comparable).
* :func:`cleanlab_knn_flags`: cleanlab's confident learning (Northcutt et al., arXiv 1911.00068) on out-of-sample
  predicted probabilities from a k-nearest-neighbour vote, the same construction cleanlab's own label-issue
  manager uses when given features, but over a kNN graph built with faiss (:func:`knn_graph`) instead of
  scikit-learn's dense neighbour search. cleanlab is optional (``pip install facesphere[noise]``).

cleanlab still takes a dense samples x classes probability matrix and builds a classes x classes confident joint,
so this path costs O(N·C + C²) memory however the graph is built; :func:`cleanlab_knn_flags` refuses sizes over
``max_dense_bytes`` rather than exhaust memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from facesphere.cleaning.embedstore import normalised

__all__ = ["CleanlabFlags", "centre_distance_flags", "cleanlab_knn_flags", "knn_graph", "leave_one_out_centre_cosine"]


def _unit_rows(embeddings) -> np.ndarray:
    x = np.asarray(embeddings, dtype=np.float32)
    if x.ndim != 2 or not len(x):
        raise ValueError(f"embeddings must be a non-empty (N, D) array, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("embeddings hold nan or inf")
    return normalised(x)


def _labels_for(labels, n: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer) or (n and labels.min() < 0):
        raise ValueError(f"labels must be ({n},) non-negative integers, got shape {labels.shape} {labels.dtype}")
    return labels.astype(np.int64)


def leave_one_out_centre_cosine(embeddings, labels) -> np.ndarray:
    """(N,) cosine of each unit embedding to the mean of the *other* images of its identity; nan when it has none.

    With S_c the sum of identity c's n_c unit embeddings, image i's centre is (S_c − x_i)/(n_c − 1); only its
    direction matters for the cosine, so cos_i = x_i·(S_c − x_i) / ‖S_c − x_i‖.
    """
    x = _unit_rows(embeddings).astype(np.float64)
    labels = _labels_for(labels, len(x))
    sums = np.zeros((labels.max() + 1, x.shape[1]))
    np.add.at(sums, labels, x)
    others = sums[labels] - x
    norms = np.linalg.norm(others, axis=1)
    sizes = np.bincount(labels)[labels]
    with np.errstate(invalid="ignore", divide="ignore"):
        cosine = np.einsum("nd,nd->n", x, others) / norms
    cosine[(sizes < 2) | (norms <= 1e-12)] = np.nan
    return cosine.astype(np.float32)


def centre_distance_flags(embeddings, labels, cut: float) -> tuple[np.ndarray, np.ndarray]:
    """(flagged (N,) bool, cosine (N,)): flagged where the leave-one-out centre cosine is below ``cut``.

    An image alone in its identity has no centre to compare with and is not flagged (its cosine is nan).
    """
    if not np.isfinite(cut) or not -1.0 <= cut <= 1.0:
        raise ValueError(f"cut must be a cosine in [-1, 1], got {cut}")
    cosine = leave_one_out_centre_cosine(embeddings, labels)
    return np.nan_to_num(cosine, nan=np.inf) < cut, cosine


def knn_graph(embeddings, k: int, kind: str = "auto"):
    """cleanlab's kNN-graph format from a faiss search: (N, N) scipy CSR, each row its k nearest *other* rows by
    cosine distance 1 − cos, ascending. ``kind`` is a gallery index kind (exact "flat" below 100k rows by default)."""
    from scipy.sparse import csr_matrix

    from facesphere.gallery.index import build_faiss_index

    x = _unit_rows(embeddings)
    n = len(x)
    if not 1 <= k < n:
        raise ValueError(f"k must be in [1, {n - 1}] for {n} embeddings, got {k}")
    scores, ids = build_faiss_index(x, kind=kind).search(x, k + 1)
    # drop each row's own entry; where duplicates hid it from the k + 1 found, drop the farthest instead
    own = ids == np.arange(n)[:, None]
    own[~own.any(axis=1), k] = True
    keep = ~own & (ids >= 0)
    if (keep.sum(axis=1) != k).any():
        raise ValueError(f"the index returned fewer than {k} neighbours for some rows")
    ids = ids[keep].reshape(n, k)
    distances = np.clip(1.0 - scores[keep].reshape(n, k), 0.0, 2.0)
    return csr_matrix((distances.ravel(), ids.ravel(), np.arange(0, n * k + 1, k)), shape=(n, n))


@dataclass(frozen=True)
class CleanlabFlags:
    """cleanlab's verdicts: ``flagged`` (N,) label issues, ``quality`` (N,) label quality in [0, 1] (low = suspect),
    ``suggested`` (N,) the identity the neighbours vote for most (the likely true label of a flip)."""

    flagged: np.ndarray
    quality: np.ndarray
    suggested: np.ndarray


def _import_cleanlab():
    try:
        import cleanlab.filter
        import cleanlab.rank
    except ImportError:
        raise ImportError("cleanlab is not installed; pip install facesphere[noise]") from None
    return cleanlab


def cleanlab_knn_flags(embeddings, labels, k: int = 10, graph=None, max_dense_bytes: int = 2 << 30) -> CleanlabFlags:
    """cleanlab label issues from a kNN vote: pred_probs[i, c] = share of i's k nearest other images labelled c.

    ``graph`` is a precomputed :func:`knn_graph` (built here with ``k`` when None). The vote leaves image i out,
    so the probabilities are out-of-sample, as confident learning requires (arXiv 1911.00068, §2).
    """
    x = _unit_rows(embeddings)
    present, labels = np.unique(_labels_for(labels, len(x)), return_inverse=True)  # cleanlab wants no empty class
    classes = len(present)
    if classes < 2:
        raise ValueError("cleanlab needs at least two identities")
    need = 8 * (len(x) * classes + 2 * classes * classes)  # float64 probabilities, confident joint and its copy
    if need > max_dense_bytes:
        raise MemoryError(f"cleanlab needs dense {len(x)} x {classes} probabilities and a {classes} x {classes} "
                          f"joint (~{need / 2**30:.1f} GiB > max_dense_bytes); profile a subset of identities")
    cleanlab = _import_cleanlab()
    graph = knn_graph(x, k) if graph is None else graph.tocsr()
    if graph.shape != (len(x), len(x)):
        raise ValueError(f"knn graph shape {graph.shape} does not match {len(x)} embeddings")
    rows = np.repeat(np.arange(len(x)), np.diff(graph.indptr))
    counts = np.diff(graph.indptr)[rows].astype(np.float64)
    pred_probs = np.zeros((len(x), classes), dtype=np.float64)
    np.add.at(pred_probs, (rows, labels[graph.indices]), 1.0 / counts)
    flagged = cleanlab.filter.find_label_issues(labels, pred_probs, n_jobs=1)
    quality = cleanlab.rank.get_label_quality_scores(labels, pred_probs)
    return CleanlabFlags(flagged=np.asarray(flagged, dtype=bool), quality=np.asarray(quality, dtype=np.float32),
                         suggested=present[pred_probs.argmax(axis=1)].astype(np.int64))
