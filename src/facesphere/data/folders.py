"""Data sets of image files on disk: the shared file-backed base class and the one-folder-per-identity layout."""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from facesphere.data.ages import AGE, AGE_FILE, age_targets, check_ages, declared_ages, folder_ages
from facesphere.data.images import DEFAULT_MAX_PIXELS, ImageError, load_image, to_tensor
from facesphere.data.transforms import SampleAugment, SharedEpoch, resize_to

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
"""Files a folder listing takes as images: the formats ``load_image`` decodes (a GIF gives its first frame),
the same whether a file is named directly or found in a folder."""


@dataclass(frozen=True)
class Skipped:
    """A folder entry a listing did not take, and why (``hidden``, ``unsupported file type .txt``, ...)."""

    path: Path
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"source": str(self.path), "skipped": self.reason}


def list_images(folder: str | os.PathLike, recursive: bool = True,
                extensions: Iterable[str] = IMAGE_EXTENSIONS) -> tuple[list[Path], list[Skipped]]:
    """The image files in ``folder`` (sorted; sub-folders too when ``recursive``) and every entry left out, with why.

    Hidden entries (names starting with ".") are left out, a hidden folder as one entry; files whose extension
    is not in ``extensions`` (case-insensitive) and entries that are neither files nor folders are left out too.
    Every folder listing of the toolkit goes through here, so each reports what it skipped the same way.
    """
    extensions = _normalise_extensions(extensions)
    images: list[Path] = []
    skipped: list[Skipped] = []
    pending = [Path(folder)]
    while pending:
        for entry in sorted(pending.pop().iterdir()):
            if _is_hidden(entry):
                skipped.append(Skipped(entry, "hidden folder" if entry.is_dir() else "hidden file"))
            elif entry.is_dir():
                if recursive:
                    pending.append(entry)
                else:
                    skipped.append(Skipped(entry, "folder"))
            elif not entry.is_file():
                skipped.append(Skipped(entry, "not a regular file"))
            elif entry.suffix.lower() not in extensions:
                skipped.append(Skipped(entry, f"unsupported file type {entry.suffix.lower() or '(no extension)'}"))
            else:
                images.append(entry)
    return sorted(images), sorted(skipped, key=lambda s: s.path)


def log_skipped(folder: str | os.PathLike, skipped: Sequence[Skipped]) -> None:
    """One warning line summing up what a listing of ``folder`` skipped, e.g.
    "skipped 3 files in F: 2 unsupported file type (.gif, .txt), 1 hidden file"."""
    if not skipped:
        return
    kinds: Counter[str] = Counter()
    types: dict[str, set[str]] = {}
    for item in skipped:
        kind, _, detail = item.reason.partition(" file type ")
        kind = f"{kind} file type" if detail else kind
        kinds[kind] += 1
        if detail:
            types.setdefault(kind, set()).add(detail)
    parts = [f"{count} {kind}" + (f" ({', '.join(sorted(types[kind]))})" if kind in types else "")
             for kind, count in sorted(kinds.items())]
    logger.warning("skipped %d entr%s in %s: %s", len(skipped), "y" if len(skipped) == 1 else "ies", folder,
                   ", ".join(parts))


class EncodedImagesDataset(Dataset):
    """Labelled encoded images decoded on access: the shared base of file-backed and record-backed data sets.

    Subclasses provide ``decode(index)`` (the stored image as HxWx3 uint8 RGB) and ``source(index)`` (what
    error messages name); this class does the rest the same way for all of them: every image is brought
    to ``image_size`` (H, W), resized when it differs or rejected with an ``ImageError`` when ``strict``
    (``image_size=None``: the size of the first image), and augmentation is seeded by (seed, epoch, index)
    only, so it does not depend on workers or ranks.

    ``ages`` (float, NaN where unknown; see :mod:`facesphere.data.ages`) makes the set offer the ``age`` target:
    ``target_names`` gains ``"age"``, every sample's targets ``"age"`` and ``"age_mask"``, and ``ages`` holds
    them as float64 (N,). Without (``ages=None``) the set offers the label only and ``ages`` is None.
    ``augment.misalign`` adds the ``aligned`` target (``facesphere.data.transforms.SampleAugment``).
    """

    def __init__(
        self,
        labels: Sequence[int] | np.ndarray,
        num_classes: int,
        image_size: tuple[int, int] | None = None,
        augment: Any = None,
        seed: int = 0,
        strict: bool = False,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        ages: Sequence[float] | np.ndarray | None = None,
    ) -> None:
        self.labels = np.asarray(labels, dtype=np.int64)
        if not len(self.labels):
            raise ValueError("no images")
        self.ages = None if ages is None else check_ages(ages, len(self.labels))
        self.num_classes = int(num_classes)
        if self.labels.min() < 0 or self.labels.max() >= self.num_classes:
            raise ValueError(f"labels must lie in [0, {self.num_classes}), got [{self.labels.min()}, {self.labels.max()}]")
        self.seed = int(seed)
        self.strict = bool(strict)
        self.max_pixels = max_pixels
        self.augment = augment
        self._augment = SampleAugment(augment)
        self.target_names = ("label", *((AGE,) if self.ages is not None else ()), *self._augment.target_names)
        self._epoch = SharedEpoch(0)
        if image_size is None:
            first = self.decode(0)
            image_size = (int(first.shape[0]), int(first.shape[1]))
            logger.info("image size %dx%d taken from %s", image_size[0], image_size[1], self.source(0))
        self.image_size = (int(image_size[0]), int(image_size[1]))

    def decode(self, index: int) -> np.ndarray:
        """Stored image ``index`` as HxWx3 uint8 RGB, neither resized nor augmented."""
        raise NotImplementedError

    def source(self, index: int) -> str:
        """Where image ``index`` comes from, for messages (a path, ``file#key``, ...)."""
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def epoch(self) -> int:
        return self._epoch.get()

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation of ``epoch``; visible to persistent DataLoader workers too."""
        self._epoch.set(epoch)

    def load_uint8(self, index: int) -> np.ndarray:
        """Sample ``index`` as an HxWx3 uint8 RGB array at ``image_size``, augmented for the current epoch."""
        return self.load_pair(index)[0]

    def load_pair(self, index: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """(input, extras) of sample ``index``: the augmented uint8 RGB image at ``image_size`` and, with
        ``augment.misalign``, the targets ``aligned`` (the image before the misalignment) and ``misalignment``
        (``SampleAugment``); else ``{}``."""
        index = int(index)
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        image = self.decode(index)
        if image.shape[:2] != self.image_size:
            if self.strict:
                raise ImageError(
                    self.source(index),
                    f"size {image.shape[0]}x{image.shape[1]} differs from the expected {self.image_size[0]}x{self.image_size[1]}",
                )
            image = resize_to(image, self.image_size)
        return self._augment(image, self.seed, self.epoch, index)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        image, extras = self.load_pair(index)
        targets: dict[str, Any] = {"label": int(self.labels[index])}
        if self.ages is not None:
            targets.update(age_targets(self.ages, index))
        targets.update(self._augment.tensors(extras))
        return to_tensor(image), targets

    def verify(self) -> list[ImageError]:
        """Decode every image once and return the errors (empty when all images are readable)."""
        errors = []
        for index in range(len(self)):
            try:
                self.decode(index)
            except ImageError as error:
                errors.append(error)
        return errors


class ImageFilesDataset(EncodedImagesDataset):
    """Labelled image files, decoded on access; the base of ``ImageFolderDataset`` and ``ImageListDataset``.

    Every image is brought to ``image_size`` (H, W): resized when it differs, or rejected with an
    ``ImageError`` when ``strict``. With ``image_size=None`` the size of the first image is used.
    Augmentation is seeded by (seed, epoch, index) only, so it does not depend on workers or ranks.
    """

    def __init__(
        self,
        paths: Sequence[Path],
        labels: Sequence[int] | np.ndarray,
        num_classes: int,
        image_size: tuple[int, int] | None = None,
        augment: Any = None,
        seed: int = 0,
        strict: bool = False,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        ages: Sequence[float] | np.ndarray | None = None,
    ) -> None:
        if len(paths) != len(labels):
            raise ValueError(f"{len(paths)} paths but {len(labels)} labels")
        if not paths:
            raise ValueError("no images")
        self.paths = [Path(p) for p in paths]
        super().__init__(labels, num_classes, image_size, augment, seed, strict, max_pixels, ages)

    @property
    def samples(self) -> list[tuple[Path, int]]:
        return list(zip(self.paths, self.labels.tolist()))

    def decode(self, index: int) -> np.ndarray:
        return load_image(self.paths[index], self.max_pixels)

    def source(self, index: int) -> str:
        return str(self.paths[index])


def _is_hidden(path: Path) -> bool:
    return path.name.startswith(".")


def _normalise_extensions(extensions: Iterable[str]) -> tuple[str, ...]:
    return tuple(e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions)


class ImageFolderDataset(ImageFilesDataset):
    """``root/<class>/<image>``: one sub-folder per identity.

    Classes are the non-empty sub-folders sorted by name (label = position in ``classes``); files in a
    class are sorted by name and filtered by extension (case-insensitive). Hidden entries, files directly
    under the root, other files and nested folders are left out and listed in ``skipped`` (one warning line
    sums them up), folders without images are skipped with a warning, and a root without any image is an error.
    ``ages`` says where the images' ages come from (``facesphere.data.ages.FOLDER_AGE_SOURCES``): ``none``,
    ``side_file`` (``root/ages.csv``, an error when absent) or ``fgnet_names`` (``SSSAyy[x].JPG`` names).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        image_size: tuple[int, int] | None = None,
        augment: Any = None,
        seed: int = 0,
        extensions: Iterable[str] = IMAGE_EXTENSIONS,
        strict: bool = False,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        ages: str = "none",
    ) -> None:
        self.root = Path(root)
        if not self.root.exists():
            raise FileNotFoundError(f"image folder {self.root} does not exist")
        if not self.root.is_dir():
            raise NotADirectoryError(f"image folder {self.root} is not a directory")
        extensions = _normalise_extensions(extensions)
        entries = sorted(p for p in self.root.iterdir() if not _is_hidden(p))
        self.skipped: list[Skipped] = [Skipped(p, "hidden file" if p.is_file() else "hidden folder")
                                       for p in sorted(self.root.iterdir()) if _is_hidden(p)]
        self.skipped += [Skipped(p, "file directly under the root (not in a class folder)")
                         for p in entries if not p.is_dir() and not (ages == "side_file" and p.name == AGE_FILE)]
        classes: list[str] = []
        paths: list[Path] = []
        labels: list[int] = []
        for folder in (p for p in entries if p.is_dir()):
            files, skipped = list_images(folder, recursive=False, extensions=extensions)
            self.skipped += skipped
            if not files:
                logger.warning("%s: skipping class folder without images", folder)
                continue
            label = len(classes)
            classes.append(folder.name)
            paths.extend(files)
            labels.extend([label] * len(files))
        self.skipped.sort(key=lambda s: s.path)
        log_skipped(self.root, self.skipped)
        if not paths:
            raise ValueError(f"no images with extensions {', '.join(extensions)} in class sub-folders of {self.root}")
        self.classes = classes
        self.class_to_index = {name: i for i, name in enumerate(classes)}
        self.age_source = ages
        found = declared_ages(folder_ages(self.root, paths, ages), str(self.root))
        super().__init__(paths, labels, len(classes), image_size, augment, seed, strict, max_pixels, found)
        logger.info("%s: %d images in %d classes", self.root, len(paths), len(classes))

    def __repr__(self) -> str:
        return f"ImageFolderDataset(root={str(self.root)!r}, images={len(self)}, classes={self.num_classes}, image_size={self.image_size})"
