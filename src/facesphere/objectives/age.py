"""Age from the embedding's norm (OE-CNN, Wang et al., arXiv 1810.07599, Sec. 3): f(‖x‖) = k‖x‖ + b.

OE-CNN decomposes the deep feature as x = ‖x‖·x̃: the direction x̃ carries identity (the ``oe`` head) and
the norm regresses age, L_age = 1/(2M) Σ_i (f(‖x_i‖) − z_i)² over the M samples with an age z_i.

Conditioning: with raw norms of 10-30 the slope's curvature is E[‖x‖²] ≈ 10²-10³, so the one SGD
optimiser, at the backbone's learning rate, would diverge on k (lr·E[‖x‖²] > 2) while b barely moves.
The objective therefore learns f in standardised coordinates, f(n) = c + a·(n − μ)/σ, so that both
parameters have curvature about 1:

* μ and σ, buffers, start as the norm's mean and standard deviation over the first batch with ages (all
  ranks), and a, c at that batch's closed-form least-squares fit (a = cov(n, z)/σ, c = mean z): the age
  term starts at its optimum for the initial backbone instead of minutes of SGD away from it.
* The norms drift while the backbone trains (a small backbone from scratch: ~1 → ~11 within a few hundred
  steps, which made a's curvature E[((n − μ)/σ)²] ≈ 2500 and the loss NaN with fixed first-batch statistics). So
  before every training step μ and σ follow the batch's norms (running averages, share ``norm_momentum``)
  and a, c are re-expressed so that f itself is unchanged (k = a/σ and b = c − a·μ/σ are kept): a change
  of coordinates only, never a change of the function being fitted.

All of this is state in the checkpoint (``fitted``, μ, σ) and a function of the batches seen, so a
resumed run continues bit for bit; the statistics are summed over ranks, so every rank holds the same a, c.
k = a/σ and b = c − a·μ/σ are what :meth:`AgeFromNorm.age_branch` reports, as the fields of the model card's
``facesphere.models.card.AgeBranch`` (plain values, since objectives and models are sibling layers: the trainer stores
them in its checkpoints, and ``facesphere.models.runs`` puts them on the card of the trained backbone).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import Tensor, nn

from facesphere.objectives.base import OBJECTIVES, Objective, ObjectiveContext, global_count, target_mask

logger = logging.getLogger(__name__)


@OBJECTIVES.register("age_from_norm")
class AgeFromNorm(Objective):
    """``1/(2M) Σ (k‖x‖ + b − z)²`` over the samples carrying target ``target`` (global mean over ranks).

    Args:
        target: the target holding ages in years (masked-out samples add neither loss nor gradient).
        input: the model output whose raw (un-normalised) rows are x.
        norm_momentum: each training batch's share in the running μ, σ of the norm (0: keep the first batch's).
    """

    def __init__(self, context: ObjectiveContext, target: str = "age", input: str = "embedding",
                 norm_momentum: float = 0.1) -> None:
        super().__init__(context)
        if not 0.0 <= norm_momentum <= 1.0:
            raise ValueError(f"norm_momentum must lie in [0, 1], got {norm_momentum}")
        self.target, self.input, self.norm_momentum = target, input, float(norm_momentum)
        self.requires = (target,)
        self.slope_per_std = nn.Parameter(torch.zeros(()))  # a: years per standard deviation of the norm
        self.age_at_mean = nn.Parameter(torch.zeros(()))  # c: the age at the mean norm
        self.register_buffer("norm_mean", torch.zeros((), dtype=torch.float64))
        self.register_buffer("norm_std", torch.ones((), dtype=torch.float64))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    def predict(self, norms: Tensor) -> Tensor:
        """Ages f(n) = c + a·(n − μ)/σ for embedding norms (differentiable in a, c and the norms)."""
        standardised = (norms - self.norm_mean.to(norms.dtype)) / self.norm_std.to(norms.dtype)
        return self.age_at_mean.to(norms.dtype) + self.slope_per_std.to(norms.dtype) * standardised

    def forward(self, outputs: dict[str, Tensor], targets: dict[str, Tensor]) -> dict[str, Tensor]:
        x = outputs[self.input]
        with torch.autocast(device_type=x.device.type, enabled=False):  # years² need float32 at least
            norms = torch.linalg.vector_norm(x.double() if x.dtype == torch.float64 else x.float(), dim=1)
            ages = targets[self.target].to(norms.dtype)
            if ages.shape != norms.shape:
                raise ValueError(f"objective {self.key!r}: target {self.target!r} must be one age per sample "
                                 f"{tuple(norms.shape)}, got {tuple(ages.shape)}")
            mask = target_mask(targets, self.target)
            if mask is None:
                mask = torch.ones_like(ages, dtype=torch.bool)
            if not bool(self.fitted):
                self._fit(norms.detach(), ages, mask)
            elif self.training and self.norm_momentum > 0:
                self._follow(norms.detach())
            prediction = self.predict(norms)
            # A sample without an age is compared with its own detached prediction: zero loss and gradient,
            # whatever placeholder (NaN) it carries, and the graph still reaches a and c (DDP needs that).
            ages = torch.where(mask, ages, prediction.detach())
            total, world = global_count(mask.sum().to(norms.dtype))
            loss = 0.5 * (prediction - ages).square().sum() * world / total.clamp(min=1.0)
        return {self.key: loss}

    @torch.no_grad()
    def _fit(self, norms: Tensor, ages: Tensor, mask: Tensor) -> None:
        """μ, σ and the least-squares a, c from the samples with ages of this batch on every rank."""
        n, z = norms.double()[mask], ages.double()[mask]
        stats, _ = global_count(torch.stack([torch.tensor(float(n.numel()), dtype=torch.float64, device=n.device),
                                             n.sum(), z.sum(), (n * n).sum(), (n * z).sum()]))
        count, sum_n, sum_z, sum_nn, sum_nz = stats.tolist()
        if count == 0:
            return
        mean_n, mean_z = sum_n / count, sum_z / count
        variance = max(sum_nn / count - mean_n * mean_n, 0.0)
        std = math.sqrt(variance)
        if not std > 1e-6 * max(abs(mean_n), 1.0):  # one sample, or equal norms: no slope can be fitted yet
            std, covariance = 1.0, 0.0
        else:
            covariance = sum_nz / count - mean_n * mean_z
        self.norm_mean.fill_(mean_n)
        self.norm_std.fill_(std)
        self.slope_per_std.fill_(covariance / std)
        self.age_at_mean.fill_(mean_z)
        self.fitted.fill_(True)
        logger.info("%s: age = %.4g + %.4g·(‖x‖ − %.4g)/%.4g fitted on the first %d samples with ages",
                    self.key, mean_z, covariance / std, mean_n, std, int(count))

    @torch.no_grad()
    def _follow(self, norms: Tensor) -> None:
        """Move μ, σ toward this batch's norm statistics (all ranks) and re-express a, c so that f is unchanged."""
        n = norms.double()
        stats, _ = global_count(torch.stack([n.new_tensor(float(n.numel())), n.sum(), (n * n).sum()]))
        mean = stats[1] / stats[0]
        variance = (stats[2] / stats[0] - mean * mean).clamp(min=0.0)
        old_mean, old_std = self.norm_mean.clone(), self.norm_std.clone()
        share = self.norm_momentum
        new_mean = old_mean + share * (mean - old_mean)
        new_std = torch.sqrt((1 - share) * old_std * old_std + share * variance)
        new_std = torch.where(new_std > 1e-6 * new_mean.abs().clamp(min=1.0), new_std, old_std)
        slope = self.slope_per_std.double() / old_std  # k, kept
        self.age_at_mean.copy_(self.age_at_mean.double() + slope * (new_mean - old_mean))
        self.slope_per_std.copy_(slope * new_std)
        self.norm_mean.copy_(new_mean)
        self.norm_std.copy_(new_std)

    def age_branch(self) -> dict[str, Any]:
        """The fitted f as the fields of the card's ``AgeBranch``: slope k = a/σ, intercept b = c − a·μ/σ."""
        if not bool(self.fitted):
            raise ValueError(f"objective {self.key!r} has seen no sample with an age: it has no age branch")
        a, c = float(self.slope_per_std.detach()), float(self.age_at_mean.detach())
        mean, std = float(self.norm_mean), float(self.norm_std)
        return {"kind": "norm_linear", "slope": a / std, "intercept": c - a * mean / std}

    def card_fields(self) -> dict[str, Any]:
        if not bool(self.fitted):
            logger.warning("objective %r has seen no sample with an age: the model gets no age branch", self.key)
            return {}
        return {"age_branch": self.age_branch()}


__all__ = ["AgeFromNorm"]
