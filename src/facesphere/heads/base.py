"""The margin-head contract: (embeddings, labels) -> logits for a plain cross-entropy.

A head owns its class centres (``weight``, shape (C, D)). The maths lives in
``logits(embeddings, weight, labels)``, a function of an explicit centre matrix, so a sharded
classifier (Partial FC) can call it on a subset of centres without knowing which head it runs.
Labels equal to ``IGNORE_LABEL`` (-1) mean "this sample's class is not among these centres":
no margin is applied to that row.

Logits are always computed in float32, with autocast disabled, whatever the caller's precision.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import Tensor, nn

from facesphere.registry import Registry

IGNORE_LABEL = -1
EPS = 1e-12


class MarginHead(nn.Module):
    """Base class: owns ``weight`` (C, D); subclasses implement :meth:`logits`."""

    def __init__(self, embedding_size: int, num_classes: int) -> None:
        super().__init__()
        if embedding_size <= 0 or num_classes <= 1:
            raise ValueError(f"need embedding_size > 0 and num_classes > 1, got {embedding_size}, {num_classes}")
        self.embedding_size = embedding_size
        self.num_classes = num_classes
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_size))
        nn.init.normal_(self.weight, std=0.01)

    def forward(self, embeddings: Tensor, labels: Tensor | None = None) -> Tensor:
        """Logits (N, C) for ``F.cross_entropy(logits, labels)``; ``labels=None`` gives margin-free logits."""
        if embeddings.ndim != 2 or embeddings.shape[1] != self.embedding_size:
            raise ValueError(f"embeddings must be (N, {self.embedding_size}), got {tuple(embeddings.shape)}")
        if labels is None:
            labels = torch.full((embeddings.shape[0],), IGNORE_LABEL, dtype=torch.long, device=embeddings.device)
        elif labels.shape != (embeddings.shape[0],):
            raise ValueError(f"labels must be (N,) = ({embeddings.shape[0]},), got {tuple(labels.shape)}")
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            return self.logits(embeddings.float(), self.weight.float(), labels.long())

    def logits(self, embeddings: Tensor, weight: Tensor, labels: Tensor) -> Tensor:
        raise NotImplementedError

    def update(self, step: int) -> None:
        """Called by the trainer before each optimisation step (annealing schedules); default no-op."""


def cosine(embeddings: Tensor, weight: Tensor) -> Tensor:
    """cos θ between every embedding and every centre, clamped to [-1, 1]."""
    return F.linear(F.normalize(embeddings, dim=1, eps=EPS), F.normalize(weight, dim=1, eps=EPS)).clamp(-1.0, 1.0)


def target_mask(labels: Tensor, num_columns: int) -> Tensor:
    """Boolean (N, C) mask of each row's target column; rows with IGNORE_LABEL have none."""
    valid = labels != IGNORE_LABEL
    mask = torch.zeros(labels.shape[0], num_columns, dtype=torch.bool, device=labels.device)
    rows = torch.nonzero(valid, as_tuple=True)[0]
    mask[rows, labels[rows]] = True
    return mask


def safe_acos(cos_theta: Tensor) -> Tensor:
    """acos with the argument clamped strictly inside (-1, 1), so its gradient stays finite."""
    limit = 1.0 - 1e-7 if cos_theta.dtype == torch.float64 else 1.0 - 1e-6
    return torch.acos(cos_theta.clamp(-limit, limit))


HEADS: Registry[MarginHead] = Registry("head")


def build_head(name: str, embedding_size: int, num_classes: int, **kwargs) -> MarginHead:
    return HEADS.build(name, embedding_size=embedding_size, num_classes=num_classes, **kwargs)


__all__ = ["MarginHead", "HEADS", "build_head", "cosine", "target_mask", "safe_acos", "IGNORE_LABEL"]
