"""Objectives of face rectification (GridFace, arXiv 1808.06210) and of its canonical-face prior.

* ``grid_continuity`` — the corner-continuity loss of the rectifier's local homographies (Sec. 3.2), read from
  the backbone's ``"homographies"`` output.
* ``canonical_prior`` — the canonical-face prior on the ``"rectified"`` output (Sec. 3.3), its gradient
  estimated by a denoising autoencoder: for a DAE r trained with noise sigma, (r(x) - x) / sigma^2 estimates
  d log p(x) / dx (Alain & Bengio, arXiv 1211.4246), so the term 0.5·‖x − sg(r(x))‖² / sigma²
  (sg: stop-gradient), whose gradient is (x − r(x)) / sigma², descends −log p.
* ``aligned_embedding`` — rectifier-only training in front of a frozen recogniser: the embedding of the rectified
  misaligned crop is pulled toward a frozen teacher's embedding of the aligned crop (target ``aligned``).
* ``aligned_image`` — the same pull in pixels: the rectified misaligned crop toward the aligned crop itself (mean
  squared difference). It needs no recogniser backward pass, so it is a cheap warm start before ``aligned_embedding``.
* ``rectify_geometry`` — where the misalignment is synthetic and known (target ``misalignment``), the cells'
  homographies are supervised by it directly (:func:`facesphere.backbones.rectifier.geometry_error`): our warm
  start, not in the paper, which learns the geometry from the recognition loss alone.
* ``denoising`` — trains the DAE itself (``face_dae`` backbone): reconstruction of the clean image.

The DAE and the teacher are stored models given by path, loaded once when the objective is built
(:func:`facesphere.objectives.base.load_frozen`: outside the module tree, never in checkpoints).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from facesphere.backbones.rectifier import continuity_loss, geometry_error
from facesphere.objectives.base import (OBJECTIVES, Objective, ObjectiveContext, ObjectiveLoadError, global_count,
                                        load_frozen, target_mask)


def _float(x: Tensor) -> Tensor:
    """float32 at least (float64 kept): losses in pixels² are not for bf16/fp16."""
    return x if x.dtype == torch.float64 else x.float()


@OBJECTIVES.register("grid_continuity")
class GridContinuity(Objective):
    """Mean over the batch of the rectifier's corner-continuity loss
    (:func:`facesphere.backbones.rectifier.continuity_loss`); the grid side n is read from the ``(N, n*n, 3, 3)``
    homographies and the image size from the ``"rectified"`` output."""

    reads = ("homographies", "rectified")

    def forward(self, outputs: dict[str, Tensor], targets: dict[str, Tensor]) -> dict[str, Tensor]:
        homographies = outputs["homographies"]
        cells = homographies.shape[1]
        grid = math.isqrt(cells)
        if grid * grid != cells:
            raise ValueError(f"objective {self.key!r}: {cells} homographies per face is not an n x n grid")
        size = tuple(outputs["rectified"].shape[-2:])
        return {self.key: continuity_loss(homographies, grid, size).mean()}  # float32 at least, autocast off


@OBJECTIVES.register("canonical_prior")
class CanonicalPrior(Objective):
    """``0.5 · mean((x − sg(r(x)))²) / sigma²`` over the elements of ``outputs[input]`` (default ``"rectified"``):
    its gradient is (x − r(x)) / (sigma² · numel), minus the DAE's estimate of the prior's score, per element.

    Args:
        dae: a stored ``face_dae`` model (model folder, run folder or checkpoint) trained on aligned faces.
        sigma: the score estimate's noise level; default (null) the DAE's own training noise, which is what the
            estimate (r(x) − x) / sigma² assumes.
        input: the model output the prior judges.
    """

    def __init__(self, context: ObjectiveContext, dae: str | Path, sigma: float | None = None,
                 input: str = "rectified") -> None:
        super().__init__(context)
        self._dae = load_frozen(context, dae, "dae")  # outside the module tree: never in checkpoints
        if not callable(getattr(self._dae.module, "reconstruct", None)):
            raise ObjectiveLoadError(f"objective {self.key!r}: dae {dae} is a {self._dae.card.backbone!r} model, "
                                     "not a denoising autoencoder (face_dae)")
        sigma = self._dae.module.noise if sigma is None else sigma
        if not sigma > 0:
            raise ValueError(f"objective {self.key!r}: sigma must be positive, got {sigma}")
        self.sigma, self.input = float(sigma), input
        self.reads = (input,)

    def forward(self, outputs: dict[str, Tensor], targets: dict[str, Tensor]) -> dict[str, Tensor]:
        x = outputs[self.input]
        expected = tuple(self._dae.card.input_size)
        if tuple(x.shape[-2:]) != expected:
            raise ValueError(f"objective {self.key!r}: the dae {self._dae.path} takes {expected[0]}x{expected[1]} "
                             f"images, the {self.input!r} output is {x.shape[-2]}x{x.shape[-1]}")
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = _float(x)
            dae = self._dae.follow(x)
            with torch.no_grad():
                reconstruction = dae.reconstruct(x.to(self._dae.dtype)).to(x.dtype)
            loss = 0.5 * (x - reconstruction).square().mean() / (self.sigma * self.sigma)
        return {self.key: loss}


@OBJECTIVES.register("aligned_embedding")
class AlignedEmbedding(Objective):
    """``mean(1 − cos(outputs[input], teacher(targets[target])))`` over the samples carrying ``target``.

    The teacher (frozen, no gradient) embeds the aligned version of each crop; the trained model sees the misaligned
    crop, so the loss teaches it (its rectifier) to give the aligned crop's embedding.

    Args:
        teacher: a stored recogniser (model folder, run folder or checkpoint) of the model's embedding size.
        target: the target holding the aligned images (same size and normalisation as the model's input).
        input: the model output compared (default the embedding).
    """

    def __init__(self, context: ObjectiveContext, teacher: str | Path, target: str = "aligned",
                 input: str = "embedding") -> None:
        super().__init__(context)
        self._teacher = load_frozen(context, teacher, "teacher")  # outside the module tree: never in checkpoints
        size = int(self._teacher.card.embedding_size)
        if size != context.embedding_size:
            raise ObjectiveLoadError(f"objective {self.key!r}: teacher {teacher} gives {size}-d embeddings, the "
                                     f"model {context.embedding_size}-d")
        self.target, self.input = target, input
        self.requires, self.reads = (target,), (input,)

    def forward(self, outputs: dict[str, Tensor], targets: dict[str, Tensor]) -> dict[str, Tensor]:
        embedding = outputs[self.input]
        mask = target_mask(targets, self.target)
        aligned = targets[self.target]
        with torch.autocast(device_type=embedding.device.type, enabled=False):
            embedding = _float(embedding)
            teacher = self._teacher(aligned).to(embedding.dtype)
            if mask is None:
                mask = torch.ones(embedding.shape[0], dtype=torch.bool, device=embedding.device)
            else:
                # A sample without its aligned image is compared with its own (detached) embedding: cos = 1 and a
                # zero gradient there, whatever placeholder (NaN) the data set put in.
                teacher = torch.where(mask[:, None], teacher, embedding.detach())
            distance = torch.where(mask, 1.0 - F.cosine_similarity(embedding, teacher, dim=1), 0.0)
            total, world = global_count(mask.sum().to(distance.dtype))
            loss = distance.sum() * world / total.clamp(min=1.0)
        return {self.key: loss}


@OBJECTIVES.register("aligned_image")
class AlignedImage(Objective):
    """``mean((outputs[input] − targets[target])²)`` over the samples carrying ``target``: the rectified crop
    (default ``"rectified"``) pulled toward the aligned crop (default target ``"aligned"``), pixel by pixel in the
    model's normalised input units."""

    def __init__(self, context: ObjectiveContext, target: str = "aligned", input: str = "rectified") -> None:
        super().__init__(context)
        self.target, self.input = target, input
        self.requires, self.reads = (target,), (input,)

    def forward(self, outputs: dict[str, Tensor], targets: dict[str, Tensor]) -> dict[str, Tensor]:
        x = outputs[self.input]
        mask = target_mask(targets, self.target)
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = _float(x)
            aligned = targets[self.target].to(x.dtype)
            if aligned.shape != x.shape:
                raise ValueError(f"objective {self.key!r}: target {self.target!r} is {tuple(aligned.shape)}, the "
                                 f"{self.input!r} output {tuple(x.shape)}")
            if mask is None:
                mask = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
            per_sample = torch.where(mask, (x - torch.where(mask[:, None, None, None], aligned, x.detach()))
                                     .square().flatten(1).mean(dim=1), 0.0)
            total, world = global_count(mask.sum().to(per_sample.dtype))
            loss = per_sample.sum() * world / total.clamp(min=1.0)
        return {self.key: loss}


@OBJECTIVES.register("rectify_geometry")
class RectifyGeometry(Objective):
    """Mean over the samples carrying ``target`` (default ``"misalignment"``) of
    :func:`facesphere.backbones.rectifier.geometry_error` between the ``"homographies"`` output and the target."""

    def __init__(self, context: ObjectiveContext, target: str = "misalignment") -> None:
        super().__init__(context)
        self.target = target
        self.requires, self.reads = (target,), ("homographies", "rectified")

    def forward(self, outputs: dict[str, Tensor], targets: dict[str, Tensor]) -> dict[str, Tensor]:
        homographies = outputs["homographies"]
        grid = math.isqrt(homographies.shape[1])
        size = tuple(outputs["rectified"].shape[-2:])
        mask = target_mask(targets, self.target)
        goal = targets[self.target]
        if mask is not None:  # a sample without a known misalignment is compared with itself: zero, no gradient
            goal = torch.where(mask[:, None, None], goal.to(homographies.dtype), homographies[:, 0].detach())
        error = geometry_error(homographies, goal, grid, size)
        if mask is None:
            return {self.key: error.mean()}
        total, world = global_count(mask.sum().to(error.dtype))
        return {self.key: torch.where(mask, error, 0.0).sum() * world / total.clamp(min=1.0)}


@OBJECTIVES.register("denoising")
class Denoising(Objective):
    """``mean((outputs["reconstruction"] − outputs["clean"])²)``: trains a denoising autoencoder (``face_dae``),
    whose forward reconstructs the clean image from a noisy copy."""

    def forward(self, outputs: dict[str, Tensor], targets: dict[str, Tensor]) -> dict[str, Tensor]:
        reconstruction = outputs["reconstruction"]
        with torch.autocast(device_type=reconstruction.device.type, enabled=False):
            return {self.key: F.mse_loss(_float(reconstruction), _float(outputs["clean"]).detach())}


__all__ = ["AlignedEmbedding", "AlignedImage", "CanonicalPrior", "Denoising", "GridContinuity", "RectifyGeometry"]
