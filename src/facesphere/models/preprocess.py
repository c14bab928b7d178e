"""From a model card to the exact preprocessing of its input: HxWx3 uint8 crops -> normalised (3, H, W) tensors.

The card says what the weights expect (colour order, H x W, alignment, ``(x - mean) / std``). The data
side declares what it feeds (:class:`FedInput`): facesphere's loaders yield HxWx3 uint8 **RGB**;
``FedInput("BGR")`` simulates a caller feeding BGR (the loaded images really are channel-swapped
before preprocessing). :class:`CardPreprocess` then normalises exactly as the card says, and

* refuses a colour order (or declared alignment) the card does not expect when it is built, i.e.
  before any data is read: ``ModelCardMismatch("model expects RGB, got BGR")``; channels are never
  silently reordered;
* refuses an image size the card does not expect on the first image, unless told to crop:
  ``center_crop=(h, w)`` keeps the central h x w region, rows ``(H - h) // 2 ...`` and columns
  ``(W - w) // 2 ...``. The documented use is a SphereFace 112x96 model (Xiaoccer MobileFaceNet) on
  ArcFace 112x112 crops: ``center_crop=112x96`` keeps columns 8..103, and since the 112x96 SphereFace
  template is the ArcFace 112x112 template shifted 8 px left (``facesphere.align.templates``), an
  ``arcface_112x112`` input becomes ``sphereface_112x96``. Nothing is resized: resizing changes the
  alignment geometry.

Deployment (``models.embedder.Embedder``) and evaluation (``evaluate.model_input``) both preprocess
through :class:`CardPreprocess`, so a model sees the same pixels in both. :class:`ImagePreprocess` is
the card-free form (size check or resize, colour order, mean/std) that evaluation uses without a card.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from facesphere.align.templates import get_template, template_for_size
from facesphere.data.images import MEAN, STD, to_tensor
from facesphere.data.transforms import resize_to
from facesphere.models.card import InputSpec, ModelCard, ModelCardMismatch

logger = logging.getLogger(__name__)

__all__ = ["CardPreprocess", "FedInput", "ImagePreprocess", "LOADER_COLOUR", "Preprocess", "cropped_alignment",
           "parse_size"]


@runtime_checkable
class Preprocess(Protocol):
    """Maps one HxWx3 uint8 RGB image to the model's normalised (3, H, W) float tensor."""

    def __call__(self, image: np.ndarray) -> torch.Tensor: ...


class ImagePreprocess:
    """Size check (or resize), colour order and mean/std normalisation: the knobs a model card sets.

    Args:
        size: expected (H, W); ``None`` accepts any size.
        mean, std: scalars or per-channel triples, in the model's channel order.
        channel_order: "RGB" or "BGR" (the tensor's channel order).
        resize: resize a differently sized image (``resize_to``) instead of raising ``ValueError``.
    The defaults reproduce ``to_tensor`` exactly (and use it).
    """

    def __init__(self, size: tuple[int, int] | None = (112, 112), mean=MEAN, std=STD,
                 channel_order: str = "RGB", resize: bool = False) -> None:
        if channel_order not in ("RGB", "BGR"):
            raise ValueError(f"channel_order must be 'RGB' or 'BGR', got {channel_order!r}")
        self.size = None if size is None else (int(size[0]), int(size[1]))
        self.mean = np.broadcast_to(np.asarray(mean, dtype=np.float32), (3,)).copy()
        self.std = np.broadcast_to(np.asarray(std, dtype=np.float32), (3,)).copy()
        if np.any(self.std == 0):
            raise ValueError("std must be non-zero")
        self.channel_order = channel_order
        self.resize = bool(resize)
        self._default = channel_order == "RGB" and np.all(self.mean == MEAN) and np.all(self.std == STD)

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an HxWx3 uint8 RGB image, got {image.dtype} {image.shape}")
        if self.size is not None and image.shape[:2] != self.size:
            if not self.resize:
                raise ValueError(f"image is {image.shape[0]}x{image.shape[1]}, the model expects "
                                 f"{self.size[0]}x{self.size[1]}: align it first, or use resize=True")
            image = resize_to(image, self.size)
        if self._default:
            return to_tensor(image)
        if self.channel_order == "BGR":
            image = image[:, :, ::-1]
        x = (image.astype(np.float32) - self.mean) / self.std
        return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))

    def __repr__(self) -> str:
        return (f"ImagePreprocess(size={self.size}, mean={self.mean.tolist()}, std={self.std.tolist()}, "
                f"channel_order={self.channel_order!r}, resize={self.resize})")


LOADER_COLOUR = "RGB"
"""Colour order of every image facesphere's loaders (``load_image``, ``.bin`` decoding) return."""

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


def cropped_alignment(alignment: str, size: tuple[int, int], crop: tuple[int, int]) -> str | None:
    """The template a centre ``crop`` (h, w) of ``size`` (H, W) images aligned to ``alignment`` is aligned to,
    when the templates say so exactly (arcface_112x112 cut to 112x96 is sphereface_112x96), else None."""
    try:
        source, target = get_template(alignment), template_for_size(crop)
    except ValueError:
        return None
    if source.size != tuple(size):
        return None
    top, left = (size[0] - crop[0]) // 2, (size[1] - crop[1]) // 2
    return target.name if np.allclose(source.points - [left, top], target.points, atol=1e-6) else None


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
            alignment = cropped_alignment(alignment, tuple(size), self.center_crop) if alignment else None
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
