"""ArcFace's combined margin (Deng et al., 1801.07698 v3 Eq. (4)): cos(m1·θ + m2) - m3 on the target."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from facesphere.heads.base import HEADS, CosineMarginHead, safe_sin


@HEADS.register("combined", "combined_margin")
class CombinedMarginHead(CosineMarginHead):
    """Target logit s·ψ(θ_y), others s·cos θ_j, with ψ(θ) = cos(m1·θ + m2) - m3 (ArcFace v3 Eq. (4)).

    SphereFace ≈ (1.35, 0, 0), CosFace (1, 0, 0.35), ArcFace (1, 0.5, 0); defaults are CM1
    (1, 0.3, 0.2), one of the paper's best combinations (ArcFace v3 Table 2), with s = 64.

    Monotone fallback: cos(m1·θ + m2) stops decreasing once m1·θ + m2 > π, i.e. beyond
    θ* = (π - m2)/m1, where a larger angle would *raise* the target logit. There (cos θ < cos θ*)
    we use ψ(θ) = cos θ - cos θ* - 1 - m3: a CosFace-style additive cosine margin in the spirit of
    ArcFace's ``cos θ - m·sin m`` fallback, but chosen to meet ψ(θ*) = -1 - m3 continuously, so ψ is
    continuous and strictly decreasing on [0, π]. (The original MXNet combined-margin code had no
    fallback; ArcFace itself keeps the paper's discontinuous one, see ``arcface.py``.)

    Evaluation: m1 = 1 uses cos(θ + m2) = cos θ·cos m2 - sin θ·sin m2; other m1 take
    θ = atan2(sin θ, cos θ). Both use sin θ = ``safe_sin``, so they are exact at θ = 0 and π with
    finite gradients (a clamped acos would shift θ by up to 1.4e-3 rad near θ = 0, moving the
    target by ≈ s·m1·sin(m2)·1.4e-3 when m2 > 0).
    """

    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        scale: float = 64.0,
        m1: float = 1.0,
        m2: float = 0.3,
        m3: float = 0.2,
    ) -> None:
        super().__init__(embedding_size, num_classes, scale)
        if not m1 > 0:
            raise ValueError(f"m1 must be > 0, got {m1}")
        if not 0 <= m2 < math.pi:
            raise ValueError(f"m2 must lie in [0, π), got {m2}")
        self.m1, self.m2, self.m3 = float(m1), float(m2), float(m3)
        # θ* = (π - m2)/m1; a fallback is needed only if θ* < π.
        self.needs_fallback = self.m1 * math.pi + self.m2 > math.pi
        self.threshold = math.cos((math.pi - self.m2) / self.m1) if self.needs_fallback else -1.0

    def margin_cosine(self, cos_theta: Tensor) -> Tensor:
        """cos(m1·θ + m2), valid where m1·θ + m2 ≤ π."""
        if self.m1 == 1.0:
            if self.m2 == 0.0:
                return cos_theta
            return cos_theta * math.cos(self.m2) - safe_sin(cos_theta) * math.sin(self.m2)
        theta = torch.atan2(safe_sin(cos_theta), cos_theta)
        return torch.cos(self.m1 * theta + self.m2)

    def fallback(self, cos_theta: Tensor) -> Tensor:
        """Target cosine for cos θ ≤ threshold (m1·θ + m2 ≥ π): continuous, decreasing in θ."""
        return cos_theta - self.threshold - 1.0 - self.m3

    def target_cosine(self, cos_theta: Tensor) -> Tensor:
        psi = self.margin_cosine(cos_theta) - self.m3
        if not self.needs_fallback:
            return psi
        return torch.where(cos_theta > self.threshold, psi, self.fallback(cos_theta))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, m1={self.m1}, m2={self.m2}, m3={self.m3}"
