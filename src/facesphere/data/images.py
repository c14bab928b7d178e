"""Image decoding and tensor conversion.

``load_image`` is the single entry point from a file on disk to an HxWx3 uint8 RGB array: it applies
the EXIF orientation, converts every Pillow mode (grayscale, alpha, palette, 16-bit, CMYK, ...) to
8-bit RGB, refuses decompression bombs before decoding, and reports every failure as one exception
type, ``ImageError``, so loaders can catch exactly that and name the offending file.

Before a file is read it is checked by its size (``DEFAULT_MAX_BYTES``) and its first bytes (one of the
:data:`IMAGE_MAGIC` signatures), so a huge or foreign file in a folder of photos costs one small read, not
its whole size in memory. A GIF gives its first frame.

Plain JPEGs (RGB or grayscale, upright, complete) are decoded with OpenCV once Pillow has read and
checked the header: the same libjpeg-turbo pixels, roughly 1.4-2x the speed of the Pillow
path for 112x112 face crops (``benchmarks/data_throughput.py``). Anything else goes through Pillow.
"""

from __future__ import annotations

import io
import logging
import os
import stat
import struct
import warnings
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 40_000_000
"""Our own ceiling on declared image size (40 MP): face crops are tiny, anything larger is suspect."""

DEFAULT_MAX_BYTES = 64 * 2**20
"""Largest image file ``load_image`` reads (64 MiB; ``max_bytes=None`` disables it): checked before reading."""

IMAGE_MAGIC = {
    "JPEG": (b"\xff\xd8\xff",),
    "PNG": (b"\x89PNG\r\n\x1a\n",),
    "BMP": (b"BM",),
    "GIF": (b"GIF87a", b"GIF89a"),
    "TIFF": (b"II*\x00", b"MM\x00*"),
    "PPM/PGM/PBM": tuple(b"P%d" % k for k in range(1, 7)),
}
"""Leading bytes of each decoded format (WebP: ``RIFF`` + size + ``WEBP``, checked apart)."""

ALPHA_BACKGROUND = (128, 128, 128)
"""Transparent pixels are composited over mid-grey, which normalises to ~0."""

JPEG_DECODER = "opencv"
"""Decoder of the pixel data of plain JPEGs in ``load_image_bytes``: "opencv" (faster) or "pillow"."""

_JPEG_EOI = b"\xff\xd9"
_ORIENTATION = 0x0112

logger = logging.getLogger(__name__)

MEAN = 127.5
STD = 128.0
_NORMALISE_LUT = (np.arange(256, dtype=np.float32) - np.float32(MEAN)) / np.float32(STD)


class ImageError(ValueError):
    """An image file could not be turned into an RGB array; ``path`` and ``reason`` say which and why."""

    def __init__(self, path: str | os.PathLike, reason: str | None = None) -> None:
        if reason is None:
            # One argument: a DataLoader re-raising a worker's error with its formatted message.
            self.path, self.reason = "", str(path)
            super().__init__(str(path))
            return
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class ImageTooLarge(ImageError):
    """The image declares more pixels than allowed (refused before decoding)."""

    def __reduce__(self):  # keep the two-argument constructor picklable across DataLoader workers
        return (type(self), (self.path, self.reason) if self.path else (self.reason,))


def load_image(path: str | os.PathLike, max_pixels: int | None = DEFAULT_MAX_PIXELS,
               max_bytes: int | None = DEFAULT_MAX_BYTES) -> np.ndarray:
    """Decode ``path`` into an HxWx3 uint8 RGB array, upright according to its EXIF orientation.

    Before reading, the file's size is checked against ``max_bytes`` and its first bytes against
    :data:`IMAGE_MAGIC`; the declared size is checked before any pixel is decoded, against both Pillow's
    ``Image.MAX_IMAGE_PIXELS`` and ``max_pixels`` (``None`` disables either of our own limits).
    Raises ``ImageError`` for missing, non-image, truncated, empty or oversized files.
    """
    path = Path(path)
    try:
        data = _read_checked(path, max_bytes)
        return _decode(io.BytesIO(data), path, max_pixels, data)
    except FileNotFoundError:
        raise ImageError(path, "file not found") from None
    except IsADirectoryError:
        raise ImageError(path, "is a directory, not an image file") from None
    except PermissionError:
        raise ImageError(path, "permission denied") from None
    except UnidentifiedImageError:
        raise ImageError(path, "not a recognised image format (or a corrupt header)") from None
    except OSError as error:  # a name too long, a path through a file, a link loop, an I/O error
        raise ImageError(path, f"cannot read: {error.strerror or error}") from None


def load_image_bytes(data: bytes, name: str = "<bytes>", max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """``load_image`` for an encoded image held in memory (e.g. inside a ``.bin`` file); ``name`` labels errors."""
    if not data:
        raise ImageError(name, "empty image data")
    _check_magic(data, name)
    try:
        return _decode(io.BytesIO(data), Path(name), max_pixels, data)
    except UnidentifiedImageError:
        raise ImageError(name, "not a recognised image format") from None


def _check_magic(head: bytes, name: str | os.PathLike) -> None:
    """``ImageError`` unless ``head`` (a file's first bytes) starts like one of the formats decoded here."""
    if any(head.startswith(m) for magics in IMAGE_MAGIC.values() for m in magics):
        return
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return
    raise ImageError(name, "not a recognised image format (its first bytes are none of JPEG, PNG, BMP, GIF, "
                           "TIFF, WebP, PPM)")


def _read_checked(path: Path, max_bytes: int | None) -> bytes:
    """The bytes of ``path``, read only once its size and first bytes say it is an image small enough."""
    info = path.stat()
    if stat.S_ISDIR(info.st_mode):
        raise IsADirectoryError(str(path))
    if not stat.S_ISREG(info.st_mode):
        raise ImageError(path, "not a regular file")
    size = info.st_size
    if size == 0:
        raise ImageError(path, "empty file (0 bytes)")
    if max_bytes is not None and size > max_bytes:
        raise ImageError(path, f"file of {size} bytes exceeds the limit of {max_bytes} bytes for an image")
    with open(path, "rb") as handle:
        head = handle.read(16)
        _check_magic(head, path)
        data = head + (handle.read() if max_bytes is None else handle.read(max_bytes + 1 - len(head)))
    if max_bytes is not None and len(data) > max_bytes:  # grew since the stat
        raise ImageError(path, f"file exceeds the limit of {max_bytes} bytes for an image")
    return data


def declared_size(data: bytes, name: str, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """(height, width) an encoded image declares, from its header only (no pixel decoded), refused exactly as
    ``load_image_bytes`` refuses it before decoding; ``name`` labels errors."""
    if not data:
        raise ImageError(name, "empty image data")
    try:
        return _decode(io.BytesIO(data), Path(name), max_pixels, header_only=True)
    except UnidentifiedImageError:
        raise ImageError(name, "not a recognised image format") from None


def _decode(source: Path | io.BytesIO, path: Path, max_pixels: int | None, data: bytes | None = None,
            header_only: bool = False) -> np.ndarray | tuple[int, int]:
    """The checks and decoding all loaders share; "unrecognised format" is left to the caller to word.

    ``data`` (the encoded bytes, when in memory) enables the OpenCV JPEG path after the header checks;
    ``header_only`` returns the checked (height, width) without decoding a pixel."""
    try:
        with warnings.catch_warnings():
            # Pillow only warns between 1x and 2x its limit; treat that as a refusal too.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as image:
                width, height = image.size
                if width <= 0 or height <= 0:
                    raise ImageError(path, f"zero-size image ({width}x{height})")
                if max_pixels is not None and width * height > max_pixels:
                    raise ImageTooLarge(
                        path, f"declared size {width}x{height} exceeds the limit of {max_pixels} pixels (decompression bomb?)"
                    )
                if header_only:
                    return height, width
                if data is not None and JPEG_DECODER == "opencv":
                    array = _decode_jpeg_opencv(image, data)
                    if array is not None:
                        return array
                image.load()
                return _to_rgb_array(_upright(image, path))
    except (ImageError, FileNotFoundError, IsADirectoryError, UnidentifiedImageError):
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageTooLarge(path, f"refused as a decompression bomb: {error}") from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError) as error:
        # Pillow reports truncated or corrupt data as OSError ("image file is truncated"), SyntaxError
        # (broken PNG chunks) or ValueError, and some plugins let struct.error or IndexError out of a short
        # header; the original message is kept as the reason.
        reason = str(error) or type(error).__name__
        if "truncated" in reason.lower():
            reason = f"truncated file ({reason})"
        raise ImageError(path, f"cannot decode: {reason}") from None


def _decode_jpeg_opencv(image: Image.Image, data: bytes) -> np.ndarray | None:
    """Pixels of a plain JPEG via ``cv2.imdecode``, or None to leave the image to Pillow.

    Only RGB/grayscale JPEGs without a rotating orientation tag that end with the EOI marker qualify.
    libjpeg (in OpenCV) fills a truncated scan with grey and merely warns, so completeness is checked
    here: 0xFFD9 cannot occur inside entropy-coded data (0xFF there is always followed by 0x00 or a
    restart marker), hence data ending in EOI after a header Pillow parsed up to the scan is complete.
    Everything else (truncated, CMYK, rotated, trailing bytes) gets Pillow's checks and error messages.
    """
    if image.format != "JPEG" or image.mode not in ("RGB", "L") or not data.endswith(_JPEG_EOI):
        return None
    try:
        # getexif() also reports an XMP orientation, as exif_transpose does; without either block it is upright.
        if ("exif" in image.info or "xmp" in image.info) and image.getexif().get(_ORIENTATION, 1) != 1:
            return None
    except Exception:  # noqa: BLE001 - malformed EXIF: Pillow's path logs it and decodes anyway
        return None
    array = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    if array is None or array.shape != (image.size[1], image.size[0], 3):
        return None
    return cv2.cvtColor(array, cv2.COLOR_BGR2RGB)


def _upright(image: Image.Image, path: Path) -> Image.Image:
    """Apply the EXIF orientation; a malformed EXIF block is ignored (logged) rather than fatal."""
    try:
        return ImageOps.exif_transpose(image)
    except Exception as error:  # noqa: BLE001 - EXIF parsing can fail in many ways; pixels are still fine
        logger.warning("%s: ignoring unreadable EXIF orientation (%s)", path, error)
        return image


def _to_rgb_array(image: Image.Image) -> np.ndarray:
    """Convert any Pillow mode to an HxWx3 uint8 RGB array, scaling high bit depths instead of clipping."""
    mode = image.mode
    if mode == "RGB":
        return np.asarray(image, dtype=np.uint8).copy()
    if mode.startswith("I;16") or mode in ("I", "F"):
        array = np.asarray(image)
        gray = _wide_to_uint8(array, mode)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    elif mode == "P":
        image = image.convert("RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, ALPHA_BACKGROUND + (255,))
        image = Image.alpha_composite(background, rgba)
    if image.mode != "RGB":
        image = image.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV: Pillow's conversions are correct here
    return np.asarray(image, dtype=np.uint8).copy()


def _wide_to_uint8(array: np.ndarray, mode: str) -> np.ndarray:
    """Map 16/32-bit integer or float grayscale to 0..255."""
    values = array.astype(np.float64)
    if mode.startswith("I;16"):
        scaled = values / 257.0  # 65535 -> 255 exactly
    elif mode == "I":
        # 32-bit container: 16-bit PNG/TIFF data lands here with values up to 65535.
        scaled = values / 257.0 if values.size and values.max() > 255 else values
    else:  # "F": assume [0, 1] if it looks like it, else [0, 255]
        scaled = values * 255.0 if values.size and values.max() <= 1.0 else values
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """HxWx3 (or NxHxWx3) uint8 RGB -> float32 (3, H, W) (or (N, 3, H, W)) normalised as (x - 127.5) / 128."""
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim not in (3, 4) or array.shape[-1] != 3:
        raise ValueError(f"expected uint8 (..., H, W, 3) RGB, got {array.dtype} {array.shape}")
    # One table lookup on a channel-first copy: exact (x - 127.5) / 128 in float32, a single pass, and no
    # torch intra-op threads (which cost more CPU than the work itself at face-crop sizes).
    channels_first = np.ascontiguousarray(np.moveaxis(array, -1, -3))
    return torch.from_numpy(_NORMALISE_LUT[channels_first])


def to_uint8(tensor: torch.Tensor) -> np.ndarray:
    """Inverse of ``to_tensor`` for visualisation: (3, H, W) or (N, 3, H, W) -> HxWx3 (NxHxWx3) uint8."""
    if tensor.ndim not in (3, 4) or tensor.shape[-3] != 3:
        raise ValueError(f"expected (..., 3, H, W), got {tuple(tensor.shape)}")
    values = tensor.detach().to("cpu", torch.float32) * STD + MEAN
    values = values.round_().clamp_(0, 255).to(torch.uint8).movedim(-3, -1)
    return values.contiguous().numpy()
