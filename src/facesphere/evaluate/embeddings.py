"""Embedding extraction for evaluation (datasets, or images by index), and cosine scores of index pairs.

Flip test-time augmentation is ``facesphere.models.flip`` (the one definition deployment uses too):
the embeddings of an image and of its horizontal mirror are summed, then L2-normalised, as insightface's
``verification.py``; SphereFace's ``evaluation.m`` concatenates them instead (``flip="concat"``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from facesphere.backbones.base import embedding_of
from facesphere.models.flip import embed_flipped, flip_mode
from facesphere.models.preprocess import ImagePreprocess
from facesphere.utils.progress import progress_bar

logger = logging.getLogger(__name__)

__all__ = ["cosine_scores", "embed_images", "embed_pairset", "extract_embeddings"]


def _images_of(batch) -> torch.Tensor:
    """Images from a batch that is either a tensor or an (images, labels, ...) tuple/list."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    raise TypeError(f"batches must be image tensors or (images, labels) pairs, got {type(batch).__name__}")


def _total_batches(loader: DataLoader) -> int | None:
    try:
        return len(loader)
    except TypeError:  # iterable-style dataset without __len__
        return None


def extract_embeddings(
    model: nn.Module,
    dataset_or_loader: Dataset | DataLoader,
    batch_size: int = 128,
    device: str | torch.device = "cpu",
    flip: bool | Literal["sum", "concat"] = True,
    normalize: bool = True,
    amp_dtype: torch.dtype | None = None,
    progress: bool = True,
) -> np.ndarray:
    """Embed every image of a dataset or loader, in order, as an (N, D) float32 array.

    Args:
        model: maps images (B, C, H, W) to embeddings (B, D). It is moved to ``device`` (modules move in
            place) and run in eval mode under ``torch.inference_mode``; its training flag is restored.
        dataset_or_loader: a Dataset of (image_tensor, label) items (batched here without shuffling, with
            ``batch_size``), or a DataLoader yielding image tensors or (images, labels) batches.
        flip: True / "sum" adds the embedding of the horizontally mirrored image before normalising;
            "concat" concatenates the two (output 2D); False disables the mirror pass.
        normalize: L2-normalise each output row (after the flip combination).
        amp_dtype: if given (e.g. ``torch.bfloat16``), run the forward under autocast with this dtype on
            ``device``'s type; embeddings are combined and returned in float32.
        progress: show a ``rich`` progress bar.
    """
    mode = flip_mode(flip)
    device = torch.device(device)
    if isinstance(dataset_or_loader, DataLoader):
        loader = dataset_or_loader
    else:
        loader = DataLoader(dataset_or_loader, batch_size=batch_size, shuffle=False, num_workers=0)

    was_training = model.training
    model.to(device)
    model.eval()
    chunks: list[np.ndarray] = []
    try:
        with torch.inference_mode(), progress_bar(progress, _total_batches(loader), "embedding") as advance:
            for batch in loader:
                images = _images_of(batch).to(device, non_blocking=True)
                chunks.append(_embed_batch(model, images, mode, normalize, amp_dtype, device))
                advance()
    finally:
        model.train(was_training)
    if not chunks:
        raise ValueError("no images to embed: the dataset/loader is empty")
    out = np.concatenate(chunks, axis=0)
    logger.info("extracted %d embeddings of dimension %d (flip=%s)", out.shape[0], out.shape[1], mode)
    return out


def _embed_batch(
    model: nn.Module,
    images: torch.Tensor,
    mode: str | None,
    normalize: bool,
    amp_dtype: torch.dtype | None,
    device: torch.device,
) -> np.ndarray:
    """One forward pass (image and mirror stacked into a single batch) -> float32 numpy embeddings."""
    def forward(x: torch.Tensor) -> torch.Tensor:
        if amp_dtype is None:
            return embedding_of(model(x)).float()
        with torch.autocast(device_type=device.type, dtype=amp_dtype):
            return embedding_of(model(x)).float()

    emb = embed_flipped(forward, images, mode)
    if normalize:
        emb = torch.nn.functional.normalize(emb, dim=1)
    return emb.cpu().numpy().astype(np.float32, copy=False)


class _Images(Dataset):
    def __init__(self, count: int, load: Callable[[int], np.ndarray], preprocess: Callable) -> None:
        self.count, self.load, self.preprocess = count, load, preprocess

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int):
        return self.preprocess(self.load(index)), 0


class _FunctionModule(nn.Module):
    """Wraps a plain ``(B, C, H, W) tensor -> (B, D)`` function so ``extract_embeddings`` can drive it."""

    def __init__(self, fn: Callable) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.fn(x)
        return out if isinstance(out, torch.Tensor) else torch.as_tensor(np.asarray(out))


def embed_images(
    model: nn.Module | Callable,
    count: int,
    load: Callable[[int], np.ndarray],
    preprocess: Callable[[np.ndarray], torch.Tensor] | None = None,
    flip: bool | str = "sum",
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    amp_dtype: torch.dtype | None = None,
    progress: bool = False,
) -> np.ndarray:
    """Embeddings (count, D) of images ``load(0..count-1)``, L2-normalised, flip as ``extract_embeddings``.

    ``model`` is an ``nn.Module`` or any function from a (B, C, H, W) tensor to (B, D) embeddings.
    Image 0 is preprocessed once up front, so a preprocessing refusal (size, model card) comes
    before any embedding is computed.
    """
    module = model if isinstance(model, nn.Module) else _FunctionModule(model)
    preprocess = preprocess or ImagePreprocess()
    if count > 0:
        preprocess(load(0))  # fail fast (wrong size, model-card mismatch) before the embedding pass
    dataset = _Images(count, load, preprocess)
    return extract_embeddings(module, dataset, batch_size=batch_size, device=device, flip=flip,
                              amp_dtype=amp_dtype, progress=progress)


def embed_pairset(model: nn.Module | Callable, pairset, **kwargs) -> np.ndarray:
    """Embed every distinct image of a ``PairSet`` (``evaluate.pairsets``) once (``embed_images`` options)."""
    return embed_images(model, pairset.num_images, pairset.load, **kwargs)


def cosine_scores(
    emb: np.ndarray, pairs_i: Sequence[int] | np.ndarray, pairs_j: Sequence[int] | np.ndarray
) -> np.ndarray:
    """Cosine similarity of rows ``emb[pairs_i[k]]`` and ``emb[pairs_j[k]]`` for every k, as float64.

    Rows are normalised here, so already-normalised and raw embeddings give the same scores; a zero
    row scores 0 against everything.
    """
    e = np.asarray(emb, dtype=np.float64)
    if e.ndim != 2:
        raise ValueError(f"emb must be (N, D), got shape {e.shape}")
    i = np.asarray(pairs_i)
    j = np.asarray(pairs_j)
    if i.shape != j.shape or i.ndim != 1:
        raise ValueError(f"pairs_i and pairs_j must be 1-D of equal length, got {i.shape} and {j.shape}")
    if i.size == 0:
        return np.empty(0, dtype=np.float64)
    if not (np.issubdtype(i.dtype, np.integer) and np.issubdtype(j.dtype, np.integer)):
        raise ValueError("pair indices must be integers")
    n = e.shape[0]
    if min(i.min(), j.min()) < 0 or max(i.max(), j.max()) >= n:
        raise ValueError(f"pair indices out of range for {n} embeddings")
    norms = np.linalg.norm(e, axis=1)
    unit = e / np.where(norms > 0, norms, 1.0)[:, None]
    return np.einsum("kd,kd->k", unit[i], unit[j])
