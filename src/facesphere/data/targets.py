"""Named targets: what a sample says about its image, beyond the pixels.

A data set returns ``(image, targets)`` with ``targets`` a dict: ``{"label": int}`` for every
labelled set, plus whatever else it knows (``"pose"``, ``"age"``, ``"landmarks"``, ...) as numbers
or arrays of a fixed shape. A target that only some samples have is always present with a
placeholder value of the right shape and comes with ``"<name>_mask"``: True where the sample has
it. PyTorch's default collation then turns a batch into a dict of tensors, masks into bool (N,).
"""

from __future__ import annotations

MASK_SUFFIX = "_mask"
"""``targets[name + MASK_SUFFIX]`` says which samples carry target ``name``; no mask: all do."""

__all__ = ["MASK_SUFFIX"]
