"""InsightFace training sets in MXNet RecordIO (``train.rec`` / ``train.idx`` / ``property``): read and write.

Layout (MS1M, Glint360K, WebFace packs as arcface_torch reads them): record 0 is a header with flag 2
and label ``(a, b)``; keys ``1 .. a-1`` are images, keys ``a .. b-1`` identity records whose label
``(start, end)`` is the half-open key range of that identity's images (identity = key - a). Image
records carry the identity as their label (a float, or the first of a label array) and their key as
``id``; a label array ``[identity, age]`` also gives the image's age in years (age < 0: unknown), which
facesphere writes for folders with ages (InsightFace's own packs have a scalar label: no ages). ``property``
holds ``num_classes,height,width``. A ``.rec`` whose record 0 has flag 0 has no header: every indexed record
is an image labelled by its own header.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import os
import statistics
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from facesphere.data.ages import MAX_AGE, declared_ages
from facesphere.data.folders import (
    IMAGE_EXTENSIONS,
    EncodedImagesDataset,
    ImageFolderDataset,
)
from facesphere.data.images import DEFAULT_MAX_PIXELS, ImageError, declared_size, load_image_bytes
from facesphere.data.lists import too_sparse
from facesphere.data.recordio import (
    IRHeader,
    RecordIOError,
    RecordIOReader,
    RecordIOWriter,
    pack,
    shareable,
)
from facesphere.utils.files import atomic_path
from facesphere.utils.progress import progress_bar

logger = logging.getLogger(__name__)

__all__ = ["PackResult", "RecordDataset", "RecordLayout", "describe_records", "image_format", "pack_folder",
           "read_layout", "read_property", "resolve_record_paths"]

REC_NAME, IDX_NAME, PROPERTY_NAME = "train.rec", "train.idx", "property"


def resolve_record_paths(root_or_rec: str | os.PathLike) -> tuple[Path, Path | None, Path | None]:
    """(.rec, .idx or None, property or None) of a dataset folder (``train.rec`` inside) or a ``.rec`` path."""
    path = Path(root_or_rec)
    if path.is_dir():
        path = path / REC_NAME
    if not path.is_file():
        raise FileNotFoundError(f"record file {path} does not exist")
    idx = path.with_suffix(".idx")
    prop = path.parent / PROPERTY_NAME
    return path, idx if idx.is_file() else None, prop if prop.is_file() else None


def read_property(path: str | os.PathLike) -> tuple[int, int, int]:
    """``num_classes,height,width`` of an InsightFace ``property`` file."""
    text = Path(path).read_text(encoding="utf-8", errors="replace").strip()
    try:
        values = tuple(int(v) for v in text.split(","))
        if len(values) != 3 or min(values) < 1:
            raise ValueError
    except ValueError:
        raise ValueError(f"{path}: expected 'num_classes,height,width' (positive integers), got {text[:80]!r}") from None
    return values  # type: ignore[return-value]


@dataclasses.dataclass
class RecordLayout:
    """Which records are images and their labels, read from headers only (no image is decoded)."""

    image_keys: np.ndarray  # int64, one per image, in index order
    labels: np.ndarray  # int64 identity per image
    header: tuple[int, int] | None  # (a, b) of the InsightFace header record, None without one
    identity_ranges: np.ndarray | None  # (num_identities, 2) int64 [start, end) key ranges, None without
    ages: np.ndarray | None = None  # float64 age per image (NaN: unknown) when image labels are [identity, age]

    @property
    def num_identities(self) -> int:
        return len(self.identity_ranges) if self.identity_ranges is not None else int(self.labels.max()) + 1


def _label(header: IRHeader, path: Path, key: int, offset: int, position: int = 0, what: str = "identity") -> int:
    """The header's ``position``-th label as a non-negative integer (a float32 holds integers exactly up to 2^24 and
    represents them up to 2^63 here), else a RecordIOError naming the record."""
    value = header.labels[position] if len(header.labels) > position else float("nan")
    if not np.isfinite(value) or value != int(value) or not 0 <= value < 2**63:
        raise RecordIOError(path, f"record {key}: label {value} is not a non-negative integer {what}", offset)
    return int(value)


def read_layout(reader: RecordIOReader) -> RecordLayout:
    """The image keys and labels of a ``.rec`` in the InsightFace layout, or of a plain image ``.rec``.

    Labels come from the identity records when they cover every image exactly once (one small read per
    identity); otherwise, and for a ``.rec`` without the header record, from every image header. Ages are read
    from every image header when the first image's label is an array (``[identity, age]``), else there are none.
    """
    if not len(reader):
        raise RecordIOError(reader.path, "no records")
    keys = reader.keys
    header0 = reader.read_label_header(0) if 0 in reader else None
    if header0 is None or header0.flag == 0:
        return RecordLayout(keys.copy(), _image_labels(reader, keys), None, None, _image_ages(reader, keys))
    if len(header0.labels) < 2:
        raise RecordIOError(reader.path, f"header record 0 has flag {header0.flag} but no (a, b) label", reader.offset(0))
    a, b = (_label(header0, reader.path, 0, reader.offset(0), i, "key") for i in (0, 1))
    if not 1 <= a <= b or a - 1 > 2 * len(reader):  # a few missing images are tolerated below, not most of them
        raise RecordIOError(reader.path, f"header record 0 has an invalid label ({a}, {b}) for an index of "
                                         f"{len(reader)} records", reader.offset(0))
    image_keys = keys[(keys >= 1) & (keys < a)]
    if len(image_keys) != a - 1:
        logger.warning("%s: the header announces %d images but the index lists %d of them", reader.path, a - 1, len(image_keys))
    ranges = []
    for key in range(a, b):
        if key not in reader:
            raise RecordIOError(reader.path, f"identity record {key} (header range [{a}, {b})) is missing from the index")
        header = reader.read_label_header(key)
        if len(header.labels) < 2:
            raise RecordIOError(reader.path, f"identity record {key} has no (start, end) label", reader.offset(key))
        ranges.append(tuple(_label(header, reader.path, key, reader.offset(key), i, "key") for i in (0, 1)))
    identity_ranges = np.array(ranges, dtype=np.int64).reshape(-1, 2)
    by_key = np.full(a, -1, dtype=np.int64)
    consistent = len(ranges) > 0
    for identity, (start, end) in enumerate(ranges):
        if not 1 <= start <= end <= a or np.any(by_key[start:end] >= 0):
            consistent = False
            break
        by_key[start:end] = identity
    labels = by_key[image_keys] if consistent else None
    if labels is None or np.any(labels < 0):
        if ranges:
            logger.warning("%s: identity records do not cover the images exactly once; reading every image header", reader.path)
        labels = _image_labels(reader, image_keys)
        identity_ranges = identity_ranges if consistent else None
    return RecordLayout(image_keys, labels, (a, b), identity_ranges, _image_ages(reader, image_keys))


def _image_labels(reader: RecordIOReader, keys: np.ndarray) -> np.ndarray:
    start = time.perf_counter()
    labels = np.empty(len(keys), dtype=np.int64)
    for i, key in enumerate(keys.tolist()):
        labels[i] = _label(reader.read_label_header(key), reader.path, key, reader.offset(key))
    if len(keys) > 10_000:
        logger.info("%s: read %d image headers in %.1f s", reader.path, len(keys), time.perf_counter() - start)
    return labels


def _image_ages(reader: RecordIOReader, keys: np.ndarray) -> np.ndarray | None:
    """The second label of every image header as an age (< 0: unknown, NaN), or None when the first image has a
    scalar label; a RecordIOError naming the record for an age that is not finite or above ``MAX_AGE``."""
    try:
        if not len(keys) or len(reader.read_label_header(int(keys[0])).labels) < 2:
            return None
    except RecordIOError:  # a damaged first record is refused when it is read, as in a pack without ages
        return None
    ages = np.full(len(keys), np.nan)
    for i, key in enumerate(keys.tolist()):
        labels = reader.read_label_header(key).labels
        age = labels[1] if len(labels) > 1 else -1.0
        if not (age < 0 or 0 <= age <= MAX_AGE):
            raise RecordIOError(reader.path, f"record {key}: age {age} is not finite or above {MAX_AGE:g} years",
                                reader.offset(key))
        if age >= 0:
            ages[i] = age
    return ages


class RecordDataset(EncodedImagesDataset):
    """Images of an InsightFace RecordIO pack (a folder with ``train.rec``, or a ``.rec`` path), decoded on access.

    Same contract as ``ImageFolderDataset``: ``(image, targets)`` samples (with ``age`` when the records carry
    ages, see ``read_layout``), ``labels`` without decoding,
    ``num_classes`` (from ``property`` when present, else the identity records or largest label + 1),
    ``image_size`` (given, else ``property``, else the first image), augmentation seeded by
    (seed, epoch, index). The reader opens the file lazily per process, so DataLoader workers work.
    """

    def __init__(
        self,
        root_or_rec: str | os.PathLike,
        image_size: tuple[int, int] | None = None,
        augment: Any = None,
        seed: int = 0,
        strict: bool = False,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ) -> None:
        self.rec_path, self.idx_path, self.property_path = resolve_record_paths(root_or_rec)
        self.reader = RecordIOReader(self.rec_path, self.idx_path)
        layout = read_layout(self.reader)
        self.layout = layout
        self.keys = layout.image_keys
        self.property = read_property(self.property_path) if self.property_path else None
        labels_classes = int(layout.labels.max()) + 1 if len(layout.labels) else 0
        num_classes = max(layout.num_identities, labels_classes)
        if self.property is not None:
            if self.property[0] != num_classes:
                logger.warning("%s: property says %d classes, the records have %d", self.property_path, self.property[0], num_classes)
            num_classes = self.property[0]
            if image_size is None:
                image_size = self.property[1:]
        distinct = len(np.unique(layout.labels))
        if too_sparse(num_classes, distinct):
            source = (f"{self.property_path}: property says {num_classes:,} classes" if num_classes != labels_classes
                      else f"{self.rec_path}#{int(self.keys[np.argmax(layout.labels)])}: label {labels_classes - 1}")
            raise RecordIOError(source, f"the classifier would have {num_classes:,} classes but only {distinct:,} "
                                        "identities have images; repack with labels numbered 0..N-1")
        ages = declared_ages(layout.ages, str(self.rec_path))
        super().__init__(layout.labels, num_classes, image_size, augment, seed, strict, max_pixels, ages)
        logger.info("%s: %d images in %d classes", self.rec_path, len(self), self.num_classes)

    def read_image_bytes(self, index: int) -> tuple[IRHeader, bytes]:
        """The header and encoded image bytes of image ``index`` as stored."""
        key = int(self.keys[index])
        return self.reader.read_header(key)

    def decode(self, index: int) -> np.ndarray:
        _, payload = self.read_image_bytes(index)
        return load_image_bytes(payload, self.source(index), self.max_pixels)

    def source(self, index: int) -> str:
        return f"{self.rec_path}#{int(self.keys[index])}"

    def __repr__(self) -> str:
        return f"RecordDataset(rec={str(self.rec_path)!r}, images={len(self)}, classes={self.num_classes}, image_size={self.image_size})"


# --------------------------------------------------------------------------------------------- pack


@dataclasses.dataclass
class PackResult:
    """What ``pack_folder`` wrote."""

    out_dir: Path
    images: int
    identities: int
    image_size: tuple[int, int]
    stored: dict[str, int]  # how images were stored: "jpeg as is", "png as is", "re-encoded png", ...
    bytes: int


def image_format(data: bytes) -> str:
    """The container format of encoded image bytes, from their signature ("jpeg", "png", ... or "unknown")."""
    signatures = ((b"\xff\xd8\xff", "jpeg"), (b"\x89PNG\r\n\x1a\n", "png"), (b"BM", "bmp"), (b"GIF8", "gif"),
                  (b"II*\x00", "tiff"), (b"MM\x00*", "tiff"), (b"P6", "ppm"), (b"P5", "pgm"))
    for signature, name in signatures:
        if data.startswith(signature):
            return name
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return "unknown"


def _encode(image: np.ndarray, fmt: str, quality: int) -> bytes:
    buffer = io.BytesIO()
    if fmt == "jpeg":
        Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    else:
        Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def pack_folder(
    image_folder: str | os.PathLike,
    out_dir: str | os.PathLike,
    quality: int = 95,
    jpeg: bool = False,
    extensions: Iterable[str] = IMAGE_EXTENSIONS,
    overwrite: bool = False,
    verify: bool = True,
    progress: bool = True,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ages: str = "none",
) -> PackResult:
    """Pack a one-folder-per-identity image folder into ``out_dir/train.rec``, ``train.idx`` and ``property``.

    Classes and files are taken exactly as ``ImageFolderDataset`` orders them (label = class position).
    JPEG and PNG files are stored byte for byte, so reading back is lossless; other formats (BMP, WebP,
    TIFF, PPM) are stored as PNG of their decoded RGB pixels, which every RecordIO reader can decode.
    ``jpeg=True`` re-encodes every non-JPEG at ``quality`` instead (smaller, lossy). With ``verify`` each
    image is decoded once, so a corrupt file fails the pack, not the training run; without it (faster) only each
    header is read, so a decompression bomb or an unreadable header still fails the pack. All three files are
    written to temporary names and renamed at the end: an interrupted pack leaves nothing behind. ``ages`` (as
    ``ImageFolderDataset`` takes it) stores each image's label as ``[identity, age]`` (-1: unknown) when the
    folder has ages; ages are float32 in the record, like every label.
    """
    if not 1 <= quality <= 100:
        raise ValueError(f"JPEG quality must be in [1, 100], got {quality}")
    out_dir = Path(out_dir)
    if not overwrite and any((out_dir / name).exists() for name in (REC_NAME, IDX_NAME, PROPERTY_NAME)):
        raise FileExistsError(f"{out_dir} already holds a record dataset; pass overwrite=True (--overwrite) to replace it")
    folder = ImageFolderDataset(image_folder, image_size=(1, 1), extensions=extensions, max_pixels=max_pixels, ages=ages)
    n, classes = len(folder), folder.num_classes
    a, b = n + 1, n + 1 + classes
    starts = np.searchsorted(folder.labels, np.arange(classes + 1)) + 1  # labels are sorted: contiguous key ranges
    stored: dict[str, int] = {}
    sizes: dict[tuple[int, int], int] = {}
    out_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        property_tmp = stack.enter_context(atomic_path(out_dir / PROPERTY_NAME))  # renamed after the .rec/.idx
        writer = stack.enter_context(RecordIOWriter(out_dir / REC_NAME, out_dir / IDX_NAME))
        advance = stack.enter_context(progress_bar(progress, n, f"packing {folder.root.name}"))
        writer.write(pack(IRHeader(2, (float(a), float(b)), 0, 0)), key=0)
        for index, path in enumerate(folder.paths):
            data = path.read_bytes()
            fmt = image_format(data)
            as_is = fmt == "jpeg" or (fmt == "png" and not jpeg)
            if verify or not as_is:
                image = load_image_bytes(data, str(path), max_pixels)
                shape = image.shape[:2]
            else:
                shape = declared_size(data, str(path), max_pixels)
            sizes[shape] = sizes.get(shape, 0) + 1
            if as_is:
                how = f"{fmt} as is"
            else:
                data = _encode(image, "jpeg" if jpeg else "png", quality)
                how = f"{fmt} re-encoded as {'jpeg' if jpeg else 'png'}"
            stored[how] = stored.get(how, 0) + 1
            key = index + 1
            label = float(folder.labels[index])
            if folder.ages is not None:
                age = float(folder.ages[index])
                label = (label, -1.0 if np.isnan(age) else age)
            writer.write(pack(IRHeader(0, label, key, 0), data), key=key)
            advance()
        for identity in range(classes):
            key = a + identity
            writer.write(pack(IRHeader(2, (float(starts[identity]), float(starts[identity + 1])), key, 0)), key=key)
        total_bytes = writer.bytes_written
        (height, width), count = max(sizes.items(), key=lambda item: item[1])
        if count != n:
            logger.warning("%s: %d of %d images are not %dx%d; property records the most common size",
                           folder.root, n - count, n, height, width)
        property_tmp.write_text(f"{classes},{height},{width}\n", encoding="ascii")
        shareable(property_tmp)
    logger.info("packed %d images of %d identities (%s) into %s (%.2f MB)", n, classes,
                ", ".join(f"{v} {k}" for k, v in sorted(stored.items())), out_dir, total_bytes / 1e6)
    return PackResult(out_dir, n, classes, (height, width), stored, total_bytes)


# ------------------------------------------------------------------------------------------ inspect


def describe_records(dataset: RecordDataset, formats_checked: int = 1000) -> dict[str, Any]:
    """Counts and layout facts of a RecordIO pack, from its headers (plus the first bytes of a few images)."""
    reader, layout = dataset.reader, dataset.layout
    counts = np.bincount(layout.labels)
    counts = counts[counts > 0]
    picks = np.unique(np.linspace(0, len(dataset) - 1, min(formats_checked, len(dataset))).astype(int))
    formats: dict[str, int] = {}
    sizes: dict[str, int] = {}
    for i in picks.tolist():
        _, payload = dataset.read_image_bytes(i)
        fmt = image_format(payload)
        formats[fmt] = formats.get(fmt, 0) + 1
        try:
            size = "x".join(map(str, declared_size(payload, dataset.source(i), max_pixels=None)))
        except ImageError:  # reported here as a count; decoding would raise it
            size = "unreadable"
        sizes[size] = sizes.get(size, 0) + 1
    prop = dataset.property
    return {
        "rec": str(dataset.rec_path), "idx": str(dataset.idx_path) if dataset.idx_path else None, "rec_bytes": reader.size,
        "property": dict(zip(("num_classes", "height", "width"), prop, strict=True)) if prop else None,
        "layout": "insightface" if layout.header else "plain",
        "header": list(layout.header) if layout.header else None,
        "records": len(reader), "images": len(dataset), "num_classes": dataset.num_classes,
        "identities": layout.num_identities, "identities_with_images": len(counts),
        "identity_records": len(layout.identity_ranges) if layout.identity_ranges is not None else 0,
        "images_with_age": int(np.sum(~np.isnan(dataset.ages))) if dataset.ages is not None else 0,
        "images_per_identity": {"min": int(counts.min()), "median": float(statistics.median(counts.tolist())),
                                "max": int(counts.max())},
        "image_size": list(dataset.image_size),
        "formats_checked": len(picks), "formats": formats, "stored_sizes": sizes,
    }
