"""Labelled sets profiling reads, through the data layer's own readers: image folders, list files, RecordIO packs.

:func:`open_labelled_set` opens the set without decoding an image (the model's input size is given), and
:func:`read_image` reads one image for embedding: the crop at that size and a digest of its encoded bytes, so
byte-identical files can be found without comparing embeddings. Unreadable images (corrupt, missing from a list
file, a damaged record) raise the data layer's errors, which profiling records per image instead of stopping.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from facesphere.data.folders import EncodedImagesDataset, ImageFilesDataset, ImageFolderDataset
from facesphere.data.images import ImageError
from facesphere.data.lists import ImageListDataset
from facesphere.data.record_dataset import REC_NAME, RecordDataset
from facesphere.data.recordio import RecordIOError

__all__ = ["READ_ERRORS", "open_labelled_set", "read_image", "set_root"]

READ_ERRORS = (ImageError, RecordIOError, OSError)
"""What reading one image of a set may raise: recorded as UNREADABLE, never fatal to a profile."""


def open_labelled_set(path: str | os.PathLike, image_size: tuple[int, int]) -> tuple[EncodedImagesDataset, list[str]]:
    """(data set, identity names) of an image folder (one sub-folder per identity: names are the folder names),
    a list file of ``path label`` lines or a RecordIO pack (a folder holding ``train.rec``, or the ``.rec``; names
    are ``str(label)``). No image is decoded: every image is brought to ``image_size`` when read."""
    path = Path(path)
    if path.suffix == ".rec" or (path.is_dir() and (path / REC_NAME).is_file()):
        dataset = RecordDataset(path, image_size=image_size)
    elif path.is_dir():
        dataset = ImageFolderDataset(path, image_size=image_size)
        return dataset, list(dataset.classes)
    elif path.is_file():
        dataset = ImageListDataset(path, image_size=image_size)
    else:
        raise FileNotFoundError(f"{path}: no such image folder, list file or RecordIO pack")
    return dataset, [str(label) for label in range(dataset.num_classes)]


def set_root(dataset: EncodedImagesDataset) -> Path:
    """The folder holding the set's files (the image folder, the list file's root, the pack's folder)."""
    if isinstance(dataset, RecordDataset):
        return dataset.rec_path.parent
    return Path(dataset.root)


def read_image(dataset: EncodedImagesDataset, index: int) -> tuple[np.ndarray, bytes]:
    """Image ``index`` as an HxWx3 uint8 RGB crop at the set's ``image_size``, and the 16-byte BLAKE2b digest of
    its encoded bytes; raises one of :data:`READ_ERRORS` when it cannot be read."""
    image = dataset.load_uint8(index)
    if isinstance(dataset, ImageFilesDataset):
        data = dataset.paths[index].read_bytes()
    else:
        data = dataset.read_image_bytes(index)[1]
    return image, hashlib.blake2b(data, digest_size=16).digest()
