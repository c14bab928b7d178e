"""OE-CNN's identity head (Wang et al., arXiv 1810.07599, Sec. 3): SphereFace's margin on the feature's direction.

OE-CNN writes the feature as x = ‖x‖·x̃: the norm regresses age (the ``age_from_norm`` objective) and the
direction x̃ = x/‖x‖ carries identity through an A-Softmax-style loss in which the norm no longer appears.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from facesphere.heads.base import EPS, HEADS
from facesphere.heads.sphereface import SphereFaceHead


@HEADS.register("oe", "oe_cnn")
class OEHead(SphereFaceHead):
    """logit_j = s·cos θ_j for j ≠ y, target s·(λ cos θ_y + ψ(θ_y))/(1 + λ), with a fixed scale s.

    The reading of 1810.07599 Sec. 3.2 taken here: the identity loss is A-Softmax (arXiv 1704.08063)
    with ‖x‖ replaced by a constant s, −log[e^{sψ(θ_y)} / (e^{sψ(θ_y)} + Σ_{j≠y} e^{s cos θ_j})], so the
    identity logits depend on the direction x̃ only and leave the norm free for age. ψ and the λ
    annealing toward pure A-Softmax are SphereFace's (:class:`SphereFaceHead`; λ = 0 gives the formula
    above exactly). Alternatives to this reading: keeping ‖x‖ as the scale (plain SphereFace, which ties
    identity confidence to age) or an additive-angle margin (ArcFace) on x̃; both are registered heads.

    Args:
        scale: the fixed s. Default 32: a normalised softmax needs s large enough for its loss lower
            bound to vanish at the number of classes (NormFace, arXiv 1704.06369; s ≈ 15 already does
            for 10⁴ classes), and ψ spans [1 − 2m, 1], so with m = 4 the target logit ranges over 8·s;
            32 is the middle of the 16-64 used by the normalised heads here, and small enough that
            fine-tuning on a few hundred identities does not saturate at once.
        margin, lambda_*: SphereFace's m (default 4, as in A-Softmax) and λ schedule (see :class:`SphereFaceHead`).
    """

    def __init__(self, embedding_size: int, num_classes: int, scale: float = 32.0, margin: int = 4,
                 lambda_base: float = 1000.0, lambda_gamma: float = 0.12, lambda_power: float = 1.0,
                 lambda_min: float = 5.0) -> None:
        super().__init__(embedding_size, num_classes, margin, lambda_base, lambda_gamma, lambda_power, lambda_min)
        if not scale > 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        self.scale = float(scale)

    def logits(self, embeddings: Tensor, weight: Tensor, labels: Tensor) -> Tensor:
        # SphereFace's logits are ‖x‖ times the margin cosine; a feature of norm s gives s times it.
        return super().logits(self.scale * F.normalize(embeddings, dim=1, eps=EPS), weight, labels)

    def extra_repr(self) -> str:
        return f"scale={self.scale}, " + super().extra_repr()


__all__ = ["OEHead"]
