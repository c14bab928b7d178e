"""Atomic file writes (a crash never leaves a half-written checkpoint, results file or plot), and the size check
that comes before reading a user's text file whole."""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; on success fsync it and rename over ``path``."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, target)
        dir_fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (``atomic_path``)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


MAX_TEXT_BYTES = 256 * 2**20  # a list, pairs or key file larger than this is not one


def check_text_size(path: str | os.PathLike, limit: int = MAX_TEXT_BYTES) -> Path:
    """``path`` when its size fits ``limit``; a ValueError naming it otherwise, before a byte is read (a huge or
    sparse file would otherwise be read whole into memory)."""
    path = Path(path)
    size = path.stat().st_size
    if size > limit:
        raise ValueError(f"{path}: {size:,} bytes is too large for a text file (at most {limit:,})")
    return path


def not_text(path: str | os.PathLike, error: UnicodeDecodeError) -> ValueError:
    """The error for a text input that does not decode, naming the file (the codec's message does not)."""
    return ValueError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})")


def read_text_checked(path: str | os.PathLike, limit: int = MAX_TEXT_BYTES) -> str:
    """The UTF-8 text of ``path``, its size checked first (``check_text_size``); a byte that does not decode is a
    ValueError naming the file (``not_text``)."""
    try:
        return check_text_size(path, limit).read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise not_text(path, error) from None


def check_writable(path: str | os.PathLike, folder: bool = False) -> Path:
    """``path`` when it can be written (as a file, or as a folder to create or fill when ``folder``); the OSError
    naming it otherwise, before any work is done, so a refusal leaves nothing behind (an unnamed temporary file
    probes the nearest existing folder: nothing appears in it)."""
    path = Path(path)
    if path.is_dir() != folder and path.exists():
        code, reason = (errno.ENOTDIR, "Not a directory") if folder else (errno.EISDIR, "Is a directory")
        raise (NotADirectoryError if folder else IsADirectoryError)(code, reason, str(path))
    probe = path if folder and path.is_dir() else path.absolute().parent
    while not probe.exists():  # the write creates missing folders: probe the first one that exists
        probe = probe.parent
    try:
        tempfile.TemporaryFile(dir=probe).close()
    except OSError as error:
        raise type(error)(error.errno, error.strerror, str(path)) from None
    return path
