"""Data sets described by a list file of ``relative/path.jpg label`` lines."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from facesphere.data.folders import ImageFilesDataset
from facesphere.data.images import DEFAULT_MAX_PIXELS

logger = logging.getLogger(__name__)


class ListFileError(ValueError):
    """A list file line that cannot be parsed; the message names the file and the line number."""

    def __init__(self, list_file: str | os.PathLike, line: int, reason: str) -> None:
        self.list_file = str(list_file)
        self.line = line
        self.reason = reason
        super().__init__(f"{self.list_file}:{line}: {reason}")

    def __reduce__(self):
        return (type(self), (self.list_file, self.line, self.reason))


def parse_list_file(list_file: str | os.PathLike) -> list[tuple[str, int]]:
    """Read ``(relative path, label)`` pairs.

    Each line is a path and an integer label separated by whitespace; the label is the last field, so
    paths may contain spaces. Blank lines and lines starting with ``#`` are skipped, as is a trailing
    `` # comment``. Raises ``ListFileError`` (with the line number) for malformed lines or negative labels.
    """
    list_file = Path(list_file)
    entries: list[tuple[str, int]] = []
    with open(list_file, encoding="utf-8") as handle:
        for number, raw in enumerate(handle, start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            if " #" in line or "\t#" in line:
                line = line[: min(i for i in (line.find(" #"), line.find("\t#")) if i >= 0)].rstrip()
            fields = line.rsplit(None, 1)
            if len(fields) != 2:
                raise ListFileError(list_file, number, f"expected '<path> <label>', got {raw.strip()!r}")
            path, label_text = fields
            try:
                label = int(label_text)
            except ValueError:
                raise ListFileError(list_file, number, f"label {label_text!r} is not an integer") from None
            if label < 0:
                raise ListFileError(list_file, number, f"label {label} is negative")
            entries.append((path, label))
    return entries


class ImageListDataset(ImageFilesDataset):
    """Images listed in ``list_file``, with paths relative to ``root`` (default: the list file's folder).

    ``num_classes`` is the largest label + 1 unless given (then every label must be below it).
    Absolute paths in the list are used as they are.
    """

    def __init__(
        self,
        list_file: str | os.PathLike,
        root: str | os.PathLike | None = None,
        image_size: tuple[int, int] | None = None,
        augment: Any = None,
        seed: int = 0,
        num_classes: int | None = None,
        strict: bool = False,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ) -> None:
        self.list_file = Path(list_file)
        if not self.list_file.is_file():
            raise FileNotFoundError(f"list file {self.list_file} does not exist")
        self.root = Path(root) if root is not None else self.list_file.parent
        entries = parse_list_file(self.list_file)
        if not entries:
            raise ValueError(f"{self.list_file}: no entries")
        labels = np.array([label for _, label in entries], dtype=np.int64)
        largest = int(labels.max())
        if num_classes is None:
            num_classes = largest + 1
        elif largest >= num_classes:
            bad = int(np.argmax(labels >= num_classes))
            raise ValueError(f"{self.list_file}: label {labels[bad]} of {entries[bad][0]!r} is not below num_classes={num_classes}")
        unused = int(num_classes) - len(np.unique(labels))
        if unused:
            logger.warning("%s: %d of %d labels have no images", self.list_file, unused, num_classes)
        paths = [self.root / path for path, _ in entries]  # an absolute path replaces root
        super().__init__(paths, labels, int(num_classes), image_size, augment, seed, strict, max_pixels)
        logger.info("%s: %d images in %d classes", self.list_file, len(paths), self.num_classes)

    def __repr__(self) -> str:
        return f"ImageListDataset(list_file={str(self.list_file)!r}, images={len(self)}, classes={self.num_classes}, image_size={self.image_size})"
