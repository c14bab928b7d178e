"""MobileFaceNet (Chen et al., "MobileFaceNets", arXiv 1804.07573), Table 1.

112x112 input -> conv3x3 s2 (64) -> depthwise conv3x3 (64) -> MobileNetV2 bottlenecks
(t, c, n, s) = (2,64,5,2), (4,128,1,2), (2,128,6,1), (4,128,1,2), (2,128,2,1) -> conv1x1 (512)
-> linear GDConv7x7 (512) -> linear conv1x1 (D=128). PReLU after every non-linear layer, BN after
every conv, no conv biases. The global depthwise conv (GDConv, §3.2) replaces global average
pooling so that the corner and centre units of the 7x7 map get different weights.

The paper reports 0.99M parameters and 221M multiply-adds (Table 2) for this network.
Variants (§4, Table 3): MobileFaceNet-M drops the linear 1x1 after the GDConv (512-d output);
MobileFaceNet-S also drops the 1x1 (512) before it (128-d output).
"""

from __future__ import annotations

from torch import Tensor, nn

from facesphere.backbones.base import BACKBONES, Backbone
from facesphere.backbones.fuse import ConvBN, check_input

# Table 1: expansion factor t, output channels c, repeats n, first stride s.
BOTTLENECKS: tuple[tuple[int, int, int, int], ...] = (
    (2, 64, 5, 2),
    (4, 128, 1, 2),
    (2, 128, 6, 1),
    (4, 128, 1, 2),
    (2, 128, 2, 1),
)


class ConvBNPReLU(nn.Sequential):
    """A non-linear conv layer of Table 1: conv -> BN -> channel-wise PReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__(
            ConvBN(in_channels, out_channels, kernel_size, stride, kernel_size // 2, groups),
            nn.PReLU(out_channels),
        )


class Bottleneck(nn.Module):
    """MobileNetV2 inverted residual: 1x1 expand -> 3x3 depthwise (stride s) -> linear 1x1 project.

    The skip connection is used only when the block keeps the shape (stride 1, c_in == c_out).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_channels * expansion
        self.use_residual = stride == 1 and in_channels == out_channels
        self.body = nn.Sequential(
            ConvBNPReLU(in_channels, hidden, 1),
            ConvBNPReLU(hidden, hidden, 3, stride, groups=hidden),
            ConvBN(hidden, out_channels, 1),  # linear bottleneck: no activation
        )

    def forward(self, x: Tensor) -> Tensor:
        out = self.body(x)
        return x + out if self.use_residual else out


def _final_map_size(input_size: tuple[int, int]) -> tuple[int, int]:
    """Spatial size after the four stride-2 3x3 (padding 1) convs: ceil(x / 16), e.g. 112 -> 7."""
    size = input_size
    for _ in range(4):
        size = tuple((s - 1) // 2 + 1 for s in size)
    return size  # type: ignore[return-value]


class MobileFaceNet(Backbone):
    """MobileFaceNet and its -M / -S variants; forward maps (N, 3, H, W) to (N, D) embeddings."""

    def __init__(
        self,
        embedding_size: int = 128,
        input_size: tuple[int, int] = (112, 112),
        variant: str = "",
        bn_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        if variant not in ("", "m", "s"):
            raise ValueError(f"variant must be '', 'm' or 's', got {variant!r}")
        input_size = (int(input_size[0]), int(input_size[1]))
        if min(input_size) < 32:
            raise ValueError(f"MobileFaceNet needs input at least 32x32, got {input_size[0]}x{input_size[1]}")
        self.arch = "mobilefacenet" + (f"_{variant}" if variant else "")
        self.input_size = input_size
        self.variant = variant

        layers: list[nn.Module] = [ConvBNPReLU(3, 64, 3, stride=2), ConvBNPReLU(64, 64, 3, groups=64)]
        channels = 64
        for t, c, n, s in BOTTLENECKS:
            for i in range(n):
                layers.append(Bottleneck(channels, c, s if i == 0 else 1, t))
                channels = c
        if variant != "s":
            layers.append(ConvBNPReLU(channels, 512, 1))
            channels = 512
        self.features = nn.Sequential(*layers)

        # Linear GDConv: a depthwise conv whose kernel covers the whole final map (7x7 at 112x112).
        self.gdconv = ConvBN(channels, channels, _final_map_size(input_size), groups=channels)
        if variant == "":
            self.embedding = ConvBN(channels, embedding_size, 1)  # linear 1x1 conv + BN
            self.embedding_size = embedding_size
        else:
            if embedding_size != channels:
                raise ValueError(
                    f"{self.arch} outputs the GDConv's {channels} channels; embedding_size must be {channels}"
                )
            self.embedding = nn.Identity()
            self.embedding_size = channels
        self._init_weights()
        # Imported weights may need another BN eps (MXNet's default is 1e-3); PyTorch's by default.
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eps = bn_eps

    def _init_weights(self) -> None:
        # Kaiming (fan_out) for convs, as for MobileNetV2; BN starts as the identity map.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        check_input(x, self.input_size, self.arch)
        x = self.embedding(self.gdconv(self.features(x)))
        return x.flatten(1)


@BACKBONES.register("mobilefacenet")
def mobilefacenet(embedding_size: int = 128, input_size: tuple[int, int] = (112, 112),
                  bn_eps: float = 1e-5) -> MobileFaceNet:
    """MobileFaceNet of Table 1 (0.99M params, 221M MAdds at 112x112, D=128)."""
    return MobileFaceNet(embedding_size, input_size, bn_eps=bn_eps)


@BACKBONES.register("mobilefacenet_m")
def mobilefacenet_m(embedding_size: int = 512, input_size: tuple[int, int] = (112, 112),
                    bn_eps: float = 1e-5) -> MobileFaceNet:
    """MobileFaceNet-M: no linear 1x1 after the GDConv, so the embedding is the GDConv's 512 channels."""
    return MobileFaceNet(embedding_size, input_size, variant="m", bn_eps=bn_eps)


@BACKBONES.register("mobilefacenet_s")
def mobilefacenet_s(embedding_size: int = 128, input_size: tuple[int, int] = (112, 112),
                    bn_eps: float = 1e-5) -> MobileFaceNet:
    """MobileFaceNet-S: MobileFaceNet-M without the 1x1 (512) before the GDConv; 128-d embedding."""
    return MobileFaceNet(embedding_size, input_size, variant="s", bn_eps=bn_eps)


__all__ = ["MobileFaceNet", "Bottleneck", "mobilefacenet", "mobilefacenet_m", "mobilefacenet_s", "BOTTLENECKS"]
