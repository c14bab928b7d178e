"""MXNet RecordIO (``.rec`` + ``.idx``) without MXNet: the container InsightFace training sets ship in.

A ``.rec`` file is a sequence of *parts*: uint32 magic ``0xced7230a``, uint32 ``lrec = cflag << 29 | length``,
``length`` bytes, zero padding to a multiple of 4. A record is one part (cflag 0) or a first part (1),
middle parts (2) and a last part (3): the writer splits a record wherever the magic occurs at a 4-byte
aligned offset of the payload and drops those 4 bytes, the reader puts them back between parts, so a
reader resynchronising on the magic can never be fooled by the data. The ``.idx`` text file maps keys to
the byte offset of a record's first part, one ``key<TAB>offset`` line per record.

Image records start with an ``IRHeader`` (``pack`` / ``unpack``): struct ``<IfQQ`` (flag, label, id,
id2); ``flag > 0`` means ``flag`` float32 labels follow the header (and the header's label is unused).

Every format problem raises one ``RecordIOError`` naming the file and byte offset (or idx line), never a
struct error from deep inside. The reader uses ``os.pread`` on a descriptor opened lazily per process,
so one reader can be handed to forked (or spawned) DataLoader workers.
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Self

import numpy as np

from facesphere.utils.files import atomic_path

logger = logging.getLogger(__name__)

__all__ = ["MAGIC", "IRHeader", "RecordIOError", "RecordIOReader", "RecordIOWriter", "pack", "unpack"]

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_PART = struct.Struct("<II")  # magic, lrec
_IR = struct.Struct("<IfQQ")  # flag, label, id, id2
_LENGTH_MASK = (1 << 29) - 1
_PREFIX = 256  # bytes read speculatively with a part header: enough for an IRHeader and a few label floats


class RecordIOError(ValueError):
    """A malformed ``.rec`` / ``.idx`` file; the message names the file and the byte offset or line."""

    def __init__(self, path: str | os.PathLike, reason: str, offset: int | None = None, line: int | None = None) -> None:
        self.path, self.reason, self.offset, self.line = str(path), reason, offset, line
        where = f":{line}" if line is not None else ""
        at = f" at byte {offset}" if offset is not None else ""
        super().__init__(f"{self.path}{where}{at}: {reason}")

    def __reduce__(self):  # picklable across DataLoader workers
        return (type(self), (self.path, self.reason, self.offset, self.line))


def shareable(path: str | os.PathLike) -> None:
    """Give a finished temporary file the permissions a normal ``open`` would (0666 minus umask), not
    ``mkstemp``'s 0600: data sets are meant to be read by other users and jobs."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def _pad(length: int) -> int:
    return -length % 4


# ------------------------------------------------------------------------------------------ IRHeader


@dataclass(frozen=True)
class IRHeader:
    """The 24-byte header of an image record. ``label`` is a float, or a tuple of floats when ``flag > 0``."""

    flag: int
    label: float | tuple[float, ...]
    id: int = 0
    id2: int = 0

    @property
    def labels(self) -> tuple[float, ...]:
        """The label as a tuple (one element for a scalar label)."""
        return self.label if isinstance(self.label, tuple) else (self.label,)


def pack(header: IRHeader, payload: bytes = b"") -> bytes:
    """``header`` + ``payload`` as a record. A sequence label is stored as ``len(label)`` floats after the
    header (flag = its length); a scalar label goes into the header with flag 0, as MXNet does."""
    if isinstance(header.label, (tuple, list, np.ndarray)):
        values = np.asarray(header.label, dtype="<f4").ravel()
        return _IR.pack(len(values), 0.0, header.id, header.id2) + values.tobytes() + bytes(payload)
    return _IR.pack(0, float(header.label), header.id, header.id2) + bytes(payload)


def unpack(record: bytes, path: str | os.PathLike = "<record>", offset: int | None = None) -> tuple[IRHeader, bytes]:
    """Split a record into its ``IRHeader`` and payload; ``path``/``offset`` only label errors."""
    if len(record) < _IR.size:
        raise RecordIOError(path, f"record of {len(record)} bytes is shorter than the {_IR.size}-byte image header", offset)
    flag, label, id_, id2 = _IR.unpack_from(record)
    end = _IR.size + 4 * flag
    if flag > 0:
        if end > len(record):
            raise RecordIOError(path, f"header flag {flag} needs {flag} label floats ({end} bytes) "
                                      f"but the record has only {len(record)} bytes", offset)
        label = tuple(float(v) for v in np.frombuffer(record, "<f4", flag, _IR.size))
        return IRHeader(flag, label, id_, id2), record[end:]
    return IRHeader(flag, float(label), id_, id2), record[_IR.size:]


# ------------------------------------------------------------------------------------------- writer


class RecordIOWriter:
    """Write records to ``rec_path`` and their ``key<TAB>offset`` lines to ``idx_path`` (default: same stem,
    ``.idx``; ``None`` for no index), atomically: both go to temporary files renamed at ``close()``.

    Use as a context manager; an exception inside the block (or ``abort()``) discards both files, so a
    crash or Ctrl-C never leaves a half-written pair behind.
    """

    def __init__(self, rec_path: str | os.PathLike, idx_path: str | os.PathLike | None | bool = True) -> None:
        self.rec_path = Path(rec_path)
        self.idx_path = self.rec_path.with_suffix(".idx") if idx_path is True else (Path(idx_path) if idx_path else None)
        self._stack = contextlib.ExitStack()
        # Entered idx first so the .rec is renamed first: an .idx never points into a missing or older .rec.
        idx_tmp = self._stack.enter_context(atomic_path(self.idx_path)) if self.idx_path else None
        rec_tmp = self._stack.enter_context(atomic_path(self.rec_path))
        self._rec = open(rec_tmp, "wb")  # noqa: SIM115 - lives until close()/abort()
        self._idx = open(idx_tmp, "w", encoding="ascii") if idx_tmp else None  # noqa: SIM115
        self._keys: set[int] = set()
        self._offset = 0
        self.closed = False

    def __len__(self) -> int:
        return len(self._keys)

    @property
    def bytes_written(self) -> int:
        return self._offset

    def write(self, payload: bytes, key: int | None = None) -> int:
        """Append one record under ``key`` (default: the number of records written so far); returns the key."""
        if self.closed:
            raise ValueError(f"{self.rec_path}: writer is closed")
        key = len(self._keys) if key is None else int(key)
        if key in self._keys:
            raise ValueError(f"{self.rec_path}: duplicate record key {key}")
        payload = bytes(payload)
        parts, start = [], 0
        position = payload.find(_MAGIC_BYTES)
        while position >= 0:
            if position % 4 == 0:  # only aligned occurrences split the record (unaligned ones cannot fool a reader)
                parts.append(payload[start:position])
                start = position + 4
                position = payload.find(_MAGIC_BYTES, start)
            else:
                position = payload.find(_MAGIC_BYTES, position + 1)
        parts.append(payload[start:])
        chunks = []
        for i, part in enumerate(parts):
            if len(part) > _LENGTH_MASK:
                raise ValueError(f"{self.rec_path}: record {key} has a part of {len(part)} bytes; RecordIO allows < 2^29")
            cflag = 0 if len(parts) == 1 else 1 if i == 0 else 3 if i == len(parts) - 1 else 2
            chunks += [_PART.pack(MAGIC, cflag << 29 | len(part)), part, bytes(_pad(len(part)))]
        data = b"".join(chunks)
        self._rec.write(data)
        if self._idx is not None:
            self._idx.write(f"{key}\t{self._offset}\n")
        self._keys.add(key)
        self._offset += len(data)
        return key

    def close(self) -> None:
        """Flush and move both files into place."""
        if self.closed:
            return
        self.closed = True
        self._close_files()
        for handle in (self._rec, self._idx):
            if handle is not None:
                shareable(handle.name)
        self._stack.close()
        logger.debug("wrote %d records (%d bytes) to %s", len(self._keys), self._offset, self.rec_path)

    def abort(self) -> None:
        """Discard everything written; the target files are left as they were."""
        if self.closed:
            return
        self.closed = True
        self._close_files()
        error = _Aborted()
        self._stack.__exit__(_Aborted, error, None)  # atomic_path deletes its temporary file on an exception

    def _close_files(self) -> None:
        self._rec.close()
        if self._idx is not None:
            self._idx.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class _Aborted(Exception):
    pass


# ------------------------------------------------------------------------------------------- reader


class RecordIOReader:
    """Random access to the records of ``rec_path`` by key, through its ``.idx`` (default: same stem).

    Without an index file (``idx_path=None`` or a missing default), the ``.rec`` is scanned once and the
    records are keyed 0, 1, 2, ... in file order. ``keys`` lists the keys in index order. Reads use
    ``os.pread`` on a descriptor opened lazily by each process, so the reader survives fork/spawn into
    DataLoader workers; it holds no file position, so concurrent readers never interfere.
    """

    def __init__(self, rec_path: str | os.PathLike, idx_path: str | os.PathLike | None | bool = True) -> None:
        self.path = Path(rec_path)
        if not self.path.is_file():
            raise FileNotFoundError(f"record file {self.path} does not exist")
        self.size = self.path.stat().st_size
        default = self.path.with_suffix(".idx")
        self.idx_path = (default if default.is_file() else None) if idx_path is True else (Path(idx_path) if idx_path else None)
        self._fd: int | None = None
        self._pid: int | None = None
        if self.idx_path is not None:
            if not self.idx_path.is_file():
                raise FileNotFoundError(f"index file {self.idx_path} does not exist")
            self.keys, self.offsets = _parse_index(self.idx_path, self.size)
        else:
            logger.info("%s: no .idx file, scanning the records", self.path)
            self.offsets = np.fromiter((offset for offset, _ in self._scan(headers_only=True)), dtype=np.int64)
            self.keys = np.arange(len(self.offsets), dtype=np.int64)
        self._first = int(self.keys[0]) if len(self.keys) else 0
        self._contiguous = bool(len(self.keys) == 0 or np.array_equal(self.keys, np.arange(self._first, self._first + len(self.keys))))
        if not self._contiguous:
            self._order = np.argsort(self.keys, kind="stable")
            self._sorted = self.keys[self._order]
            if np.any(self._sorted[1:] == self._sorted[:-1]):
                dup = int(self._sorted[1:][self._sorted[1:] == self._sorted[:-1]][0])
                raise RecordIOError(self.idx_path, f"duplicate key {dup}")

    def __len__(self) -> int:
        return len(self.keys)

    def __contains__(self, key: int) -> bool:
        return self._position(int(key)) is not None

    def __repr__(self) -> str:
        return f"RecordIOReader({str(self.path)!r}, records={len(self)})"

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_fd"] = state["_pid"] = None  # descriptors are per process
        return state

    def __del__(self) -> None:
        self.close()

    def close(self) -> None:
        fd = getattr(self, "_fd", None)
        if fd is not None and self._pid == os.getpid():
            os.close(fd)
        self._fd = None

    def offset(self, key: int) -> int:
        """Byte offset of record ``key``'s first part; ``KeyError`` when the index has no such key."""
        position = self._position(int(key))
        if position is None:
            raise KeyError(f"{self.path}: no record with key {key}")
        return int(self.offsets[position])

    def read(self, key: int) -> bytes:
        """The payload of record ``key``."""
        return self.read_at(self.offset(key))[0]

    def read_header(self, key: int) -> tuple[IRHeader, bytes]:
        """``unpack`` of record ``key`` (errors name this file and the record's offset)."""
        offset = self.offset(key)
        header, payload = unpack(self.read_at(offset)[0], self.path, offset)
        return self._checked(header, key, offset), payload

    def _checked(self, header: IRHeader, key: int, offset: int) -> IRHeader:
        """Refuse a record whose header names another key: an index entry pointing at another record's offset would
        otherwise pair that record's image with this key's label. Packs that leave the id unset (0) pass, and so
        does any record read without an index (keys are then file positions, not ids)."""
        if self.idx_path is not None and header.id not in (0, int(key)):
            raise RecordIOError(self.path, f"the index maps key {key} to a record whose header says it is record "
                                           f"{header.id}: the index ({self.idx_path}) does not match the file", offset)
        return header

    def read_label_header(self, key: int) -> IRHeader:
        """Only the ``IRHeader`` of record ``key``, from one small read (no image bytes) in the usual case."""
        offset = self.offset(key)
        prefix = self._pread(_PART.size + _PREFIX, offset)
        if len(prefix) >= _PART.size + _IR.size:
            magic, lrec = _PART.unpack_from(prefix)
            length, cflag = lrec & _LENGTH_MASK, lrec >> 29
            if magic == MAGIC and cflag in (0, 1) and length >= _IR.size:
                flag = _IR.unpack_from(prefix, _PART.size)[0]
                need = _IR.size + 4 * flag
                if need <= min(length, len(prefix) - _PART.size):
                    return self._checked(unpack(prefix[_PART.size:_PART.size + need], self.path, offset)[0], key, offset)
        return self.read_header(key)  # split header, long label or an error: take the careful path

    def read_at(self, offset: int) -> tuple[bytes, int]:
        """The record whose first part starts at ``offset``, and the offset just after it."""
        parts: list[bytes] = []
        position = offset
        while True:
            head = self._pread(_PART.size, position)
            if len(head) < _PART.size:
                raise RecordIOError(self.path, f"truncated: the file ends ({self.size} bytes) inside a part header", position)
            magic, lrec = _PART.unpack(head)
            if magic != MAGIC:
                raise RecordIOError(self.path, f"bad magic 0x{magic:08x} (expected 0x{MAGIC:08x}): not a record boundary "
                                               "or a corrupt file", position)
            cflag, length = lrec >> 29, lrec & _LENGTH_MASK
            if cflag not in ((0, 1) if not parts else (2, 3)):
                state = "a record start (0 or 1)" if not parts else "a continuation (2 or 3)"
                raise RecordIOError(self.path, f"continuation flag {cflag} out of order, expected {state}", position)
            data = self._pread(length, position + _PART.size)
            if len(data) < length:
                raise RecordIOError(self.path, f"truncated: a part of {length} bytes runs past the end of the file "
                                               f"({self.size} bytes)", position)
            position += _PART.size + length + _pad(length)
            if cflag == 0:
                return data, position
            parts.append(data)
            if cflag == 3:
                return _MAGIC_BYTES.join(parts), position

    def scan(self) -> Iterator[tuple[int, bytes]]:
        """Every record in file order as ``(offset, payload)``, ignoring the index."""
        yield from self._scan(headers_only=False)

    def __iter__(self) -> Iterator[tuple[int, bytes]]:
        """``(key, payload)`` in index order."""
        for key, offset in zip(self.keys.tolist(), self.offsets.tolist()):
            yield key, self.read_at(offset)[0]

    def _scan(self, headers_only: bool) -> Iterator[tuple[int, bytes]]:
        position = 0
        while position < self.size:
            if headers_only:
                start, position = position, self._skip(position)
                yield start, b""
            else:
                data, next_position = self.read_at(position)
                yield position, data
                position = next_position

    def _skip(self, offset: int) -> int:
        """Walk over the record at ``offset`` reading only part headers (builds an index cheaply)."""
        position, first = offset, True
        while True:
            head = self._pread(_PART.size, position)
            if len(head) < _PART.size:
                raise RecordIOError(self.path, "truncated: the file ends inside a part header", position)
            magic, lrec = _PART.unpack(head)
            if magic != MAGIC:
                raise RecordIOError(self.path, f"bad magic 0x{magic:08x} (expected 0x{MAGIC:08x})", position)
            cflag, length = lrec >> 29, lrec & _LENGTH_MASK
            if cflag not in ((0, 1) if first else (2, 3)):
                raise RecordIOError(self.path, f"continuation flag {cflag} out of order", position)
            if position + _PART.size + length > self.size:
                raise RecordIOError(self.path, f"truncated: a part of {length} bytes runs past the end of the file "
                                               f"({self.size} bytes)", position)
            position += _PART.size + length + _pad(length)
            if cflag in (0, 3):
                return position
            first = False

    def _position(self, key: int) -> int | None:
        if self._contiguous:
            position = key - self._first
            return position if 0 <= position < len(self.keys) else None
        i = int(np.searchsorted(self._sorted, key))
        return int(self._order[i]) if i < len(self._sorted) and self._sorted[i] == key else None

    def _pread(self, length: int, offset: int) -> bytes:
        if self._fd is None or self._pid != os.getpid():
            self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
            self._pid = os.getpid()
        if offset < 0:
            raise RecordIOError(self.path, "negative offset", offset)
        return os.pread(self._fd, length, offset)


def _parse_index(idx_path: Path, rec_size: int) -> tuple[np.ndarray, np.ndarray]:
    """``key<TAB>offset`` lines -> (keys, offsets) int64 arrays, validated against the .rec size.

    A vectorised parse for the common case (millions of lines), and a line-by-line one that names the
    first bad line when anything looks wrong.
    """
    raw = idx_path.read_bytes()
    tokens = raw.split()
    lines = [line for line in raw.splitlines() if line.strip()]
    keys = offsets = None
    if len(tokens) == 2 * len(lines):
        try:
            values = np.array(tokens, dtype=np.bytes_).astype(np.int64).reshape(-1, 2)
            keys, offsets = values[:, 0].copy(), values[:, 1].copy()
        except (ValueError, OverflowError):
            keys = None
    if keys is None:
        keys, offsets = _parse_index_lines(idx_path, raw)
    bad = np.flatnonzero((offsets < 0) | (offsets >= max(rec_size, 1)) | ((offsets % 4) != 0))
    if len(bad):
        line = _line_number(raw, int(bad[0]))
        offset = int(offsets[bad[0]])
        reason = ("offset lies beyond the end of the record file" if offset >= rec_size else
                  "offset is negative" if offset < 0 else "offset is not a multiple of 4 (parts are 4-byte aligned)")
        raise RecordIOError(idx_path, f"record {int(keys[bad[0]])}: {reason} ({rec_size} bytes)", offset, line)
    return keys, offsets


def _parse_index_lines(idx_path: Path, raw: bytes) -> tuple[np.ndarray, np.ndarray]:
    keys, offsets = [], []
    for number, line in enumerate(raw.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        try:
            if len(fields) != 2:
                raise ValueError
            key, offset = int(fields[0]), int(fields[1])
            if max(abs(key), abs(offset)) >= 2**63:
                raise ValueError
        except ValueError:
            text = line.decode("utf-8", "replace")[:80]
            raise RecordIOError(idx_path, f"expected '<integer key><TAB><integer offset>', got {text!r}", line=number) from None
        keys.append(key)
        offsets.append(offset)
    return np.array(keys, dtype=np.int64), np.array(offsets, dtype=np.int64)


def _line_number(raw: bytes, entry: int) -> int:
    """1-based line number of the ``entry``-th non-blank line."""
    seen = -1
    for number, line in enumerate(raw.splitlines(), start=1):
        if line.strip():
            seen += 1
            if seen == entry:
                return number
    return entry + 1


def read_index(idx_path: str | os.PathLike, rec_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Public form of the index parser: (keys, offsets) of ``idx_path`` checked against a ``.rec`` of ``rec_size`` bytes."""
    return _parse_index(Path(idx_path), rec_size)


def write_index(rec_path: str | os.PathLike, idx_path: str | os.PathLike | None = None, keys: Sequence[int] | None = None) -> Path:
    """Rebuild the ``.idx`` of a ``.rec`` by scanning it (keys 0, 1, ... in file order unless given)."""
    reader = RecordIOReader(rec_path, idx_path=None)
    keys = reader.keys if keys is None else np.asarray(keys, dtype=np.int64)
    if len(keys) != len(reader):
        raise ValueError(f"{rec_path}: {len(reader)} records but {len(keys)} keys")
    target = Path(idx_path) if idx_path else reader.path.with_suffix(".idx")
    with atomic_path(target) as tmp:
        tmp.write_text("".join(f"{k}\t{o}\n" for k, o in zip(keys.tolist(), reader.offsets.tolist())), encoding="ascii")
    return target
