"""The official LFW ``pairs.txt`` (View 2) and its mapping onto an image folder.

Format (http://vis-www.cs.umass.edu/lfw/README.txt, "pairs.txt"): a header ``"<folds> <n>"`` (``10 300``), then for each fold ``n`` matched lines
``name n1 n2`` followed by ``n`` mismatched lines ``name1 n1 name2 n2`` (fields separated by tabs or
spaces). A single-number header (``pairsDevTrain.txt``/``pairsDevTest.txt``: ``1100``) means one
block of ``n`` matched then ``n`` mismatched pairs. Image ``k`` of ``Name`` is
``<root>/<Name>/<Name>_<kkkk>.jpg`` (4-digit, 1-based), as in both the original and aligned copies.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["LFWPair", "PairsFileError", "lfw_image_path", "lfw_pair_paths", "parse_lfw_pairs"]


class PairsFileError(ValueError):
    """A malformed pairs file; ``path`` and ``line`` (1-based) locate the problem."""

    def __init__(self, path: str | os.PathLike, line: int, reason: str) -> None:
        self.path, self.line, self.reason = str(path), int(line), reason
        super().__init__(f"{self.path}:{self.line}: {reason}")


@dataclass(frozen=True)
class LFWPair:
    """One line of pairs.txt: two (name, 1-based image number) references, the label and the fold."""

    name1: str
    num1: int
    name2: str
    num2: int
    same: bool
    fold: int
    line: int


def _positive_int(token: str, path, line: int, what: str) -> int:
    try:
        value = int(token)
    except ValueError:
        raise PairsFileError(path, line, f"{what} {token!r} is not an integer") from None
    if value < 1:
        raise PairsFileError(path, line, f"{what} must be >= 1, got {value}")
    return value


def parse_lfw_pairs(path: str | os.PathLike) -> list[LFWPair]:
    """All pairs of an LFW pairs file, in file order, with fold ids 0..folds-1 (see the module doc)."""
    path = Path(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    numbered = [(i + 1, ln.split()) for i, ln in enumerate(lines) if ln.strip()]
    if not numbered:
        raise PairsFileError(path, 1, "empty pairs file")
    header_line, header = numbered[0]
    if len(header) == 2:
        n_folds = _positive_int(header[0], path, header_line, "number of folds")
        per_class = _positive_int(header[1], path, header_line, "pairs per class")
    elif len(header) == 1:
        n_folds, per_class = 1, _positive_int(header[0], path, header_line, "pairs per class")
    else:
        raise PairsFileError(path, header_line, f"header must be '<folds> <pairs per class>', got {' '.join(header)!r}")
    body = numbered[1:]
    expected = n_folds * 2 * per_class
    if len(body) != expected:
        last = body[-1][0] if body else header_line
        raise PairsFileError(path, last, f"header announces {n_folds} folds x 2 x {per_class} = {expected} pairs, found {len(body)}")
    pairs = []
    for k, (line, fields) in enumerate(body):
        fold, within = divmod(k, 2 * per_class)
        same = within < per_class
        if same:
            if len(fields) != 3:
                kind = "a mismatched pair" if len(fields) == 4 else f"{len(fields)} fields"
                raise PairsFileError(path, line, f"expected a matched pair 'name n1 n2' (fold {fold}), got {kind}")
            name, a, b = fields
            pairs.append(LFWPair(name, _positive_int(a, path, line, "image number"), name,
                                 _positive_int(b, path, line, "image number"), True, fold, line))
        else:
            if len(fields) != 4:
                kind = "a matched pair" if len(fields) == 3 else f"{len(fields)} fields"
                raise PairsFileError(path, line, f"expected a mismatched pair 'name1 n1 name2 n2' (fold {fold}), got {kind}")
            n1, a, n2, b = fields
            if n1 == n2:
                raise PairsFileError(path, line, f"mismatched pair names the same person twice ({n1})")
            pairs.append(LFWPair(n1, _positive_int(a, path, line, "image number"), n2,
                                 _positive_int(b, path, line, "image number"), False, fold, line))
    logger.info("%s: %d pairs in %d fold(s) of %d matched + %d mismatched", path, len(pairs), n_folds, per_class, per_class)
    return pairs


def lfw_image_path(root: str | os.PathLike, name: str, number: int, ext: str = ".jpg") -> Path:
    """``<root>/<name>/<name>_<number:04d><ext>``."""
    return Path(root) / name / f"{name}_{int(number):04d}{ext}"


def lfw_pair_paths(
    pairs_path: str | os.PathLike, root: str | os.PathLike, ext: str = ".jpg", check: bool = True
) -> tuple[list[Path], list[Path], np.ndarray, np.ndarray]:
    """(paths1, paths2, same, folds) of an LFW pairs file over the image folder ``root``.

    With ``check`` every referenced image must exist; the error lists how many are missing and the
    first few, each with its pairs.txt line.
    """
    root = Path(root)
    if check and not root.is_dir():
        raise FileNotFoundError(f"LFW image folder {root} does not exist")
    pairs = parse_lfw_pairs(pairs_path)
    p1 = [lfw_image_path(root, p.name1, p.num1, ext) for p in pairs]
    p2 = [lfw_image_path(root, p.name2, p.num2, ext) for p in pairs]
    if check:
        missing = []
        for pair, a, b in zip(pairs, p1, p2):
            missing.extend((pair.line, p) for p in (a, b) if not p.is_file())
        if missing:
            shown = "; ".join(f"line {ln}: {p}" for ln, p in missing[:5])
            raise FileNotFoundError(f"{len(missing)} image(s) referenced by {pairs_path} are missing under {root}: {shown}"
                                    + (" ..." if len(missing) > 5 else ""))
    same = np.array([p.same for p in pairs], dtype=bool)
    folds = np.array([p.fold for p in pairs], dtype=np.int64)
    return p1, p2, same, folds
