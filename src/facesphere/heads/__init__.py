"""Margin heads: (embeddings, labels) -> logits for a plain cross-entropy, chosen by name.

Importing this package registers every head in ``HEADS``.
"""

from facesphere.heads import arcface, coco, combined, cosface, normface, oe, softmax, sphereface, subcenter  # noqa: F401
from facesphere.heads.base import HEADS, IGNORE_LABEL, MarginHead, build_head

__all__ = ["MarginHead", "HEADS", "build_head", "IGNORE_LABEL"]
