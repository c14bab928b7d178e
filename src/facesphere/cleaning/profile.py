"""Noise profile of a labelled set (IMDb-Face, arXiv 1807.11649): identity centres, and each image's status.

:func:`profile_embeddings` works on any embeddings (an (N, D) array or an on-disk
:class:`~facesphere.cleaning.embedstore.EmbeddingStore`) in streaming passes, one chunk in memory at a time:

1. **Duplicates** first (the same photo filed twice, within or across identities): byte-identical files by
   content digest, then near copies: the nearest earlier image at cosine >= ``duplicate_cosine`` (faiss: exact
   inner products up to ``exact_search_limit`` images; beyond, an IVF index over a 64-d random projection, its
   candidates re-scored exactly). The later copy becomes DUPLICATE with ``duplicate_of`` = the earliest copy,
   and is left out of the identity statistics so no photo counts twice.
2. **Identity centres**: the sum of each identity's unit embeddings, then a spherical k-means (``max_centres``
   + 1 clusters, farthest-point start, a few Lloyd passes; see :func:`_identity_centres`) inside every identity
   large enough to hold two modes. Up to ``max_centres`` clusters are kept as modes, only when each holds at
   least ``MIN_MODE_SHARE`` of the identity and ``MIN_MODE_IMAGES`` images, and the mode centres are distinct
   at the verification threshold (their cosine is below T). Why: a person photographed in two sessions
   (young/old, glasses, lighting) can form two modes far apart, and one centre would sit between them, closer
   to the larger, so the smaller session would look like noise; a handful of mislabelled photos is never a
   quarter of an identity, so it is never promoted to a mode and stays flagged. Modes closer than T are one
   mode (a random halving of a one-mode identity gives halves far above T), so an ordinary identity keeps its
   single centre. A block of another person's photos as large as a quarter of the identity does become a
   mode; its images are still flagged when that person's own identity is nearer.
3. **Scores** per image: ``own_cosine`` to the nearest centre of its own identity with the image itself removed
   from its centre's sum (leave-one-out: with e and S unit image and centre sum, (e·S − 1) / √(|S|² − 2 e·S + 1);
   without it a 3-image identity looks far cleaner than it is), and ``other_cosine`` / ``other_label``: the
   nearest centre of any other identity, found with faiss over all centres (exact up to ``exact_search_limit``
   centres, IVF beyond), asking for ``max_centres`` + 2 neighbours so the own identity's centres can be skipped.
4. **Classification** with the model's calibrated verification threshold T (``facesphere calibrate`` at a FAR):
   FLIP when other_cosine >= the flip cut and other_cosine > own_cosine (``other_label`` is the suggestion);
   OUTLIER when own_cosine < T and the image is no flip (close to no identity of the set); CLEAN otherwise. The
   flip cut (:func:`flip_cut`) is T raised to hold the clean images' nearest-other cosines at the same FAR.

   T is an image-to-image threshold applied to image-to-centre cosines. Measured with MobileFaceNet y1 on 720
   LFW images of 120 people (``benchmarks/noise_profile_thresholds.py``, T at FAR 1e-3 over all their pairs):
   99.7 % of genuine images reach T against their identity's leave-one-out centre, against 98.3 % against one
   other photo of the person, so T calls fewer clean images outliers than it rejects genuine pairs; an impostor
   reaches T against another identity's centre at 1.6e-3 per centre, 1.6x the pair FAR (a unit centre is a mean
   divided by its norm, below 1, which lifts impostor cosines too). Flips need other_cosine > own_cosine as
   well, so a clean image is not called a flip by that margin; but an outlier meets every one of the C centres,
   so about C x 1.6 x FAR of the outliers pass T somewhere and are called flips instead (still flagged). The
   profile notes this when C x FAR > 1 %: calibrate at a smaller FAR for sets of many identities.

Set-level problems are reported in ``problems``, never raised: one identity (flips cannot be measured),
identities with one image (no leave-one-out centre: own_cosine nan; they are never called outliers, only
flips), unreadable images (UNREADABLE). A set with no readable image is a ValueError naming it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from facesphere.cleaning.embedstore import (
    HASH_DTYPE,
    ArrayEmbeddings,
    EmbeddingStore,
    as_embeddings,
    embed_to_store,
    normalised,
)
from facesphere.cleaning.sources import open_labelled_set, set_root
from facesphere.cleaning.noise import Status
from facesphere.models.store import file_sha256
from facesphere.utils.files import atomic_path, atomic_write_text, check_writable, read_text_checked

logger = logging.getLogger(__name__)

__all__ = ["DUPLICATE_COSINE", "MIN_MODE_IMAGES", "MIN_MODE_SHARE", "NoiseProfile", "profile_embeddings", "profile_set"]

DUPLICATE_COSINE = 0.96
"""Cosine at or above which two images count as the same photo: between the lowest cosine of a photo and a near
copy of it (0.976: JPEG re-encoded at quality 75 or 95, shifted by one pixel, or scaled to 100x100 and back) and
the highest of two distinct photos of one person (0.940), MobileFaceNet y1 on 720 LFW images
(``benchmarks/noise_profile_thresholds.py``). Byte-identical files are duplicates whatever their cosine."""

MIN_MODE_SHARE = 0.25
"""Smallest share of an identity a second mode must hold to be kept as a mode (not noise)."""

MIN_MODE_IMAGES = 3
"""Smallest number of images a mode must hold to be kept."""

PROFILE_FORMAT = "facesphere-noise-profile"
ARRAYS_FILE, META_FILE = "profile.npz", "profile.json"
_BATCH = 8192  # rows per vectorised step: bounds the (rows, centres, D) gathers to a few tens of MB
_IVF_NPROBE = 16  # inverted lists searched per query
_DUP_DIM = 64  # dimensions of the projection the approximate duplicate search runs on
_DUP_MARGIN = 0.15  # projected neighbours within this of the duplicate cut are re-scored exactly
_TRAIN_SAMPLE = 32768  # vectors an IVF index is trained on (a strided sample): bounds memory and training time

_PER_IMAGE = {"labels": np.int64, "status": np.uint8, "own_cosine": np.float32, "other_cosine": np.float32,
              "other_label": np.int64, "duplicate_of": np.int64}
_PER_IDENTITY = {"identity_size": np.int64, "identity_centres": np.int64, "identity_spread": np.float32}


@dataclass
class NoiseProfile:
    """What profiling found, image by image and identity by identity."""

    sources: list[str]
    labels: np.ndarray
    identity_names: list[str]
    status: np.ndarray
    own_cosine: np.ndarray
    other_cosine: np.ndarray
    other_label: np.ndarray
    duplicate_of: np.ndarray
    identity_size: np.ndarray
    identity_centres: np.ndarray
    identity_spread: np.ndarray
    threshold: float
    far: float
    model: str
    duplicate_cosine: float
    problems: list[dict] = field(default_factory=list)
    flip_cut: float | None = None  # the cosine a flip must reach to another identity (None: ``threshold``)
    ages: np.ndarray | None = None  # float64 age per image (NaN: unknown) when the set has ages; the lists keep them

    def __post_init__(self) -> None:
        for name, dtype in {**_PER_IMAGE, **_PER_IDENTITY}.items():
            setattr(self, name, np.asarray(getattr(self, name), dtype=dtype))
        self.sources = [str(s) for s in self.sources]
        self.identity_names = [str(s) for s in self.identity_names]
        n, c = len(self.sources), len(self.identity_names)
        bad = [f"{name} {getattr(self, name).shape}" for name in _PER_IMAGE if getattr(self, name).shape != (n,)]
        bad += [f"{name} {getattr(self, name).shape}" for name in _PER_IDENTITY if getattr(self, name).shape != (c,)]
        if self.ages is not None:
            self.ages = np.asarray(self.ages, dtype=np.float64)
            bad += [f"ages {self.ages.shape}"] if self.ages.shape != (n,) else []
        if bad:
            raise ValueError(f"a profile of {n} images and {c} identities cannot have {', '.join(bad)}")
        if n and (self.labels.min() < 0 or self.labels.max() >= c):
            raise ValueError(f"labels must lie in [0, {c})")
        if n and self.status.max() > max(Status):
            raise ValueError(f"status codes must be one of {[int(s) for s in Status]}")

    def __len__(self) -> int:
        return len(self.sources)

    def summary(self) -> dict[str, Any]:
        """Counts per status, and the estimated flip, outlier and duplicate rates (flagged / readable images)."""
        counts = {s.name.lower(): int((self.status == s).sum()) for s in Status}
        readable = len(self) - counts["unreadable"]
        rate = (lambda k: counts[k] / readable if readable else float("nan"))
        return {"images": len(self), "identities": len(self.identity_names), "readable": readable, **counts,
                "flip_rate": rate("flip"), "outlier_rate": rate("outlier"), "duplicate_rate": rate("duplicate"),
                "threshold": self.threshold, "far": self.far, "model": self.model,
                "duplicate_cosine": self.duplicate_cosine, "flip_cut": self.flip_cut, "problems": len(self.problems)}

    # ------------------------------------------------------------------ files

    def save(self, folder: str | os.PathLike) -> None:
        """``folder/profile.npz`` (arrays, no pickles) then ``profile.json`` (names, scalars, the npz's digest),
        each written atomically; the json is the commit: it names the exact npz it belongs to."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(folder / ARRAYS_FILE) as tmp, open(tmp, "wb") as handle:
            np.savez(handle, **{name: getattr(self, name) for name in (*_PER_IMAGE, *_PER_IDENTITY)},
                     **({"ages": self.ages} if self.ages is not None else {}))
        meta = {"format": PROFILE_FORMAT, "version": 1, "images": len(self), "identities": len(self.identity_names),
                "arrays_sha256": file_sha256(folder / ARRAYS_FILE), "threshold": self.threshold, "far": self.far,
                "model": self.model, "duplicate_cosine": self.duplicate_cosine, "flip_cut": self.flip_cut,
                "summary": self.summary(),
                "problems": self.problems, "identity_names": self.identity_names, "sources": self.sources}
        atomic_write_text(folder / META_FILE, json.dumps(meta, indent=1))

    @classmethod
    def load(cls, folder: str | os.PathLike) -> NoiseProfile:
        """A saved profile; a ValueError naming ``folder`` when a file is missing, damaged or does not match."""
        folder = Path(folder)
        try:
            meta = json.loads(read_text_checked(folder / META_FILE, limit=4 << 30))
            if not isinstance(meta, dict) or meta.get("format") != PROFILE_FORMAT:
                raise ValueError(f"{META_FILE} is not a noise profile")
            if file_sha256(folder / ARRAYS_FILE) != meta["arrays_sha256"]:
                raise ValueError(f"{ARRAYS_FILE} does not match {META_FILE} (changed or damaged)")
            with np.load(folder / ARRAYS_FILE, allow_pickle=False) as arrays:
                values = {name: arrays[name] for name in (*_PER_IMAGE, *_PER_IDENTITY)}
                values["ages"] = arrays["ages"] if "ages" in arrays.files else None
            profile = cls(sources=meta["sources"], identity_names=meta["identity_names"], threshold=float(meta["threshold"]),
                          far=float(meta["far"]), model=str(meta["model"]),
                          duplicate_cosine=float(meta["duplicate_cosine"]), problems=list(meta["problems"]),
                          flip_cut=None if meta.get("flip_cut") is None else float(meta["flip_cut"]), **values)
            if (len(profile), len(profile.identity_names)) != (meta["images"], meta["identities"]):
                raise ValueError("sizes differ from those recorded")
            return profile
        except (OSError, ValueError, KeyError, TypeError) as error:
            detail = error.strerror if isinstance(error, OSError) and error.strerror else error
            raise ValueError(f"{folder}: not a readable noise profile ({detail})") from None


# ---------------------------------------------------------------------------------------------------- profiling


def _batches(source: ArrayEmbeddings | EmbeddingStore, rows: np.ndarray | None = None):
    """(global indices, unit float32 rows) of every image (or of the ``rows`` mask), ``_BATCH`` at a time."""
    for start, chunk in source.chunks():
        for offset in range(0, len(chunk), _BATCH):
            index = np.arange(start + offset, start + min(offset + _BATCH, len(chunk)))
            keep = rows[index] if rows is not None else slice(None)
            index = index[keep]
            if len(index):
                yield index, normalised(chunk[offset:offset + _BATCH][keep])


def _first_per_group(groups: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(group ids, row positions) of the lowest ``score`` in each group present."""
    order = np.lexsort((score, groups))
    first = np.r_[True, groups[order][1:] != groups[order][:-1]]
    return groups[order][first], order[first]


@dataclass
class _Centres:
    """The kept centres: unit rows, the norm and image count of their sums, their identity; per image its mode."""

    unit: np.ndarray  # (M, D) float32
    norm: np.ndarray  # (M,) float64 |sum of the member images' unit embeddings|
    count: np.ndarray  # (M,) int64
    label: np.ndarray  # (M,) int64
    row_of: np.ndarray  # (C, k) int64 centre row of (identity, mode), -1 where none
    mode: np.ndarray  # (N,) int8 mode of each member image


def _identity_centres(source, labels: np.ndarray, member: np.ndarray, num_classes: int, threshold: float,
                      max_centres: int, iterations: int) -> _Centres:
    """Sums per identity, then, per identity that could hold two modes, a spherical k-means kept by the rule of the
    module docstring.

    The k-means runs with one cluster more than ``max_centres``, so a small group of misfiled photos takes the spare
    cluster instead of capturing a mode, and on a 64-d random projection of the embeddings (cosines are kept
    to about ±0.1, enough to steer assignments): its state is C · (k + 1) · 64 floats, whatever D. One last pass
    assigns each image of an identity that kept several modes to the nearest kept mode and sums those modes in
    full dimension; only these exact sums decide (distinct at T) and score. Memory: O(C · D), never O(N · D)."""
    dim = source.dim
    k = max(1, int(max_centres))
    sums = torch.zeros((num_classes, dim), dtype=torch.float32)
    for index, rows in _batches(source, member):
        sums.index_add_(0, torch.from_numpy(labels[index]), torch.from_numpy(rows))
    sizes = np.bincount(labels[member], minlength=num_classes)
    mode = np.zeros(len(labels), dtype=np.int8)
    need = np.maximum(MIN_MODE_IMAGES, np.ceil(MIN_MODE_SHARE * sizes - 1e-9)).astype(np.int64)
    candidates = np.flatnonzero(sizes >= 2 * need) if k > 1 else np.zeros(0, np.int64)
    kept, kept_sums, kept_counts = np.zeros(0, np.int64), None, None
    if len(candidates):
        kept, kept_sums, kept_counts = _modes(source, labels, member, candidates, sums, need, k, threshold,
                                              iterations, mode)
    # the centres: the modes of identities that kept several, the whole sum for every other identity with images;
    # built without a second copy of the (C, D) sums where possible (this is profiling's largest array)
    row_of = np.full((num_classes, k), -1, dtype=np.int64)
    single = np.flatnonzero((sizes > 0) & ~np.isin(np.arange(num_classes), kept))
    row_of[single, 0] = np.arange(len(single))
    total = sums.numpy()
    del sums
    for start in range(0, len(single), _BATCH):  # compact in place: single is sorted, so single[i] >= i
        block = single[start:start + _BATCH]
        total[start:start + len(block)] = total[block]
    total = total[:len(single)]
    count, label = sizes[single], single
    if len(kept):
        present = kept_counts > 0
        rows_at = len(single) + np.cumsum(present.reshape(-1)).reshape(present.shape) - 1
        row_of[kept] = np.where(present, rows_at, -1)
        total = np.concatenate([total, kept_sums[present]])
        count = np.r_[count, kept_counts[present]]
        label = np.r_[label, np.repeat(kept, present.sum(1))]
    norm = np.linalg.norm(total, axis=1).astype(np.float64)
    total /= np.maximum(norm, 1e-12)[:, None].astype(np.float32)  # in place: the unit centres
    return _Centres(unit=total, norm=norm, count=count.astype(np.int64), label=label.astype(np.int64), row_of=row_of,
                    mode=mode)


def _modes(source, labels, member, candidates, sums, need, k, threshold, iterations, mode):
    """(identities that keep several modes, their (n, k, D) mode sums, (n, k) counts); sets ``mode`` of their images."""
    num_classes = len(sums)
    project = _projection(source.dim) if source.dim > _DUP_DIM else normalised
    slots = k + 1
    slot = np.full(num_classes, -1, dtype=np.int64)
    slot[candidates] = np.arange(len(candidates))
    split = member & (slot[labels] >= 0)
    starts = torch.zeros((len(candidates), slots, min(source.dim, _DUP_DIM)), dtype=torch.float32)
    starts[:, 0] = torch.from_numpy(project(sums[candidates].numpy()))
    for j in range(1, slots):  # farthest-point start: the image least like every start so far
        best = np.full(len(candidates), np.inf)
        for index, rows in _batches(source, split):
            ids, rows = slot[labels[index]], project(rows)
            score = torch.einsum("bd,bjd->bj", torch.from_numpy(rows), starts[ids, :j]).amax(1).numpy()
            groups, at = _first_per_group(ids, score)
            better = score[at] < best[groups]
            best[groups[better]] = score[at[better]]
            starts[groups[better], j] = torch.from_numpy(rows[at[better]])
    cluster = np.zeros(len(labels), dtype=np.int8)
    for iteration in range(max(1, iterations)):
        acc = torch.zeros((len(candidates) * slots, starts.shape[2]), dtype=torch.float32)
        changed = 0
        for index, rows in _batches(source, split):
            ids, rows = slot[labels[index]], project(rows)
            assign = torch.einsum("bd,bjd->bj", torch.from_numpy(rows), starts[ids]).argmax(1).numpy()
            changed += int((cluster[index] != assign).sum())
            cluster[index] = assign
            acc.index_add_(0, torch.from_numpy(ids * slots + assign), torch.from_numpy(rows))
        acc = acc.view(len(candidates), slots, -1)
        starts = torch.where(acc.norm(dim=2, keepdim=True) > 0, torch.nn.functional.normalize(acc, dim=2), starts)
        if not changed and iteration:
            break
    counts = np.zeros((len(candidates), slots), dtype=np.int64)
    np.add.at(counts, (slot[labels[split]], cluster[split]), 1)
    rank = np.argsort(np.argsort(-counts, axis=1, kind="stable"), axis=1)
    big = (counts >= need[candidates][:, None]) & (rank < k)
    several = big.sum(1) >= 2
    if not several.any():
        return np.zeros(0, np.int64), None, None
    # last pass, full dimension: every image of an identity with several big clusters to the nearest of them
    kept = candidates[several]
    position = np.full(num_classes, -1, dtype=np.int64)
    position[kept] = np.arange(len(kept))
    mode_of = np.where(big[several], np.cumsum(big[several], axis=1) - 1, -1)  # cluster -> mode number
    allowed = torch.from_numpy(big)
    mode_sums = torch.zeros((len(kept) * k, source.dim), dtype=torch.float32)
    chosen = member & (position[labels] >= 0)
    for index, rows in _batches(source, chosen):
        ids = slot[labels[index]]
        score = torch.einsum("bd,bjd->bj", torch.from_numpy(project(rows)), starts[ids])
        nearest = score.masked_fill(~allowed[ids], -np.inf).argmax(1).numpy()
        mode[index] = mode_of[position[labels[index]], nearest]
        mode_sums.index_add_(0, torch.from_numpy(position[labels[index]] * k + mode[index]), torch.from_numpy(rows))
    mode_sums = mode_sums.view(len(kept), k, -1)
    mode_counts = np.zeros((len(kept), k), dtype=np.int64)
    np.add.at(mode_counts, (position[labels[chosen]], mode[chosen].astype(np.int64)), 1)
    unit = torch.nn.functional.normalize(mode_sums, dim=2)
    between = torch.einsum("cid,cjd->cij", unit, unit).numpy()  # cosines between the modes of each identity
    present = mode_counts > 0
    between[~(present[:, :, None] & present[:, None, :])] = -1.0
    between[:, np.arange(k), np.arange(k)] = -1.0
    accepted = ((between < threshold).all(axis=(1, 2)) & (present.sum(1) >= 2)
                & ((mode_counts >= need[kept][:, None]) | ~present).all(1))
    mode[chosen & np.isin(labels, kept[~accepted])] = 0
    logger.info("%d of %d identities large enough keep several centres", int(accepted.sum()), len(candidates))
    return kept[accepted], mode_sums[accepted].numpy(), mode_counts[accepted]


def _search_index(count: int, dim: int, exact_limit: int, sample: np.ndarray | None, lists: int):
    """An empty faiss inner-product index: exact (``IndexFlatIP``) up to ``exact_limit`` vectors, else inverted
    lists over ``lists`` coarse centroids holding 8-bit scalar-quantised vectors (D bytes each), trained on
    ``sample``. Not the gallery's builder: that one trains IVF-PQ on up to 256k vectors, sized for a one-off
    build; here the training sample must stay small for memory to stay bounded, and PQ training and adding
    took 10x longer than scalar quantisation on 100k x 512 vectors. Quantised scores are approximate: callers
    re-score what it finds exactly."""
    import faiss

    if count <= exact_limit:
        return faiss.IndexFlatIP(dim)
    lists = int(np.clip(lists, 1, max(1, len(sample) // 32)))
    index = faiss.IndexIVFScalarQuantizer(faiss.IndexFlatIP(dim), dim, lists, faiss.ScalarQuantizer.QT_8bit,
                                          faiss.METRIC_INNER_PRODUCT)
    index.train(np.ascontiguousarray(sample, dtype=np.float32))
    index.nprobe = min(_IVF_NPROBE, lists)
    return index


def _find_duplicates(source, valid: np.ndarray, duplicate_cosine: float, hashes: np.ndarray | None,
                     exact_limit: int) -> np.ndarray:
    """(N,) index of the earliest copy of each image (-1 when it is the first or only one).

    Above ``exact_limit`` images the search runs on a random orthogonal projection to ``_DUP_DIM`` dimensions
    (near copies stay near copies under any projection, Johnson–Lindenstrauss), so the index holds ``_DUP_DIM``
    bytes per image; every neighbour it scores within ``_DUP_MARGIN`` of the cut is re-scored exactly."""
    n = len(valid)
    duplicate_of = np.full(n, -1, dtype=np.int64)
    if hashes is not None:
        readable = np.flatnonzero(valid & (hashes != np.zeros((), HASH_DTYPE)))
        _, first, inverse = np.unique(hashes[readable], return_index=True, return_inverse=True)
        earliest = readable[first][inverse]
        copies = earliest < readable
        duplicate_of[readable[copies]] = earliest[copies]
    count = int(valid.sum())
    if count < 2:
        return duplicate_of
    exact = count <= exact_limit
    project = _projection(source.dim) if not exact and source.dim > _DUP_DIM else (lambda rows: rows)
    sample = None
    if not exact:  # a strided sample over the whole set (sets are stored identity by identity)
        stride = -(-count // _TRAIN_SAMPLE)
        position = np.cumsum(valid) - 1
        sample = np.concatenate([project(rows[position[index] % stride == 0]) for index, rows in _batches(source, valid)])
    index = _search_index(count, sample.shape[1] if sample is not None else source.dim, exact_limit, sample,
                          lists=round(math.sqrt(count)))
    del sample
    ids = np.flatnonzero(valid)
    for _, rows in _batches(source, valid):
        index.add(project(rows))
    neighbours = min(count, 4)
    cut = duplicate_cosine - (0 if exact else _DUP_MARGIN)
    for query_ids, rows in _batches(source, valid):
        scores, found = index.search(project(rows), neighbours)
        found = np.where(found >= 0, ids[np.clip(found, 0, None)], -1)
        hit = (found >= 0) & (scores >= cut) & (found != query_ids[:, None])
        if cut < duplicate_cosine and hit.any():  # re-score the candidates exactly
            rq, cq = np.nonzero(hit)
            exact_scores = np.einsum("ij,ij->i", rows[rq], normalised(source.rows(found[rq, cq])))
            hit[rq, cq] = exact_scores >= duplicate_cosine
        earlier = np.where(hit & (found < query_ids[:, None]), found, n).min(1)
        new = (earlier < query_ids) & (duplicate_of[query_ids] < 0)
        duplicate_of[query_ids[new]] = earlier[new]
    while True:  # point every copy at the first of its chain
        chained = (duplicate_of >= 0) & (duplicate_of[np.clip(duplicate_of, 0, None)] >= 0)
        if not chained.any():
            return duplicate_of
        duplicate_of[chained] = duplicate_of[duplicate_of[chained]]


def _projection(dim: int):
    """Rows -> their unit-length random orthogonal projection onto ``_DUP_DIM`` dimensions (seeded: reproducible)."""
    basis = np.linalg.qr(np.random.default_rng(0).standard_normal((dim, _DUP_DIM)))[0].astype(np.float32)
    return lambda rows: normalised(rows @ basis)


def _score(source, labels: np.ndarray, valid: np.ndarray, member: np.ndarray, centres: _Centres,
           exact_limit: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """own_cosine (leave-one-out), other_cosine, other_label of every valid image."""
    n, k = len(labels), centres.row_of.shape[1]
    own = np.full(n, np.nan, dtype=np.float32)
    other = np.full(n, np.nan, dtype=np.float32)
    other_label = np.full(n, -1, dtype=np.int64)
    count = len(centres.unit)
    sample = centres.unit[::-(-count // _TRAIN_SAMPLE)]
    index = _search_index(count, centres.unit.shape[1], exact_limit, sample, lists=4 * round(math.sqrt(count)))
    del sample
    index.add(centres.unit)
    neighbours = min(len(centres.unit), k + 2)
    unit = torch.from_numpy(centres.unit)
    for query, rows in _batches(source, valid):
        rows_of = centres.row_of[labels[query]]  # (b, k)
        present = rows_of >= 0
        at = np.clip(rows_of, 0, None)
        dots = torch.einsum("bd,bjd->bj", torch.from_numpy(rows), unit[torch.from_numpy(at)]).numpy().astype(np.float64)
        norm, members = centres.norm[at], centres.count[at]
        mine = member[query][:, None] & (np.arange(k)[None, :] == centres.mode[query][:, None])
        with np.errstate(invalid="ignore", divide="ignore"):
            raw = dots * norm  # e · S
            loo = (raw - 1.0) / np.sqrt(np.maximum(norm ** 2 - 2.0 * raw + 1.0, 0.0))
        cos = np.where(mine, np.where(members > 1, loo, np.nan), dots)
        cos = np.where(present, cos, np.nan)
        defined = ~np.isnan(cos).all(1)
        own[query[defined]] = np.nanmax(cos[defined], axis=1)
        found = index.search(rows, neighbours)[1]
        scores = torch.einsum("bd,bjd->bj", torch.from_numpy(rows), unit[torch.from_numpy(np.clip(found, 0, None))]).numpy()
        found_label = np.where(found >= 0, centres.label[np.clip(found, 0, None)], -1)
        usable = (found >= 0) & (found_label != labels[query][:, None])
        best = np.where(usable, scores, -np.inf).argmax(1)
        got = usable[np.arange(len(query)), best]
        other[query[got]] = scores[np.arange(len(query)), best][got]
        other_label[query[got]] = found_label[np.arange(len(query)), best][got]
    return own, other, other_label


def flip_cut(own: np.ndarray, other: np.ndarray, member: np.ndarray, threshold: float, far: float) -> float:
    """The cosine to another identity a flip must reach: T, raised to the (1 − FAR) quantile of the nearest-other
    cosines of the images that are clean by their own identity (own >= T and own >= other).

    Each image is compared with every other identity and keeps the best, so against C identities an image of
    nobody in the set passes T by chance far more often than the pair FAR (1.6e-3 per centre, 16% of LFW images
    have some other centre >= T: ``benchmarks/noise_profile_thresholds.py``), and outliers would be called flips.
    Holding the clean images' nearest-other cosines to the same FAR restores the meaning of the threshold for the
    maximum over identities. With fewer than 1/FAR such images the quantile cannot be measured and T is used.
    """
    with np.errstate(invalid="ignore"):
        clean = member & (own >= threshold) & (own >= other) & np.isfinite(other)
    values = other[clean]
    if len(values) * far < 1:
        return float(threshold)
    return max(float(threshold), float(np.quantile(values, 1.0 - far)))


def profile_embeddings(embeddings, labels, threshold: float, *, far: float, model: str,
                       duplicate_cosine: float = DUPLICATE_COSINE, max_centres: int = 2,
                       identity_names: list[str] | None = None, sources: list[str] | None = None,
                       valid: np.ndarray | None = None, content_hashes: np.ndarray | None = None,
                       problems: list[dict] = (), set_name: str = "embeddings", kmeans_iterations: int = 5,
                       chunk_size: int = 16384, exact_search_limit: int = 20_000) -> NoiseProfile:
    """Profile a labelled set from its embeddings (module docstring: centres, scores, rules).

    Args:
        embeddings: (N, D) array (rows normalised here), an :class:`EmbeddingStore` or its folder.
        labels: (N,) identity of each image as filed, in [0, C).
        threshold: the model's verification threshold (cosine) at ``far`` (``Threshold.value``).
        identity_names: (C,) names (default ``str(label)``, C = largest label + 1); ``sources``: (N,) what each
            image is (default ``#index``).
        valid: (N,) bool, False for images that could not be read (UNREADABLE; their rows are ignored).
        content_hashes: (N,) 16-byte digests of the encoded images: equal digests are duplicates outright.
        problems: per-image problems found before (unreadable files), kept in the profile.
        exact_search_limit: up to this many images (centres) faiss searches exactly, above it through IVF.
    """
    source = as_embeddings(embeddings, chunk_size)
    n = len(source)
    labels = np.asarray(labels, dtype=np.int64)
    if labels.shape != (n,):
        raise ValueError(f"{set_name}: {len(labels)} labels for {n} embeddings")
    num_classes = len(identity_names) if identity_names is not None else (int(labels.max()) + 1 if n else 0)
    if n and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"{set_name}: labels must lie in [0, {num_classes})")
    valid = np.ones(n, dtype=bool) if valid is None else np.asarray(valid, dtype=bool)
    if valid.shape != (n,):
        raise ValueError(f"{set_name}: valid must hold one flag per image")
    if not valid.any():
        raise ValueError(f"{set_name}: no readable image to profile ({n} images, all unreadable)" if n
                         else f"{set_name}: no images to profile")
    if content_hashes is not None:
        content_hashes = np.asarray(content_hashes, dtype=HASH_DTYPE)
    if not 0 < threshold < 1 or not -1 < duplicate_cosine <= 1:
        raise ValueError(f"threshold {threshold} must lie in (0, 1) and duplicate_cosine {duplicate_cosine} in (-1, 1]")
    started = time.perf_counter()

    duplicate_of = _find_duplicates(source, valid, duplicate_cosine, content_hashes, exact_search_limit)
    member = valid & (duplicate_of < 0)
    logger.info("%s: %d duplicates found in %.1f s", set_name, int((duplicate_of >= 0).sum()), time.perf_counter() - started)
    centres = _identity_centres(source, labels, member, num_classes, threshold, max_centres, kmeans_iterations)
    logger.info("%s: %d centres of %d identities after %.1f s", set_name, len(centres.unit), num_classes,
                time.perf_counter() - started)
    own, other, other_label = _score(source, labels, valid, member, centres, exact_search_limit)

    status = np.full(n, Status.CLEAN, dtype=np.uint8)
    cut = flip_cut(own, other, member, threshold, far)
    with np.errstate(invalid="ignore"):
        is_flip = (other >= cut) & ~(own >= other)
        is_outlier = (own < threshold) & ~is_flip
    status[is_flip] = Status.FLIP
    status[is_outlier] = Status.OUTLIER
    status[duplicate_of >= 0] = Status.DUPLICATE
    status[~valid] = Status.UNREADABLE

    identity_size = np.bincount(labels[valid], minlength=num_classes)
    identity_centres = (centres.row_of >= 0).sum(1)
    clean = (status == Status.CLEAN) & ~np.isnan(own)
    clean_count = np.bincount(labels[clean], minlength=num_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        spread = np.bincount(labels[clean], weights=own[clean], minlength=num_classes) / clean_count
    spread[clean_count == 0] = np.nan

    notes = [dict(p) for p in problems]
    members_per_identity = np.bincount(labels[member], minlength=num_classes)
    if int((members_per_identity > 0).sum()) < 2:
        notes.append({"source": set_name, "reason": "only one identity: flips cannot be measured (no other identity)"})
    singles = int((members_per_identity == 1).sum())
    if singles:
        notes.append({"source": set_name, "reason": f"{singles} identities have one image: no leave-one-out centre "
                                                    "(own_cosine nan); they are never called outliers"})
    empty = int(((members_per_identity == 0) & (np.bincount(labels, minlength=num_classes) > 0)).sum())
    if empty:
        notes.append({"source": set_name, "reason": f"{empty} identities have no readable image"})

    profile = NoiseProfile(
        sources=sources if sources is not None else [f"#{i}" for i in range(n)], labels=labels,
        identity_names=identity_names if identity_names is not None else [str(c) for c in range(num_classes)],
        status=status, own_cosine=own, other_cosine=other, other_label=other_label, duplicate_of=duplicate_of,
        identity_size=identity_size, identity_centres=identity_centres, identity_spread=spread,
        threshold=float(threshold), far=float(far), model=str(model), duplicate_cosine=float(duplicate_cosine),
        problems=notes, flip_cut=cut)
    summary = profile.summary()
    logger.info("%s: %d images profiled in %.1f s: %d flips, %d outliers, %d duplicates, %d unreadable", set_name, n,
                time.perf_counter() - started, summary["flip"], summary["outlier"], summary["duplicate"],
                summary["unreadable"])
    return profile


def profile_set(path: str | os.PathLike, model: str | os.PathLike, threshold, out_dir: str | os.PathLike, *,
                batch_size: int = 64, device: str = "cpu", chunk_size: int = 16384, progress: bool = True,
                workers: int = 2, flip: bool = True, duplicate_cosine: float = DUPLICATE_COSINE,
                max_centres: int = 2) -> NoiseProfile:
    """Profile a labelled set on disk with a stored model and save the profile into ``out_dir``.

    ``path``: an image folder, list file or RecordIO pack (``cleaning.sources``); ``model``: anything
    ``models.runs.load_embedder`` reads; ``threshold``: a :class:`~facesphere.pipeline.threshold.Threshold` or its
    file, calibrated for this model (checked). Embeddings go to ``out_dir/embeddings`` in chunks (resumed after
    an interruption), the profile to ``out_dir`` (``NoiseProfile.save``). Nothing is written inside the set's
    folder: an ``out_dir`` there is refused before any work.
    """
    from facesphere.models.runs import load_embedder
    from facesphere.pipeline.threshold import Threshold

    threshold = threshold if isinstance(threshold, Threshold) else Threshold.load(threshold)
    embedder = load_embedder(model, device=device)
    card = embedder.card
    threshold.check_model(card.name, card.embedding_size, card.weights_sha256)
    dataset, names = open_labelled_set(path, tuple(card.input_size))
    root, out_dir = set_root(dataset).resolve(), Path(out_dir).resolve()
    if out_dir == root or root in out_dir.parents:
        raise ValueError(f"{out_dir}: the output folder lies inside the set's folder {root}; profiling never writes there")
    check_writable(out_dir, folder=True)
    sources = [dataset.source(i) for i in range(len(dataset))]
    skipped = [{"source": str(item.path), "reason": f"not profiled: {item.reason}"} for item in getattr(dataset, "skipped", [])]
    key = {"set": str(Path(path).resolve()), "images": len(dataset),
           "sources": hashlib.sha256("\n".join(f"{s}\t{l}" for s, l in zip(sources, dataset.labels.tolist())).encode()).hexdigest(),
           "model": card.name, "weights_sha256": card.weights_sha256, "embedding_size": card.embedding_size}
    store = embed_to_store(dataset, embedder, out_dir / "embeddings", key=key, batch_size=batch_size,
                           chunk_size=chunk_size, workers=workers, flip=flip, progress=progress)
    profile = profile_embeddings(store, dataset.labels, threshold.value, far=threshold.target_far, model=card.name,
                                 duplicate_cosine=duplicate_cosine, max_centres=max_centres, identity_names=names,
                                 sources=sources, valid=store.valid(), content_hashes=store.hashes(),
                                 problems=[*skipped, *store.problems], set_name=str(path), chunk_size=chunk_size)
    profile = replace(profile, ages=dataset.ages)
    profile.save(out_dir)
    logger.info("profile of %s saved to %s", path, out_dir)
    return profile
