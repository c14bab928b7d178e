"""Cleaned list files of a profiled set: what to train on, and what a person should look at.

``write_cleaned_lists`` writes, into one output folder and each file atomically:

- ``kept.txt``: the images to train on, ``<path> <label>`` per line (the format of ``facesphere.data.lists``, so
  ``ImageListDataset`` trains on it directly); for a set with ages, ``<path> <label> <age>`` under the age column's
  header (``-``: no age), and the flagged tables end with an ``age`` column. Paths are absolute. The clean images
  come first; below the ``REVIEWED_MARKER`` comment line follow the flagged images a reviewer decided to keep (a
  rejected flag keeps the image under its label, a confirmed flip keeps it under the suggested identity). Images of
  RecordIO packs are named ``/abs/file.rec#key`` (the record's key in the pack), as profiling named them: such lines identify records, they
  are not paths a list-file reader can open.
- ``flips.tsv``, ``outliers.tsv``, ``duplicates.tsv``: the flagged images, one per row under a header
  (``FLAGGED_COLUMNS``), with the suggested identity (the nearest other identity), both cosines, the image a
  duplicate repeats, and the review ``decision`` (``pending`` until a person decides, see ``cleaning.review``).
- ``unreadable.tsv``: images that could not be read, or whose path cannot be written to a list file, with the reason.
- ``typical.tsv``: the most typical clean images (highest cosine to their own centre) of every identity a flagged
  image involves, which the report and the review show beside it.

Tab-separated files are written and read with Python's ``csv`` module (a field holding a tab, quote or newline is
quoted). A source image is never opened for writing, moved or deleted.
"""

from __future__ import annotations

import csv
import io
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from facesphere.cleaning.noise import Status
from facesphere.data.ages import AGE, format_age
from facesphere.data.lists import AGE_HEADER
from facesphere.utils.files import atomic_write_text, check_text_size

logger = logging.getLogger(__name__)

__all__ = ["CONFIRMED", "DECISIONS", "FLAGGED_COLUMNS", "FLAGGED_FILES", "KEPT", "PENDING", "REJECTED",
           "REVIEWED_MARKER", "TYPICAL", "TYPICAL_COLUMNS", "UNREADABLE", "UNREADABLE_COLUMNS", "kept_label",
           "kept_line", "kept_text", "list_path", "read_table", "record_source", "table_text", "typical_images", "write_cleaned_lists"]

KEPT, UNREADABLE, TYPICAL = "kept.txt", "unreadable.tsv", "typical.tsv"
FLAGGED_FILES = {"flip": "flips.tsv", "outlier": "outliers.tsv", "duplicate": "duplicates.tsv"}
"""Flagged kind -> its list file."""
KIND_STATUS = {"flip": Status.FLIP, "outlier": Status.OUTLIER, "duplicate": Status.DUPLICATE}
PENDING, CONFIRMED, REJECTED = "pending", "confirmed", "rejected"
DECISIONS = (PENDING, CONFIRMED, REJECTED)
FLAGGED_COLUMNS = ("index", "path", "label", "identity", "suggested_label", "suggested_identity", "own_cosine",
                   "other_cosine", "duplicate_of", "duplicate_path", "decision")
UNREADABLE_COLUMNS = ("index", "path", "label", "identity", "reason")
TYPICAL_COLUMNS = ("label", "identity", "rank", "index", "path", "own_cosine")
KEPT_HEADER = "# facesphere clean: images to train on, '<path> <label>' per line\n"
REVIEWED_MARKER = "# reviewed: flagged images a reviewer kept (rewritten by each review decision)"
MAX_TABLE_BYTES = 2 << 30  # like MAX_LIST_BYTES: millions of rows fit


def record_source(source: str) -> tuple[str, int] | None:
    """(pack, key) of a RecordIO record named ``file.rec#key``; None for any other source (a file path)."""
    rec, hash_, key = source.rpartition("#")
    return (rec, int(key)) if hash_ and rec.endswith(".rec") and key.isdigit() else None


def list_path(source: str) -> str:
    """``source`` as a ``kept.txt`` path: absolute (a relative one is taken from the working folder; a RecordIO
    record ``file.rec#key`` keeps its key); a ValueError when the list-file format cannot hold it (a newline,
    surrounding spaces, or ``' #'`` starting a comment)."""
    record = record_source(source)
    text = f"{os.path.abspath(record[0])}#{record[1]}" if record else os.path.abspath(source)
    if "\n" in text or "\r" in text or text != text.strip() or " #" in text or "\t#" in text:
        raise ValueError(f"{source!r}: a list file cannot name this path (newline, surrounding space or ' #')")
    return text


def kept_label(kind: str, row: Mapping[str, str]) -> int | None:
    """The label a decided flagged image is kept under, or None when it is left out (pending, or a confirmed
    outlier or duplicate): a rejected flag keeps the label as filed, a confirmed flip takes the suggested one."""
    decision = row["decision"]
    if decision == REJECTED:
        return int(row["label"])
    if decision == CONFIRMED and kind == "flip":
        return int(row["suggested_label"])
    return None


def _cosine(value: float) -> str:
    return "" if not np.isfinite(value) else f"{value:.6f}"


class _Tsv(csv.excel_tab):
    lineterminator = "\r\n"  # so that the writer quotes a field holding '\r' as well as '\n' (see table_text)


def table_text(columns: Iterable[str], rows: Iterable[Mapping[str, object]]) -> str:
    """A header line and one tab-separated row per mapping (``csv`` quoting), lines ending in ``\\n``."""
    columns = tuple(columns)
    out = io.StringIO()
    writer = csv.writer(out, dialect=_Tsv)
    lines = []
    for fields in [columns, *([row[c] for c in columns] for row in rows)]:
        out.seek(0)
        out.truncate()
        writer.writerow(fields)
        lines.append(out.getvalue()[:-2] + "\n")  # the row's own terminator: never inside a quoted field
    return "".join(lines)


def read_table(path: str | os.PathLike, columns: Iterable[str]) -> list[dict[str, str]]:
    """The rows of a list written by ``table_text``; a ValueError naming the file when its header differs (an
    ``age`` column after ``columns``, written for sets with ages, is read too)."""
    path = Path(path)
    text = check_text_size(path, MAX_TABLE_BYTES).read_bytes().decode("utf-8")  # bytes: a quoted '\r' stays one
    reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t")
    header = next(reader, None)
    if header is None or tuple(header) not in (tuple(columns), (*columns, AGE)):
        raise ValueError(f"{path}: not a facesphere clean list (header {header!r}, expected {list(columns)!r})")
    rows = [dict(zip(header, fields)) for fields in reader]
    for number, row in enumerate(rows, start=2):
        if len(row) != len(header):
            raise ValueError(f"{path}:{number}: expected {len(header)} fields")
    return rows


def kept_line(path: str, label: int | str, age: str | None = None) -> str:
    """One ``kept.txt`` line: ``path label``, then the age (as the tables hold it, ``-``: unknown) for sets with ages."""
    return f"{path} {label}\n" if age is None else f"{path} {label} {age}\n"


def kept_text(clean: Iterable[str], reviewed: Iterable[str], with_age: bool = False) -> str:
    """``kept.txt``: the header (with the age column's when ``with_age``), the clean lines, the review marker and the
    lines of images a reviewer kept."""
    return (KEPT_HEADER + (AGE_HEADER + "\n" if with_age else "") + "".join(clean) + REVIEWED_MARKER + "\n"
            + "".join(reviewed))


def typical_images(profile, labels: Iterable[int], count: int) -> dict[int, list[int]]:
    """Per label, the indices of up to ``count`` clean images with the highest own cosine (most typical first)."""
    wanted = np.unique(np.fromiter((int(v) for v in labels), dtype=np.int64))
    status = np.asarray(profile.status)
    own = np.asarray(profile.own_cosine, dtype=np.float64)
    label = np.asarray(profile.labels, dtype=np.int64)
    candidates = np.flatnonzero((status == Status.CLEAN) & np.isfinite(own) & np.isin(label, wanted))
    order = candidates[np.lexsort((candidates, -own[candidates], label[candidates]))]
    result: dict[int, list[int]] = {int(v): [] for v in wanted}
    for index in order:
        chosen = result[int(label[index])]
        if len(chosen) < count:
            chosen.append(int(index))
    return result


def write_cleaned_lists(profile, out_dir: str | os.PathLike, typical: int = 4) -> dict[str, int]:
    """Write the list files of ``profile`` (a ``facesphere.cleaning.profile.NoiseProfile``) into ``out_dir``, every
    decision pending (see the module doc); returns the number of rows per file. Never touches a source image."""
    out_dir = Path(out_dir)
    names = list(profile.identity_names)
    labels = np.asarray(profile.labels, dtype=np.int64)
    status = np.asarray(profile.status)
    other = np.asarray(profile.other_label, dtype=np.int64)
    duplicate_of = np.asarray(profile.duplicate_of, dtype=np.int64)
    reasons = {p["source"]: p["reason"] for p in profile.problems}
    ages = None if profile.ages is None else [format_age(float(a)) for a in profile.ages]
    flagged_columns = FLAGGED_COLUMNS if ages is None else (*FLAGGED_COLUMNS, AGE)

    def name(label: int) -> str:
        return names[label] if 0 <= label < len(names) else ""

    paths: list[str | None] = []
    unreadable = []
    for i, source in enumerate(profile.sources):
        try:
            paths.append(list_path(source) if status[i] != Status.UNREADABLE else None)
        except ValueError as error:
            paths.append(None)
            reasons.setdefault(source, str(error))
        if paths[-1] is None:
            unreadable.append({"index": i, "path": source, "label": int(labels[i]), "identity": name(int(labels[i])),
                               "reason": reasons.get(source, "unreadable")})
    clean = [kept_line(paths[i], labels[i], None if ages is None else ages[i])
             for i in np.flatnonzero(status == Status.CLEAN) if paths[i] is not None]
    tables = {}
    for kind, code in KIND_STATUS.items():
        rows = []
        for i in np.flatnonzero(status == code):
            if paths[i] is None:
                continue
            dup = int(duplicate_of[i]) if kind == "duplicate" else -1
            suggested = int(other[i])
            rows.append({"index": int(i), "path": paths[i], "label": int(labels[i]), "identity": name(int(labels[i])),
                         "suggested_label": suggested if suggested >= 0 else "", "suggested_identity": name(suggested),
                         "own_cosine": _cosine(profile.own_cosine[i]), "other_cosine": _cosine(profile.other_cosine[i]),
                         "duplicate_of": dup if dup >= 0 else "",
                         "duplicate_path": (paths[dup] or profile.sources[dup]) if dup >= 0 else "", "decision": PENDING,
                         **({AGE: ages[i]} if ages is not None else {})})
        tables[kind] = rows
    involved = {int(r[c]) for rows in tables.values() for r in rows for c in ("label", "suggested_label")
                if r[c] != ""}
    typical_rows = [{"label": label, "identity": name(label), "rank": rank, "index": index, "path": paths[index],
                     "own_cosine": _cosine(profile.own_cosine[index])}
                    for label, indices in sorted(typical_images(profile, involved, typical).items())
                    for rank, index in enumerate(indices) if paths[index] is not None]
    out_dir.mkdir(parents=True, exist_ok=True)
    for kind, rows in tables.items():
        atomic_write_text(out_dir / FLAGGED_FILES[kind], table_text(flagged_columns, rows))
    atomic_write_text(out_dir / UNREADABLE, table_text(UNREADABLE_COLUMNS, unreadable))
    atomic_write_text(out_dir / TYPICAL, table_text(TYPICAL_COLUMNS, typical_rows))
    atomic_write_text(out_dir / KEPT, kept_text(clean, [], ages is not None))  # last: its presence marks a complete folder
    counts = {KEPT: len(clean), **{FLAGGED_FILES[k]: len(v) for k, v in tables.items()},
              UNREADABLE: len(unreadable)}
    logger.info("%s: kept %d images; flagged %s", out_dir, len(clean),
                ", ".join(f"{len(v)} {k}s" for k, v in tables.items()))
    return counts
