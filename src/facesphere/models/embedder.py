"""What every embedder shares, whatever runs the network: card-driven preprocessing, flip-sum, normalising.

An :class:`Embedder` has a model card and a way to run a normalised batch (N, 3, H, W) float32 to
(N, D) embeddings (:meth:`Embedder.run`). :meth:`Embedder.embed` takes HxWx3 uint8 **RGB** face crops
and applies the card exactly as evaluation does (``models.preprocess.CardPreprocess``): the size
must be the card's, channels are put in the card's colour order, and pixels become
``(x - mean) / std``. With ``flip=True`` the embeddings of each crop and its horizontal mirror are
summed before normalising (``models.flip``, as in ``evaluate.embeddings``).
:meth:`Embedder.embed_with_norms` also returns the raw embeddings' L2 norms from the same forward pass
(averaged over the two views with ``flip``), which a card's ``age_branch.predict`` turns into ages (OE-CNN).

The ONNX Runtime embedder (``models.onnx_runtime.OnnxEmbedder``) and the PyTorch one
(``models.torch_embedder.TorchEmbedder``) differ only in :meth:`Embedder._forward`.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Sequence

import numpy as np

from facesphere.models.card import ModelCard, ModelCardMismatch
from facesphere.models.flip import embed_flipped
from facesphere.models.preprocess import CardPreprocess, FedInput

logger = logging.getLogger(__name__)


def _as_image_list(images: np.ndarray | Sequence[np.ndarray]) -> list[np.ndarray]:
    """(N, H, W, 3) / (H, W, 3) array or a sequence of (H, W, 3) arrays -> list of (H, W, 3) arrays."""
    if isinstance(images, np.ndarray):
        if images.ndim == 3:
            return [images]
        if images.ndim == 4:
            return list(images)
        raise ValueError(f"expected HxWx3 or NxHxWx3 uint8 RGB images, got an array of shape {images.shape}")
    return [np.asarray(image) for image in images]


class Embedder(abc.ABC):
    """Face crops -> embeddings with the preprocessing ``card`` prescribes; ``source`` names the model in errors."""

    def __init__(self, card: ModelCard, source: str) -> None:
        self.card = card
        self.source = source
        # embed() takes RGB crops; declaring the card's own order makes CardPreprocess put them in that order.
        self._preprocess = CardPreprocess(card, FedInput(card.colour_order))

    @property
    def input_size(self) -> tuple[int, int]:
        return tuple(self.card.input_size)  # type: ignore[return-value]

    @property
    def embedding_size(self) -> int:
        return self.card.embedding_size

    @abc.abstractmethod
    def _forward(self, batch: np.ndarray) -> np.ndarray:
        """Run the network on a checked, C-contiguous float32 (N, 3, H, W) batch; (N, D) float32."""

    def _mismatch(self, problem: str) -> ModelCardMismatch:
        return ModelCardMismatch(f"{self.card.name} ({self.source})", [problem])

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Normalised batch (N, 3, H, W) float32, as the card says -> (N, D) float32 raw embeddings."""
        batch = np.asarray(batch)
        h, w = self.card.input_size
        if batch.ndim != 4 or batch.shape[1] != 3 or tuple(batch.shape[2:]) != (h, w):
            raise self._mismatch(f"model expects (N, 3, {h}, {w}) float32 batches, got shape {tuple(batch.shape)}")
        if batch.dtype != np.float32:
            raise self._mismatch(f"model expects float32 batches normalised as "
                                 f"{self.card.input_spec.describe_normalisation()}, got {batch.dtype}")
        if batch.shape[0] == 0:
            return np.zeros((0, self.card.embedding_size), dtype=np.float32)
        out = np.asarray(self._forward(np.ascontiguousarray(batch)), dtype=np.float32)
        if out.shape != (batch.shape[0], self.card.embedding_size):
            raise self._mismatch(f"network returned shape {out.shape}, the card says "
                                 f"({batch.shape[0]}, {self.card.embedding_size})")
        return out

    def preprocess(self, images: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
        """HxWx3 uint8 RGB crop(s) of the card's size -> the normalised (N, 3, H, W) float32 batch."""
        crops = _as_image_list(images)
        if not crops:
            h, w = self.card.input_size
            return np.zeros((0, 3, h, w), dtype=np.float32)
        try:
            return np.stack([self._preprocess(crop).numpy() for crop in crops])
        except ModelCardMismatch as error:
            raise ModelCardMismatch(f"{self.card.name} ({self.source})", error.problems) from None

    def _embed(self, images: np.ndarray | Sequence[np.ndarray], flip: bool, batch_size: int
               ) -> tuple[np.ndarray, np.ndarray]:
        """(raw (N, D) embeddings, flip-summed with ``flip``; (N,) raw norms, averaged over the views with ``flip``)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        crops = _as_image_list(images)
        out, norms = [np.zeros((0, self.card.embedding_size), dtype=np.float32)], [np.zeros(0)]

        def run(batch: np.ndarray) -> np.ndarray:  # every view's raw output passes here once
            raw = self.run(batch)
            norms.append(np.linalg.norm(raw.astype(np.float64), axis=1))
            return raw

        for start in range(0, len(crops), batch_size):
            batch = self.preprocess(crops[start:start + batch_size])
            out.append(embed_flipped(run, batch, "sum" if flip else None))
            if flip:  # the views ran as one stacked batch [crops, mirrors]: average each crop's two norms
                norms[-1] = norms[-1].reshape(2, -1).mean(axis=0)
        return np.concatenate(out), np.concatenate(norms)

    def embed(self, images: np.ndarray | Sequence[np.ndarray], flip: bool = False, normalize: bool = True,
              batch_size: int = 64) -> np.ndarray:
        """HxWx3 uint8 RGB crop(s) -> (N, D) float32 embeddings.

        ``flip``: add the embedding of each horizontally mirrored crop (before normalising).
        ``normalize``: L2-normalise each row. Crops are processed ``batch_size`` at a time.
        """
        embeddings = self._embed(images, flip, batch_size)[0]
        return (_unit(embeddings) if normalize else embeddings).astype(np.float32, copy=False)

    def embed_with_norms(self, images: np.ndarray | Sequence[np.ndarray], flip: bool = False,
                         batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
        """(unit (N, D) float32 embeddings, (N,) float64 L2 norms of the raw embeddings) in one forward pass.

        With ``flip`` the embedding is the normalised flip-sum and the norm the mean of the two views' norms,
        so that a card's linear ``age_branch`` gives the mean of the two views' ages (OE-CNN, arXiv 1810.07599).
        """
        embeddings, norms = self._embed(images, flip, batch_size)
        return _unit(embeddings).astype(np.float32, copy=False), norms


def _unit(embeddings: np.ndarray) -> np.ndarray:
    return embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)


__all__ = ["Embedder"]
