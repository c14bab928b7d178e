"""Embeddings of a whole labelled set on disk, in chunk files, so profiling a set never needs them all in memory.

A store is a folder of ``chunk_XXXXX.npy`` files (float32 (n, D) rows, unit length; a row of zeros for an image
that could not be read), each with ``valid_XXXXX.npy`` (bool: the image was read and embedded) and
``hash_XXXXX.npy`` (16-byte BLAKE2b digests of each image's encoded bytes, zeros where unread), plus
``store.json``: the dimension, the chunk sizes, the per-image problems and a ``key`` naming what was embedded
(set, model, sizes). Every file is written atomically and ``store.json`` is rewritten after each chunk, so an
interrupted run resumes at the first missing chunk when the key matches.

Rows are float32, not float16: the leave-one-out cosine of profiling, (e·S − 1) / √(|S|² − 2 e·S + 1), subtracts
nearly equal quantities for large identities and the duplicate cut sits near 0.99, so float16's 11-bit mantissa
(about 1e-3 per component) would move both; float32 costs 2 KiB per 512-d image on disk, and nothing in memory
beyond one chunk.

:class:`ArrayEmbeddings` gives an in-memory (N, D) array the same reading interface (``chunks`` / ``rows``), so
:func:`facesphere.cleaning.profile.profile_embeddings` takes either.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from torch.utils.data import Dataset

from facesphere.cleaning.sources import READ_ERRORS, read_image
from facesphere.utils.files import atomic_path, atomic_write_text, read_text_checked

logger = logging.getLogger(__name__)

__all__ = ["ArrayEmbeddings", "EmbeddingStore", "EmbeddingStoreError", "as_embeddings", "embed_to_store", "normalised"]

STORE_FILE = "store.json"
STORE_FORMAT = "facesphere-embedding-store"
HASH_DTYPE = np.dtype("S16")


class EmbeddingStoreError(ValueError):
    """A store folder that cannot be read (missing or damaged files); the message names the folder."""


def normalised(rows: np.ndarray) -> np.ndarray:
    """float32 rows scaled to unit length (a zero row stays zero)."""
    rows = np.asarray(rows, dtype=np.float32)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return rows / np.where(norms > 0, norms, 1.0)


class ArrayEmbeddings:
    """An in-memory (N, D) array read like a store: ``chunks()`` of ``chunk_size`` rows, ``rows(indices)``."""

    def __init__(self, embeddings: np.ndarray, chunk_size: int = 16384) -> None:
        array = np.asarray(embeddings)
        if array.ndim != 2 or not array.shape[1]:
            raise ValueError(f"embeddings must be an (N, D) array, got shape {array.shape}")
        self.array = array
        self.chunk_size = int(chunk_size)

    def __len__(self) -> int:
        return len(self.array)

    @property
    def dim(self) -> int:
        return int(self.array.shape[1])

    def chunks(self) -> Iterator[tuple[int, np.ndarray]]:
        for start in range(0, len(self.array), self.chunk_size):
            yield start, np.asarray(self.array[start:start + self.chunk_size], dtype=np.float32)

    def rows(self, indices: np.ndarray) -> np.ndarray:
        return np.asarray(self.array[np.asarray(indices, dtype=np.int64)], dtype=np.float32)


class EmbeddingStore:
    """A store folder, open for reading (``open``) or being filled chunk by chunk (``create`` / ``append``)."""

    def __init__(self, folder: str | os.PathLike, meta: dict[str, Any]) -> None:
        self.folder = Path(folder)
        self.meta = meta

    # ------------------------------------------------------------------ writing

    @classmethod
    def create(cls, folder: str | os.PathLike, dim: int, key: dict[str, Any], resume: bool = True) -> EmbeddingStore:
        """A store to fill in ``folder``; with ``resume`` an existing store of the same ``key`` keeps its chunks."""
        folder = Path(folder)
        if resume and (folder / STORE_FILE).is_file():
            try:
                existing = cls.open(folder, complete=False)
            except EmbeddingStoreError as error:
                logger.warning("%s; starting the store afresh", error)
            else:
                if existing.meta.get("key") == key and existing.dim == dim:
                    logger.info("%s: resuming after %d embedded images", folder, len(existing))
                    return existing
                logger.info("%s: holds embeddings of something else; starting afresh", folder)
        meta = {"format": STORE_FORMAT, "version": 1, "dim": int(dim), "dtype": "float32", "key": key,
                "chunks": [], "problems": [], "complete": False}
        store = cls(folder, meta)
        store._write_meta()
        return store

    def append(self, embeddings: np.ndarray, valid: np.ndarray, hashes: np.ndarray,
               problems: list[dict[str, str]] = ()) -> None:
        """Write the next chunk: (n, D) embeddings, (n,) bool valid, (n,) 16-byte content digests."""
        embeddings = np.asarray(embeddings, dtype=np.float32)
        n = len(embeddings)
        if embeddings.shape != (n, self.dim) or np.shape(valid) != (n,) or np.shape(hashes) != (n,):
            raise ValueError(f"chunk shapes {embeddings.shape}, {np.shape(valid)}, {np.shape(hashes)} do not fit "
                             f"a {self.dim}-d store")
        index = len(self.meta["chunks"])
        for name, array in ((f"chunk_{index:05d}.npy", embeddings), (f"valid_{index:05d}.npy", np.asarray(valid, bool)),
                            (f"hash_{index:05d}.npy", np.asarray(hashes, HASH_DTYPE))):
            with atomic_path(self.folder / name) as tmp, open(tmp, "wb") as handle:
                np.save(handle, array, allow_pickle=False)
        self.meta["chunks"].append(n)
        self.meta["problems"].extend(dict(p) for p in problems)
        self._write_meta()

    def finish(self) -> EmbeddingStore:
        """Mark the store complete (every image of the key embedded or reported)."""
        self.meta["complete"] = True
        self._write_meta()
        return self

    def _write_meta(self) -> None:
        atomic_write_text(self.folder / STORE_FILE, json.dumps(self.meta))

    # ------------------------------------------------------------------ reading

    @classmethod
    def open(cls, folder: str | os.PathLike, complete: bool = True) -> EmbeddingStore:
        """Read a store's ``store.json``; EmbeddingStoreError naming ``folder`` when it is missing or damaged."""
        folder = Path(folder)
        try:
            meta = json.loads(read_text_checked(folder / STORE_FILE))
        except (OSError, ValueError) as error:
            raise EmbeddingStoreError(f"{folder}: not a readable embedding store ({error})") from None
        if not isinstance(meta, dict) or meta.get("format") != STORE_FORMAT or not isinstance(meta.get("chunks"), list):
            raise EmbeddingStoreError(f"{folder}: {STORE_FILE} is not an embedding store description")
        store = cls(folder, meta)
        for i, n in enumerate(meta["chunks"]):
            if not all((folder / f"{kind}_{i:05d}.npy").is_file() for kind in ("chunk", "valid", "hash")):
                raise EmbeddingStoreError(f"{folder}: chunk {i} ({n} images) is missing")
        if complete and not meta.get("complete"):
            raise EmbeddingStoreError(f"{folder}: the store is incomplete (an interrupted run)")
        return store

    @property
    def dim(self) -> int:
        return int(self.meta["dim"])

    @property
    def problems(self) -> list[dict[str, str]]:
        return list(self.meta["problems"])

    def __len__(self) -> int:
        return int(sum(self.meta["chunks"]))

    def _load(self, kind: str, index: int, mmap: bool = False) -> np.ndarray:
        path = self.folder / f"{kind}_{index:05d}.npy"
        try:
            array = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
        except (OSError, ValueError) as error:
            raise EmbeddingStoreError(f"{path}: cannot read ({error})") from None
        expected = self.meta["chunks"][index]
        if len(array) != expected or (kind == "chunk" and array.shape != (expected, self.dim)):
            raise EmbeddingStoreError(f"{path}: shape {array.shape}, the store says {expected} rows")
        return array

    def chunks(self) -> Iterator[tuple[int, np.ndarray]]:
        """(first index, float32 rows) chunk by chunk, one chunk in memory at a time."""
        start = 0
        for i, n in enumerate(self.meta["chunks"]):
            yield start, self._load("chunk", i)
            start += n

    def rows(self, indices: np.ndarray) -> np.ndarray:
        """Rows at ``indices`` (any order), read through memory maps: only their pages are touched."""
        indices = np.asarray(indices, dtype=np.int64)
        out = np.empty((len(indices), self.dim), dtype=np.float32)
        bounds = np.cumsum([0, *self.meta["chunks"]])
        which = np.searchsorted(bounds, indices, side="right") - 1
        for chunk in np.unique(which):
            mask = which == chunk
            out[mask] = self._load("chunk", int(chunk), mmap=True)[indices[mask] - bounds[chunk]]
        return out

    def valid(self) -> np.ndarray:
        """(N,) bool: the image was read and embedded."""
        parts = [self._load("valid", i) for i in range(len(self.meta["chunks"]))]
        return np.concatenate(parts) if parts else np.zeros(0, bool)

    def hashes(self) -> np.ndarray:
        """(N,) 16-byte digests of the images' encoded bytes (zeros where unread)."""
        parts = [self._load("hash", i) for i in range(len(self.meta["chunks"]))]
        return np.concatenate(parts) if parts else np.zeros(0, HASH_DTYPE)


def as_embeddings(embeddings: Any, chunk_size: int = 16384) -> ArrayEmbeddings | EmbeddingStore:
    """A store as it is, a store folder opened, anything else taken as an (N, D) array."""
    if isinstance(embeddings, (EmbeddingStore, ArrayEmbeddings)):
        return embeddings
    if isinstance(embeddings, (str, os.PathLike)):
        return EmbeddingStore.open(embeddings)
    return ArrayEmbeddings(embeddings, chunk_size)


class _Readable(Dataset):
    """Items (crop, read?, reason, digest) of a labelled set: an unreadable image becomes a blank crop and its
    reason instead of an exception, so one bad file never stops a DataLoader."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        try:
            image, digest = read_image(self.dataset, index)
            return image, True, "", digest
        except READ_ERRORS as error:
            h, w = self.dataset.image_size
            reason = getattr(error, "reason", None) or (error.strerror if isinstance(error, OSError) else None) or str(error)
            return np.zeros((h, w, 3), np.uint8), False, str(reason), bytes(16)


def _collate(items):
    images, read, reasons, digests = zip(*items)
    return np.stack(images), np.array(read, bool), list(reasons), np.array(digests, HASH_DTYPE)


def embed_to_store(dataset, embedder, folder: str | os.PathLike, *, key: dict[str, Any], batch_size: int = 64,
                   chunk_size: int = 16384, workers: int = 0, flip: bool = True, progress: bool = True) -> EmbeddingStore:
    """Embed every image of ``dataset`` (an ``EncodedImagesDataset``) with ``embedder`` into a store in ``folder``.

    Images are read and decoded by ``workers`` DataLoader processes (``facesphere.data.build_loader``) while the
    model runs; each unreadable image is kept as a zero row with ``valid`` False and a ``{"source", "reason"}``
    problem. A store of the same ``key`` left by an interrupted run is resumed at its first missing chunk.
    """
    from facesphere.data import build_loader
    from facesphere.utils.progress import progress_bar

    if batch_size < 1 or chunk_size < 1:
        raise ValueError(f"batch_size and chunk_size must be positive, got {batch_size} and {chunk_size}")
    chunk_size = max(batch_size, chunk_size // batch_size * batch_size)  # whole batches per chunk
    store = EmbeddingStore.create(folder, embedder.embedding_size, {**key, "chunk_size": chunk_size, "flip": flip})
    done, total = len(store), len(dataset)
    if done >= total:
        return store.finish()
    batches = [list(range(start, min(start + batch_size, total))) for start in range(done, total, batch_size)]
    loader = build_loader(_Readable(dataset), batches, num_workers=workers)
    loader.collate_fn = _collate
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    problems: list[dict[str, str]] = []
    pending = 0
    with progress_bar(progress, len(batches), f"embedding {total - done} images") as advance:
        for batch, (images, read, reasons, digests) in zip(batches, loader):
            rows = np.zeros((len(batch), embedder.embedding_size), np.float32)
            if read.any():
                rows[read] = embedder.embed(list(images[read]), flip=flip, batch_size=batch_size)
            problems += [{"source": dataset.source(i), "reason": r} for i, r, ok in zip(batch, reasons, read) if not ok]
            parts.append((rows, read, digests))
            pending += len(batch)
            if pending >= chunk_size or batch[-1] == total - 1:
                store.append(*(np.concatenate(column) for column in zip(*parts)), problems=problems)
                parts, problems, pending = [], [], 0
            advance()
    logger.info("%s: %d images embedded, %d unreadable", folder, total, len(store.problems))
    return store.finish()
