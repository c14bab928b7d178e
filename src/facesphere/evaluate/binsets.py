"""Safe reader for InsightFace verification ``.bin`` files (lfw.bin, cfp_fp.bin, agedb_30.bin, ...).

A ``.bin`` is a pickle of ``(bins, issame)``: ``bins`` holds 2·N encoded JPEG/PNG images (pair k is
``bins[2k], bins[2k+1]``) and ``issame`` N booleans. Two encodings of ``bins`` exist in the wild:

* ``bytes`` (the MXNet-era files, written by Python 2 as ``str``; read here with ``encoding="bytes"``;
  Python 3 protocol-2 pickles of bytes go through ``_codecs.encode(text, "latin1")``, of empty bytes ``bytes()``);
* ``numpy`` uint8 arrays of the encoded bytes (the Paddle variant, e.g. ``small_lfw.bin``: shape (n, 1)), pickled through
  ``numpy.core.multiarray._reconstruct``, ``numpy.ndarray`` and ``numpy.dtype``.

``pickle.load`` on such a file would run whatever callable the file names. ``BinUnpickler`` admits
only the globals above and replaces each with a stand-in that checks its arguments (uint8 only, no
object arrays, latin-1 text only) and never calls into numpy; every other global is refused with an
``UnsafePickleError`` naming it, before anything is called.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
from pathlib import Path

import numpy as np

from facesphere.data.images import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, load_image_bytes
from facesphere.data.transforms import resize_to

logger = logging.getLogger(__name__)

MAX_BIN_BYTES = 4 * 2**30  # the real sets (LFW, CFP, AgeDB) are 0.1-0.5 GB; larger is a wrong or hostile file

__all__ = [
    "BinFormatError",
    "BinUnpickler",
    "UnsafePickleError",
    "decode_image_bytes",
    "load_bin",
    "read_bin",
]


class UnsafePickleError(pickle.UnpicklingError, ValueError):
    """The pickle names a global (callable or class) that a ``.bin`` file has no business using.

    Also a ``ValueError``, like every refusal of a bad input file, so callers (the CLI) report it as one."""


class BinFormatError(ValueError):
    """The file unpickled safely but is not a ``(bins, issame)`` verification set."""


# --------------------------------------------------------------------------- restricted unpickler


class _NDArrayMarker:
    """Stands in for ``numpy.ndarray``: only a token for ``_reconstruct``; not callable, not modifiable."""

    __slots__ = ()

    def __setstate__(self, state) -> None:
        raise UnsafePickleError("refusing to set state on numpy.ndarray")

    def __repr__(self) -> str:
        return "<numpy.ndarray (restricted)>"


_NDARRAY = _NDArrayMarker()


class _UInt8DType:
    """Stands in for ``numpy.dtype('u1')``; its ``__setstate__`` accepts only a plain uint8 state."""

    def __setstate__(self, state) -> None:
        # numpy writes (version, byteorder, subarray, names, fields, elsize, alignment, flags)
        if not (isinstance(state, tuple) and len(state) >= 8 and state[1] in ("|", b"|")
                and state[2] is None and state[3] is None and state[4] is None):
            raise UnsafePickleError(f"numpy dtype state {state!r} is not a plain uint8 dtype")


def _dtype(spec, align=False, copy=False) -> _UInt8DType:
    if spec not in ("u1", b"u1", "uint8", b"uint8", "|u1", b"|u1"):
        raise UnsafePickleError(f"numpy dtype {spec!r} is not allowed in a .bin file (only uint8 arrays are)")
    return _UInt8DType()


class _UInt8Array:
    """Stands in for a uint8 ``numpy.ndarray`` of encoded bytes; ``__setstate__`` validates numpy's array state."""

    data: bytes | None = None

    def __setstate__(self, state) -> None:
        if not (isinstance(state, tuple) and len(state) == 5):
            raise UnsafePickleError("malformed numpy array state")
        _version, shape, dtype, _fortran, raw = state
        if not isinstance(dtype, _UInt8DType):
            raise UnsafePickleError("numpy array state does not carry an allowed (uint8) dtype")
        # small_lfw.bin stores (n, 1) column arrays; the bytes are the same whatever the shape
        if not (isinstance(shape, tuple) and 1 <= len(shape) <= 2
                and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
            raise UnsafePickleError(f"numpy array shape {shape!r} is not 1-D or 2-D")
        if not isinstance(raw, (bytes, bytearray)) or len(raw) != int(np.prod(shape)):
            raise UnsafePickleError("numpy uint8 array payload is missing or has the wrong length")
        self.data = bytes(raw)


def _reconstruct(cls, shape, typecode) -> _UInt8Array:
    if cls is not _NDARRAY or shape != (0,) or typecode not in (b"b", "b"):
        raise UnsafePickleError("numpy _reconstruct called with unexpected arguments")
    return _UInt8Array()


def _latin1_encode(text, encoding="utf-8", errors="strict") -> bytes:
    """``_codecs.encode`` as Python 3 uses it to pickle bytes at protocol < 3; nothing else is allowed."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafePickleError(f"_codecs.encode({type(text).__name__}, {encoding!r}) is not allowed")
    return text.encode("latin1")


def _empty_bytes(*args) -> bytes:
    """``bytes()``, as Python 3 pickles an empty ``bytes`` at protocol < 3; any argument is refused."""
    if args:
        raise UnsafePickleError("bytes(...) with arguments is not allowed")
    return b""


class _Guarded:
    """An allowed callable as the pickle sees it: callable, but BUILD cannot touch its attributes."""

    __slots__ = ("_fn", "_name")

    def __init__(self, fn, name: str) -> None:
        self._fn, self._name = fn, name

    def __call__(self, *args, **kwargs):
        return self._fn(*args, **kwargs)

    def __setstate__(self, state) -> None:
        raise UnsafePickleError(f"refusing to set state on {self._name}")


_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _Guarded(_reconstruct, "numpy _reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"): _Guarded(_reconstruct, "numpy _reconstruct"),
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _Guarded(_dtype, "numpy.dtype"),
    ("_codecs", "encode"): _Guarded(_latin1_encode, "_codecs.encode"),
    ("__builtin__", "bytes"): _Guarded(_empty_bytes, "bytes"),
    ("builtins", "bytes"): _Guarded(_empty_bytes, "bytes"),
}


class BinUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the handful of globals a ``.bin`` legitimately uses (see module doc)."""

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"refusing to load global {module}.{name}: a .bin file may only contain encoded images "
                "(bytes or uint8 arrays) and booleans"
            ) from None

    def persistent_load(self, pid):
        raise UnsafePickleError(f"refusing persistent id {pid!r}")


class _BoundedReader:
    """The file as the unpickler reads it: one read may ask for at most ``max_item`` bytes and never more than the
    file still holds, so a declared length (BINBYTES8, a huge array) is refused before it is allocated."""

    def __init__(self, handle, size: int, max_item: int) -> None:
        self._handle, self._left, self._max_item = handle, size, max_item

    def _take(self, n: int) -> int:
        if n > self._max_item:
            raise BinFormatError(f"an item of {n:,} bytes exceeds the {self._max_item:,}-byte limit of one image")
        if n > self._left:
            raise BinFormatError(f"an item of {n:,} bytes runs past the end of the file")
        return n

    def read(self, n: int = -1) -> bytes:
        data = self._handle.read(self._take(self._left if n is None or n < 0 else min(n, self._left)))
        self._left -= len(data)
        return data

    def readinto(self, buffer) -> int:
        count = self._handle.readinto(memoryview(buffer)[: self._take(len(buffer))])
        self._left -= count
        return count

    def readline(self, limit: int = -1) -> bytes:
        line = self._handle.readline(min(self._max_item, self._left) if limit is None or limit < 0 else limit)
        self._left -= len(line)
        return line


def _safe_load(handle, size: int, source: str, max_item: int):
    try:
        return BinUnpickler(_BoundedReader(handle, size, max_item), encoding="bytes").load()
    except (UnsafePickleError, BinFormatError) as error:
        raise type(error)(f"{source}: {error}") from None
    except (pickle.UnpicklingError, EOFError, TypeError, ValueError, AttributeError, IndexError,
            KeyError, OverflowError, MemoryError, RecursionError, UnicodeDecodeError) as error:
        raise BinFormatError(f"{source}: not a readable pickle ({type(error).__name__}: {error})") from None


# --------------------------------------------------------------------------- reading


def _as_bytes(item, index: int, source: str) -> bytes:
    if isinstance(item, _UInt8Array) and item.data is not None:
        return item.data
    if isinstance(item, (bytes, bytearray)):
        return bytes(item)
    raise BinFormatError(f"{source}: image {index} is a {type(item).__name__}, expected encoded image bytes")


def read_bin(path: str | os.PathLike, max_bytes: int | None = MAX_BIN_BYTES,
             max_image_bytes: int = DEFAULT_MAX_BYTES) -> tuple[list[bytes], np.ndarray]:
    """The encoded images (2·N byte strings) and ``issame`` (N bools) of a ``.bin``, safely unpickled.

    The pickle is streamed from the file; a file over ``max_bytes`` (None: no limit) or an image declared over
    ``max_image_bytes`` is refused before it is read."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if max_bytes is not None and size > max_bytes:
                raise BinFormatError(f"{path}: {size:,} bytes is too large for a .bin file (at most {max_bytes:,})")
            obj = _safe_load(handle, size, str(path), max_image_bytes)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such .bin file") from None
    except OSError as error:  # a folder, no permission, an I/O error
        raise BinFormatError(f"{path}: cannot read ({error.strerror or error})") from None
    if not (isinstance(obj, (tuple, list)) and len(obj) == 2):
        raise BinFormatError(f"{path}: expected a (bins, issame) pair, got {type(obj).__name__}")
    bins, issame = obj
    if not isinstance(bins, (list, tuple)) or not isinstance(issame, (list, tuple)):
        raise BinFormatError(f"{path}: bins and issame must be lists")
    encoded = [_as_bytes(b, i, str(path)) for i, b in enumerate(bins)]
    if not all(isinstance(v, bool) or (isinstance(v, int) and v in (0, 1)) for v in issame):
        raise BinFormatError(f"{path}: issame must hold booleans")
    if len(encoded) != 2 * len(issame):
        raise BinFormatError(f"{path}: {len(encoded)} images for {len(issame)} pairs (expected 2 per pair)")
    if not issame:
        raise BinFormatError(f"{path}: no pairs")
    logger.info("%s: %d encoded images, %d pairs", path, len(encoded), len(issame))
    return encoded, np.asarray(issame, dtype=bool)


def decode_image_bytes(data: bytes, name: str = "<bytes>", max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode an encoded image into HxWx3 uint8 RGB, with ``load_image``'s checks; ``ImageError`` on failure."""
    return load_image_bytes(data, name, max_pixels)


def _unique_encoded(encoded: list[bytes]) -> tuple[list[bytes], np.ndarray]:
    """Distinct encodings (first occurrence order) and, for each slot, the index of its distinct encoding."""
    first: dict[bytes, int] = {}
    unique: list[bytes] = []
    slot = np.empty(len(encoded), dtype=np.int64)
    for i, blob in enumerate(encoded):
        key = hashlib.sha1(blob).digest() + len(blob).to_bytes(8, "little")
        if key not in first:
            first[key] = len(unique)
            unique.append(blob)
        slot[i] = first[key]
    return unique, slot


def load_bin(
    path: str | os.PathLike, image_size: tuple[int, int] | None = None, dedupe: bool = False
) -> tuple[np.ndarray, np.ndarray] | tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decode a ``.bin`` into ``(images, issame)``: (M, H, W, 3) uint8 RGB and (N,) bool.

    Without ``dedupe`` M = 2·N and pair k is ``images[2k], images[2k+1]``. With ``dedupe`` identical
    encodings are decoded once and a third array ``slots`` (2·N,) maps every pair slot to its image.
    Images whose size differs from ``image_size`` (default: the first image's size) are resized, as
    InsightFace's ``load_bin`` does.
    """
    encoded, issame = read_bin(path)
    unique, slots = _unique_encoded(encoded) if dedupe else (encoded, np.arange(len(encoded)))
    images = []
    for i, blob in enumerate(unique):
        image = decode_image_bytes(blob, f"{path}[{i}]")
        if image_size is None:
            image_size = image.shape[:2]
        if image.shape[:2] != tuple(image_size):
            image = resize_to(image, tuple(image_size))
        images.append(image)
    stacked = np.stack(images)
    if dedupe:
        logger.info("%s: %d distinct images among %d slots", path, len(unique), len(encoded))
        return stacked, issame, slots
    return stacked, issame
