"""Fusable building blocks shared by the backbones, and BatchNorm folding for deployment.

Backbones build every "conv (or linear) immediately followed by BN" as a :class:`ConvBN` /
:class:`LinearBN` block, so :func:`fuse_batchnorm` can fold the BN into the preceding layer by a
plain walk over the module tree, without tracing. In eval mode BN is the per-channel affine map
``y = γ (x - μ) / sqrt(σ² + ε) + β``, which composes exactly with a conv/linear: with
``s = γ / sqrt(σ² + ε)``, ``W' = s·W`` and ``b' = s·(b - μ) + β``. The MobileFaceNet paper
(arXiv 1804.07573, §3.3) folds BN this way before deployment.
"""

from __future__ import annotations

import copy
import logging
from collections import OrderedDict
from typing import Sequence

import torch
from torch import Tensor, nn

logger = logging.getLogger(__name__)

# Each conv type and the BN type that normalises its output.
_CONV_BN = {nn.Conv1d: nn.BatchNorm1d, nn.Conv2d: nn.BatchNorm2d, nn.Conv3d: nn.BatchNorm3d}


class ConvBN(nn.Sequential):
    """``Conv2d`` (no bias) followed by ``BatchNorm2d``: the fusable unit of every backbone here."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int = 1,
        padding: int | tuple[int, int] = 0,
        groups: int = 1,
    ) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=False),
            nn.BatchNorm2d(out_channels),
        )


class LinearBN(nn.Sequential):
    """``Linear`` followed by ``BatchNorm1d`` (the embedding layer of ArcFace's "E" output)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__(nn.Linear(in_features, out_features, bias=bias), nn.BatchNorm1d(out_features))


def check_input(x: Tensor, input_size: Sequence[int], arch: str) -> None:
    """Raise ``ValueError`` unless ``x`` is (N, 3, H, W) with (H, W) == ``input_size``.

    Backbones end in a layer sized for one spatial resolution (GDConv kernel, flattened FC), so a
    wrong size would otherwise fail deep inside with an opaque shape error, or silently not fail.
    """
    height, width = input_size
    if x.ndim != 4 or x.shape[1] != 3 or x.shape[2] != height or x.shape[3] != width:
        got = "x".join(str(s) for s in x.shape[1:]) if x.ndim == 4 else f"a {x.ndim}-D tensor {tuple(x.shape)}"
        raise ValueError(
            f"{arch} expects {height}x{width} input, i.e. (N, 3, {height}, {width}) RGB images, got {got}"
        )


def _bn_scale_shift(bn: nn.modules.batchnorm._BatchNorm) -> tuple[Tensor, Tensor]:
    """Per-channel (scale, shift) of an eval-mode BN: ``bn(x) == scale * x + shift``."""
    var, mean = bn.running_var, bn.running_mean
    scale = torch.rsqrt(var + bn.eps)
    shift = -mean * scale
    if bn.affine:
        scale = scale * bn.weight
        shift = shift * bn.weight + bn.bias
    return scale, shift


def _can_fuse(layer: nn.Module, bn: nn.Module) -> bool:
    if type(layer) in _CONV_BN:
        ok = type(bn) is _CONV_BN[type(layer)] and layer.out_channels == bn.num_features
    elif type(layer) is nn.Linear:
        ok = type(bn) is nn.BatchNorm1d and layer.out_features == bn.num_features
    else:
        return False
    if ok and not bn.track_running_stats:
        logger.warning("not folding %s: it has no running statistics (always uses batch statistics)", bn)
        return False
    return ok


@torch.no_grad()
def _fuse_pair(layer: nn.Module, bn: nn.modules.batchnorm._BatchNorm) -> nn.Module:
    """A copy of ``layer`` (conv or linear) with ``bn`` folded in; it always has a bias."""
    fused = copy.deepcopy(layer)
    scale, shift = _bn_scale_shift(bn)
    weight = layer.weight
    shape = (-1,) + (1,) * (weight.ndim - 1)
    fused.weight = nn.Parameter(weight * scale.to(weight.dtype).reshape(shape), requires_grad=weight.requires_grad)
    bias = layer.bias if layer.bias is not None else torch.zeros_like(scale)
    fused.bias = nn.Parameter((bias * scale + shift).to(weight.dtype), requires_grad=weight.requires_grad)
    return fused


def _fuse_children(module: nn.Module) -> int:
    """Fold in place below ``module``; returns how many BN layers were folded."""
    count = 0
    for name, child in list(module.named_children()):
        if isinstance(child, (ConvBN, LinearBN)) and len(child) == 2 and _can_fuse(child[0], child[1]):
            setattr(module, name, _fuse_pair(child[0], child[1]))
            count += 1
        else:
            count += _fuse_children(child)
    if type(module) is nn.Sequential:
        # Generic Sequentials: drop each BN that directly follows a conv/linear (names are kept).
        items = list(module._modules.items())
        kept: OrderedDict[str, nn.Module] = OrderedDict()
        i = 0
        while i < len(items):
            name, child = items[i]
            if i + 1 < len(items) and _can_fuse(child, items[i + 1][1]):
                kept[name] = _fuse_pair(child, items[i + 1][1])
                count += 1
                i += 2
            else:
                kept[name] = child
                i += 1
        module._modules = kept
    return count


def fuse_batchnorm(model: nn.Module) -> nn.Module:
    """Return an eval-mode copy of ``model`` with every BN that directly follows a conv/linear folded in.

    Only :class:`ConvBN`/:class:`LinearBN` blocks and adjacent (layer, BN) pairs inside plain
    ``nn.Sequential`` containers are folded; BNs elsewhere (e.g. iResNet's pre-conv BN, which
    cannot be folded exactly through zero padding) are left as they are. The copy reproduces the
    original's eval-mode outputs and is meant for inference only (it has no BN to train).
    """
    fused = copy.deepcopy(model)
    count = _fuse_children(fused)
    logger.info("folded %d BatchNorm layers into the preceding conv/linear layers", count)
    return fused.eval()


__all__ = ["ConvBN", "LinearBN", "check_input", "fuse_batchnorm"]
