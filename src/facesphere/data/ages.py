"""Ages of images on disk: validation, the ``age`` / ``age_mask`` targets, and where folders keep them.

An age is a number of years, finite, >= 0 and at most ``MAX_AGE``; an image without one has ``NaN`` in a data
set's ``ages`` array and, in its targets, the placeholder ``NaN`` with ``age_mask`` False (see
:mod:`facesphere.data.targets`), so age losses leave it out. Image folders carry ages in one of the ways of
``FOLDER_AGE_SOURCES``: a side file ``ages.csv`` in the root (a ``path,age`` header, then one
``relative/path,age`` line per image; images it does not list have no age), or FG-NET's file names
``SSSAyy[x].JPG`` (subject SSS at age yy, ``FGNET_NAME``).
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from facesphere.data.targets import MASK_SUFFIX
from facesphere.utils.files import atomic_write_text, check_text_size

logger = logging.getLogger(__name__)

__all__ = ["AGE", "AGE_FILE", "FGNET_NAME", "FOLDER_AGE_SOURCES", "MAX_AGE", "AgeFileError", "age_targets",
           "check_ages", "declared_ages", "fgnet_age", "folder_ages", "format_age", "parse_age", "read_age_file", "write_age_file"]

AGE = "age"
"""The target name of an age, in years."""
MAX_AGE = 150.0
"""Ages above this are refused as absurd (a typo, or a birth year in the age column)."""
AGE_FILE = "ages.csv"
"""The side file of an image folder's ages."""
FOLDER_AGE_SOURCES = ("none", "side_file", "fgnet_names")
"""Where an image folder's ages come from: nowhere, ``ages.csv`` in the root, FG-NET file names."""
FGNET_NAME = re.compile(r"^(\d{3})A(\d{2})([a-z]?)\.jpe?g$", re.IGNORECASE)
"""FG-NET's ``SSSAyy[x].JPG``: groups subject, age in years, the a/b tag of two photos at one age."""
_NUMBER = re.compile(r"[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)?")  # ASCII only: float() takes more
_MAX_AGE_FILE_BYTES = 1 << 30


def parse_age(text: str) -> float:
    """``text`` as an age in years; a ValueError saying why it is not one (not a number, negative, not finite,
    above ``MAX_AGE``). The message quotes at most 30 characters of ``text``."""
    shown = text[:30]
    if text.strip().lower().lstrip("+-") in ("nan", "inf", "infinity"):
        raise ValueError(f"age {shown!r} is not a finite number")
    if not _NUMBER.fullmatch(text):
        raise ValueError(f"age {shown!r} is not a number")
    return _checked(float(text), shown)


def _checked(age: float, shown: Any) -> float:
    if not math.isfinite(age):
        raise ValueError(f"age {shown} is not a finite number")
    if age < 0:
        raise ValueError(f"age {shown} is negative")
    if age > MAX_AGE:
        raise ValueError(f"age {shown} is above {MAX_AGE:g} years")
    return float(age)


def check_ages(ages: Sequence[float] | np.ndarray, count: int) -> np.ndarray:
    """``ages`` as float64 (``count``,): NaN (unknown) or a valid age each; a ValueError naming the first bad index."""
    array = np.asarray(ages, dtype=np.float64)
    if array.shape != (count,):
        raise ValueError(f"expected {count} ages, got shape {array.shape}")
    bad = ~np.isnan(array) & ~((array >= 0) & (array <= MAX_AGE))
    if bad.any():
        index = int(np.argmax(bad))
        try:
            _checked(float(array[index]), array[index])
        except ValueError as error:
            raise ValueError(f"sample {index}: {error}") from None
    return array


def format_age(age: float) -> str:
    """An age as list and side files write it: ``-`` when unknown, else the shortest text that reads back to it."""
    return "-" if math.isnan(age) else repr(float(age)).removesuffix(".0")


def age_targets(ages: np.ndarray, index: int) -> dict[str, Any]:
    """``{"age": float, "age_mask": bool}`` of sample ``index`` (the NaN placeholder and False when unknown)."""
    age = float(ages[index])
    return {AGE: age, AGE + MASK_SUFFIX: not math.isnan(age)}


def fgnet_age(name: str) -> int | None:
    """The age an FG-NET file name ``SSSAyy[x].JPG`` gives, None for any other name."""
    match = FGNET_NAME.match(name)
    return int(match.group(2)) if match else None


class AgeFileError(ValueError):
    """A side file of ages that cannot be used; the message names the file and line."""


def read_age_file(path: str | os.PathLike) -> dict[str, float]:
    """``relative/path -> age`` of an ``ages.csv`` (header ``path,age``; ``-`` or an empty age: unknown, left
    out). Paths use ``/``; a repeated path, a bad age or a malformed line is an ``AgeFileError`` naming file:line."""
    path = Path(path)
    try:
        text = check_text_size(path, _MAX_AGE_FILE_BYTES).read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise AgeFileError(f"{path}: not UTF-8 text (byte {error.start})") from None
    except ValueError as error:
        raise AgeFileError(str(error)) from None
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, None)
    if header is None or [h.strip().lower() for h in header] != ["path", "age"]:
        raise AgeFileError(f"{path}:1: expected the header 'path,age', got {','.join(header or [])[:60]!r}")
    ages: dict[str, float] = {}
    for row in reader:
        number = reader.line_num
        if not row or (len(row) == 1 and not row[0].strip()):
            continue
        if len(row) != 2 or not row[0]:
            raise AgeFileError(f"{path}:{number}: expected 'relative/path,age', got {','.join(row)[:80]!r}")
        name, text_age = row[0], row[1].strip()
        key = Path(name).as_posix()
        if key in ages:
            raise AgeFileError(f"{path}:{number}: {name!r} is listed twice")
        if text_age in ("", "-"):
            ages[key] = float("nan")
            continue
        try:
            ages[key] = parse_age(text_age)
        except ValueError as error:
            raise AgeFileError(f"{path}:{number}: {error}") from None
    return ages


def write_age_file(path: str | os.PathLike, names: Sequence[str], ages: np.ndarray) -> None:
    """Write ``ages.csv`` (atomically) for the images ``names`` (relative paths), unknown ages as ``-``."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["path", "age"])
    for name, age in zip(names, check_ages(ages, len(names))):
        writer.writerow([Path(name).as_posix(), format_age(float(age))])
    atomic_write_text(path, out.getvalue())


def folder_ages(root: Path, paths: Sequence[Path], source: str) -> np.ndarray | None:
    """The ages (float64, NaN: unknown) of the images ``paths`` under ``root`` from ``source`` (one of
    ``FOLDER_AGE_SOURCES``); None for ``none``. ``side_file`` needs ``root/ages.csv`` and refuses a line naming
    no image of the set; ``fgnet_names`` leaves images with other names without an age."""
    if source not in FOLDER_AGE_SOURCES:
        raise ValueError(f"unknown age source {source!r}; choose one of {', '.join(FOLDER_AGE_SOURCES)}")
    if source == "none":
        return None
    if source == "fgnet_names":
        return np.array([np.nan if (a := fgnet_age(p.name)) is None else a for p in paths], dtype=np.float64)
    side = root / AGE_FILE
    if not side.is_file():
        raise FileNotFoundError(f"{side}: no side file of ages (header 'path,age', then 'relative/path,age' lines)")
    listed = read_age_file(side)
    names = [p.relative_to(root).as_posix() for p in paths]
    unknown = sorted(set(listed) - set(names))
    if unknown:
        number = _line_of(side, unknown[0])
        raise AgeFileError(f"{side}:{number}: {unknown[0]!r} is not an image of {root}"
                           + (f" ({len(unknown) - 1} more such lines)" if len(unknown) > 1 else ""))
    return np.array([listed.get(name, np.nan) for name in names], dtype=np.float64)


def _line_of(path: Path, name: str) -> int:
    reader = csv.reader(io.StringIO(path.read_text(encoding="utf-8"), newline=""))
    for row in reader:
        if row and Path(row[0]).as_posix() == name:
            return reader.line_num
    return 0


def declared_ages(ages: np.ndarray | None, what: str) -> np.ndarray | None:
    """``ages`` when at least one is known, else None (a set without any age declares no ``age`` target); logs
    how many images of ``what`` have no age (they are masked out of age losses)."""
    if ages is None:
        return None
    unknown = int(np.isnan(ages).sum())
    if unknown == len(ages):
        logger.warning("%s: no image has an age; the set offers no age target", what)
        return None
    if unknown:
        logger.info("%s: %d of %d images have no age (masked out of age losses)", what, unknown, len(ages))
    return ages
