"""ArcFace (Deng et al., 1801.07698): an additive angular margin, target s·cos(θ_y + m)."""

from __future__ import annotations

import math

from torch import Tensor

from facesphere.heads.base import HEADS
from facesphere.heads.combined import CombinedMarginHead


@HEADS.register("arcface")
class ArcFaceHead(CombinedMarginHead):
    """Target logit s·cos(θ_y + m), others s·cos θ_j (ArcFace v3 Eq. (3)).

    Computed as s·(cos θ·cos m - sin θ·sin m) with sin θ = sqrt(clamp(1 - cos²θ)), with exact
    autograd as in the 2018 MXNet code (insightface@d37bb397 ``train_softmax.py``, loss_type 4);
    today's arcface_torch instead adds m to acos(cos θ) under ``no_grad``, so its backward skips
    the d cos(θ+m)/d cos θ factor.

    Fallback, as in that code: where θ + m > π (cos θ ≤ cos(π - m)) cos(θ + m) would increase with
    θ, so the target becomes s·(cos θ - m·sin m) (``mm = sin(π - m)·m``), a CosFace-style margin.
    It jumps down at the threshold (cos m + m sin m ≥ 1 for m ≤ π/2) and so stays monotone.

    Args:
        scale: s, default 64; margin: m, default 0.5 (paper §3.1 and Table 2), 0 ≤ m ≤ π/2.
        easy_margin: apply the margin only where cos θ > 0 and keep cos θ elsewhere (the MXNet
            ``easy_margin`` option) instead of the fallback above. Not monotone: at θ = π/2 the
            target jumps up from -sin m to 0.
    """

    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        scale: float = 64.0,
        margin: float = 0.5,
        easy_margin: bool = False,
    ) -> None:
        if not 0 <= margin <= math.pi / 2:
            raise ValueError(f"margin must lie in [0, π/2], got {margin}")
        super().__init__(embedding_size, num_classes, scale, m1=1.0, m2=margin, m3=0.0)
        self.margin = float(margin)
        self.easy_margin = bool(easy_margin)
        if self.easy_margin:
            self.needs_fallback, self.threshold = True, 0.0
        else:
            self.threshold = math.cos(math.pi - self.margin)

    def fallback(self, cos_theta: Tensor) -> Tensor:
        if self.easy_margin:
            return cos_theta
        return cos_theta - self.margin * math.sin(self.margin)

    def extra_repr(self) -> str:
        return (f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, scale={self.scale}, "
                f"margin={self.margin}, easy_margin={self.easy_margin}")
