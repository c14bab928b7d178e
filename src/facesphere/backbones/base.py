"""The backbone contract: images (N, 3, H, W) -> embeddings (N, D)."""

from __future__ import annotations

from torch import nn

from facesphere.registry import Registry


class Backbone(nn.Module):
    """Base class of every backbone.

    Subclasses set ``input_size`` (H, W) and ``embedding_size`` (D) and map normalised RGB images
    of that size to un-normalised embeddings; heads and evaluation decide whether to normalise.
    """

    input_size: tuple[int, int]
    embedding_size: int


BACKBONES: Registry[Backbone] = Registry("backbone")


def build_backbone(name: str, **kwargs) -> Backbone:
    """Build a registered backbone by name, e.g. ``build_backbone("mobilefacenet", embedding_size=128)``."""
    return BACKBONES.build(name, **kwargs)
