"""Masked regression of a dense or vector target (landmarks, pose, position maps, 3DMM parameters).

The prediction is a model output (e.g. a backbone's ``"position_map"``), or a linear read-out of one
(``out_features``: e.g. 3DMM parameters or landmark coordinates from the embedding). Samples whose
target is masked out contribute nothing; the loss is the mean over the elements of the samples that
carry the target, taken over the global batch (all ranks), so one process and many agree.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import Tensor, nn

from facesphere.objectives.base import OBJECTIVES, Objective, ObjectiveContext, global_count, target_mask

_LOSSES = {"l1": F.l1_loss, "l2": F.mse_loss, "smooth_l1": F.smooth_l1_loss}


@OBJECTIVES.register("regression")
class Regression(Objective):
    """``mean |prediction - target|`` (``l1``), squared (``l2``) or Huber (``smooth_l1``) over present samples.

    Args:
        target: the target to regress (any shape per sample).
        input: the model output to read (default the embedding).
        out_features: if set, a linear layer maps the input (N, in_features) to (N, out_features) first.
        in_features: that layer's input width (default: the backbone's embedding size).
        loss: ``l1``, ``l2`` or ``smooth_l1``.
    """

    def __init__(self, context: ObjectiveContext, target: str, input: str = "embedding",
                 out_features: int | None = None, in_features: int | None = None, loss: str = "l1") -> None:
        super().__init__(context)
        if loss not in _LOSSES:
            raise ValueError(f"regression loss {loss!r} is not one of {', '.join(_LOSSES)}")
        self.target, self.input, self.loss = target, input, loss
        self.requires = (target,)
        self.readout = nn.Linear(in_features or context.embedding_size, out_features) if out_features else None

    def forward(self, outputs: dict[str, Tensor], targets: dict[str, Tensor]) -> dict[str, Tensor]:
        prediction = outputs[self.input]
        if self.readout is not None:
            prediction = self.readout(prediction)
        target = targets[self.target].to(prediction.dtype)
        if target.ndim == 1 and prediction.shape == (target.shape[0], 1):  # a scalar target (age) read out as (N, 1)
            prediction = prediction[:, 0]
        if prediction.shape != target.shape:
            raise ValueError(f"objective {self.key!r}: prediction {tuple(prediction.shape)} does not match target "
                             f"{self.target!r} {tuple(target.shape)}")
        mask = target_mask(targets, self.target)
        if mask is not None:
            # A masked sample's target becomes its own (detached) prediction: zero loss and zero gradient,
            # whatever placeholder (even NaN) the data set put there.
            shape = (-1,) + (1,) * (target.ndim - 1)
            target = torch.where(mask.view(shape), target, prediction.detach())
            present = mask.sum()
        else:
            present = torch.tensor(target.shape[0], device=target.device)
        per_element = _LOSSES[self.loss](prediction, target, reduction="none").reshape(target.shape[0], -1)
        total, world = global_count(present.to(per_element.dtype) * per_element.shape[1])
        return {self.key: per_element.sum() * world / total.clamp(min=1.0)}


__all__ = ["Regression"]
