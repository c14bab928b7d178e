"""Parameter and multiply-add counts, the complexity measures the face-recognition papers report.

Convention (MobileNetV2, MobileFaceNet Table 2, SphereFace, ArcFace's "FLOPs"): only the
multiply-adds of convolutions and fully connected layers are counted; one multiply-add is one
multiplication plus one accumulation. Biases, BatchNorm, PReLU/ReLU, pooling, dropout and
element-wise additions are not counted (they are a small fraction and vanish after BN folding).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

_COUNTED_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(frozen=True)
class Complexity:
    """Trainable parameter count and multiply-adds of one forward pass on one image."""

    parameters: int
    multiply_adds: int

    def __str__(self) -> str:
        return f"{_human(self.parameters)} params, {_human(self.multiply_adds)} MAdds"


def _human(n: int) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def _conv_madds(module: nn.Module, output: Tensor) -> int:
    # Each output element takes (C_in / groups) * prod(kernel) multiply-adds, whatever the stride/padding.
    per_image = output.numel() // output.shape[0]
    return per_image * (module.in_channels // module.groups) * math.prod(module.kernel_size)


def _linear_madds(module: nn.Linear, output: Tensor) -> int:
    per_image = output.numel() // output.shape[0] if output.ndim > 1 else output.numel()
    return per_image * module.in_features


def count_complexity(model: nn.Module, input_size: Sequence[int] | None = None) -> Complexity:
    """Count trainable parameters and conv/linear multiply-adds of ``model`` on one image.

    ``input_size`` is (H, W) for an RGB image or (C, H, W); it defaults to ``model.input_size``
    (every :class:`~facesphere.backbones.Backbone` has one). The model runs once on a zero image
    in eval mode under ``torch.no_grad``; each submodule's training flag is restored afterwards.
    """
    if input_size is None:
        input_size = getattr(model, "input_size", None)
        if input_size is None:
            raise ValueError(f"{type(model).__name__} has no input_size attribute: pass input_size=(H, W)")
    size = tuple(int(s) for s in input_size)
    if len(size) == 2:
        size = (3,) + size
    if len(size) != 3 or min(size) <= 0:
        raise ValueError(f"input_size must be (H, W) or (C, H, W) with positive entries, got {tuple(input_size)}")

    reference = next(iter(model.parameters()), None)
    device = reference.device if reference is not None else torch.device("cpu")
    dtype = reference.dtype if reference is not None and reference.is_floating_point() else torch.float32

    total = 0

    def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        nonlocal total
        if isinstance(module, _COUNTED_CONVS):
            total += _conv_madds(module, output)
        else:
            total += _linear_madds(module, output)

    handles = [
        m.register_forward_hook(hook) for m in model.modules() if isinstance(m, _COUNTED_CONVS + (nn.Linear,))
    ]
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros((1,) + size, device=device, dtype=dtype))
    finally:
        for handle in handles:
            handle.remove()
        for m, training in modes.items():
            m.training = training

    parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return Complexity(parameters=parameters, multiply_adds=total)


__all__ = ["Complexity", "count_complexity"]
