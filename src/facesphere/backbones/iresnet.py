"""iResNet, the "LResNet-E-IR" backbones of ArcFace (Deng et al., arXiv 1801.07698, §3.1 / Fig. 7).

Compared with ImageNet ResNets, for 112x112 faces:

* "L": the stem is a 3x3 stride-1 conv (+BN+PReLU) instead of conv7x7 s2 + max-pool, so the
  four stages (64/128/256/512 channels) see 112/56/28/14 and end on a 7x7 map;
* "IR": the improved residual unit BN -> conv3x3 -> BN -> PReLU -> conv3x3 (stride s) -> BN,
  added to the shortcut (identity, or conv1x1 stride s + BN when the shape changes); the first
  unit of every stage downsamples with stride 2 on its second conv;
* "E": the output layer BN -> Dropout -> FC -> BN on the flattened 512x7x7 map.

Units per stage: 18: [2,2,2,2], 34: [3,4,6,3], 50: [3,4,14,3], 100: [3,13,30,3], 200: [6,26,60,6].
"""

from __future__ import annotations

from functools import partial

from torch import Tensor, nn

from facesphere.backbones.base import BACKBONES, Backbone
from facesphere.backbones.fuse import ConvBN, LinearBN, check_input

STAGE_CHANNELS = (64, 128, 256, 512)
LAYERS: dict[int, tuple[int, int, int, int]] = {
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 14, 3),
    100: (3, 13, 30, 3),
    200: (6, 26, 60, 6),
}


class IRBlock(nn.Module):
    """Improved residual unit (ArcFace Fig. 7): BN-conv3x3-BN-PReLU-conv3x3(stride)-BN + shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)  # pre-conv BN: not foldable exactly (zero padding)
        self.conv1 = ConvBN(in_channels, out_channels, 3, 1, 1)
        self.prelu = nn.PReLU(out_channels)
        self.conv2 = ConvBN(out_channels, out_channels, 3, stride, 1)
        if stride != 1 or in_channels != out_channels:
            self.shortcut: nn.Module = ConvBN(in_channels, out_channels, 1, stride)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv2(self.prelu(self.conv1(self.bn1(x))))
        return out + self.shortcut(x)


class IResNet(Backbone):
    """LResNet-E-IR: (N, 3, 112, 112) -> (N, D) with D = 512 by default."""

    def __init__(
        self,
        depth: int,
        embedding_size: int = 512,
        dropout: float = 0.0,
        input_size: tuple[int, int] = (112, 112),
        bn_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        if depth not in LAYERS:
            raise ValueError(f"iResNet depth must be one of {sorted(LAYERS)}, got {depth}")
        input_size = (int(input_size[0]), int(input_size[1]))
        if min(input_size) < 16:
            raise ValueError(f"iResNet needs input at least 16x16, got {input_size[0]}x{input_size[1]}")
        self.arch = f"iresnet{depth}"
        self.input_size = input_size
        self.embedding_size = embedding_size

        self.stem = nn.Sequential(ConvBN(3, 64, 3, 1, 1), nn.PReLU(64))
        stages: list[nn.Module] = []
        channels = 64
        for out_channels, units in zip(STAGE_CHANNELS, LAYERS[depth]):
            blocks = [IRBlock(channels, out_channels, 2)]
            blocks += [IRBlock(out_channels, out_channels, 1) for _ in range(units - 1)]
            stages.append(nn.Sequential(*blocks))
            channels = out_channels
        self.stages = nn.Sequential(*stages)

        # Four stride-2 3x3 convs (padding 1): 112 -> 7.
        height, width = input_size
        for _ in range(4):
            height, width = (height - 1) // 2 + 1, (width - 1) // 2 + 1
        self.bn = nn.BatchNorm2d(channels)
        self.dropout = nn.Dropout(dropout)
        self.embedding = LinearBN(channels * height * width, embedding_size)
        self._init_weights()
        # Imported weights may need another BN eps (InsightFace's iResNets use 2e-5); PyTorch's by default.
        for m in self.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
                m.eps = bn_eps

    def _init_weights(self) -> None:
        # Kaiming (fan_out) convs; BN gamma 1, beta 0; the FC keeps PyTorch's default init.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        check_input(x, self.input_size, self.arch)
        x = self.bn(self.stages(self.stem(x)))
        return self.embedding(self.dropout(x).flatten(1))


for _depth in LAYERS:  # one registered variant per depth: build_backbone("iresnet50", embedding_size=...)
    BACKBONES.register(f"iresnet{_depth}")(partial(IResNet, _depth))


__all__ = ["IResNet", "IRBlock", "LAYERS"]
