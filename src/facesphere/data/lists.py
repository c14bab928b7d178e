"""Data sets described by a list file of ``relative/path.jpg label`` lines (optionally ``... label age``)."""

from __future__ import annotations

import io
import logging
import math
import os
import re
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from facesphere.data.ages import declared_ages, format_age, parse_age
from facesphere.data.folders import ImageFilesDataset
from facesphere.data.images import DEFAULT_MAX_PIXELS
from facesphere.utils.files import atomic_write_text, check_text_size

logger = logging.getLogger(__name__)

_LABEL = re.compile(r"[+-]?[0-9]+")  # ASCII digits only: int() would also take "1_000" and other scripts' digits
_MAX_LABEL = 2**63 - 1  # labels are int64
MAX_LIST_BYTES = 2 << 30  # MS1M's 5.8M lines fit many times over; a larger file is not a list


class ListFileError(ValueError):
    """A list file (or one of its lines) that cannot be used; the message names the file and the line number
    (``line`` 0: the whole file)."""

    def __init__(self, list_file: str | os.PathLike, line: int, reason: str) -> None:
        self.list_file = str(list_file)
        self.line = line
        self.reason = reason
        super().__init__(f"{self.list_file}{f':{line}' if line else ''}: {reason}")

    def __reduce__(self):
        return (type(self), (self.list_file, self.line, self.reason))


AGE_HEADER = "# columns: path label age"
"""The comment line (before the first entry) declaring a third column, the age in years (``-``: unknown)."""


class ListEntry(NamedTuple):
    """One entry of a list file: its line number, path, label and age (NaN: unknown, or no age column)."""

    line: int
    path: str
    label: int
    age: float = math.nan


def parse_list_file(list_file: str | os.PathLike) -> list[tuple[str, int]]:
    """Read ``(relative path, label)`` pairs (an age column, if declared, is read and checked by
    :func:`read_list_file`, and left out here).

    Each line is a path and an integer label separated by whitespace; the label is the last field, so
    paths may contain spaces. Blank lines and lines starting with ``#`` are skipped, as is a trailing
    `` # comment``. Raises ``ListFileError`` (with the line number) for malformed lines or negative labels.
    """
    return [(entry.path, entry.label) for entry in read_list_file(list_file)[0]]


def read_list_file(list_file: str | os.PathLike) -> tuple[list[ListEntry], bool]:
    """The entries of a list file, and whether it has an age column.

    Without a header the format is ``parse_list_file``'s. The comment line ``AGE_HEADER`` (``# columns: path
    label age``) before the first entry declares a third field, the age in years: the path is then everything
    before the last two fields, and a line with only two fields, or ``-`` as its age, has no age (NaN). An age that
    is not a plain decimal number, negative, not finite or above ``MAX_AGE`` is a ``ListFileError`` naming the line.
    """
    list_file = Path(list_file)
    try:
        check_text_size(list_file, MAX_LIST_BYTES)
    except ValueError as error:
        raise ListFileError(list_file, 0, str(error).removeprefix(f"{list_file}: ")) from None
    raw = list_file.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise ListFileError(list_file, line, f"not UTF-8 text (byte 0x{raw[error.start]:02x})") from None
    entries: list[ListEntry] = []
    with_age: bool | None = None  # None: no columns header seen
    for number, raw_line in enumerate(io.StringIO(text, newline=None), start=1):  # lines end at \n, \r\n or \r
        line = raw_line.strip()
        if not line:
            continue
        if line.startswith("#"):
            body = line[1:].strip()
            if body[:8].lower() == "columns:":
                if entries or with_age is not None:
                    raise ListFileError(list_file, number, "a columns header must come once, before the first entry")
                columns = body[8:].split()
                if columns not in (["path", "label"], ["path", "label", "age"]):
                    raise ListFileError(list_file, number, f"unknown columns {' '.join(columns)[:60]!r}; "
                                                           "expected 'path label' or 'path label age'")
                with_age = len(columns) == 3
            continue
        if " #" in line or "\t#" in line:
            line = line[: min(i for i in (line.find(" #"), line.find("\t#")) if i >= 0)].rstrip()
        age = math.nan
        fields = line.rsplit(None, 2 if with_age else 1)
        if with_age and len(fields) == 3:
            *fields, age_text = fields
            if age_text != "-":
                try:
                    age = parse_age(age_text)
                except ValueError as error:
                    raise ListFileError(list_file, number, str(error)) from None
        if len(fields) != 2:
            expected = "<path> <label> <age>" if with_age else "<path> <label>"
            raise ListFileError(list_file, number, f"expected '{expected}', got {raw_line.strip()[:80]!r}")
        path, label_text = fields
        if not _LABEL.fullmatch(label_text):
            hint = " (with the age column, a path with spaces needs an age or '-')" if with_age else ""
            raise ListFileError(list_file, number, f"label {label_text[:30]!r} is not an integer{hint}")
        if label_text.startswith("-") and label_text.strip("-0"):
            raise ListFileError(list_file, number, f"label {label_text} is negative")
        if len(label_text.lstrip("+0")) > 19 or int(label_text) > _MAX_LABEL:  # length first: int() refuses > 4300 digits
            raise ListFileError(list_file, number, f"label {label_text[:30]} is out of range (above {_MAX_LABEL})")
        entries.append(ListEntry(number, path, int(label_text), age))
    return entries, bool(with_age)


SPARSE_CLASSES = 1_000_000
"""Class counts above this are refused when most classes would have no sample (``too_sparse``)."""

SPARSE_FACTOR = 100
"""... namely when the class count exceeds the number of labels in use by this factor."""


def too_sparse(num_classes: int, distinct: int) -> bool:
    """True when a largest label implies far more classes than the data uses: the classifier is sized by the
    class count (``num_classes x embedding_size`` weights, e.g. 2e9 classes x 512 float32 = 4 TB), so a stray
    label must be refused before anything is allocated. Sparse label sets of ordinary size (a filtered subset
    of MS1M: labels up to 93k, 5k used) pass; only a count above ``SPARSE_CLASSES`` and above
    ``SPARSE_FACTOR`` times the labels used is refused."""
    return num_classes > SPARSE_CLASSES and num_classes > SPARSE_FACTOR * distinct


def remap_list_file(source: str | os.PathLike, target: str | os.PathLike) -> int:
    """Write ``source``'s entries to ``target`` with labels renumbered 0..N-1 in the order of the old labels
    (each line keeps its old label as a ``# label <old>`` comment, and its age when the list has an age column);
    returns N. For sparse label sets whose
    largest label would size the classifier far beyond the classes in use."""
    entries, with_age = read_list_file(source)
    if not entries:
        raise ListFileError(source, 0, "no entries")
    new = {old: i for i, old in enumerate(sorted({e.label for e in entries}))}
    lines = (f"{e.path} {new[e.label]}{f' {format_age(e.age)}' if with_age else ''}  # label {e.label}\n" for e in entries)
    atomic_write_text(target, (AGE_HEADER + "\n" if with_age else "") + "".join(lines))
    logger.info("%s: %d entries, labels up to %d renumbered 0..%d", target, len(entries), max(new, default=-1), len(new) - 1)
    return len(new)


class ImageListDataset(ImageFilesDataset):
    """Images listed in ``list_file``, with paths relative to ``root`` (default: the list file's folder).

    ``num_classes`` is the largest label + 1 unless given (then every label must be below it).
    Absolute paths in the list are used as they are. A list with an age column (``AGE_HEADER``) and at least one
    known age gives the ``age`` target (images without an age are masked, see ``EncodedImagesDataset``).
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
        numbered, with_age = read_list_file(self.list_file)
        if not numbered:
            raise ValueError(f"{self.list_file}: no entries")
        entries = [(e.path, e.label) for e in numbered]
        ages = declared_ages(np.array([e.age for e in numbered]), str(self.list_file)) if with_age else None
        labels = np.array([label for _, label in entries], dtype=np.int64)
        largest = int(labels.max())
        if num_classes is None:
            num_classes = largest + 1
            distinct = len(np.unique(labels))
            if too_sparse(num_classes, distinct):
                bad = int(np.argmax(labels))
                raise ListFileError(self.list_file, numbered[bad][0],
                                    f"label {largest} of {entries[bad][0]!r} would size the classifier for {num_classes:,} "
                                    f"classes but only {distinct:,} labels are used; number the labels 0..N-1 "
                                    f"(facesphere data remap-list {self.list_file} <new list>)")
        elif largest >= num_classes:
            bad = int(np.argmax(labels >= num_classes))
            raise ValueError(f"{self.list_file}: label {labels[bad]} of {entries[bad][0]!r} is not below num_classes={num_classes}")
        unused = int(num_classes) - len(np.unique(labels))
        if unused:
            logger.warning("%s: %d of %d labels have no images", self.list_file, unused, num_classes)
        paths = [self.root / path for path, _ in entries]  # an absolute path replaces root
        super().__init__(paths, labels, int(num_classes), image_size, augment, seed, strict, max_pixels, ages)
        logger.info("%s: %d images in %d classes", self.list_file, len(paths), self.num_classes)

    def __repr__(self) -> str:
        return f"ImageListDataset(list_file={str(self.list_file)!r}, images={len(self)}, classes={self.num_classes}, image_size={self.image_size})"
