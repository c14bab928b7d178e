"""NormFace (Wang et al., 1704.06369): softmax on scaled cosines of normalised features and centres."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from facesphere.heads.base import HEADS, CosineMarginHead


@HEADS.register("normface", "norm_softmax")
class NormFaceHead(CosineMarginHead):
    """logit_j = s·W̃_jᵀx̃ = s·cos θ_j, x̃ and W̃_j L2-normalised, no bias (NormFace's scaled cosine softmax).

    Without the scale the loss is bounded far from zero (the loss bound after normalisation, NormFace,
    arXiv 1704.06369, Proposition 2: L ≥ log(1 + (n-1)e^{-n s/(n-1)}), ≈0.39 at s = 10 for 10,575 classes).

    Args:
        scale: s, or its initial value when learned. Default 10, the released layer's
            initialisation (``scaled_cosine_softmax.prototxt``: Scale layer, filler 10, min 0.01).
        learn_scale: learn s as a scalar Parameter (default True, as released).
        min_scale: lower bound of a learned s (released: 0.01). The bound is a straight-through
            clamp: the forward value is max(s, min_scale) but the gradient always reaches s, so a
            parameter pushed below the bound can still recover (a plain ``clamp`` would freeze it).
            Weight decay, if the trainer applies it to ``scale``, pulls s toward 0.
    """

    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        scale: float = 10.0,
        learn_scale: bool = True,
        min_scale: float = 0.01,
    ) -> None:
        super().__init__(embedding_size, num_classes, scale)
        if not 0 < min_scale <= scale:
            raise ValueError(f"need 0 < min_scale <= scale, got min_scale={min_scale}, scale={scale}")
        self.learn_scale = bool(learn_scale)
        self.min_scale = float(min_scale)
        if self.learn_scale:
            self.scale = nn.Parameter(torch.tensor(float(scale)))

    def effective_scale(self, like: Tensor) -> Tensor | float:
        if not self.learn_scale:
            return self.scale
        s = self.scale.to(like.dtype)
        return s + (s.clamp(min=self.min_scale) - s).detach()

    def extra_repr(self) -> str:
        scale = float(self.scale.detach()) if self.learn_scale else self.scale
        return (f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, scale={scale:g}, "
                f"learn_scale={self.learn_scale}, min_scale={self.min_scale}")
