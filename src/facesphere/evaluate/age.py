"""Cross-age protocols: CACD-VS verification and FG-NET identification / verification.

**CACD-VS** (Chen, Chen and Hsu, "Cross-Age Reference Coding", ECCV 2014): 4,000 pairs of 250x250
celebrity photos, files ``NNNN_0.jpg`` / ``NNNN_1.jpg`` for pair NNNN. Fold f (1-based, as the data's
"fold1") holds pairs 400(f-1) .. 400f-1; in each fold the first 200 are genuine, the last 200 impostor.
Labels and folds therefore come from the file numbers, and any subset of complete folds can be
evaluated: with two or more folds, the usual leave-one-fold-out accuracy over the folds present; with a
single fold (the shared copy has only fold 1) the threshold is chosen by 10-fold cross-validation
*within* it, on stratified sub-folds (the k-th genuine and the k-th impostor pair go to sub-fold k mod
10, so each holds 20 + 20 pairs). The photos are not aligned: pass ``align`` (uint8 RGB photo -> aligned
crop, or None when no face is found); without it a centre crop is resized, which is only good for smoke tests.

**FG-NET**: 1,002 photos of 82 people aged 0-69; ``SSSAyy[x].JPG`` = subject SSS at age yy (x = a/b
for two photos at one age) and 68 manual landmarks per photo in ``points/sssayy[x].pts`` (iBUG .pts,
0-based indices; FG-NET's own markup, not iBUG's, see ``FGNET_FIVE``). FG-NET is evaluated
leave-one-out, or as the FG-NET probe set of MegaFace with 1M distractors (Kemelmacher-Shlizerman et
al., arXiv 1512.00596, §4). The "leave-one-person-out" protocol of age-invariant FR trains on 81 people and
tests on the 82nd; for a model that never trains on FG-NET the training side is void, and what is
left is the leave-one-image-out search used by the published rank-1 figures: each image in turn is
the probe and all 1,001 others the gallery (optionally ∪ distractors). That is
``fgnet_identification``. ``fgnet_verification_pairs`` builds cross-age pairs: every same-person pair
with an age gap >= ``min_age_gap``, and as many different-person pairs with the same minimum gap
(so only identity differs between the classes), drawn uniformly with a fixed seed.

Fine-tuning on FG-NET (the leave-one-person-out protocol above, coarsened to k folds of people) needs
people the model never trained on: ``fgnet_subject_folds`` splits the 82 subjects into k
subject-disjoint folds, and ``subset=`` restricts ``fgnet_identification`` / ``fgnet_verification`` to one
fold's images (``fgnet_verification_pairs`` takes that fold's image list).

Alignment without a detector: FG-NET's 68 points reduce to the 5 ArcFace points
(``fgnet_five_points``) and ``align_similarity`` warps with the least-squares similarity (Umeyama)
onto the ArcFace 112x112 template (``facesphere.align.similarity``).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from facesphere.align.similarity import align_similarity
from facesphere.align.templates import template_for_size
from facesphere.data.images import load_image
from facesphere.data.transforms import resize_to
from facesphere.utils.files import check_text_size

logger = logging.getLogger(__name__)

MAX_PTS_BYTES = 1 << 20  # a 68-point file is about 1 kB

__all__ = [
    "CACD_FOLD_SIZE",
    "AlignedLoader",
    "FGNetImage",
    "cacd_vs_cv_folds",
    "evaluate_cacd_vs",
    "fgnet_five_points",
    "fgnet_identification",
    "fgnet_loader",
    "fgnet_subject_folds",
    "fgnet_verification",
    "fgnet_verification_pairs",
    "parse_cacd_vs",
    "parse_fgnet",
    "read_pts",
]

def _centre_crop(image: np.ndarray, fraction: float, size: tuple[int, int]) -> np.ndarray:
    h, w = image.shape[:2]
    side = max(1, int(round(min(h, w) * fraction)))
    y0, x0 = (h - side) // 2, (w - side) // 2
    return resize_to(np.ascontiguousarray(image[y0 : y0 + side, x0 : x0 + side]), size)


class AlignedLoader:
    """source -> aligned HxWx3 uint8: ``load_image`` then ``align``; a centre crop when there is no align.

    ``align(image)`` returns the aligned crop, or None when it finds no face; those images fall back to
    the centre crop and are counted in ``failures`` (reported by the protocols).
    """

    def __init__(self, align: Callable[[np.ndarray], np.ndarray | None] | None, size=(112, 112),
                 crop_fraction: float = 0.6) -> None:
        self.align, self.size, self.crop_fraction = align, (int(size[0]), int(size[1])), crop_fraction
        self.failures = 0

    def __call__(self, source: Any) -> np.ndarray:
        image = source if isinstance(source, np.ndarray) else load_image(source)
        if self.align is not None:
            out = self.align(image)
            if out is not None:
                return out
            self.failures += 1
            logger.debug("no face aligned in %s; using the centre crop", source)
        return _centre_crop(image, self.crop_fraction, self.size)


# --------------------------------------------------------------------------- CACD-VS

CACD_FOLD_SIZE = 400
_CACD_NAME = re.compile(r"^(\d{4})_([01])\.jpg$", re.IGNORECASE)


def _cacd_dir(root: Path) -> Path:
    return root / "CACD_VS" if (root / "CACD_VS").is_dir() else root


def parse_cacd_vs(root: str | os.PathLike, name: str = "cacd_vs"):
    """The CACD-VS pairs present under ``root`` (or ``root/CACD_VS``) as a ``PairSet``; folds 1..10.

    Both files of every pair must exist; a fold with fewer than 400 pairs is evaluated but logged.
    """
    from facesphere.evaluate.pairsets import PairSet

    folder = _cacd_dir(Path(root))
    if not folder.is_dir():
        raise FileNotFoundError(f"CACD-VS folder {folder} does not exist")
    halves: dict[int, dict[int, Path]] = {}
    for entry in folder.iterdir():
        m = _CACD_NAME.match(entry.name)
        if m:
            halves.setdefault(int(m.group(1)), {})[int(m.group(2))] = entry
    if not halves:
        raise ValueError(f"no CACD-VS images (NNNN_0.jpg / NNNN_1.jpg) in {folder}")
    broken = sorted(k for k, v in halves.items() if len(v) != 2)
    if broken:
        raise FileNotFoundError(f"{len(broken)} CACD-VS pair(s) miss one image, e.g. pair {broken[0]:04d} in {folder}")
    ids = np.array(sorted(halves), dtype=np.int64)
    folds = ids // CACD_FOLD_SIZE + 1
    same = (ids % CACD_FOLD_SIZE) < CACD_FOLD_SIZE // 2
    for fold, count in zip(*np.unique(folds, return_counts=True)):
        if count != CACD_FOLD_SIZE:
            logger.warning("CACD-VS fold %d has %d of %d pairs", fold, count, CACD_FOLD_SIZE)
    p1 = [halves[int(k)][0] for k in ids]
    p2 = [halves[int(k)][1] for k in ids]
    ps = PairSet.from_path_pairs(p1, p2, same, folds, name=name)
    logger.info("%s: %d pairs (%d genuine) in fold(s) %s", folder, len(ps), int(same.sum()), sorted(set(folds.tolist())))
    return ps


def cacd_vs_cv_folds(same, folds, n_sub: int = 10) -> np.ndarray:
    """Fold ids for the k-fold protocol: the official folds when >= 2 are present, else stratified sub-folds.

    Sub-fold of a pair = its position among the pairs of its class (file order) mod ``n_sub``.
    """
    same = np.asarray(same, dtype=bool)
    folds = np.asarray(folds)
    if np.unique(folds).size >= 2:
        return folds
    sub = np.empty(same.size, dtype=np.int64)
    for cls in (True, False):
        idx = np.flatnonzero(same == cls)
        sub[idx] = np.arange(idx.size) % n_sub
    return sub


def evaluate_cacd_vs(model, root: str | os.PathLike, *, align: Callable[[np.ndarray], np.ndarray | None] | None = None,
                     size: tuple[int, int] = (112, 112), preprocess=None, out_dir=None, **kwargs) -> dict:
    """CACD-VS accuracy over the folds present (module doc); ``kwargs`` go to ``evaluate_pairset``.

    ``embeddings`` (one row per image of ``parse_cacd_vs(root)``, e.g. crops detected and aligned once and
    embedded by several models) skips loading, aligning and embedding.
    """
    from facesphere.evaluate.pairset_eval import evaluate_pairset

    ps = parse_cacd_vs(root)
    loader = AlignedLoader(align, size)
    ps.loader = loader
    folds = cacd_vs_cv_folds(ps.same, ps.folds)
    single = np.unique(ps.folds).size == 1
    report = evaluate_pairset(model, ps, preprocess=preprocess, folds=folds, out_dir=out_dir, **kwargs)
    report["cacd_folds"] = sorted(int(f) for f in np.unique(ps.folds))
    report["fold_scheme"] = "10 stratified sub-folds within the single fold" if single else "leave-one-official-fold-out"
    if kwargs.get("embeddings") is not None:  # the caller embedded the photos, aligned its own way
        report["alignment"] = "by the caller (embeddings given)"
        return report
    report["alignment"] = "align callable" if align is not None else "none (centre crop: not comparable to published numbers)"
    report["align_failures"] = loader.failures
    if align is None:
        logger.warning("CACD-VS evaluated without face alignment: numbers are for smoke tests only")
    return report


# --------------------------------------------------------------------------- FG-NET

from facesphere.data.ages import FGNET_NAME as _FGNET_NAME  # noqa: E402 (the data layer owns the name pattern)


@dataclass(frozen=True)
class FGNetImage:
    """One FG-NET photo: file, landmark file (None if absent), subject id, age in years, a/b tag."""

    path: Path
    points_path: Path | None
    subject: int
    age: int
    tag: str = ""

    @property
    def stem(self) -> str:
        return self.path.stem


def parse_fgnet(root: str | os.PathLike, require_points: bool = True) -> list[FGNetImage]:
    """All photos under ``root/images`` (sorted by name) with subject, age and ``root/points`` landmarks."""
    root = Path(root)
    images_dir = root / "images" if (root / "images").is_dir() else root
    points_dir = root / "points"
    files = sorted(p for p in images_dir.iterdir() if p.is_file() and not p.name.startswith("."))
    out, skipped = [], []
    points = {p.stem.lower(): p for p in points_dir.glob("*.pts")} if points_dir.is_dir() else {}
    for path in files:
        m = _FGNET_NAME.match(path.name)
        if not m:
            skipped.append(path.name)
            continue
        pts = points.get(path.stem.lower())
        if pts is None and require_points:
            raise FileNotFoundError(f"no landmark file for {path.name} in {points_dir} (expected {path.stem.lower()}.pts)")
        out.append(FGNetImage(path, pts, int(m.group(1)), int(m.group(2)), m.group(3).lower()))
    if skipped:
        logger.warning("%s: ignored %d file(s) not named SSSAyy[x].JPG, e.g. %s", images_dir, len(skipped), skipped[0])
    if not out:
        raise ValueError(f"no FG-NET images in {images_dir}")
    logger.info("%s: %d images of %d subjects, ages %d-%d", images_dir, len(out), len({i.subject for i in out}),
                min(i.age for i in out), max(i.age for i in out))
    return out


def read_pts(path: str | os.PathLike) -> np.ndarray:
    """An iBUG ``.pts`` file (``version: 1``, ``n_points: N``, ``{`` x y lines ``}``) as (N, 2) float64."""
    path = check_text_size(path, MAX_PTS_BYTES)
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8", errors="replace").splitlines()]
    try:
        header = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[: lines.index("{")] if ":" in ln)}
        start, end = lines.index("{"), lines.index("}")
    except ValueError:
        raise ValueError(f"{path}: not an iBUG .pts file (missing '{{' or '}}')") from None
    try:
        pts = np.array([[float(v) for v in ln.split()] for ln in lines[start + 1 : end] if ln], dtype=np.float64)
    except ValueError as error:
        raise ValueError(f"{path}: bad coordinate line ({error})") from None
    if pts.ndim != 2 or pts.shape[1] != 2:
        raise ValueError(f"{path}: expected 'x y' lines, got shape {pts.shape}")
    if not np.isfinite(pts).all():
        raise ValueError(f"{path}: coordinates must be finite numbers (found nan or inf)")
    expected = header.get("n_points")
    if expected is not None and (not expected.isdecimal() or int(expected) != pts.shape[0]):
        raise ValueError(f"{path}: header says n_points {expected[:20]!r}, found {pts.shape[0]} points")
    return pts


FGNET_FIVE = (31, 36, 67, 48, 54)
"""FG-NET's own 68-point markup (not iBUG's): 31 and 36 are the pupils (image-left eye first), 67 the
nose tip, 48 and 54 the image-left and image-right mouth corners. Its eye contours are 27-30 and
32-35, jaw 0-14, brows 15-26, nose 37-47 and 67, mouth 48-66 (checked by drawing the indices)."""


def fgnet_five_points(pts68) -> np.ndarray:
    """FG-NET's 68 manual points (0-based) -> the 5 template points: pupils 31 and 36, nose tip 67, mouth 48, 54."""
    p = np.asarray(pts68, dtype=np.float64)
    if p.shape != (68, 2):
        raise ValueError(f"expected (68, 2) landmarks, got {p.shape}")
    return p[list(FGNET_FIVE)]


def fgnet_loader(size: tuple[int, int] = (112, 112), align: Callable[[np.ndarray], np.ndarray | None] | None = None):
    """FGNetImage -> aligned crop: the 68 landmarks (default) or an external ``align`` callable."""
    if align is not None:
        external = AlignedLoader(align, size)
        return lambda item: external(item.path)
    template = template_for_size(size).points

    def load(item: FGNetImage) -> np.ndarray:
        if item.points_path is None:
            raise FileNotFoundError(f"{item.path.name} has no landmark file")
        return align_similarity(load_image(item.path), fgnet_five_points(read_pts(item.points_path)), template, size)

    return load


def fgnet_subject_folds(images: Sequence[FGNetImage], k: int = 5, seed: int = 0) -> np.ndarray:
    """Fold id (0..k-1) per image, subject-disjoint: the sorted subjects, permuted with ``seed``, cut into ``k``
    contiguous runs whose sizes differ by at most one (FG-NET: 82 people -> 17, 16, 17, 16, 16).

    For fine-tuning on FG-NET (train on k-1 folds, test on the people of the k-th) every photo of a person
    lands in the same fold, so no test identity is seen in training.
    """
    subjects = np.array([im.subject for im in images], dtype=np.int64)
    unique = np.unique(subjects)
    if not 2 <= k <= unique.size:
        raise ValueError(f"k must be between 2 and the number of subjects ({unique.size}), got {k}")
    order = np.random.default_rng(seed).permutation(unique.size)
    fold_of = np.empty(unique.size, dtype=np.int64)
    fold_of[order] = np.arange(unique.size) * k // unique.size
    return fold_of[np.searchsorted(unique, subjects)]


def _fgnet_selection(root, align, subset, embeddings) -> tuple[list[FGNetImage], np.ndarray | None]:
    """The ``parse_fgnet`` images in ``subset`` (a boolean mask over them or their indices; None: all) and their
    rows of ``embeddings`` (one row per ``parse_fgnet`` image; None stays None)."""
    images = parse_fgnet(root, require_points=align is None)
    n = len(images)
    if embeddings is not None:
        embeddings = np.asarray(embeddings)
        if embeddings.shape[0] != n:
            raise ValueError(f"{embeddings.shape[0]} embeddings for {n} FG-NET images")
    if subset is None:
        return images, embeddings
    keep = np.asarray(subset)
    if keep.dtype == bool:
        if keep.shape != (n,):
            raise ValueError(f"a boolean subset needs one entry per image ({n}), got shape {keep.shape}")
        keep = np.flatnonzero(keep)
    elif keep.ndim != 1 or not np.issubdtype(keep.dtype, np.integer) or (keep.size and (keep.min() < 0 or keep.max() >= n)):
        raise ValueError(f"subset must be a boolean mask or indices into the {n} images")
    keep = np.unique(keep)
    return [images[k] for k in keep], None if embeddings is None else embeddings[keep]


def fgnet_verification_pairs(images: Sequence[FGNetImage], min_age_gap: int = 10, seed: int = 0,
                             n_folds: int = 10, max_genuine: int | None = None, loader=None, name: str = "fgnet_cross_age"):
    """Cross-age pairs over FG-NET images as a ``PairSet`` (module doc); folds = position mod ``n_folds``.

    Genuine pairs (i < j, same subject, |age_i - age_j| >= min_age_gap) are all taken (or ``max_genuine``
    of them, drawn with ``seed``); impostor pairs, equal in number and with the same minimum gap, are
    drawn without replacement from all different-subject pairs. Both lists are in (i, j) order;
    the k-th pair of each class goes to fold k mod ``n_folds``. Folds are not identity-disjoint (only
    one threshold is fitted on them).
    """
    from facesphere.evaluate.pairsets import PairSet

    subj = np.array([im.subject for im in images])
    age = np.array([im.age for im in images])
    i, j = np.triu_indices(len(images), 1)
    gap_ok = np.abs(age[i] - age[j]) >= min_age_gap
    gen = np.flatnonzero(gap_ok & (subj[i] == subj[j]))
    imp = np.flatnonzero(gap_ok & (subj[i] != subj[j]))
    rng = np.random.default_rng(seed)
    if max_genuine is not None and gen.size > max_genuine:
        gen = np.sort(rng.choice(gen, size=max_genuine, replace=False))
    if gen.size == 0 or imp.size < gen.size:
        raise ValueError(f"age gap {min_age_gap}: {gen.size} genuine and {imp.size} impostor pairs available")
    imp = np.sort(rng.choice(imp, size=gen.size, replace=False))
    chosen = np.concatenate([gen, imp])
    same = np.r_[np.ones(gen.size, bool), np.zeros(imp.size, bool)]
    folds = np.r_[np.arange(gen.size) % n_folds, np.arange(imp.size) % n_folds]
    ps = PairSet(name, list(images), i[chosen], j[chosen], same, folds, loader=loader or fgnet_loader())
    logger.info("FG-NET cross-age pairs (gap >= %d): %d genuine + %d impostor", min_age_gap, gen.size, imp.size)
    return ps


def _embed_fgnet(model, images, size, align, preprocess, embed_kwargs) -> np.ndarray:
    from facesphere.evaluate.embeddings import embed_images

    load = fgnet_loader(size, align)
    return embed_images(model, len(images), lambda k: load(images[k]), preprocess=preprocess, **embed_kwargs)


def fgnet_identification(model, root: str | os.PathLike, *, size: tuple[int, int] = (112, 112), align=None,
                         preprocess=None, distractors=None, embeddings: np.ndarray | None = None, subset=None,
                         **embed_kwargs) -> dict:
    """Leave-one-image-out identification on FG-NET (module doc): rank-1/5/10 and the CMC.

    Also splits rank-1 by the probe's age (0-9, 10-19, ..., 60+) since children are the hard case.
    ``embeddings`` (one row per ``parse_fgnet`` image) skips the embedding pass. ``subset`` (a boolean mask
    over the ``parse_fgnet`` images, or their indices, e.g. ``fgnet_subject_folds(...) == f``) restricts
    probes and gallery to those images: the test fold's people after fine-tuning on the others.
    """
    from facesphere.evaluate.identification import _cmc_from, search

    images, emb = _fgnet_selection(root, align, subset, embeddings)
    if emb is None:
        emb = _embed_fgnet(model, images, size, align, preprocess, embed_kwargs)
    subjects = np.array([im.subject for im in images])
    res = search(emb, subjects, emb, subjects, distractors, exclude=np.arange(len(images)))
    n_d = 0 if distractors is None else int(np.asarray(distractors).shape[0])
    result = _cmc_from(res, len(images) - 1, n_d, skip_unmated=True)
    ages = np.array([im.age for im in images])
    by_age = {}
    for lo in range(0, 70, 10):
        sel = (ages >= lo) & ((ages < lo + 10) if lo < 60 else True) & res.mated
        if sel.any():
            by_age[f"{lo}-{lo + 9}" if lo < 60 else "60+"] = float(np.mean(res.rank[sel] == 1))
    out = {"protocol": "fgnet leave-one-image-out identification", "num_subjects": int(np.unique(subjects).size),
           **result.to_dict(), "rank_1_by_probe_age": by_age}
    logger.info("FG-NET identification: rank-1 %.4f over %d probes", out["rank_1"], out["num_probes"])
    return out


def fgnet_verification(model, root: str | os.PathLike, *, min_age_gap: int = 10, seed: int = 0,
                       size: tuple[int, int] = (112, 112), align=None, preprocess=None, out_dir=None,
                       subset=None, embeddings: np.ndarray | None = None, **kwargs) -> dict:
    """Cross-age verification on FG-NET pairs (``fgnet_verification_pairs``), via ``evaluate_pairset``.

    ``subset`` (mask or indices over the ``parse_fgnet`` images) builds the pairs among those images only;
    ``embeddings`` (one row per ``parse_fgnet`` image) skips the embedding pass.
    """
    from facesphere.evaluate.pairset_eval import evaluate_pairset

    images, embeddings = _fgnet_selection(root, align, subset, embeddings)
    ps = fgnet_verification_pairs(images, min_age_gap=min_age_gap, seed=seed, loader=fgnet_loader(size, align))
    report = evaluate_pairset(model, ps, preprocess=preprocess, out_dir=out_dir, embeddings=embeddings, **kwargs)
    report.update(min_age_gap=int(min_age_gap), seed=int(seed))
    return report
