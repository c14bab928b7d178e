"""A person's review of what cleaning flagged: confirm or reject each flagged image, written to the list files.

A review folder is the output of ``facesphere clean profile`` (see ``facesphere.cleaning.lists``). Deciding an item:

- confirm a flip: the image is relabelled to the suggested identity (kept under it);
- confirm an outlier or a duplicate: the image is dropped;
- reject: the image is fine and kept under its label;
- ``pending``: undecided again (left out of ``kept.txt``, as before any decision).

Each decision rewrites the kind's ``.tsv`` (its ``decision`` column) and then the reviewed part of ``kept.txt``
(below ``REVIEWED_MARKER``, derived from every decision), each file atomically, under an exclusive ``fcntl`` lock on
the folder's ``.review.lock`` so that two reviewers never lose each other's decisions. A kill between the two
writes leaves a new ``.tsv`` beside the old ``kept.txt``; the next decision or ``sync`` brings ``kept.txt`` level
with the decisions. Decisions are idempotent and can be changed. Nothing here imports evaluation code: the web
service uses this module.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import logging
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image

from facesphere.cleaning.lists import (
    CONFIRMED,
    DECISIONS,
    FLAGGED_COLUMNS,
    FLAGGED_FILES,
    KEPT,
    PENDING,
    REJECTED,
    REVIEWED_MARKER,
    TYPICAL,
    TYPICAL_COLUMNS,
    kept_label,
    kept_line,
    read_table,
    record_source,
    table_text,
)
from facesphere.data.images import DEFAULT_MAX_PIXELS, ImageError, load_image, load_image_bytes
from facesphere.data.recordio import RecordIOReader
from facesphere.utils.files import atomic_write_text, check_text_size

logger = logging.getLogger(__name__)

__all__ = ["ReviewError", "ReviewFolder", "ReviewItem", "load_source"]

LOCK = ".review.lock"
ACTIONS = {"confirm": CONFIRMED, "reject": REJECTED, "pending": PENDING, CONFIRMED: CONFIRMED, REJECTED: REJECTED}
"""What a reviewer may send -> the decision stored."""


class ReviewError(ValueError):
    """A review request that cannot be carried out: an unknown item or decision."""


def load_source(source: str, max_pixels: int | None = DEFAULT_MAX_PIXELS):
    """Image ``source`` of a profile (a path, or ``file.rec#key`` for a RecordIO record) as HxWx3 uint8 RGB;
    ``ImageError`` naming it when it cannot be read."""
    record = record_source(source)
    if record is not None:
        try:
            payload = RecordIOReader(record[0]).read_header(record[1])[1]
        except (OSError, ValueError, KeyError) as error:
            raise ImageError(source, f"cannot read the record: {error}") from None
        return load_image_bytes(payload, source, max_pixels)
    return load_image(source, max_pixels)


@dataclass(frozen=True)
class ReviewItem:
    """One flagged image: its kind (flip, outlier, duplicate), what the lists say about it, its decision, and the
    indices of the most typical images of its identity and (for a flip) of the suggested identity, to show beside it."""

    kind: str
    index: int
    path: str
    label: int
    identity: str
    suggested_label: int | None
    suggested_identity: str
    own_cosine: float | None
    other_cosine: float | None
    duplicate_of: int | None
    duplicate_path: str
    decision: str
    typical: list[int]
    suggested_typical: list[int]

    @classmethod
    def from_row(cls, kind: str, row: dict[str, str], typical: dict[int, list[int]]) -> ReviewItem:
        def number(text: str, kind=int):
            return kind(text) if text != "" else None

        label, suggested = int(row["label"]), number(row["suggested_label"])
        return cls(kind=kind, index=int(row["index"]), path=row["path"], label=label, identity=row["identity"],
                   suggested_label=suggested, suggested_identity=row["suggested_identity"],
                   own_cosine=number(row["own_cosine"], float), other_cosine=number(row["other_cosine"], float),
                   duplicate_of=number(row["duplicate_of"]), duplicate_path=row["duplicate_path"],
                   decision=row["decision"], typical=list(typical.get(label, [])),
                   suggested_typical=list(typical.get(suggested, [])) if kind == "flip" else [])

    def to_dict(self) -> dict:
        return asdict(self)


class ReviewFolder:
    """The flagged items of a cleaning output folder and the decisions on them (see the module doc)."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise NotADirectoryError(f"{self.folder}: not a folder (give the output folder of facesphere clean profile)")
        for name in (KEPT, TYPICAL, *FLAGGED_FILES.values()):
            if not (self.folder / name).is_file():
                raise FileNotFoundError(f"{self.folder / name}: missing; not the output folder of facesphere clean profile")
        self._cache: dict[str, tuple[tuple[int, int, int], list[dict[str, str]]]] = {}
        rows = self._read_all()
        self._kinds = {int(r["index"]): kind for kind, table in rows.items() for r in table}
        self._paths = {int(r["index"]): r["path"] for table in rows.values() for r in table}
        self._paths.update({int(r["duplicate_of"]): r["duplicate_path"] for r in rows["duplicate"] if r["duplicate_of"]})
        self.typical: dict[int, list[int]] = {}
        for row in read_table(self.folder / TYPICAL, TYPICAL_COLUMNS):
            self.typical.setdefault(int(row["label"]), []).append(int(row["index"]))
            self._paths[int(row["index"])] = row["path"]

    def _read_all(self, fresh: bool = False) -> dict[str, list[dict[str, str]]]:
        """Every flagged list as it is on disk. For listing, a list is read again only when its file looks replaced
        (inode, time, size); ``fresh`` (a decision) always reads: an inode reused within one clock tick at the same
        size would look unchanged. Rows are shared with the cache, never to be changed in place."""
        return {kind: self._read(kind, fresh) for kind in FLAGGED_FILES}

    def _read(self, kind: str, fresh: bool) -> list[dict[str, str]]:
        path = self.folder / FLAGGED_FILES[kind]
        stat = path.stat()
        signature = (stat.st_ino, stat.st_mtime_ns, stat.st_size)  # taken before the read: never newer than it
        cached = self._cache.get(kind)
        if cached is not None and cached[0] == signature and not fresh:
            return cached[1]
        table = read_table(path, FLAGGED_COLUMNS)
        for row in table:
            if row["decision"] not in DECISIONS:
                raise ValueError(f"{path}: image {row['index']} has decision {row['decision']!r} (expected one of "
                                 f"{', '.join(DECISIONS)})")
        self._cache[kind] = (signature, table)
        return table

    def items(self, pending_only: bool = False) -> list[ReviewItem]:
        """Every flagged item (or the undecided ones) as the lists say now, flips first, then outliers, duplicates."""
        found = [ReviewItem.from_row(kind, row, self.typical) for kind, table in self._read_all().items() for row in table]
        return [item for item in found if item.decision == PENDING or not pending_only]

    def image_path(self, index: int) -> str:
        """The source of image ``index`` when the review lists name it (flagged, duplicated or typical); a
        ReviewError otherwise: nothing else may be shown."""
        try:
            return self._paths[int(index)]
        except KeyError:
            raise ReviewError(f"image {index} is not named in the review lists of {self.folder}") from None

    def thumbnail(self, index: int, size: int = 256) -> bytes:
        """Image ``index`` (``image_path``) as a JPEG at most ``size`` pixels on a side."""
        image = Image.fromarray(load_source(self.image_path(index)))
        image.thumbnail((size, size))
        out = io.BytesIO()
        image.save(out, format="JPEG", quality=90)
        return out.getvalue()

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.folder / LOCK, "a") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def decide(self, index: int, action: str) -> ReviewItem:
        """Record ``action`` (confirm, reject or pending) for flagged image ``index`` and rewrite the lists."""
        if action not in ACTIONS:
            raise ReviewError(f"decision {action!r}: expected confirm, reject or pending")
        kind = self._kinds.get(int(index))
        if kind is None:
            raise ReviewError(f"image {index} is not flagged in {self.folder}")
        decision = ACTIONS[action]
        with self._locked():
            rows = self._read_all(fresh=True)  # under the lock: another reviewer's decisions are kept
            position = next(i for i, r in enumerate(rows[kind]) if int(r["index"]) == int(index))
            row = rows[kind][position]
            if row["decision"] != decision:
                row = {**row, "decision": decision}
                rows[kind] = [*rows[kind][:position], row, *rows[kind][position + 1:]]
                atomic_write_text(self.folder / FLAGGED_FILES[kind], table_text(row.keys(), rows[kind]))  # + age column
                logger.info("%s: image %s (%s, %s) %s", self.folder, index, kind, row["path"], decision)
            self._write_kept(rows)
        return ReviewItem.from_row(kind, row, self.typical)

    def sync(self) -> bool:
        """Bring ``kept.txt`` level with the decisions (after a kill between a decision's two writes); True when it
        had to be rewritten."""
        with self._locked():
            return self._write_kept(self._read_all(fresh=True))

    def _write_kept(self, rows: dict[str, list[dict[str, str]]]) -> bool:
        path = self.folder / KEPT
        text = check_text_size(path, 2 << 30).read_bytes().decode("utf-8")
        head, marker, _ = text.partition(REVIEWED_MARKER + "\n")
        if not marker:
            raise ValueError(f"{path}: the line {REVIEWED_MARKER!r} is missing; not written by facesphere clean")
        decided = sorted((int(r["index"]), kept_line(r["path"], label, r.get("age"))) for kind, table in rows.items()
                         for r in table if (label := kept_label(kind, r)) is not None)
        new = head + marker + "".join(line for _, line in decided)
        if new == text:
            return False
        atomic_write_text(path, new)
        return True
