"""From (model card, declared input) to the preprocessing of an evaluation, refusing mismatches up front.

The card says what the weights expect (colour order, H x W, alignment, ``(x - mean) / std``). The data
side declares what it feeds (:class:`FedInput`): facesphere's loaders yield HxWx3 uint8 **RGB**;
``FedInput("BGR")`` simulates a caller feeding BGR (the loaded images really are channel-swapped
before preprocessing). :class:`CardPreprocess` then normalises exactly as the card says, and

* refuses a colour order (or declared alignment) the card does not expect when it is built, i.e.
  before any data is read: ``ModelCardMismatch("model expects RGB, got BGR")``; channels are never
  silently reordered;
* refuses an image size the card does not expect on the first image (``embed_images`` preprocesses
  image 0 before the embedding pass), unless told to crop: ``center_crop=(h, w)`` keeps the central
  h x w region, rows ``(H - h) // 2 ...`` and columns ``(W - w) // 2 ...``. The documented use is a
  SphereFace 112x96 model (Xiaoccer MobileFaceNet) on ArcFace 112x112 crops: ``center_crop=112x96``
  keeps columns 8..103, and since the 112x96 SphereFace template is the ArcFace 112x112 template
  shifted 8 px left, an ``arcface_112x112`` input becomes ``sphereface_112x96``. Nothing is resized:
  resizing changes the alignment geometry.

:func:`evaluate_with_card` runs a registered protocol this way (used by ``facesphere eval`` and by
the trainer's configured protocol runs); :class:`CardGuard` also checks every batch's shape and
value range against the card (``ModelCard.check_input``) and counts the images embedded.
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from facesphere.evaluate.pairsets import ImagePreprocess
from facesphere.models.card import (
    FACESPHERE_MEAN,
    FACESPHERE_STD,
    InputSpec,
    ModelCard,
    ModelCardMismatch,
    alignment_for_size as _alignment_for_size,
    training_card,
)

logger = logging.getLogger(__name__)

__all__ = [
    "CardGuard",
    "CardPreprocess",
    "FedInput",
    "LOADER_COLOUR",
    "SELF_ALIGNING_PROTOCOLS",
    "evaluate_with_card",
    "parse_size",
    "training_card",
]

LOADER_COLOUR = "RGB"
"""Colour order of every image facesphere's loaders (``load_image``, ``.bin`` decoding) return."""

SELF_ALIGNING_PROTOCOLS = frozenset({"cacd_vs", "fgnet_identification", "fgnet_verification"})
"""Protocols that align faces themselves, by landmarks, to ``size=(H, W)`` (``facesphere.align.similarity.template_for_size``)."""

CROPPED_ALIGNMENTS = {("arcface_112x112", (112, 96)): "sphereface_112x96"}
"""(alignment, centre-crop size) -> alignment of the crop, where the templates say so exactly."""

_SIZE = re.compile(r"^\s*(\d+)\s*[xX,]\s*(\d+)\s*$")


def parse_size(value: Any) -> tuple[int, int]:
    """(H, W) from ``"112x96"``, ``"112,96"``, ``[112, 96]`` or ``(112, 96)``."""
    if isinstance(value, str):
        match = _SIZE.match(value)
        if match:
            return int(match.group(1)), int(match.group(2))
    elif isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, (int, np.integer)) for v in value):
        return int(value[0]), int(value[1])
    raise ValueError(f"expected a size HxW such as 112x96, got {value!r}")


@dataclass(frozen=True)
class FedInput:
    """What the data side feeds the preprocessing: HxWx3 uint8 pixels in ``colour_order``.

    ``alignment`` names the template the crops were aligned to; None means unknown (not checked).
    """

    colour_order: str = LOADER_COLOUR
    alignment: str | None = None

    def __post_init__(self) -> None:
        if self.colour_order not in ("RGB", "BGR"):
            raise ValueError(f"colour order must be RGB or BGR, got {self.colour_order!r}")


class CardPreprocess:
    """HxWx3 uint8 image (as loaded, RGB) -> the card's normalised (3, H, W) float tensor; see the module doc.

    Args:
        card: the model's card (size, mean/std, colour order, alignment).
        fed: what the data side feeds; a colour order other than ``LOADER_COLOUR`` swaps the loaded
            image's channels first (simulating that feed).
        center_crop: (h, w) central region to keep, or None (the image must already be the card's size).
    Raises ModelCardMismatch at construction for colour/alignment, on the first image of a size for size.
    """

    def __init__(self, card: ModelCard, fed: FedInput = FedInput(),
                 center_crop: tuple[int, int] | str | None = None) -> None:
        self.card = card
        self.fed = fed
        self.center_crop = None if center_crop is None else parse_size(center_crop)
        if self.center_crop is not None and min(self.center_crop) <= 0:
            raise ValueError(f"center_crop must be positive, got {self.center_crop}")
        # size checks and cropping happen here; the mean/std step is the generic one (to_tensor's LUT when it applies)
        self._normalise = ImagePreprocess(size=None, mean=card.mean, std=card.std)
        self._checked: dict[tuple[int, int], tuple[int, int, int, int] | None] = {}
        # Colour order (and alignment, unless a crop changes it) are known now: refuse before any image is read.
        known = self.fed_spec(card.input_size)
        if self.center_crop is not None:
            known = known.model_copy(update={"alignment": None})  # depends on the image size: checked per size
        card.check(known)

    def fed_spec(self, size: tuple[int, int]) -> InputSpec:
        """The input the model receives from images of ``size`` (H, W) (before cropping)."""
        alignment = self.fed.alignment
        if self.center_crop is not None and tuple(size) != self.center_crop:
            alignment = CROPPED_ALIGNMENTS.get((alignment, self.center_crop)) if alignment else None
        out_size = self.center_crop if self.center_crop is not None else tuple(size)
        return InputSpec(colour_order=self.fed.colour_order, size=out_size, mean=self.card.mean,  # type: ignore[arg-type]
                         std=self.card.std, alignment=alignment)

    def _check_size(self, size: tuple[int, int]) -> tuple[int, int, int, int] | None:
        """Check images of ``size`` once; the crop box (top, left, bottom, right) or None."""
        if size in self._checked:
            return self._checked[size]
        box = None
        if self.center_crop is not None:
            h, w = self.center_crop
            if h > size[0] or w > size[1]:
                raise ModelCardMismatch(self.card.name, [f"cannot cut a {h}x{w} centre crop from "
                                                         f"{size[0]}x{size[1]} images"])
            top, left = (size[0] - h) // 2, (size[1] - w) // 2
            box = (top, left, top + h, left + w)
        problems = self.card.mismatches(self.fed_spec(size))
        if problems:
            ch, cw = self.card.input_size
            if self.center_crop is None and size[0] >= ch and size[1] >= cw:
                problems.append(f"pass center_crop={ch}x{cw} to keep the central {ch}x{cw} region "
                                f"(e.g. ArcFace 112x112 crops for a SphereFace 112x96 model)")
            raise ModelCardMismatch(self.card.name, problems)
        if box is not None:
            logger.info("%s: %dx%d images cut to rows %d..%d, columns %d..%d", self.card.name, *size,
                        box[0], box[2] - 1, box[1], box[3] - 1)
        self._checked[size] = box
        return box

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an HxWx3 uint8 image, got {image.dtype} {image.shape}")
        if self.fed.colour_order != LOADER_COLOUR:
            image = image[:, :, ::-1]  # the caller feeds the other order: really swap
        box = self._check_size((int(image.shape[0]), int(image.shape[1])))
        if box is not None:
            image = image[box[0]:box[2], box[1]:box[3]]
        return self._normalise(image)

    def describe(self) -> dict[str, Any]:
        """JSON-able record of what was fed and how it was preprocessed (for results files)."""
        boxes = {f"{h}x{w}": (None if b is None else {"rows": [b[0], b[2] - 1], "columns": [b[1], b[3] - 1]})
                 for (h, w), b in self._checked.items()}
        return {
            "model_expects": self.card.input_spec.describe(),
            "fed_colour_order": self.fed.colour_order,
            "fed_alignment": self.fed.alignment,
            "center_crop": None if self.center_crop is None else f"{self.center_crop[0]}x{self.center_crop[1]}",
            "image_sizes": boxes,
            "normalisation": self.card.input_spec.describe_normalisation(),
        }

    def __repr__(self) -> str:
        return f"CardPreprocess({self.card.name!r}, fed={self.fed}, center_crop={self.center_crop})"


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
        alignment = alignment or _alignment_for_size(options["size"])
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
