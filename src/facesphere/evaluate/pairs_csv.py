"""The CSV pair list: ``path1,path2,same[,fold]`` rows, read into parallel path lists and labels."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np

from facesphere.utils.files import check_text_size, not_text

__all__ = ["read_pairs_csv"]

_TRUE = {"1", "true", "t", "yes", "y", "same", "genuine", "match", "matched", "positive"}
_FALSE = {"0", "false", "f", "no", "n", "diff", "different", "impostor", "imposter", "mismatch", "mismatched", "negative"}


_HEADER_FIRST = {"path1", "path_1", "image1", "image_1", "img1", "file1", "left", "first"}


def _is_int(token: str) -> bool:
    try:
        int(token)
    except ValueError:
        return False
    return True


def _label(token: str) -> bool | None:
    t = token.strip().lower()
    return True if t in _TRUE else False if t in _FALSE else None


def _decoded(reader, path: Path):
    """The CSV rows; a byte that is not UTF-8 is an error naming the file."""
    try:
        yield from reader
    except UnicodeDecodeError as error:
        raise not_text(path, error) from None


def read_pairs_csv(path: str | os.PathLike, root: str | os.PathLike | None = None, check: bool = True
                   ) -> tuple[list[Path], list[Path], np.ndarray, np.ndarray | None]:
    """Parse ``path1,path2,same[,fold]`` rows: (paths1, paths2, same, folds or None).

    The first row is a header (skipped) when its third field is not a label, its fourth is not an
    integer, or its first field is a column name such as ``path1``. Labels: 1/0, true/false,
    yes/no, same/different, genuine/impostor, match/mismatch (any case). Either every row has a fold
    id (an integer) or none has. Blank rows and rows starting with ``#`` are ignored. Relative paths
    are resolved against ``root`` (default: the CSV's folder). Errors name the line.
    """
    path = Path(path)
    base = Path(root) if root is not None else path.parent
    p1: list[Path] = []
    p2: list[Path] = []
    same: list[bool] = []
    folds: list[int] = []
    first = True
    has_fold: bool | None = None
    with check_text_size(path).open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle)
        for row in _decoded(reader, path):
            line = reader.line_num
            fields = [f.strip() for f in row]
            if not fields or all(not f for f in fields) or fields[0].startswith("#"):
                continue
            if len(fields) not in (3, 4):
                raise ValueError(f"{path}:{line}: expected 'path1,path2,same[,fold]', got {len(fields)} fields")
            label = _label(fields[2])
            if first:
                first = False
                if label is None or fields[0].lower() in _HEADER_FIRST or (len(fields) == 4 and not _is_int(fields[3])):
                    continue  # header
            if label is None:
                raise ValueError(f"{path}:{line}: {fields[2]!r} is not a same/different label")
            if has_fold is None:
                has_fold = len(fields) == 4
            elif has_fold != (len(fields) == 4):
                raise ValueError(f"{path}:{line}: either every row has a fold column or none has")
            if len(fields) == 4:
                try:
                    folds.append(int(fields[3]))
                except ValueError:
                    raise ValueError(f"{path}:{line}: fold {fields[3]!r} is not an integer") from None
            if not fields[0] or not fields[1]:
                raise ValueError(f"{path}:{line}: empty image path")
            a, b = (Path(f) if Path(f).is_absolute() else base / f for f in fields[:2])
            if check:
                for p in (a, b):
                    if not p.is_file():
                        raise FileNotFoundError(f"{path}:{line}: image {p} does not exist")
            p1.append(a)
            p2.append(b)
            same.append(label)
    if not same:
        raise ValueError(f"{path}: no pairs")
    return p1, p2, np.array(same, dtype=bool), (np.array(folds, dtype=np.int64) if folds else None)
