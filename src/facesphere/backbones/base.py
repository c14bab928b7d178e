"""The backbone contract: images (N, 3, H, W) -> embeddings (N, D)."""

from __future__ import annotations

from torch import Tensor, nn

from facesphere.registry import Registry


class Backbone(nn.Module):
    """Base class of every backbone.

    Subclasses set ``input_size`` (H, W) and ``embedding_size`` (D) and map normalised RGB images
    of that size to un-normalised embeddings; heads and evaluation decide whether to normalise.
    """

    input_size: tuple[int, int]
    embedding_size: int
    needed_outputs: frozenset[str] | None = None
    """Set by the trainer when its objectives name what they read (``Objective.reads``): a backbone may then skip
    training-time outputs outside it (GridFace skips its recogniser when only the rectification is trained).
    None: compute everything. Evaluation and deployment never set it."""


BACKBONES: Registry[Backbone] = Registry("backbone")


def embedding_of(out: Tensor | dict[str, Tensor]) -> Tensor:
    """The embeddings of a backbone's output: the tensor itself, or ``out["embedding"]`` for backbones
    that return several named outputs (e.g. the GridFace rectifier's rectified images and homographies)."""
    return out["embedding"] if isinstance(out, dict) else out


def build_backbone(name: str, **kwargs) -> Backbone:
    """Build a registered backbone by name, e.g. ``build_backbone("mobilefacenet", embedding_size=128)``."""
    return BACKBONES.build(name, **kwargs)
