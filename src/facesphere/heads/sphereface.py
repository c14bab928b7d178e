"""SphereFace / A-Softmax (Liu et al., 1704.08063): a multiplicative angular margin on the target."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from facesphere.heads.base import HEADS, MarginHead, cosine, replace_target


def chebyshev(cos_theta: Tensor, m: int) -> Tensor:
    """cos(mθ) = T_m(cos θ) by the Chebyshev recurrence T_{n+1} = 2c·T_n - T_{n-1}.

    A polynomial in cos θ: exact and with bounded gradient at θ = 0 and π, unlike cos(m·acos c).
    """
    previous, current = torch.ones_like(cos_theta), cos_theta
    if m == 0:
        return previous
    for _ in range(m - 1):
        previous, current = current, 2 * cos_theta * current - previous
    return current


def sphereface_psi(cos_theta: Tensor, m: int) -> Tensor:
    """ψ(θ) = (-1)^k cos(mθ) - 2k for θ ∈ [kπ/m, (k+1)π/m], k ∈ {0, …, m-1} (A-Softmax, arXiv 1704.08063).

    k = floor(mθ/π) (clamped to m - 1 at θ = π) is piecewise constant, so it is computed without
    gradient. ψ is continuous (both pieces equal 1 - 2k at θ = kπ/m) and even C¹ in θ (sin(mθ) = 0
    there), so a k off by one ulp at a boundary changes ψ only at second order. Decreases from 1
    at θ = 0 to 1 - 2m at θ = π.
    """
    with torch.no_grad():
        theta = torch.acos(cos_theta.clamp(-1.0, 1.0))
        k = torch.floor(theta * (m / math.pi)).clamp_(0, m - 1)
        sign = 1.0 - 2.0 * torch.remainder(k, 2.0)
    return sign * chebyshev(cos_theta, m) - 2.0 * k


@HEADS.register("sphereface", "a_softmax")
class SphereFaceHead(MarginHead):
    """A-Softmax: logit_j = ‖x‖cos θ_j for j ≠ y, target ‖x‖·(λ cos θ_y + ψ(θ_y))/(1 + λ).

    Centres are L2-normalised (‖W_j‖ = 1, no bias); the feature keeps its norm ‖x‖. ψ is the
    paper's piecewise ψ (see :func:`sphereface_psi`). λ is the released Caffe code's annealing
    toward pure A-Softmax (``margin_inner_product_layer.cpp``):
    λ = max(λ_min, base·(1 + γ·iter)^(-power)), with iter the value last passed to :meth:`update`
    (Caffe increments its counter before use, so its first batch uses iter = 1; here step 0 gives
    λ = base). Set ``lambda_base=0, lambda_min=0`` for the un-annealed loss.

    Gradients are exact autograd. The Caffe layer instead rescaled its hand-written gradient
    coefficients (README "Note 1"), so its λ schedule, iteration count and learning-rate decay may
    need retuning here.

    Args:
        margin: the integer angular multiplier m ≥ 1 (default 4, the paper's setting; m = 1 gives
            the "modified softmax" ‖x‖cos θ).
        lambda_base, lambda_gamma, lambda_power, lambda_min: the schedule's base (1000), γ (0.12),
            power (1) and floor (5), as in the released ``sphereface_model.prototxt``.
    """

    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        margin: int = 4,
        lambda_base: float = 1000.0,
        lambda_gamma: float = 0.12,
        lambda_power: float = 1.0,
        lambda_min: float = 5.0,
    ) -> None:
        super().__init__(embedding_size, num_classes)
        if isinstance(margin, bool) or not float(margin).is_integer() or margin < 1:
            raise ValueError(f"margin must be an integer >= 1, got {margin!r}")
        if lambda_base < 0 or lambda_gamma < 0 or lambda_min < 0:
            raise ValueError("lambda_base, lambda_gamma and lambda_min must be >= 0")
        self.margin = int(margin)
        self.lambda_base = float(lambda_base)
        self.lambda_gamma = float(lambda_gamma)
        self.lambda_power = float(lambda_power)
        self.lambda_min = float(lambda_min)
        self.iteration = 0

    @property
    def lambda_(self) -> float:
        """Current annealing weight λ = max(λ_min, base·(1 + γ·iter)^(-power))."""
        decayed = self.lambda_base * (1.0 + self.lambda_gamma * self.iteration) ** (-self.lambda_power)
        return max(self.lambda_min, decayed)

    def update(self, step: int) -> None:
        """Set the annealing iteration to the trainer's step."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        self.iteration = int(step)

    def logits(self, embeddings: Tensor, weight: Tensor, labels: Tensor) -> Tensor:
        lam = self.lambda_

        def annealed_psi(cos_theta: Tensor) -> Tensor:
            return (lam * cos_theta + sphereface_psi(cos_theta, self.margin)) / (1.0 + lam)

        cos = replace_target(cosine(embeddings, weight), labels, annealed_psi)
        return torch.linalg.vector_norm(embeddings, dim=1, keepdim=True) * cos

    def extra_repr(self) -> str:
        return (f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, margin={self.margin}, "
                f"lambda={self.lambda_:g} (base={self.lambda_base}, gamma={self.lambda_gamma}, "
                f"power={self.lambda_power}, min={self.lambda_min}), iteration={self.iteration}")
