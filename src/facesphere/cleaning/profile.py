"""Noise profile of a labelled set (IMDb-Face, arXiv 1807.11649): identity centres, and each image's status.

:func:`profile_embeddings` works on any embeddings (an (N, D) array or an on-disk
:class:`~facesphere.cleaning.embedstore.EmbeddingStore`) in streaming passes, one chunk in memory at a time:

1. **Duplicates** first (the same photo filed twice, within or across identities): byte-identical files by
   content digest, then near copies: the nearest earlier image at cosine >= ``duplicate_cosine`` (faiss: exact
   inner products up to ``exact_search_limit`` images, an IVF-PQ index beyond, its candidates re-scored
   exactly). The later copy becomes DUPLICATE with ``duplicate_of`` = the earliest copy, and is left out of the
   identity statistics so no photo counts twice.
2. **Identity centres**: the sum of each identity's unit embeddings, then a spherical k-means (k =
   ``max_centres``, farthest-point start, a few Lloyd passes) inside every identity large enough. The split is
   kept only when every mode holds at least ``MIN_MODE_SHARE`` of the identity and ``MIN_MODE_IMAGES`` images,
   *and* the mode centres pass the verification threshold against each other. Why: a person photographed in two
   sessions (young/old, with/without glasses) forms two modes that are still the same person, and one centre
   would put the smaller session far from it; a handful of mislabelled photos is never a quarter of an
   identity, and a large block of another person's photos fails the same-person test between the centres, so
   neither is promoted to a mode and both stay flagged.
3. **Scores** per image: ``own_cosine`` to the nearest centre of its own identity with the image itself removed
   from its centre's sum (leave-one-out: with e and S unit image and centre sum, (e·S − 1) / √(|S|² − 2 e·S + 1);
   without it a 3-image identity looks far cleaner than it is), and ``other_cosine`` / ``other_label``: the
   nearest centre of any other identity, found with faiss over all centres (exact up to ``exact_search_limit``
   centres, IVF beyond), asking for ``max_centres`` + 2 neighbours so the own identity's centres can be skipped.
4. **Classification** with the model's calibrated verification threshold T (``facesphere calibrate`` at a FAR):
   FLIP when other_cosine >= T and other_cosine > own_cosine (``other_label`` is the suggestion); OUTLIER when
   own_cosine < T and other_cosine < T (close to no identity of the set); CLEAN otherwise.

   T is an image-to-image threshold applied to image-to-centre cosines. A centre averages its images, so the
   noise of one photo cancels: a genuine image's cosine to its own (leave-one-out) centre runs above its
   cosines to single photos of the same person, and an impostor's cosine to another identity's centre has a
   narrower spread than impostor pairs. Both make the cut conservative: at most the calibrated FAR of images are
   flagged as flips by chance and fewer clean ones fall below T than genuine pairs do.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from facesphere.cleaning.embedstore import ArrayEmbeddings, EmbeddingStore, HASH_DTYPE, as_embeddings, normalised
from facesphere.cleaning.noise import Status
from facesphere.utils.files import atomic_path, atomic_write_text, read_text_checked

logger = logging.getLogger(__name__)

__all__ = ["DUPLICATE_COSINE", "MIN_MODE_IMAGES", "MIN_MODE_SHARE", "NoiseProfile", "profile_embeddings"]

DUPLICATE_COSINE = 0.95
"""Cosine at or above which two images count as the same photo (see ``benchmarks/noise_profile_scale.py``)."""

MIN_MODE_SHARE = 0.25
"""Smallest share of an identity a second mode must hold to be kept as a mode (not noise)."""

MIN_MODE_IMAGES = 3
"""Smallest number of images a mode must hold to be kept."""

PROFILE_FORMAT = "facesphere-noise-profile"
ARRAYS_FILE, META_FILE = "profile.npz", "profile.json"
_BATCH = 8192  # rows per vectorised step: bounds the (rows, centres, D) gathers to a few tens of MB
_IVF_NPROBE = 16
_PQ_MARGIN = 0.15  # IVF-PQ inner products are approximate: candidates within this of the cut are re-scored exactly

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

    def __post_init__(self) -> None:
        for name, dtype in {**_PER_IMAGE, **_PER_IDENTITY}.items():
            setattr(self, name, np.asarray(getattr(self, name), dtype=dtype))
        self.sources = [str(s) for s in self.sources]
        self.identity_names = [str(s) for s in self.identity_names]
        n, c = len(self.sources), len(self.identity_names)
        bad = [f"{name} {getattr(self, name).shape}" for name in _PER_IMAGE if getattr(self, name).shape != (n,)]
        bad += [f"{name} {getattr(self, name).shape}" for name in _PER_IDENTITY if getattr(self, name).shape != (c,)]
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
                "duplicate_cosine": self.duplicate_cosine, "problems": len(self.problems)}

    # ------------------------------------------------------------------ files

    def save(self, folder: str | os.PathLike) -> None:
        """``folder/profile.npz`` (arrays, no pickles) then ``profile.json`` (names, scalars, the npz's digest),
        each written atomically; the json is the commit: it names the exact npz it belongs to."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(folder / ARRAYS_FILE) as tmp, open(tmp, "wb") as handle:
            np.savez(handle, **{name: getattr(self, name) for name in (*_PER_IMAGE, *_PER_IDENTITY)})
        meta = {"format": PROFILE_FORMAT, "version": 1, "images": len(self), "identities": len(self.identity_names),
                "arrays_sha256": _sha256(folder / ARRAYS_FILE), "threshold": self.threshold, "far": self.far,
                "model": self.model, "duplicate_cosine": self.duplicate_cosine, "summary": self.summary(),
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
            if _sha256(folder / ARRAYS_FILE) != meta["arrays_sha256"]:
                raise ValueError(f"{ARRAYS_FILE} does not match {META_FILE} (changed or damaged)")
            with np.load(folder / ARRAYS_FILE, allow_pickle=False) as arrays:
                values = {name: arrays[name] for name in (*_PER_IMAGE, *_PER_IDENTITY)}
            profile = cls(sources=meta["sources"], identity_names=meta["identity_names"], threshold=float(meta["threshold"]),
                          far=float(meta["far"]), model=str(meta["model"]),
                          duplicate_cosine=float(meta["duplicate_cosine"]), problems=list(meta["problems"]), **values)
            if (len(profile), len(profile.identity_names)) != (meta["images"], meta["identities"]):
                raise ValueError("sizes differ from those recorded")
            return profile
        except (OSError, ValueError, KeyError, TypeError) as error:
            detail = error.strerror if isinstance(error, OSError) and error.strerror else error
            raise ValueError(f"{folder}: not a readable noise profile ({detail})") from None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
    """Sums per identity, then per identity large enough a spherical k-means whose split is kept by the rule
    of the module docstring. Memory: O(C · k · D), never O(N · D)."""
    dim = source.dim
    k = max(1, int(max_centres))
    sums = torch.zeros((num_classes, dim), dtype=torch.float32)
    for index, rows in _batches(source, member):
        sums.index_add_(0, torch.from_numpy(labels[index]), torch.from_numpy(rows))
    sizes = np.bincount(labels[member], minlength=num_classes)
    mode = np.zeros(len(labels), dtype=np.int8)
    candidates = np.flatnonzero(sizes >= k * MIN_MODE_IMAGES) if k > 1 else np.zeros(0, np.int64)
    slot = np.full(num_classes, -1, dtype=np.int64)
    slot[candidates] = np.arange(len(candidates))
    accepted = np.zeros(len(candidates), dtype=bool)
    if len(candidates):
        split = member & (slot[labels] >= 0)
        # start: the identity's mean, then repeatedly the image farthest from the starts so far (float16: the
        # starts only steer assignments)
        starts = torch.zeros((len(candidates), k, dim), dtype=torch.float16)
        starts[:, 0] = torch.nn.functional.normalize(sums[candidates], dim=1).half()
        for j in range(1, k):
            best = np.full(len(candidates), np.inf)
            for index, rows in _batches(source, split):
                ids = slot[labels[index]]
                score = torch.einsum("bd,bjd->bj", torch.from_numpy(rows), starts[ids, :j].float()).amax(1).numpy()
                groups, at = _first_per_group(ids, score)
                better = score[at] < best[groups]
                best[groups[better]] = score[at[better]]
                starts[groups[better], j] = torch.from_numpy(rows[at[better]]).half()
        for iteration in range(max(1, iterations)):
            acc = torch.zeros((len(candidates) * k, dim), dtype=torch.float32)
            changed = 0
            for index, rows in _batches(source, split):
                ids = slot[labels[index]]
                assign = torch.einsum("bd,bjd->bj", torch.from_numpy(rows), starts[ids].float()).argmax(1).numpy()
                changed += int((mode[index] != assign).sum())
                mode[index] = assign
                acc.index_add_(0, torch.from_numpy(ids * k + assign), torch.from_numpy(rows))
            acc = acc.view(len(candidates), k, dim)
            filled = acc.norm(dim=2) > 0
            starts = torch.where(filled[..., None], torch.nn.functional.normalize(acc, dim=2), starts.float()).half()
            if not changed and iteration:
                break
        counts = np.zeros((len(candidates), k), dtype=np.int64)
        np.add.at(counts, (slot[labels[split]], mode[split]), 1)
        need = np.maximum(MIN_MODE_IMAGES, np.ceil(MIN_MODE_SHARE * sizes[candidates] - 1e-9))
        accepted = (counts >= need[:, None]).all(1)
        unit = torch.nn.functional.normalize(acc, dim=2)
        between = torch.einsum("cid,cjd->cij", unit, unit).numpy()  # cosines between the modes of each identity
        accepted &= (between >= threshold).all(axis=(1, 2))
        rejected = candidates[~accepted]
        mode[split & np.isin(labels, rejected)] = 0
        logger.info("%d of %d identities large enough keep %d centres", int(accepted.sum()), len(candidates), k)
    # the centres: k per accepted identity, the whole sum for every other identity with images
    row_of = np.full((num_classes, k), -1, dtype=np.int64)
    single = np.flatnonzero((sizes > 0) & ~np.isin(np.arange(num_classes), candidates[accepted]))
    kept = candidates[accepted]
    parts_sum = [sums[single].numpy()]
    parts_count, parts_label = [sizes[single]], [single]
    row_of[single, 0] = np.arange(len(single))
    if len(kept):
        kept_acc = acc[slot[kept]].reshape(-1, dim).numpy()
        parts_sum.append(kept_acc)
        parts_count.append(counts[slot[kept]].reshape(-1))
        parts_label.append(np.repeat(kept, k))
        row_of[kept] = len(single) + np.arange(len(kept) * k).reshape(-1, k)
    del sums
    total = np.concatenate(parts_sum)
    norm = np.linalg.norm(total.astype(np.float64), axis=1)
    return _Centres(unit=normalised(total), norm=norm, count=np.concatenate(parts_count).astype(np.int64),
                    label=np.concatenate(parts_label).astype(np.int64), row_of=row_of, mode=mode)


def _search_index(vectors: np.ndarray | None, dim: int, count: int, exact_limit: int, compress: bool = False):
    """A faiss inner-product index: exact up to ``exact_limit`` vectors, else IVF (flat lists, or PQ codes of
    D/8 bytes with ``compress``) trained on ``vectors`` (all of them, or a sample)."""
    import faiss

    if count <= exact_limit:
        return faiss.IndexFlatIP(dim)
    lists = int(np.clip(round(math.sqrt(count) * (1 if compress else 4)), 16, 65536))
    lists = max(1, min(lists, len(vectors) // 39))  # faiss wants >= 39 training points per list
    quantizer = faiss.IndexFlatIP(dim)
    if compress and dim % 8 == 0:
        index = faiss.IndexIVFPQ(quantizer, dim, lists, dim // 8, 8, faiss.METRIC_INNER_PRODUCT)
    elif compress:
        index = faiss.IndexIVFScalarQuantizer(quantizer, dim, lists, faiss.ScalarQuantizer.QT_8bit,
                                              faiss.METRIC_INNER_PRODUCT)
    else:
        index = faiss.IndexIVFFlat(quantizer, dim, lists, faiss.METRIC_INNER_PRODUCT)
    index.train(np.ascontiguousarray(vectors, dtype=np.float32))
    index.nprobe = min(_IVF_NPROBE, lists)
    index.keep_quantizer = quantizer  # the index does not own its quantizer: keep it alive with it
    return index


def _find_duplicates(source, valid: np.ndarray, duplicate_cosine: float, hashes: np.ndarray | None,
                     exact_limit: int) -> np.ndarray:
    """(N,) index of the earliest copy of each image (-1 when it is the first or only one)."""
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
    sample = None
    if not exact:  # a strided sample over the whole set (sets are stored identity by identity)
        stride = max(1, count // 65536)
        position = np.cumsum(valid) - 1
        sample = np.concatenate([rows[position[index] % stride == 0] for index, rows in _batches(source, valid)])
    index = _search_index(sample, source.dim, count, exact_limit, compress=True)
    del sample
    ids = np.flatnonzero(valid)
    for chunk_ids, rows in _batches(source, valid):
        index.add(rows)
    neighbours = min(count, 4)
    cut = duplicate_cosine - (0 if exact else _PQ_MARGIN)
    for query_ids, rows in _batches(source, valid):
        scores, found = index.search(rows, neighbours)
        hit = (found >= 0) & (scores >= cut)
        found = np.where(found >= 0, ids[np.clip(found, 0, None)], -1)
        hit &= found != query_ids[:, None]
        if not hit.any():
            continue
        if not exact:  # re-score the candidates exactly
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


def _score(source, labels: np.ndarray, valid: np.ndarray, member: np.ndarray, centres: _Centres,
           exact_limit: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """own_cosine (leave-one-out), other_cosine, other_label of every valid image."""
    n, k = len(labels), centres.row_of.shape[1]
    own = np.full(n, np.nan, dtype=np.float32)
    other = np.full(n, np.nan, dtype=np.float32)
    other_label = np.full(n, -1, dtype=np.int64)
    index = _search_index(centres.unit, centres.unit.shape[1], len(centres.unit), exact_limit)
    index.add(centres.unit)
    neighbours = min(len(centres.unit), k + 2)
    unit = torch.from_numpy(centres.unit)
    for query, rows in _batches(source, valid):
        rows_of = centres.row_of[labels[query]]  # (b, k)
        present = rows_of >= 0
        at = np.clip(rows_of, 0, None)
        dots = torch.einsum("bd,bjd->bj", torch.from_numpy(rows), unit[torch.from_numpy(at)]).numpy().astype(np.float64)
        norm, count = centres.norm[at], centres.count[at]
        mine = member[query][:, None] & (np.arange(k)[None, :] == centres.mode[query][:, None])
        with np.errstate(invalid="ignore", divide="ignore"):
            raw = dots * norm  # e · S
            loo = (raw - 1.0) / np.sqrt(np.maximum(norm ** 2 - 2.0 * raw + 1.0, 0.0))
        cos = np.where(mine, np.where(count > 1, loo, np.nan), dots)
        cos = np.where(present, cos, np.nan)
        defined = ~np.isnan(cos).all(1)
        own[query[defined]] = np.nanmax(cos[defined], axis=1)
        scores, found = index.search(rows, neighbours)
        found_label = np.where(found >= 0, centres.label[np.clip(found, 0, None)], -1)
        usable = (found >= 0) & (found_label != labels[query][:, None])
        best = np.where(usable, scores, -np.inf).argmax(1)
        got = usable[np.arange(len(query)), best]
        other[query[got]] = scores[np.arange(len(query)), best][got]
        other_label[query[got]] = found_label[np.arange(len(query)), best][got]
    return own, other, other_label


def profile_embeddings(embeddings, labels, threshold: float, *, far: float, model: str,
                       duplicate_cosine: float = DUPLICATE_COSINE, max_centres: int = 2,
                       identity_names: list[str] | None = None, sources: list[str] | None = None,
                       valid: np.ndarray | None = None, content_hashes: np.ndarray | None = None,
                       problems: list[dict] = (), set_name: str = "embeddings", kmeans_iterations: int = 5,
                       chunk_size: int = 65536, exact_search_limit: int = 50_000) -> NoiseProfile:
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
    own, other, other_label = _score(source, labels, valid, member, centres, exact_search_limit)

    status = np.full(n, Status.CLEAN, dtype=np.uint8)
    with np.errstate(invalid="ignore"):
        is_flip = (other >= threshold) & ~(own >= other)
        is_outlier = (own < threshold) & ~(other >= threshold)
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
        problems=notes)
    summary = profile.summary()
    logger.info("%s: %d images profiled in %.1f s: %d flips, %d outliers, %d duplicates, %d unreadable", set_name, n,
                time.perf_counter() - started, summary["flip"], summary["outlier"], summary["duplicate"],
                summary["unreadable"])
    return profile
