"""The margin-head contract: (embeddings, labels) -> logits for a plain cross-entropy.

A head owns its class centres (``weight``, one row per class: (C, D), or (C, K·D) for K sub-centres).
The maths lives in ``logits(embeddings, weight, labels)``, a function of an explicit centre matrix
(rows of :meth:`MarginHead.centres`), so a sharded classifier (Partial FC) can call it on a subset of
classes without knowing which head it runs. Before the loss, :meth:`MarginHead.screen` may name
samples the head treats as label noise; the loss leaves them out entirely.
Labels equal to ``IGNORE_LABEL`` (-1) mean "this sample's class is not among these centres":
no margin is applied to that row.

Logits are always computed in float32 (float64 if the inputs or centres are float64, for
gradient checks), with autocast disabled, whatever the caller's precision: margins live in the
last few bits of cos θ near ±1, which bf16/fp16 cannot represent.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from facesphere.registry import Registry

IGNORE_LABEL = -1
EPS = 1e-12


class MarginHead(nn.Module):
    """Base class: owns ``weight`` (C, ·), one row per class; subclasses implement :meth:`logits`."""

    class_state: tuple[str, ...] = ("weight",)
    """Names of the state_dict entries with one row per class: resharding a Partial FC checkpoint cuts these
    by class range and takes every other entry from the first shard (they are replicated)."""

    def __init__(self, embedding_size: int, num_classes: int) -> None:
        super().__init__()
        if embedding_size <= 0 or num_classes <= 1:
            raise ValueError(f"need embedding_size > 0 and num_classes > 1, got {embedding_size}, {num_classes}")
        self.embedding_size = embedding_size
        self.num_classes = num_classes
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_size))
        nn.init.normal_(self.weight, std=0.01)

    def forward(self, embeddings: Tensor, labels: Tensor | None = None) -> Tensor:
        """Logits (N, C) for ``F.cross_entropy(logits, labels)``; ``labels=None`` gives margin-free logits.

        Labels must lie in [-1, C). The range is checked only for CPU labels: checking CUDA labels
        would force a host-device synchronisation every step.
        """
        if labels is None:
            labels = torch.full((embeddings.shape[0],), IGNORE_LABEL, dtype=torch.long, device=embeddings.device)
        check_inputs(embeddings, labels, self.embedding_size, IGNORE_LABEL, self.num_classes)
        return self.exact_logits(embeddings, self.centres(), labels)

    def centres(self) -> Tensor:
        """The centre matrix :meth:`logits` runs on, one row per class (default ``weight``); differentiable."""
        return self.weight

    def screen(self, embeddings: Tensor, labels: Tensor) -> Tensor | None:
        """Look at a training batch before its loss; returns a bool (N,) mask of samples to leave out, or None.

        ``labels`` index rows of ``weight`` (this rank's classes) or are IGNORE_LABEL (never left out).
        A left-out sample adds nothing to the loss, not even as a row of negatives. Heads may update
        per-class statistics here (sub-centre ArcFace counts its sub-centres' wins). Default: None.
        """
        return None

    def exact_logits(self, embeddings: Tensor, weight: Tensor, labels: Tensor) -> Tensor:
        """:meth:`logits` in float32 (float64 if either input is) with autocast off, whatever the caller's precision."""
        dtype = torch.float64 if torch.float64 in (embeddings.dtype, weight.dtype) else torch.float32
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            return self.logits(embeddings.to(dtype), weight.to(dtype), labels.long())

    def logits(self, embeddings: Tensor, weight: Tensor, labels: Tensor) -> Tensor:
        """Logits (N, C') of ``embeddings`` (N, D) against the centres ``weight`` (C', D).

        ``labels`` index rows of ``weight``, or are IGNORE_LABEL. Pure in (embeddings, weight,
        labels) apart from the head's hyper-parameters, so Partial FC may pass a sampled subset.
        """
        raise NotImplementedError

    def update(self, step: int) -> None:
        """Called by the trainer before each optimisation step (annealing schedules); default no-op."""


def check_inputs(embeddings: Tensor, labels: Tensor, embedding_size: int, low: int, high: int) -> None:
    """Embeddings (N, D) and labels (N,) in [low, high); the range only for CPU labels (a CUDA check would
    force a host-device synchronisation every step)."""
    if embeddings.ndim != 2 or embeddings.shape[1] != embedding_size:
        raise ValueError(f"embeddings must be (N, {embedding_size}), got {tuple(embeddings.shape)}")
    if labels.shape != (embeddings.shape[0],):
        raise ValueError(f"labels must be (N,) = ({embeddings.shape[0]},), got {tuple(labels.shape)}")
    if labels.device.type == "cpu" and labels.numel() and (int(labels.min()) < low or int(labels.max()) >= high):
        raise ValueError(f"labels must lie in [{low}, {high}), got [{int(labels.min())}, {int(labels.max())}]")


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


def safe_sin(cos_theta: Tensor) -> Tensor:
    """sin θ = sqrt(1 - cos²θ) for θ ∈ [0, π], with the radicand clamped to the smallest normal float.

    Exact at cos θ = ±1 (returns ~1e-19, not 0), and the sqrt's gradient stays finite: in floating
    point 1 - c² is either 0 (clamped, zero gradient) or at least one ulp below 1.
    """
    return torch.sqrt((1.0 - cos_theta * cos_theta).clamp(min=torch.finfo(cos_theta.dtype).tiny))


def replace_target(values: Tensor, labels: Tensor, fn: Callable[[Tensor], Tensor]) -> Tensor:
    """Copy of ``values`` (N, C) with each row's target entry v replaced by ``fn(v)``.

    Rows labelled IGNORE_LABEL keep their entries. ``fn`` runs on the N target entries only (not
    on N×C), so costly margins stay cheap at large C; it must be finite with finite gradient on
    every input in [-1, 1] since ignored rows are masked out by ``torch.where``.
    """
    valid = (labels != IGNORE_LABEL).unsqueeze(1)
    index = labels.clamp(min=0).unsqueeze(1)
    target = values.gather(1, index)
    return values.scatter(1, index, torch.where(valid, fn(target), target))


class CosineMarginHead(MarginHead):
    """Scaled-cosine head: logit_j = s·cos θ_j, with the target cosine c replaced by ``target_cosine(c)``.

    The shared form of NormFace, COCO, AM-Softmax/CosFace, ArcFace and the combined margin
    (ArcFace 1801.07698 v3 Eq. (2)/(4)): features and centres are L2-normalised, there is no bias,
    and all logits share one scale s. Subclasses override :meth:`target_cosine` (identity here).
    """

    def __init__(self, embedding_size: int, num_classes: int, scale: float) -> None:
        super().__init__(embedding_size, num_classes)
        if not scale > 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        self.scale = float(scale)

    def effective_scale(self, like: Tensor) -> Tensor | float:
        """The scale s used in the logits (a float, or a tensor when learned)."""
        return self.scale

    def target_cosine(self, cos_theta: Tensor) -> Tensor:
        """Margin-penalised target cosine; identity (no margin) by default."""
        return cos_theta

    def class_cosine(self, embeddings: Tensor, weight: Tensor) -> Tensor:
        """cos θ (N, C') between the embeddings and each class of ``weight`` (one centre per row here)."""
        return cosine(embeddings, weight)

    def logits(self, embeddings: Tensor, weight: Tensor, labels: Tensor) -> Tensor:
        cos = replace_target(self.class_cosine(embeddings, weight), labels, self.target_cosine)
        return cos * self.effective_scale(cos)

    def extra_repr(self) -> str:
        return f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, scale={self.scale}"


HEADS: Registry[MarginHead] = Registry("head")


def build_head(name: str, embedding_size: int, num_classes: int, **kwargs) -> MarginHead:
    """Build a registered head by name, e.g. ``build_head("arcface", 512, 85742, margin=0.5)``."""
    return HEADS.build(name, embedding_size=embedding_size, num_classes=num_classes, **kwargs)


__all__ = [
    "MarginHead",
    "CosineMarginHead",
    "HEADS",
    "build_head",
    "check_inputs",
    "cosine",
    "target_mask",
    "safe_acos",
    "safe_sin",
    "replace_target",
    "IGNORE_LABEL",
]
