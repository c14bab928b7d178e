"""Training augmentation on HxWx3 uint8 RGB arrays, without torchvision.

Every transform is a callable ``(image, rng) -> image`` that draws all of its randomness from the
explicit ``np.random.Generator`` it is given. Datasets create that generator from
``augment_rng(seed, epoch, index)``, so an augmented sample is a pure function of (seed, epoch, index):
identical for any number of DataLoader workers, any process rank, and after resuming mid-epoch.

``AugmentConfig.misalign`` adds a last, geometric step (:mod:`facesphere.data.misalign`) drawn from its own
generator ``misalign_rng(seed, epoch, index)``, so switching it on changes no other draw; a data set then
also returns the image before that step as the ``aligned`` target (``SampleAugment``).
"""

from __future__ import annotations

import math
from typing import Any, Protocol, Sequence

import cv2
import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from facesphere.data.images import to_tensor
from facesphere.data.misalign import MisalignJitter, MisalignLevel

_AUGMENT_STREAM = 0x61756720  # domain tag so augmentation never reuses another generator's stream
_MISALIGN_STREAM = 0x6D697361  # the misalignment's own stream: turning it on leaves the other draws unchanged
ALIGNED = "aligned"
"""Target name of the un-misaligned image (same normalisation, flip and colour as the input)."""
MISALIGNMENT = "misalignment"
"""Target name of the homography undoing the misalignment, (3, 3) float32 in pixels: the input's pixel that shows
the aligned image's pixel p is ``MISALIGNMENT @ p`` (what a perfect rectifier predicts; identity when unjittered)."""


class Transform(Protocol):
    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray: ...


def augment_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator for sample ``index`` in ``epoch``: depends on nothing else (no worker id, no rank)."""
    return np.random.default_rng([_AUGMENT_STREAM, int(seed), int(epoch), int(index)])


def misalign_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator of sample ``index``'s misalignment in ``epoch``, independent of ``augment_rng``'s draws."""
    return np.random.default_rng([_MISALIGN_STREAM, int(seed), int(epoch), int(index)])


def resize_to(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Deterministically resize an HxWxC image to ``size`` = (H, W); area filter when shrinking."""
    height, width = int(size[0]), int(size[1])
    if image.shape[0] == height and image.shape[1] == width:
        return image
    shrinking = height <= image.shape[0] and width <= image.shape[1]
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    return cv2.resize(np.ascontiguousarray(image), (width, height), interpolation=interpolation)


class HorizontalFlip:
    """Mirror left-right with probability ``p``."""

    def __init__(self, p: float = 0.5) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"flip probability must be in [0, 1], got {p}")
        self.p = float(p)

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if rng.random() < self.p:
            return np.ascontiguousarray(image[:, ::-1])
        return image

    def __repr__(self) -> str:
        return f"HorizontalFlip(p={self.p})"


class ScaleTranslate:
    """Random zoom about the centre (log-uniform in ``scale``) plus a shift of up to ``translate`` x size.

    The result is resampled back to the input size with ``cv2.warpAffine`` (bilinear, reflected border),
    which is the crop/scale jitter of a random-resized-crop without changing the aspect ratio.
    """

    def __init__(self, scale: tuple[float, float] = (1.0, 1.0), translate: float = 0.0) -> None:
        lo, hi = float(scale[0]), float(scale[1])
        if not 0 < lo <= hi:
            raise ValueError(f"scale must satisfy 0 < lo <= hi, got {scale}")
        if not 0.0 <= translate < 1.0:
            raise ValueError(f"translate must be in [0, 1), got {translate}")
        self.scale = (lo, hi)
        self.translate = float(translate)

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        lo, hi = self.scale
        s = math.exp(rng.uniform(math.log(lo), math.log(hi))) if hi > lo else lo
        dx, dy = rng.uniform(-self.translate, self.translate, size=2) if self.translate > 0 else (0.0, 0.0)
        height, width = image.shape[:2]
        if s == 1.0 and dx == 0.0 and dy == 0.0:
            return image
        cx, cy = (width - 1) / 2.0, (height - 1) / 2.0
        matrix = np.array(
            [[s, 0.0, (1.0 - s) * cx + dx * width], [0.0, s, (1.0 - s) * cy + dy * height]], dtype=np.float64
        )
        return cv2.warpAffine(
            np.ascontiguousarray(image), matrix, (width, height), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101
        )

    def __repr__(self) -> str:
        return f"ScaleTranslate(scale={self.scale}, translate={self.translate})"


class ColorJitter:
    """Multiply brightness, contrast and saturation by factors drawn uniformly from [1 - x, 1 + x]."""

    def __init__(self, brightness: float = 0.0, contrast: float = 0.0, saturation: float = 0.0) -> None:
        for name, value in (("brightness", brightness), ("contrast", contrast), ("saturation", saturation)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} jitter must be in [0, 1], got {value}")
        self.brightness, self.contrast, self.saturation = float(brightness), float(contrast), float(saturation)

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        b = rng.uniform(1 - self.brightness, 1 + self.brightness) if self.brightness else 1.0
        c = rng.uniform(1 - self.contrast, 1 + self.contrast) if self.contrast else 1.0
        s = rng.uniform(1 - self.saturation, 1 + self.saturation) if self.saturation else 1.0
        if b == 1.0 and c == 1.0 and s == 1.0:
            return image
        # Luma via cv2.cvtColor (0.299, 0.587, 0.114) rather than a numpy matmul, which may start BLAS threads.
        x = image.astype(np.float32)
        if b != 1.0:
            x *= b
        if c != 1.0:
            mean = float(cv2.cvtColor(x, cv2.COLOR_RGB2GRAY).mean())
            x = (x - mean) * c + mean
        if s != 1.0:
            gray = cv2.cvtColor(x, cv2.COLOR_RGB2GRAY)[:, :, None]
            x = (x - gray) * s + gray
        return cv2.add(x, 0.0, dtype=cv2.CV_8U)  # rounds and saturates to 0..255

    def __repr__(self) -> str:
        return f"ColorJitter(brightness={self.brightness}, contrast={self.contrast}, saturation={self.saturation})"


class Compose:
    """Apply transforms in order, all drawing from the same generator. An empty Compose is the identity."""

    def __init__(self, transforms: Sequence[Transform] = ()) -> None:
        self.transforms = list(transforms)

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        for transform in self.transforms:
            image = transform(image, rng)
        return image

    def __len__(self) -> int:
        return len(self.transforms)

    def __repr__(self) -> str:
        return f"Compose({self.transforms!r})"


class AugmentConfig(BaseModel):
    """Config-file view of the augmentation; every default is 'off', so ``AugmentConfig().build()`` is the identity."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    flip: float = Field(0.0, ge=0, le=1, description="probability of a horizontal flip")
    scale: tuple[float, float] = Field((1.0, 1.0), description="zoom range (lo, hi); > 1 zooms in")
    translate: float = Field(0.0, ge=0, lt=1, description="max shift as a fraction of the image size")
    brightness: float = Field(0.0, ge=0, le=1)
    contrast: float = Field(0.0, ge=0, le=1)
    saturation: float = Field(0.0, ge=0, le=1)
    misalign: MisalignLevel = Field("none", description="jitter each sample by a random homography up to this level "
                                    "(facesphere.data.misalign) and give the un-jittered image as the 'aligned' target")
    misalign_share: float = Field(1.0, ge=0, le=1, description="share of the samples jittered (the rest: input "
                                  "equals the aligned target)")

    @model_validator(mode="after")
    def _scale_range(self) -> "AugmentConfig":
        lo, hi = self.scale
        if not 0 < lo <= hi:
            raise ValueError(f"scale must satisfy 0 < lo <= hi, got {self.scale}")
        return self

    @property
    def is_identity(self) -> bool:
        return (
            self.flip == 0
            and self.scale == (1.0, 1.0)
            and self.translate == 0
            and self.brightness == 0
            and self.contrast == 0
            and self.saturation == 0
            and self.misalign == "none"
        )

    def build(self) -> Compose:
        """Geometric jitter, then flip, then colour; only the enabled parts are included. The misalignment is
        not part of it (it makes a pair, see ``SampleAugment``)."""
        transforms: list[Transform] = []
        if self.scale != (1.0, 1.0) or self.translate > 0:
            transforms.append(ScaleTranslate(self.scale, self.translate))
        if self.flip > 0:
            transforms.append(HorizontalFlip(self.flip))
        if self.brightness or self.contrast or self.saturation:
            transforms.append(ColorJitter(self.brightness, self.contrast, self.saturation))
        return Compose(transforms)



def as_transform(augment: Any) -> Transform | None:
    """Normalise a dataset's ``augment`` argument: None, an AugmentConfig, a dict or pydantic model with
    the same fields, or any ``(image, rng) -> image`` callable. Returns None when there is nothing to do."""
    if augment is None:
        return None
    config = _config_of(augment)
    if config is None:
        if callable(augment):
            return augment
        raise TypeError(f"augment must be None, an AugmentConfig, a dict or a callable, got {type(augment).__name__}")
    transform = config.build()
    return transform if len(transform) else None


def _config_of(augment: Any) -> AugmentConfig | None:
    """``augment`` as an AugmentConfig; None for a callable (or None)."""
    if isinstance(augment, AugmentConfig):
        return augment
    if isinstance(augment, dict):
        return AugmentConfig(**augment)
    if isinstance(augment, BaseModel):
        return AugmentConfig(**augment.model_dump())
    return None


class SampleAugment:
    """What a data set does to each decoded sample: the augmentation, then the misalignment when configured.

    ``augment`` is a data set's ``augment`` argument (see ``as_transform``). Calling it with the sample's
    (seed, epoch, index) returns ``(input, aligned)``: ``aligned`` is the augmented image before the
    misalignment (None without misalignment), so input and target differ only in geometry. ``target_names``
    is what the set adds to its targets.
    """

    def __init__(self, augment: Any) -> None:
        self.transform = as_transform(augment)
        config = _config_of(augment)
        self.misalign = None if config is None or config.misalign == "none" else MisalignJitter(config.misalign,
                                                                                                config.misalign_share)
        self.target_names: tuple[str, ...] = () if self.misalign is None else (ALIGNED, MISALIGNMENT)

    def __call__(self, image: np.ndarray, seed: int, epoch: int, index: int) -> tuple[np.ndarray, dict[str, Any]]:
        """(input image, extra targets): ``{}``, or with misalignment ``aligned`` (uint8 image) and
        ``misalignment`` ((3, 3) float32)."""
        if self.transform is not None:
            image = self.transform(image, augment_rng(seed, epoch, index))
        if self.misalign is None:
            return image, {}
        jittered, homography = self.misalign.with_homography(image, misalign_rng(seed, epoch, index))
        return jittered, {ALIGNED: image, MISALIGNMENT: np.linalg.inv(homography).astype(np.float32)}

    @staticmethod
    def tensors(extras: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The extra targets as tensors: images as (3, H, W) normalised floats, the homography as it is."""
        return {name: to_tensor(value) if name == ALIGNED else torch.from_numpy(value) for name, value in extras.items()}


class SharedEpoch:
    """An epoch counter shared with DataLoader worker processes.

    A dataset's ``set_epoch`` runs in the main process, but persistent workers hold their own copy of
    the dataset; keeping the counter in a shared-memory tensor makes the new epoch visible to them
    (with fork, spawn and forkserver alike) before the next epoch's indices are sent.
    """

    def __init__(self, epoch: int = 0) -> None:
        self._value = torch.zeros((), dtype=torch.int64)
        try:
            self._value.share_memory_()
        except (RuntimeError, OSError):  # no /dev/shm: fine for single-process use
            pass
        self.set(epoch)

    def get(self) -> int:
        return int(self._value.item())

    def set(self, epoch: int) -> None:
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self._value.fill_(int(epoch))
