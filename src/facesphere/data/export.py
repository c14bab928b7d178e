"""Writing a data set to disk as one folder per identity (what ``ImageFolderDataset`` reads)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
from torch.utils.data import Dataset

from facesphere.data.ages import AGE_FILE, write_age_file
from facesphere.data.images import to_uint8
from facesphere.utils.files import atomic_path

logger = logging.getLogger(__name__)


def write_image_folder(
    dataset: Dataset,
    root: str | os.PathLike,
    ext: str = "png",
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
    log_every: float = 10.0,
) -> int:
    """Write ``dataset`` as ``root/<identity>/<sample>.<ext>``, readable by ``ImageFolderDataset``.

    Folders are named by the global identity (``dataset.identities`` if present, else the label),
    zero-padded to at least 5 digits so name order equals label order; files are numbered per
    identity (4 digits). Each file is encoded in memory and written atomically (``atomic_path``), so an
    interrupted run never leaves a half-written image; with ``overwrite=False`` existing files are kept,
    which makes re-running resume. ``progress(done, total)`` is called after every image, and progress
    is logged every ``log_every`` percent. A data set with ``ages`` (float, NaN: unknown) also gets
    ``root/ages.csv``, the side file ``ImageFolderDataset(root, ages="side_file")`` reads them back from (written
    last and atomically, each run anew). Returns the number of image files written.
    """
    ext = ext.lower().lstrip(".")
    if ext not in ("png", "jpg", "jpeg", "bmp", "webp"):
        raise ValueError(f"unsupported image extension {ext!r}")
    root = Path(root)
    labels = np.asarray(getattr(dataset, "labels"))
    names = getattr(dataset, "identities", None) or list(range(int(labels.max()) + 1 if len(labels) else 0))
    width = max(5, len(str(max(names)))) if len(names) else 5
    total = len(labels)
    ages = getattr(dataset, "ages", None)
    counts: dict[int, int] = {}
    names_written: list[str] = []
    written = 0
    next_log = log_every
    params = [cv2.IMWRITE_JPEG_QUALITY, 95] if ext in ("jpg", "jpeg") else []
    for index in range(total):
        label = int(labels[index])
        number = counts.get(label, 0)
        counts[label] = number + 1
        folder = root / f"{int(names[label]):0{width}d}"
        target = folder / f"{number:04d}.{ext}"
        names_written.append(f"{folder.name}/{target.name}")
        if overwrite or not target.exists():
            if hasattr(dataset, "load_uint8"):
                image = dataset.load_uint8(index)
            else:
                image = to_uint8(dataset[index][0])
            ok, encoded = cv2.imencode(f".{ext}", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), params)
            if not ok:
                raise OSError(f"could not encode {target}")
            with atomic_path(target) as tmp:
                tmp.write_bytes(encoded.tobytes())
            written += 1
        done = index + 1
        if progress is not None:
            progress(done, total)
        if total and 100.0 * done / total >= next_log:
            logger.info("wrote %d/%d images (%.0f%%) to %s", done, total, 100.0 * done / total, root)
            next_log += log_every
    if ages is not None:
        write_age_file(root / AGE_FILE, names_written, ages)
    return written
