"""The data layer: image decoding, augmentation, data sets (synthetic, folder, list, RecordIO), batch sampling, loaders.

Every data set returns ``(image, targets)`` with ``image`` a float32 (3, H, W) RGB tensor normalised as
(x - 127.5) / 128 and ``targets`` a dict of named targets, ``targets["label"]`` an int in
[0, num_classes) (see :mod:`facesphere.data.targets` for optional targets and their masks, and
:mod:`facesphere.data.ages` for the ``age`` target of files on disk); it
exposes ``num_classes``, ``labels`` (numpy int64, one per index, without decoding), ``target_names``
(the keys of ``targets`` besides masks), ``image_size`` (H, W) and ``set_epoch(epoch)``.
Random augmentation is a pure function of (seed, epoch, index).
"""

from __future__ import annotations

import functools
import os
import time
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from facesphere.data.folders import IMAGE_EXTENSIONS, EncodedImagesDataset, ImageFilesDataset, ImageFolderDataset
from facesphere.data.images import DEFAULT_MAX_PIXELS, ImageError, load_image, load_image_bytes, to_tensor, to_uint8
from facesphere.data.ages import AGE_FILE, FOLDER_AGE_SOURCES, AgeFileError, read_age_file, write_age_file
from facesphere.data.lists import AGE_HEADER, ImageListDataset, ListEntry, ListFileError, parse_list_file, read_list_file
from facesphere.data.record_dataset import PackResult, RecordDataset, describe_records, pack_folder, read_layout
from facesphere.data.recordio import IRHeader, RecordIOError, RecordIOReader, RecordIOWriter
from facesphere.data.sampler import GlobalBatchSampler
from facesphere.data.export import write_image_folder
from facesphere.data.face_render import render_face
from facesphere.data.face_traits import FaceIdentity, FaceVariation, face_identity, face_variation
from facesphere.data.synthetic import SyntheticFaces, contact_sheet
from facesphere.data.targets import MASK_SUFFIX
from facesphere.data.misalign import MISALIGN_STRENGTHS, MisalignStrength, jitter_homography, misalign
from facesphere.data.transforms import (
    ALIGNED,
    MISALIGNMENT,
    AugmentConfig,
    ColorJitter,
    Compose,
    HorizontalFlip,
    SampleAugment,
    ScaleTranslate,
    as_transform,
    augment_rng,
    misalign_rng,
    resize_to,
)

__all__ = [
    "AGE_FILE",
    "AGE_HEADER",
    "ALIGNED",
    "MISALIGNMENT",
    "AgeFileError",
    "AugmentConfig",
    "ColorJitter",
    "Compose",
    "DEFAULT_MAX_PIXELS",
    "EncodedImagesDataset",
    "FOLDER_AGE_SOURCES",
    "FaceIdentity",
    "FaceVariation",
    "GlobalBatchSampler",
    "HorizontalFlip",
    "IMAGE_EXTENSIONS",
    "IRHeader",
    "ImageError",
    "ImageFilesDataset",
    "ImageFolderDataset",
    "ImageListDataset",
    "ListEntry",
    "ListFileError",
    "MASK_SUFFIX",
    "MISALIGN_STRENGTHS",
    "MisalignStrength",
    "PackResult",
    "RecordDataset",
    "RecordIOError",
    "RecordIOReader",
    "RecordIOWriter",
    "SampleAugment",
    "ScaleTranslate",
    "SyntheticFaces",
    "as_transform",
    "augment_rng",
    "build_loader",
    "contact_sheet",
    "describe_records",
    "face_identity",
    "face_variation",
    "jitter_homography",
    "load_image",
    "load_image_bytes",
    "misalign",
    "misalign_rng",
    "pack_folder",
    "parse_list_file",
    "read_age_file",
    "read_layout",
    "read_list_file",
    "render_face",
    "resize_to",
    "set_loader_epoch",
    "to_tensor",
    "to_uint8",
    "write_age_file",
    "write_image_folder",
]


def _default_start_method() -> str:
    """forkserver where available: forking a process whose OpenCV, ONNX Runtime or OpenMP thread pools are
    running copies their locks without their threads, and a worker can then wait forever (it happened in
    this project's test suite); workers started from a clean server process cannot inherit such a lock."""
    import multiprocessing

    return "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"


def _worker_init(worker_id: int, owner_pid: int | None = None) -> None:
    """One intra-op thread per worker: workers already run in parallel, more threads only oversubscribe; and the
    worker ends with the process that owns the loader (``owner_pid``, see :func:`_exit_with`).

    No seeding is needed: augmentation is derived from (seed, epoch, index), never from worker state."""
    import cv2

    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    if owner_pid is not None:
        _exit_with(owner_pid)


def _exit_with(pid: int) -> None:
    """End this process as soon as process ``pid`` has ended, even by kill -9.

    A worker started by a forkserver is the server's child, not its owner's: torch's own check (is my parent
    alive?) and ``PR_SET_PDEATHSIG`` both watch the server, and the server waits for its last worker, so after
    a kill -9 of the owner the worker, the server and the resource tracker would all run on. A daemon thread
    waits on a pidfd of the owner (Linux ≥ 5.3) or polls its pid every second (other POSIX systems); once the
    worker is gone the server and the tracker read EOF on their pipes and exit. Nothing is done elsewhere."""
    import select
    import threading

    if os.name != "posix":
        return
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):  # no pidfd on this system (or the owner has already ended: polled below)
        pidfd = None

    def wait_then_exit() -> None:
        if pidfd is not None:
            poller = select.poll()
            poller.register(pidfd, select.POLLIN)  # readable once the process has ended
            poller.poll()
        else:
            while True:
                time.sleep(1.0)
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                except PermissionError:  # it exists under another user: keep waiting
                    pass
        os._exit(1)

    threading.Thread(target=wait_then_exit, name="exit-with-owner", daemon=True).start()


def build_loader(
    dataset: Dataset,
    sampler: Sampler[list[int]],
    num_workers: int,
    pin_memory: bool = False,
    persistent_workers: bool | None = None,
    prefetch_factor: int | None = None,
    multiprocessing_context: Any = None,
) -> DataLoader:
    """A DataLoader driven by a batch sampler (e.g. ``GlobalBatchSampler``).

    Workers start by ``forkserver`` unless ``multiprocessing_context`` says otherwise (see
    ``_default_start_method``); data sets must therefore be picklable, as all of facesphere's are.

    ``persistent_workers`` defaults to True whenever there are workers (they keep their per-process
    caches across epochs; data sets share their epoch counter with them, so ``set_epoch`` still
    reaches them). Call ``set_loader_epoch(loader, epoch)`` before iterating each epoch.
    """
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    if persistent_workers is None:
        persistent_workers = num_workers > 0
    kwargs: dict[str, Any] = {}
    if num_workers > 0:
        kwargs["worker_init_fn"] = functools.partial(_worker_init, owner_pid=os.getpid())
        kwargs["persistent_workers"] = bool(persistent_workers)
        if prefetch_factor is not None:
            kwargs["prefetch_factor"] = prefetch_factor
        kwargs["multiprocessing_context"] = multiprocessing_context or _default_start_method()
    # A private generator: creating an iterator must not consume the global torch RNG, or a resumed run's
    # dropout / augmentation draws would drift from the uninterrupted run (augmentation is index-seeded anyway).
    return DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, pin_memory=pin_memory,
                      generator=torch.Generator().manual_seed(0), **kwargs)


def set_loader_epoch(loader: DataLoader, epoch: int) -> None:
    """Call ``set_epoch`` on the loader's data set and batch sampler (whichever have it)."""
    for part in (loader.dataset, loader.batch_sampler, loader.sampler):
        if hasattr(part, "set_epoch"):
            part.set_epoch(epoch)
