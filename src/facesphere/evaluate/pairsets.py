"""Pair sets: each distinct image once plus index pairs into that list, and the formats they are read from.

A ``PairSet`` holds each distinct image once plus index pairs into that list, so evaluation embeds
every image a single time however many pairs use it (LFW: 7,701 images for 6,000 pairs).

:data:`PAIRSET_FORMATS` is the one table of pair-set formats: name -> :class:`PairSetFormat` (file
suffixes it is recognised by, reader and its options). :func:`load_pairset` reads through it, and
each format is also an evaluation protocol of the same name (``evaluate.protocols``).
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from facesphere.data.images import load_image
from facesphere.evaluate.pairs_csv import read_pairs_csv
from facesphere.registry import Registry

logger = logging.getLogger(__name__)

__all__ = ["PAIRSET_FORMATS", "PairSet", "PairSetFormat", "load_pairset", "pairset_format", "read_pairs_csv"]


def _default_load(source: Any) -> np.ndarray:
    if isinstance(source, np.ndarray):
        return source
    return load_image(source)


@dataclass
class PairSet:
    """Distinct images plus index pairs into them.

    Attributes:
        name: used in reports and plot legends.
        images: one source per distinct image: a path, an HxWx3 uint8 array, or anything ``loader`` takes.
        left, right: (N,) int64 indices into ``images``; pair k is ``(images[left[k]], images[right[k]])``.
        same: (N,) bool, True for genuine pairs.
        folds: (N,) fold ids, or None for contiguous equal folds in pair order.
        loader: source -> HxWx3 uint8 RGB; default ``load_image`` for paths, identity for arrays.
    """

    name: str
    images: Sequence[Any]
    left: np.ndarray
    right: np.ndarray
    same: np.ndarray
    folds: np.ndarray | None = None
    loader: Callable[[Any], np.ndarray] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.left = np.asarray(self.left, dtype=np.int64)
        self.right = np.asarray(self.right, dtype=np.int64)
        self.same = np.asarray(self.same, dtype=bool)
        n = self.same.shape[0]
        if self.same.ndim != 1 or self.left.shape != (n,) or self.right.shape != (n,):
            raise ValueError(f"left, right and same must be 1-D of equal length, got {self.left.shape}, "
                             f"{self.right.shape}, {self.same.shape}")
        if n == 0:
            raise ValueError(f"pair set {self.name!r} has no pairs")
        m = len(self.images)
        if min(self.left.min(), self.right.min()) < 0 or max(self.left.max(), self.right.max()) >= m:
            raise ValueError(f"pair indices out of range for {m} images")
        if self.folds is not None:
            self.folds = np.asarray(self.folds, dtype=np.int64)
            if self.folds.shape != (n,):
                raise ValueError(f"folds must have one id per pair, got shape {self.folds.shape}")

    def __len__(self) -> int:
        return int(self.same.shape[0])

    @property
    def num_images(self) -> int:
        return len(self.images)

    def load(self, index: int) -> np.ndarray:
        """Image ``index`` as HxWx3 uint8 RGB."""
        return (self.loader or _default_load)(self.images[index])

    def image_name(self, index: int) -> str:
        """A short name for captions: the file stem for paths (or sources with a ``stem``), ``#index`` otherwise."""
        source = self.images[index]
        if isinstance(source, (str, os.PathLike)):
            return Path(source).stem
        stem = getattr(source, "stem", None)
        return stem if isinstance(stem, str) else f"#{index}"

    # ------------------------------------------------------------------ constructors

    @classmethod
    def from_path_pairs(cls, paths1: Sequence, paths2: Sequence, same, folds=None, name: str = "pairs",
                        loader: Callable[[Any], np.ndarray] | None = None) -> PairSet:
        """Deduplicate the images of two parallel path lists (by resolved path) into a ``PairSet``."""
        if len(paths1) != len(paths2):
            raise ValueError(f"{len(paths1)} left paths but {len(paths2)} right paths")
        index: dict[str, int] = {}
        images: list[Path] = []

        def slot(p) -> int:
            key = os.path.normpath(os.path.abspath(os.fspath(p)))
            if key not in index:
                index[key] = len(images)
                images.append(Path(p))
            return index[key]

        left = [slot(p) for p in paths1]
        right = [slot(p) for p in paths2]
        return cls(name, images, np.array(left), np.array(right), same, folds, loader)

    @classmethod
    def from_lfw(cls, pairs_path: str | os.PathLike, root: str | os.PathLike, name: str = "lfw",
                 ext: str = ".jpg", check: bool = True) -> PairSet:
        """The LFW protocol: ``pairs.txt`` over the image folder ``root``, with its 10 folds."""
        from facesphere.evaluate.lfw import lfw_pair_paths

        p1, p2, same, folds = lfw_pair_paths(pairs_path, root, ext=ext, check=check)
        ps = cls.from_path_pairs(p1, p2, same, folds, name=name)
        logger.info("%s: %d pairs over %d distinct images", name, len(ps), ps.num_images)
        return ps

    @classmethod
    def from_bin(cls, path: str | os.PathLike, name: str | None = None,
                 image_size: tuple[int, int] | None = None) -> PairSet:
        """An InsightFace ``.bin`` (safe reader): identical encodings become one image; folds contiguous."""
        from facesphere.evaluate.binsets import load_bin

        images, issame, slots = load_bin(path, image_size=image_size, dedupe=True)
        return cls(name or Path(path).stem, images, slots[0::2], slots[1::2], issame, None)

    @classmethod
    def from_csv(cls, path: str | os.PathLike, root: str | os.PathLike | None = None, name: str | None = None,
                 check: bool = True) -> PairSet:
        """A CSV of ``path1,path2,same[,fold]`` rows (see ``read_pairs_csv``)."""
        p1, p2, same, folds = read_pairs_csv(path, root=root, check=check)
        return cls.from_path_pairs(p1, p2, same, folds, name=name or Path(path).stem)


# --------------------------------------------------------------------------- formats


@dataclass(frozen=True)
class PairSetFormat:
    """One pair-set format: recognised by ``suffixes``, read by ``read(path, **options) -> PairSet``."""

    name: str
    suffixes: tuple[str, ...]
    read: Callable[..., PairSet]

    def __call__(self, path: str | os.PathLike, **options) -> PairSet:
        return self.read(path, **options)

    @property
    def options(self) -> frozenset[str]:
        """The keyword options ``read`` takes (besides the path)."""
        return frozenset(p.name for p in inspect.signature(self.read).parameters.values()
                         if p.kind is inspect.Parameter.KEYWORD_ONLY)

    @property
    def summary(self) -> str:
        return (self.read.__doc__ or "").strip().splitlines()[0]


PAIRSET_FORMATS: Registry[PairSet] = Registry("pair-set format")


def _format(name: str, *suffixes: str) -> Callable[[Callable[..., PairSet]], Callable[..., PairSet]]:
    def register(read: Callable[..., PairSet]) -> Callable[..., PairSet]:
        PAIRSET_FORMATS.register(name)(PairSetFormat(name, suffixes, read))
        return read

    return register


def _lfw_files(path: Path, pairs, root) -> tuple[Path, Path]:
    if path.is_file():  # the pairs file itself
        if root is None:
            raise ValueError("lfw: path is a pairs file, so pass root=<LFW image folder>")
        return path, Path(root)
    if pairs is not None:
        return Path(pairs), path
    for candidate in (path / "pairs.txt", path.parent / "pairs.txt"):
        if candidate.is_file():
            return candidate, path
    raise FileNotFoundError(f"lfw: no pairs.txt in {path} or its parent; pass pairs=<path to pairs.txt>")


@_format("lfw", ".txt")
def _read_lfw(path: str | os.PathLike, *, pairs: str | os.PathLike | None = None, root: str | os.PathLike | None = None,
             ext: str = ".jpg", check: bool = True) -> PairSet:
    """LFW 10-fold verification: path = aligned image folder (``pairs=`` pairs.txt) or pairs.txt (``root=``)."""
    pairs_path, image_root = _lfw_files(Path(path), pairs, root)
    return PairSet.from_lfw(pairs_path, image_root, ext=ext, check=check)


@_format("bin", ".bin")
def _read_bin(path: str | os.PathLike, *, image_size: tuple[int, int] | None = None) -> PairSet:
    """An InsightFace verification ``.bin`` (lfw.bin, cfp_fp.bin, agedb_30.bin): 10 contiguous folds."""
    return PairSet.from_bin(path, image_size=image_size)


@_format("csv", ".csv")
def _read_csv(path: str | os.PathLike, *, root: str | os.PathLike | None = None, check: bool = True) -> PairSet:
    """A CSV of ``path1,path2,same[,fold]`` (paths relative to ``root``, default the CSV's folder)."""
    return PairSet.from_csv(path, root=root, check=check)


def pairset_format(name: str) -> PairSetFormat:
    """The format registered as ``name`` (KeyError listing the known ones otherwise)."""
    return PAIRSET_FORMATS.get(name)  # type: ignore[return-value]


def load_pairset(path: str | os.PathLike, kind: str | None = None, **options) -> PairSet:
    """A ``PairSet`` read as format ``kind`` (a :data:`PAIRSET_FORMATS` name), or the one its suffix names.

    ``options`` are the format's own (e.g. ``root`` for LFW pairs files and CSVs).
    """
    if kind is None:
        suffix = Path(path).suffix.lower()
        matches = [n for n in PAIRSET_FORMATS.names() if suffix in pairset_format(n).suffixes]
        if len(matches) != 1:
            raise ValueError(f"cannot tell the pair-set format of {path}; pass kind= one of "
                             f"{', '.join(PAIRSET_FORMATS.names())}")
        kind = matches[0]
    return pairset_format(kind)(path, **options)
