"""AM-Softmax / CosFace (Wang et al., 1801.05599): an additive margin on the target cosine."""

from __future__ import annotations

from torch import Tensor

from facesphere.heads.base import HEADS, CosineMarginHead


@HEADS.register("cosface", "am_softmax")
class CosFaceHead(CosineMarginHead):
    """Target logit s·(cos θ_y - m), others s·cos θ_j.

    AM-Softmax's ψ(θ) = cos θ - m in its normalised softmax loss (arXiv 1801.05599); equivalently ArcFace v3
    Eq. (4) with (m1, m2, m3) = (1, 0, m). Features and centres are L2-normalised, no bias.

    Args:
        scale: s, default 64 (ArcFace's setting, following CosFace); AM-Softmax released s = 30.
        margin: m, default 0.35 (both papers' best margin).
    """

    def __init__(self, embedding_size: int, num_classes: int, scale: float = 64.0, margin: float = 0.35) -> None:
        super().__init__(embedding_size, num_classes, scale)
        self.margin = float(margin)

    def target_cosine(self, cos_theta: Tensor) -> Tensor:
        return cos_theta - self.margin

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, margin={self.margin}"
