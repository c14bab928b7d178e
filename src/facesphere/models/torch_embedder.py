"""The PyTorch twin of ``OnnxEmbedder``: a backbone and its card, with the same ``embed``/``run`` methods."""

from __future__ import annotations

import logging
import os

import numpy as np
import torch
from torch import nn

from facesphere.backbones.base import embedding_of
from facesphere.models.card import ModelCard
from facesphere.models.embedder import Embedder

logger = logging.getLogger(__name__)


def check_backbone_matches_card(backbone: nn.Module, card: ModelCard, what: str = "backbone") -> None:
    """Raise ``ValueError`` unless the backbone's ``input_size`` and ``embedding_size`` are the card's."""
    size = tuple(int(v) for v in getattr(backbone, "input_size", ()))
    dim = getattr(backbone, "embedding_size", None)
    if size != tuple(card.input_size) or dim != card.embedding_size:
        raise ValueError(f"{what} {type(backbone).__name__} takes {size} input to {dim}-d embeddings, but card "
                         f"{card.name!r} says {tuple(card.input_size)} -> {card.embedding_size}")


class TorchEmbedder(Embedder):
    """Run ``backbone`` (in eval mode, under ``torch.inference_mode``) on ``device``, preprocessing by ``card``."""

    def __init__(self, backbone: nn.Module, card: ModelCard, device: str | torch.device = "cpu",
                 source: str = "pytorch") -> None:
        check_backbone_matches_card(backbone, card)
        super().__init__(card, source)
        self.device = torch.device(device)
        self.backbone = backbone.to(self.device).eval()

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, device: str | torch.device = "cpu") -> TorchEmbedder:
        """A stored facesphere model folder (``card.json`` + ``model.safetensors``, see ``models.store``)."""
        from facesphere.models.store import load_model

        backbone, card = load_model(folder, device=device)
        return cls(backbone, card, device=device, source=os.fspath(folder))

    def _forward(self, batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            out = self.backbone(torch.from_numpy(batch).to(self.device))
        return embedding_of(out).float().cpu().numpy()

    def __repr__(self) -> str:
        return f"TorchEmbedder({self.card.name!r}, device={self.device}, source={self.source!r})"


__all__ = ["TorchEmbedder", "check_backbone_matches_card"]
