"""1:N identification: closed-set CMC (rank-k) and open-set TPIR at FPIR, on cosine similarity.

Each probe is searched in the gallery, optionally enlarged by unlabelled distractors (MegaFace
Challenge 1 style: every probe is searched in gallery ∪ distractors, distractors never match). The
rank of a mated search is 1 + the number of non-mated entries scoring at least as high as the best
mated entry (ties count against the probe). Open-set (NIST FRVT 1:N terms): probes whose identity
is in the gallery are mated searches, the rest non-mated; at threshold T, FPIR = fraction of non-mated
searches whose top score exceeds T, TPIR = fraction of mated searches whose mated entry is within
``rank`` and scores above T. For an FPIR target the threshold is the (a+1)-th highest non-mated top
score with a = floor(target · #non-mated), so the achieved FPIR never exceeds the target; a target
below 1/#non-mated cannot be measured and gives None.

Scores are computed in float32 blocks of at most ``block_elements`` probe × gallery entries, so a
million-entry distractor set never needs the full score matrix in memory.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["CMCResult", "SearchResult", "cmc", "leave_one_out_cmc", "open_set_identification", "search"]

DEFAULT_BLOCK_ELEMENTS = 1 << 22  # 4M float32 scores = 16 MB per block


def _unit(x, name: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"{name} must be (N, D), got shape {x.shape}")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


@dataclass(frozen=True)
class SearchResult:
    """Per-probe outcome of ``search``.

    ``best_mated``: highest score of a same-identity gallery entry (-inf when there is none);
    ``rank``: 1-based rank of that entry (0 when there is none); ``top_nonmated``: highest score of
    any other entry, distractors included (-inf when there is none).
    """

    best_mated: np.ndarray
    rank: np.ndarray
    top_nonmated: np.ndarray

    @property
    def mated(self) -> np.ndarray:
        return self.rank > 0


def _blocks(n: int, size: int):
    for start in range(0, n, size):
        yield start, min(n, start + size)


def search(
    probes,
    probe_labels,
    gallery,
    gallery_labels,
    distractors=None,
    exclude=None,
    block_elements: int = DEFAULT_BLOCK_ELEMENTS,
) -> SearchResult:
    """Search every probe in gallery ∪ distractors (cosine); see ``SearchResult``.

    ``exclude`` (optional, one gallery index per probe, -1 for none) removes that entry from the
    probe's search: leave-one-out with the probes being the gallery itself.
    """
    p = _unit(probes, "probes")
    g = _unit(gallery, "gallery")
    d = _unit(distractors, "distractors") if distractors is not None else np.zeros((0, p.shape[1]), np.float32)
    if not (p.shape[1] == g.shape[1] == d.shape[1]):
        raise ValueError(f"embedding dimensions differ: probes {p.shape[1]}, gallery {g.shape[1]}, distractors {d.shape[1]}")
    pl = np.asarray(probe_labels)
    gl = np.asarray(gallery_labels)
    if pl.shape != (p.shape[0],) or gl.shape != (g.shape[0],):
        raise ValueError("labels must be 1-D with one label per probe / gallery entry")
    _, codes = np.unique(np.concatenate([pl, gl]), return_inverse=True)
    pc, gc = codes[: pl.size], codes[pl.size :]
    ex = np.full(p.shape[0], -1, np.int64) if exclude is None else np.asarray(exclude, dtype=np.int64)
    if ex.shape != (p.shape[0],) or ex.max(initial=-1) >= g.shape[0]:
        raise ValueError("exclude must hold one gallery index (or -1) per probe")
    n_cols = max(g.shape[0], d.shape[0], 1)
    rows = max(1, min(p.shape[0], block_elements // n_cols)) if n_cols <= block_elements else 1
    cols = max(1, block_elements // rows)

    best = np.full(p.shape[0], -np.inf, np.float32)
    top = np.full(p.shape[0], -np.inf, np.float32)
    above = np.zeros(p.shape[0], np.int64)
    for r0, r1 in _blocks(p.shape[0], rows):
        pb, pcb, exb = p[r0:r1], pc[r0:r1], ex[r0:r1]
        local = np.arange(r1 - r0)
        # pass 1 over the gallery: best mated and top non-mated scores
        for c0, c1 in _blocks(g.shape[0], cols):
            s = pb @ g[c0:c1].T
            mated = pcb[:, None] == gc[None, c0:c1]
            hit = (exb >= c0) & (exb < c1)
            s[local[hit], exb[hit] - c0] = -np.inf
            mated[local[hit], exb[hit] - c0] = False
            best[r0:r1] = np.maximum(best[r0:r1], np.where(mated, s, -np.inf).max(axis=1, initial=-np.inf))
            top[r0:r1] = np.maximum(top[r0:r1], np.where(mated, -np.inf, s).max(axis=1, initial=-np.inf))
        # pass 2: non-mated entries scoring >= the best mated one (gallery recomputed, then distractors)
        bb = best[r0:r1, None]
        for c0, c1 in _blocks(g.shape[0], cols):
            s = pb @ g[c0:c1].T
            nonmated = pcb[:, None] != gc[None, c0:c1]
            hit = (exb >= c0) & (exb < c1)
            nonmated[local[hit], exb[hit] - c0] = False
            above[r0:r1] += np.count_nonzero(nonmated & (s >= bb), axis=1)
        for c0, c1 in _blocks(d.shape[0], cols):
            s = pb @ d[c0:c1].T
            above[r0:r1] += np.count_nonzero(s >= bb, axis=1)
            top[r0:r1] = np.maximum(top[r0:r1], s.max(axis=1))
    has_mate = np.isfinite(best)
    rank = np.where(has_mate, above + 1, 0)
    return SearchResult(best.astype(np.float64), rank, top.astype(np.float64))


@dataclass(frozen=True)
class CMCResult:
    """Closed-set identification: 1-based rank of the first correct match of every (mated) probe."""

    ranks: np.ndarray
    num_gallery: int
    num_distractors: int
    num_skipped: int = 0

    def accuracy(self, k: int) -> float:
        """Rank-k identification rate: fraction of probes whose first correct match is within the top k."""
        return float(np.mean(self.ranks <= k))

    def curve(self, max_rank: int = 20) -> np.ndarray:
        """CMC values for ranks 1..max_rank."""
        return np.array([self.accuracy(k) for k in range(1, max_rank + 1)])

    def to_dict(self, ranks: Sequence[int] = (1, 5, 10)) -> dict:
        """JSON-ready summary: ``rank_<k>`` for each k, probe/gallery/distractor counts, the CMC to rank 20."""
        out = {f"rank_{k}": self.accuracy(k) for k in ranks}
        out.update(num_probes=int(self.ranks.size), num_gallery=self.num_gallery,
                   num_distractors=self.num_distractors, num_skipped_probes=self.num_skipped,
                   cmc=[float(v) for v in self.curve(20)])
        return out


def _cmc_from(res: SearchResult, n_gallery: int, n_distractors: int, skip_unmated: bool) -> CMCResult:
    missing = int(np.count_nonzero(~res.mated))
    if missing and not skip_unmated:
        raise ValueError(f"{missing} probe(s) have no same-identity gallery entry; closed-set CMC needs one "
                         "(use skip_unmated=True, or open_set_identification)")
    if missing:
        logger.info("CMC: skipping %d probe(s) without a gallery mate", missing)
    ranks = res.rank[res.mated]
    if ranks.size == 0:
        raise ValueError("no probe has a gallery mate")
    return CMCResult(ranks, n_gallery, n_distractors, missing)


def cmc(probes, probe_labels, gallery, gallery_labels, distractors=None, skip_unmated: bool = False,
        block_elements: int = DEFAULT_BLOCK_ELEMENTS) -> CMCResult:
    """Closed-set CMC of probes against gallery (∪ distractors); every probe needs a gallery mate."""
    res = search(probes, probe_labels, gallery, gallery_labels, distractors, block_elements=block_elements)
    n_d = 0 if distractors is None else int(np.asarray(distractors).shape[0])
    return _cmc_from(res, int(np.asarray(gallery).shape[0]), n_d, skip_unmated)


def leave_one_out_cmc(embeddings, labels, distractors=None, block_elements: int = DEFAULT_BLOCK_ELEMENTS) -> CMCResult:
    """Each image in turn is the probe and all *other* images the gallery (∪ distractors).

    Images whose identity has no other image cannot be identified and are skipped (``num_skipped``).
    """
    emb = np.asarray(embeddings)
    res = search(emb, labels, emb, labels, distractors, exclude=np.arange(emb.shape[0]), block_elements=block_elements)
    n_d = 0 if distractors is None else int(np.asarray(distractors).shape[0])
    return _cmc_from(res, emb.shape[0] - 1, n_d, skip_unmated=True)


def _fpir_key(t: float) -> str:
    return format(t, "g")


def open_set_identification(
    probes,
    probe_labels,
    gallery,
    gallery_labels,
    distractors=None,
    fpir_targets: Sequence[float] = (1e-1, 1e-2, 1e-3),
    rank: int = 1,
    block_elements: int = DEFAULT_BLOCK_ELEMENTS,
) -> dict:
    """Open-set TPIR at FPIR targets (module doc); probes absent from the gallery are non-mated searches.

    Returns num_mated, num_nonmated, rank, ``tpir_at_fpir`` and ``threshold_at_fpir`` (keys like
    "0.01"; None when unmeasurable), and ``achieved_fpir``.
    """
    res = search(probes, probe_labels, gallery, gallery_labels, distractors, block_elements=block_elements)
    mated = res.mated
    n_m, n_nm = int(mated.sum()), int((~mated).sum())
    if n_m == 0 or n_nm == 0:
        raise ValueError(f"open-set evaluation needs mated and non-mated searches, got {n_m} and {n_nm}")
    nm_top = np.sort(res.top_nonmated[~mated])[::-1]
    tpir, thr, achieved = {}, {}, {}
    for target in fpir_targets:
        if not 0.0 <= target <= 1.0:
            raise ValueError(f"FPIR targets must lie in [0, 1], got {target}")
        allowed = int(math.floor(target * n_nm * (1.0 + 1e-9)))
        key = _fpir_key(float(target))
        if allowed < 1:
            tpir[key] = thr[key] = achieved[key] = None
            continue
        t = float(nm_top[allowed]) if allowed < n_nm else -math.inf
        hit = mated & (res.rank <= rank) & (res.best_mated > t)
        tpir[key] = float(hit.sum() / n_m)
        thr[key] = t if math.isfinite(t) else None
        achieved[key] = float(np.mean(nm_top > t))
    return {"num_mated": n_m, "num_nonmated": n_nm, "rank": int(rank), "tpir_at_fpir": tpir,
            "threshold_at_fpir": thr, "achieved_fpir": achieved}
