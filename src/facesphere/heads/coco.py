"""COCO loss v2 (Liu, Li, Wang, 1710.00870): congenerous cosine logits with a fixed feature scale α."""

from __future__ import annotations

import math

from facesphere.heads.base import HEADS, CosineMarginHead


def coco_alpha(num_classes: int, target_probability: float) -> float:
    """Smallest feature scale α at which ideally separated classes can reach p(true) = p.

    α = ((K-1)/K)·log((K-1)p/(1-p)) (COCO, arXiv 1710.00870; derived from the simplex bound
    p ≤ e^α / (e^α + (K-1)e^{-α/(K-1)}); the paper's own closed form was not in the stored text).
    Reproduces the released face scale: K = 87,020, p ≈ 0.99996 gives α ≈ 21.475.
    """
    if num_classes < 2:
        raise ValueError(f"need num_classes >= 2, got {num_classes}")
    if not 0 < target_probability < 1:
        raise ValueError(f"target_probability must lie in (0, 1), got {target_probability}")
    k, p = num_classes, target_probability
    return (k - 1) / k * math.log((k - 1) * p / (1 - p))


@HEADS.register("coco", "coco_loss")
class COCOHead(CosineMarginHead):
    """logit_k = ĉ_kᵀx̂ = α·cos θ_k with ĉ_k = c_k/‖c_k‖, x̂ = α·x/‖x‖; no margin, labels ignored.

    Args:
        alpha: the feature scale α; None computes it from ``num_classes`` and
            ``target_probability`` with :func:`coco_alpha` (so it must be positive: p > 1/K).
        target_probability: the p* used when ``alpha`` is None (default 0.9).
    """

    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        alpha: float | None = None,
        target_probability: float = 0.9,
    ) -> None:
        if alpha is None:
            alpha = coco_alpha(num_classes, target_probability)
        super().__init__(embedding_size, num_classes, alpha)
        self.target_probability = target_probability

    @property
    def alpha(self) -> float:
        return self.scale

    def extra_repr(self) -> str:
        return f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, alpha={self.alpha:.6g}"
