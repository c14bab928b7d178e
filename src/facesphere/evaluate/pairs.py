"""Reproducible genuine / impostor pair sampling from a labelled set, for verification on any dataset.

Pairs are unordered and returned as ``(i, j)`` with ``i < j`` (dataset indices); no pair occurs twice.
Identities are balanced so that a few large identities do not dominate the protocol:

* genuine pairs are spread as evenly as possible over identities (water-filling: every identity gets the
  same share, capped by its C(n_c, 2) available pairs; leftover pairs go to randomly chosen identities);
* impostor pairs cycle through identities as anchors (a fresh permutation per round), each paired with a
  uniformly chosen other identity and uniform samples. When the request is a large fraction of all
  impostor pairs, sampling is instead uniform over the enumerated remaining pairs, which cannot stall.
"""

from __future__ import annotations

import logging

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["sample_pairs"]


def sample_pairs(labels, n_positive: int, n_negative: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw ``n_positive`` genuine and ``n_negative`` impostor pairs, shuffled together deterministically.

    Args:
        labels: (N,) identity label of every sample (any sortable values).
        n_positive: number of genuine pairs (two different samples of one identity).
        n_negative: number of impostor pairs (samples of two different identities).
        seed: seed of the ``numpy.random.Generator``; same inputs and seed give the same pairs.

    Returns:
        ``(i, j, same)``: int64 index arrays with ``i < j`` and a bool array, True for genuine pairs.

    Raises:
        ValueError: if fewer distinct genuine or impostor pairs exist than requested.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    for name, v in (("n_positive", n_positive), ("n_negative", n_negative)):
        if not isinstance(v, (int, np.integer)) or v < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {v!r}")
    _, inv = np.unique(labels, return_inverse=True)
    inv = inv.reshape(-1)
    counts = np.bincount(inv) if inv.size else np.zeros(0, dtype=np.int64)
    order = np.argsort(inv, kind="stable")  # samples grouped by identity (CSR layout)
    starts = np.concatenate(([0], np.cumsum(counts)))
    rng = np.random.default_rng(seed)

    gi, gj = _genuine(counts, order, starts, int(n_positive), rng)
    ii, ij = _impostor(inv, counts, order, starts, int(n_negative), rng)
    i = np.concatenate((gi, ii)).astype(np.int64)
    j = np.concatenate((gj, ij)).astype(np.int64)
    same = np.concatenate((np.ones(gi.size, bool), np.zeros(ii.size, bool)))
    perm = rng.permutation(i.size)
    logger.debug("sampled %d genuine and %d impostor pairs from %d samples", gi.size, ii.size, inv.size)
    return i[perm], j[perm], same[perm]


def _row_start(a: np.ndarray, n: int) -> np.ndarray:
    """Index of the first pair (a, a+1) in the row-major enumeration of pairs a < b < n."""
    return a * (2 * n - a - 1) // 2


def _unrank_pairs(k: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Map pair ranks k in [0, C(n, 2)) to (a, b), a < b, in row-major order (float guess, integer fix)."""
    k = k.astype(np.int64)
    disc = float(2 * n - 1) ** 2 - 8.0 * k
    a = np.floor(((2 * n - 1) - np.sqrt(np.maximum(disc, 0.0))) / 2.0).astype(np.int64)
    a = np.clip(a, 0, n - 2)
    for _ in range(2):  # correct a possible off-by-one of the float estimate
        a = np.where(_row_start(a, n) > k, a - 1, a)
        a = np.where((a + 1 <= n - 2) & (_row_start(a + 1, n) <= k), a + 1, a)
    b = a + 1 + (k - _row_start(a, n))
    return a, b


def _genuine(counts, order, starts, n_pos: int, rng) -> tuple[np.ndarray, np.ndarray]:
    capacity = counts * (counts - 1) // 2
    total = int(capacity.sum())
    if n_pos > total:
        raise ValueError(
            f"too few samples: requested {n_pos} genuine pairs but only {total} exist "
            f"({int(np.count_nonzero(counts >= 2))} identities with >= 2 samples)"
        )
    alloc = np.zeros_like(capacity)
    remaining = n_pos
    active = np.flatnonzero(capacity > 0)
    while remaining > 0:  # water-filling; each round saturates an identity or finishes
        share = remaining // active.size
        if share == 0:
            alloc[rng.choice(active, size=remaining, replace=False)] += 1
            break
        give = np.minimum(share, capacity[active] - alloc[active])
        alloc[active] += give
        remaining -= int(give.sum())
        active = active[alloc[active] < capacity[active]]
    out_i, out_j = [], []
    for c in np.flatnonzero(alloc):
        ranks = rng.choice(int(capacity[c]), size=int(alloc[c]), replace=False)
        a, b = _unrank_pairs(ranks, int(counts[c]))
        members = order[starts[c] : starts[c + 1]]
        x, y = members[a], members[b]
        out_i.append(np.minimum(x, y))
        out_j.append(np.maximum(x, y))
    if not out_i:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(out_i), np.concatenate(out_j)


def _impostor(inv, counts, order, starts, n_neg: int, rng) -> tuple[np.ndarray, np.ndarray]:
    n = inv.size
    capacity = (n * n - int(np.sum(counts.astype(np.int64) ** 2))) // 2
    if n_neg > capacity:
        raise ValueError(
            f"too few samples: requested {n_neg} impostor pairs but only {capacity} exist "
            f"({counts.size} identities, {n} samples)"
        )
    if n_neg == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    if capacity <= 4 * n_neg:
        codes = _enumerated_impostors(counts, order, starts, n, n_neg, np.zeros(0, np.int64), rng)
        return codes // n, codes % n

    m = counts.size
    chosen = np.zeros(0, np.int64)  # pair codes i * n + j (i < j), in draw order
    drawn = 0
    anchors = np.zeros(0, np.int64)
    while chosen.size < n_neg:
        need = n_neg - chosen.size
        batch = max(64, int(need * 1.25))
        while anchors.size < batch:  # balanced anchors: whole permutations of the identities
            anchors = np.concatenate((anchors, rng.permutation(m)))
        anchor, anchors = anchors[:batch], anchors[batch:]
        other = rng.integers(0, m - 1, size=batch)
        other += other >= anchor
        a = order[starts[anchor] + (rng.random(batch) * counts[anchor]).astype(np.int64)]
        b = order[starts[other] + (rng.random(batch) * counts[other]).astype(np.int64)]
        codes = np.minimum(a, b) * n + np.maximum(a, b)
        _, first = np.unique(codes, return_index=True)
        codes = codes[np.sort(first)]  # drop in-batch repeats, keep draw order
        codes = codes[~np.isin(codes, chosen)][:need]
        chosen = np.concatenate((chosen, codes))
        drawn += batch
        if chosen.size < n_neg and drawn > 50 * n_neg + 10_000:
            logger.debug("impostor rejection sampling stalled; enumerating the remaining pairs")
            extra = _enumerated_impostors(counts, order, starts, n, n_neg - chosen.size, chosen, rng)
            chosen = np.concatenate((chosen, extra))
    return chosen // n, chosen % n


def _enumerated_impostors(counts, order, starts, n, k, exclude, rng) -> np.ndarray:
    """k codes drawn uniformly without replacement from all impostor pairs not in ``exclude``.

    In identity-grouped order, sample p pairs with every q >= end of p's group: this lists each
    impostor pair exactly once, vectorised, in memory proportional to the number of impostor pairs.
    """
    group_end = np.repeat(starts[1:], counts)  # for grouped position p: end of its identity's block
    per_p = n - group_end
    p = np.repeat(np.arange(n), per_p)
    offsets = np.repeat(np.cumsum(per_p) - per_p, per_p)
    q = group_end[p] + (np.arange(p.size) - offsets)
    a, b = order[p], order[q]
    codes = np.minimum(a, b) * n + np.maximum(a, b)
    if exclude.size:
        codes = codes[~np.isin(codes, exclude)]
    return codes[rng.choice(codes.size, size=k, replace=False)]
