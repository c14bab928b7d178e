"""A small convolutional denoising autoencoder of aligned faces: the canonical-face prior of GridFace.

GridFace (arXiv 1808.06210, Sec. 3.3) regularises the rectified face with a prior p(x) of canonical (aligned) faces
whose gradient is estimated by a denoising autoencoder: for a DAE r trained to undo Gaussian noise of standard
deviation sigma, (r(x) - x) / sigma^2 estimates the score d log p(x) / dx (Alain & Bengio, arXiv 1211.4246,
Sec. 3). :class:`FaceDAE` is that autoencoder; ``facesphere.objectives.rectify`` trains it (``denoising``) and
uses it as the prior (``canonical_prior``).

Images are the recognisers' normalised RGB, ``(x - 127.5) / 128``, so ``noise`` is in those units: the default
0.2 is about 26 grey levels, small enough for the score estimate (exact as sigma -> 0) and large enough that the
reconstruction cannot be the identity.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from facesphere.backbones.base import BACKBONES, Backbone

_WIDTHS = (32, 64, 128, 128)
"""Channels after each of the four stride-2 stages: 112 -> 56 -> 28 -> 14 -> 7."""


def _down(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c_out),
                         nn.ReLU(inplace=True))


def _up(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1, bias=False), nn.BatchNorm2d(c_out),
                         nn.ReLU(inplace=True))


@BACKBONES.register("face_dae")
class FaceDAE(Backbone):
    """Conv encoder (4 stride-2 convs + BN + ReLU, then a 1x1 bottleneck of ``embedding_size`` channels) and the
    mirrored transposed-conv decoder back to 3 channels (linear output); about 0.92M parameters at the defaults.

    ``forward(x)`` returns ``{"embedding": the pooled bottleneck (N, embedding_size), "reconstruction": r(x~),
    "clean": x}``, where x~ = x + N(0, noise^2) in training mode and x in eval mode (so the ``denoising`` objective
    trains r to undo the noise); :meth:`reconstruct` is r(x) without noise, what the prior reads.

    Args:
        input_size: (H, W), both divisible by 16.
        noise: the standard deviation of the training noise, in normalised units ((x - 127.5) / 128).
        embedding_size: the bottleneck's channels (its spatial mean is the embedding of the Backbone contract).
    """

    def __init__(self, input_size: tuple[int, int] = (112, 112), noise: float = 0.2, embedding_size: int = 128) -> None:
        super().__init__()
        if any(int(s) % 16 for s in input_size):
            raise ValueError(f"face_dae input_size must be divisible by 16 (four stride-2 stages), "
                             f"got {tuple(input_size)}")
        if not noise > 0:
            raise ValueError(f"face_dae noise must be positive, got {noise}")
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.embedding_size = int(embedding_size)
        self.noise = float(noise)
        widths = (3,) + _WIDTHS
        self.encoder = nn.Sequential(*(_down(a, b) for a, b in zip(widths[:-1], widths[1:])),
                                     nn.Conv2d(widths[-1], self.embedding_size, 1, bias=False),
                                     nn.BatchNorm2d(self.embedding_size))
        back = (self.embedding_size,) + _WIDTHS[::-1]
        self.decoder = nn.Sequential(*(_up(a, b) for a, b in zip(back[:-2], back[1:-1])),
                                     nn.ConvTranspose2d(back[-2], 3, 4, stride=2, padding=1))

    def reconstruct(self, x: Tensor) -> Tensor:
        """r(x): the decoder of the encoder of ``x`` (no noise added)."""
        return self.decoder(self.encoder(x))

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        noisy = x + self.noise * torch.randn_like(x) if self.training else x
        code = self.encoder(noisy)
        return {"embedding": code.mean(dim=(2, 3)), "reconstruction": self.decoder(code), "clean": x}


__all__ = ["FaceDAE"]
