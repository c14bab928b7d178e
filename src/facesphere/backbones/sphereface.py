"""SphereFace residual CNNs (Liu et al., "SphereFace", arXiv 1704.08063, Table 2 and the released
Caffe prototxt), for 112x96 (H x W) faces.

Four stages of 64/128/256/512 channels; each starts with a 3x3 stride-2 conv (padding 1) +
PReLU and continues with r residual units [conv3x3 + PReLU, conv3x3 + PReLU] + identity.
No BatchNorm; convs have biases as in Caffe. The final 512x7x6 map is flattened into a 512-d FC.
Residual units per stage: 4: [0,0,0,0], 10: [0,1,2,0], 20: [1,2,4,1], 36: [2,4,8,2], 64: [3,8,16,3].

Initialisation follows the prototxt: "xavier" filler for the stride-2 convs and the FC,
Gaussian (std 0.01) for the residual convs, zero biases. Caffe's xavier is uniform in
±sqrt(3 / fan_in) (its default variance_norm is FAN_IN), not PyTorch's fan-average variant.
"""

from __future__ import annotations

import math
from functools import partial

import torch
from torch import Tensor, nn

from facesphere.backbones.base import BACKBONES, Backbone
from facesphere.backbones.fuse import check_input

STAGE_CHANNELS = (64, 128, 256, 512)
UNITS: dict[int, tuple[int, int, int, int]] = {
    4: (0, 0, 0, 0),
    10: (0, 1, 2, 0),
    20: (1, 2, 4, 1),
    36: (2, 4, 8, 2),
    64: (3, 8, 16, 3),
}


def _caffe_xavier_(weight: Tensor) -> None:
    """Caffe's XavierFiller with the default FAN_IN: U(-a, a), a = sqrt(3 / fan_in)."""
    fan_in = weight[0].numel()
    bound = math.sqrt(3.0 / fan_in)
    with torch.no_grad():
        weight.uniform_(-bound, bound)


class ConvPReLU(nn.Sequential):
    """3x3 conv (with bias, padding 1) followed by channel-wise PReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__(nn.Conv2d(in_channels, out_channels, 3, stride, 1), nn.PReLU(out_channels))


class SphereResidual(nn.Module):
    """Residual unit: x + PReLU(conv(PReLU(conv(x)))), identity skip, no BN."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(ConvPReLU(channels, channels, 1), ConvPReLU(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class SphereFaceNet(Backbone):
    """SphereFace-{4,10,20,36,64}: (N, 3, 112, 96) -> (N, 512)."""

    def __init__(self, depth: int, embedding_size: int = 512, input_size: tuple[int, int] = (112, 96)) -> None:
        super().__init__()
        if depth not in UNITS:
            raise ValueError(f"SphereFace depth must be one of {sorted(UNITS)}, got {depth}")
        input_size = (int(input_size[0]), int(input_size[1]))
        if min(input_size) < 16:
            raise ValueError(f"SphereFace needs input at least 16x16, got {input_size[0]}x{input_size[1]}")
        self.arch = f"sphereface{depth}"
        self.input_size = input_size
        self.embedding_size = embedding_size

        stages: list[nn.Module] = []
        channels = 3
        for out_channels, units in zip(STAGE_CHANNELS, UNITS[depth]):
            downsample = ConvPReLU(channels, out_channels, 2)
            stages.append(nn.Sequential(downsample, *(SphereResidual(out_channels) for _ in range(units))))
            channels = out_channels
        self.stages = nn.Sequential(*stages)

        height, width = input_size
        for _ in range(4):
            height, width = (height - 1) // 2 + 1, (width - 1) // 2 + 1
        self.fc = nn.Linear(channels * height * width, embedding_size)  # 512*7*6 -> 512
        self._init_weights()

    def _init_weights(self) -> None:
        for stage in self.stages:
            _caffe_xavier_(stage[0][0].weight)
            for unit in stage[1:]:
                for conv_prelu in unit.body:
                    nn.init.normal_(conv_prelu[0].weight, std=0.01)
        _caffe_xavier_(self.fc.weight)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        check_input(x, self.input_size, self.arch)
        return self.fc(self.stages(x).flatten(1))


for _depth in UNITS:  # one registered variant per depth, alias "sphereN" as in the SphereFace repository
    BACKBONES.register(f"sphereface{_depth}", f"sphere{_depth}")(partial(SphereFaceNet, _depth))


__all__ = ["SphereFaceNet", "SphereResidual", "UNITS"]
