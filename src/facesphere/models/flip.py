"""Flip test-time augmentation: the one definition of "the embedding of x uses x and its mirror".

``"sum"``: ``f(x) + f(mirror(x))`` before L2-normalising, as insightface's
``recognition/arcface_torch/eval/verification.py`` (``embeddings = embeddings_list[0] + embeddings_list[1]``);
``"concat"``: ``[f(x), f(mirror(x))]`` (2D), as SphereFace's ``test/code/evaluation.m``. The image and its
mirror (reversed last axis, i.e. width of an (N, 3, H, W) batch) run as one stacked batch: one pass
over the weights, bigger kernels. Works on torch tensors (evaluation) and numpy arrays (deployment embedders).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, TypeVar

import numpy as np
import torch

Batch = TypeVar("Batch", np.ndarray, torch.Tensor)
FlipMode = Literal["sum", "concat"]

__all__ = ["FlipMode", "embed_flipped", "flip_mode"]


def flip_mode(flip: bool | str | None) -> FlipMode | None:
    """True / "sum" -> "sum", "concat" -> "concat", False / None -> None; anything else is refused."""
    mode = {True: "sum", False: None, None: None, "sum": "sum", "concat": "concat"}.get(flip, "invalid")  # type: ignore[arg-type]
    if mode == "invalid":
        raise ValueError(f"flip must be True, False, 'sum' or 'concat', got {flip!r}")
    return mode  # type: ignore[return-value]


def embed_flipped(forward: Callable[[Batch], Batch], batch: Batch, mode: FlipMode | None) -> Batch:
    """``forward`` (N, 3, H, W) -> (N, D) applied with flip augmentation ``mode`` (module doc); None: plain."""
    if mode is None:
        return forward(batch)
    n = batch.shape[0]
    if isinstance(batch, torch.Tensor):
        out = forward(torch.cat([batch, torch.flip(batch, dims=[-1])], dim=0))
        plain, mirrored = out[:n], out[n:]
        return plain + mirrored if mode == "sum" else torch.cat([plain, mirrored], dim=1)
    out = forward(np.concatenate([batch, batch[..., ::-1]]))
    plain, mirrored = out[:n], out[n:]
    return plain + mirrored if mode == "sum" else np.concatenate([plain, mirrored], axis=1)
