"""Evaluation with a model card: the card's preprocessing (``models.preprocess``) plus per-batch guards.

:func:`evaluate_with_card` runs a registered protocol with :class:`facesphere.models.preprocess.CardPreprocess`
derived from the card (so mismatching input is refused before any embedding), wraps the backbone in
:class:`CardGuard`, which checks every batch's shape and value range against the card
(``ModelCard.check_input``) and counts the images embedded, and reports the throughput. Used by
``facesphere eval`` and by the trainer's configured protocol runs.
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch
from torch import nn

from facesphere.align.templates import template_for_size
from facesphere.models.card import ModelCard
from facesphere.models.preprocess import LOADER_COLOUR, CardPreprocess, FedInput, parse_size

__all__ = ["CardGuard", "SELF_ALIGNING_PROTOCOLS", "evaluate_with_card"]

SELF_ALIGNING_PROTOCOLS = frozenset({"cacd_vs", "fgnet_identification", "fgnet_verification"})
"""Protocols that align faces themselves, by landmarks, to ``size=(H, W)`` (``facesphere.align.templates``)."""


class CardGuard(nn.Module):
    """Wraps a backbone: checks each batch against the card (shape, value range) and counts images."""

    def __init__(self, backbone: nn.Module, card: ModelCard) -> None:
        super().__init__()
        self.backbone = backbone
        self.card = card
        self.images = 0
        self.last_end: float | None = None
        self.train(backbone.training)  # callers restore this flag afterwards: mirror the backbone's

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.card.check_input(images)
        out = self.backbone(images)
        self.images += int(images.shape[0])
        self.last_end = time.perf_counter()
        return out


_RESERVED = {"preprocess": "derived from the card", "flip": "--flip/--no-flip", "batch_size": "--batch-size",
             "device": "--device", "out_dir": "--out", "progress": "set by the caller"}


def evaluate_with_card(backbone: nn.Module, card: ModelCard, protocol: str, path: str | os.PathLike,
                       options: dict[str, Any] | None = None, *, fed_colour: str = LOADER_COLOUR, flip: bool = True,
                       batch_size: int = 64, device: str | torch.device = "cpu", amp_dtype: torch.dtype | None = None,
                       out_dir: str | os.PathLike | None = None, progress: bool = False) -> dict[str, Any]:
    """Run protocol ``protocol`` on ``path`` with the preprocessing derived from ``card``.

    ``options`` are the protocol's own (e.g. ``pairs``, ``n_folds``) plus ``center_crop`` (HxW) and
    ``alignment`` (the template the data is aligned to, if known). Self-aligning protocols get
    ``size=card.input_size`` unless set. Card mismatches raise ``ModelCardMismatch`` before any
    embedding. The result adds ``input`` (``CardPreprocess.describe``) and ``throughput``.
    """
    from facesphere.evaluate.protocols import get_protocol, run_protocol

    get_protocol(protocol)  # unknown names fail before anything else
    options = dict(options or {})
    clash = sorted(set(options) & set(_RESERVED))
    if clash:
        raise ValueError(f"option(s) {', '.join(clash)} cannot be set here: "
                         + "; ".join(f"{k}: {_RESERVED[k]}" for k in clash))
    center_crop = options.pop("center_crop", None)
    alignment = options.pop("alignment", None)
    if protocol in SELF_ALIGNING_PROTOCOLS:
        options["size"] = parse_size(options.get("size", card.input_size))
        alignment = alignment or template_for_size(options["size"]).name
    for key in ("size", "image_size"):
        if options.get(key) is not None:
            options[key] = parse_size(options[key])
    preprocess = CardPreprocess(card, FedInput(fed_colour, alignment), center_crop)
    guard = CardGuard(backbone, card)
    started = time.perf_counter()
    try:
        result = run_protocol(protocol, guard, path, preprocess=preprocess, flip=flip, batch_size=batch_size,
                              device=device, amp_dtype=amp_dtype, out_dir=out_dir, progress=progress, **options)
    except TypeError as error:  # an option the protocol does not take: a user error, not a crash
        if "unexpected keyword argument" not in str(error):
            raise
        raise ValueError(f"protocol {protocol}: {error}") from None
    images = guard.images // (2 if flip else 1)
    seconds = (guard.last_end or time.perf_counter()) - started
    result["input"] = preprocess.describe()
    result["options"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in options.items()}
    result["throughput"] = {"images": images, "forward_images": guard.images, "seconds": seconds,
                            "images_per_second": images / seconds if seconds > 0 else None,
                            "note": "protocol start to the last forward pass: reading, preprocessing and the network"}
    return result
