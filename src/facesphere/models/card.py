"""Model cards: what a set of weights expects as input, where it came from, and what it was claimed to do.

A face-recognition model is only usable with the preprocessing it was trained with: colour order,
crop size, the alignment template that made the crop, and the pixel normalisation. Getting any of
them wrong rarely fails loudly; it just costs accuracy. So every stored model carries a
:class:`ModelCard`, and every batch of images can be described by an :class:`InputSpec`;
``card.check(spec)`` refuses a mismatch with :class:`ModelCardMismatch` ("model expects RGB, got
BGR") instead of silently producing worse embeddings.

End to end: an image loader (or dataset) declares what it yields with an ``input_spec`` attribute
(:func:`input_spec_of` reads it), the evaluation code calls ``card.check(spec)`` once (or
``card.prepare(images, spec)`` to convert colour order and normalisation where that is exact),
and ``card.check_input(images)`` guards each batch's shape and value range.

Units: ``mean`` and ``std`` are per channel, in the card's colour order, in 0-255 pixel units, so the
backbone's input is ``(x - mean) / std``; raw pixels are ``mean = 0, std = 1``.
"""

from __future__ import annotations

import inspect
import logging
import math
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from facesphere.align.templates import template_for_size

logger = logging.getLogger(__name__)

ColourOrder = Literal["RGB", "BGR"]

FACESPHERE_MEAN = (127.5, 127.5, 127.5)
FACESPHERE_STD = (128.0, 128.0, 128.0)
"""facesphere's own normalisation, (x - 127.5) / 128, as produced by ``facesphere.data.images.to_tensor``."""

_STRICT = ConfigDict(strict=True, frozen=True, extra="forbid")


class ModelCardMismatch(ValueError):
    """Input that does not match what a model expects; ``problems`` lists each mismatch."""

    def __init__(self, model: str, problems: list[str]) -> None:
        self.model = model
        self.problems = list(problems)
        super().__init__(f"{model}: " + "; ".join(self.problems))


def _same(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return all(math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-6) for x, y in zip(a, b))


def _fmt(values: tuple[float, ...]) -> str:
    return f"{values[0]:g}" if len(set(values)) == 1 else "(" + ", ".join(f"{v:g}" for v in values) + ")"


MAX_INPUT_SIDE = 4096
"""Largest image side a card or input spec may declare: a bound on what building or feeding a model allocates."""
MAX_EMBEDDING_SIZE = 65536
"""Largest embedding a card may declare (same reason)."""


def _check_input(size: tuple[int, int], mean: tuple[float, ...], std: tuple[float, ...], label: str) -> None:
    """Sizes in [1, MAX_INPUT_SIDE], finite means and finite positive stds (NaN or inf would not survive JSON)."""
    if not all(0 < side <= MAX_INPUT_SIDE for side in size):
        raise ValueError(f"{label} must be positive (H, W) of at most {MAX_INPUT_SIDE}, got {size}")
    if not all(math.isfinite(m) for m in mean):
        raise ValueError(f"mean must be finite, got {mean}")
    if not all(math.isfinite(s) and s > 0 for s in std):
        raise ValueError(f"std must be positive and finite, got {std}")


class InputSpec(BaseModel):
    """What a batch of images is: colour order, size (H, W), normalisation and (if known) alignment.

    ``mean``/``std`` are what was applied to 0-255 pixels, per channel in ``colour_order``:
    ``InputSpec.raw(...)`` is unnormalised pixels; ``InputSpec.facesphere(...)`` is what facesphere's
    image loaders produce. ``alignment=None`` means "unknown" and is not checked.
    """

    model_config = _STRICT

    colour_order: ColourOrder
    size: tuple[int, int]
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    alignment: str | None = None

    @model_validator(mode="after")
    def _valid(self) -> "InputSpec":
        _check_input(self.size, self.mean, self.std, "size")
        return self

    @classmethod
    def raw(cls, size: tuple[int, int], colour_order: ColourOrder = "RGB", alignment: str | None = None) -> "InputSpec":
        """Unnormalised 0-255 pixels."""
        return cls(colour_order=colour_order, size=tuple(size), alignment=alignment)  # type: ignore[arg-type]

    @classmethod
    def facesphere(cls, size: tuple[int, int] = (112, 112), alignment: str | None = "auto") -> "InputSpec":
        """RGB ``(x - 127.5) / 128``: the output of ``facesphere.data.images.to_tensor``.

        ``alignment="auto"`` means arcface_112x112 at 112x112 (facesphere's default crop), else unknown.
        """
        if alignment == "auto":
            alignment = "arcface_112x112" if tuple(size) == (112, 112) else None
        return cls(colour_order="RGB", size=tuple(size), mean=FACESPHERE_MEAN, std=FACESPHERE_STD,  # type: ignore[arg-type]
                   alignment=alignment)

    @property
    def value_range(self) -> tuple[tuple[float, float], ...]:
        """Per channel, the (low, high) that 0 and 255 pixels map to."""
        return tuple(((0.0 - m) / s, (255.0 - m) / s) for m, s in zip(self.mean, self.std))

    @property
    def is_raw(self) -> bool:
        return _same(self.mean, (0.0, 0.0, 0.0)) and _same(self.std, (1.0, 1.0, 1.0))

    def describe_normalisation(self) -> str:
        return "raw 0-255 pixels" if self.is_raw else f"(x - {_fmt(self.mean)}) / {_fmt(self.std)}"

    def describe(self) -> str:
        h, w = self.size
        aligned = f", aligned to {self.alignment}" if self.alignment else ""
        return f"{h}x{w} {self.colour_order}{aligned}, {self.describe_normalisation()}"


def input_spec_of(source: Any) -> InputSpec | None:
    """The ``input_spec`` a dataset or loader declares (a DataLoader's dataset is looked at too), or None."""
    for obj in (source, getattr(source, "dataset", None)):
        spec = getattr(obj, "input_spec", None)
        if isinstance(spec, InputSpec):
            return spec
    return None


class PublishedFigure(BaseModel):
    """A number the model's authors published, e.g. LFW accuracy 99.50 %, with where it was read."""

    model_config = _STRICT

    benchmark: str
    value: float
    metric: str = "accuracy"
    unit: str = "%"
    where: str = ""
    note: str = ""

    def describe(self) -> str:
        value = f"{self.value:.2f}" if self.unit == "%" else f"{self.value:g}"
        text = f"{self.benchmark} {self.metric} {value}{' ' + self.unit if self.unit else ''}"
        extra = "; ".join(x for x in (self.where, self.note) if x)
        return f"{text} ({extra})" if extra else text


class AgeBranch(BaseModel):
    """Age read from the embedding's norm, OE-CNN (arXiv 1810.07599, Sec. 3): age = slope·‖x‖ + intercept.

    ``‖x‖`` is the L2 norm of the backbone's raw embedding of one aligned crop (eval mode, before any
    normalisation); with flip test-time augmentation the ages of the two views are averaged. Fitted in
    training by the ``age_from_norm`` objective and carried to the card by export.
    """

    model_config = _STRICT

    kind: Literal["norm_linear"] = "norm_linear"
    slope: float
    intercept: float

    @model_validator(mode="after")
    def _finite(self) -> "AgeBranch":
        if not (math.isfinite(self.slope) and math.isfinite(self.intercept)):
            raise ValueError(f"age branch slope and intercept must be finite, got {self.slope}, {self.intercept}")
        return self

    def predict(self, norms):
        """Ages in years from embedding norms (array-like); a line can fall below 0 far from the norms it was
        fitted on, so ages are clipped at 0."""
        return np.maximum(self.slope * np.asarray(norms, dtype=np.float64) + self.intercept, 0.0)


class RectifierInfo(BaseModel):
    """A rectifier inside the model, in front of its recogniser (GridFace, arXiv 1808.06210 Sec. 3.2): an
    ``grid`` x ``grid`` grid of local homographies warps each aligned crop before it is embedded (``grid`` 1:
    one global homography, the plain STN). A model whose card has one is always served with it (it runs inside
    the backbone), and no second rectifier may be put in front of it."""

    model_config = _STRICT

    kind: Literal["local_homographies"] = "local_homographies"
    grid: int = Field(ge=1, le=64)

    def describe(self) -> str:
        what = "one global homography (STN)" if self.grid == 1 else f"{self.grid}x{self.grid} local homographies"
        return f"{what} rectify each crop before the recogniser (GridFace)"


Scalar = bool | int | float | str
"""A backbone argument's value; one level of ``{name: scalar}`` is allowed too (an inner backbone's arguments)."""


def _is_scalar(value: Any) -> bool:
    return isinstance(value, (bool, int, float, str))


class ModelCard(BaseModel):
    """Everything needed to rebuild, feed and cite a stored model (serialised as ``card.json``)."""

    model_config = _STRICT

    format_version: Literal[1] = 1
    name: str = Field(min_length=1)
    backbone: str = Field(min_length=1)
    backbone_args: dict[str, Scalar | dict[str, Scalar]] = Field(default_factory=dict)
    input_size: tuple[int, int]
    colour_order: ColourOrder
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    alignment: str = Field(min_length=1)
    embedding_size: int
    licence: str
    source: str
    notes: str = ""
    published: tuple[PublishedFigure, ...] = ()
    source_files: dict[str, str] = Field(default_factory=dict)
    """Original file name -> sha256, so a card can be traced to the exact files it was converted from."""
    weights_sha256: str | None = None
    """sha256 of ``model.safetensors``; set by ``save_model``, checked by ``load_model``."""
    age_branch: AgeBranch | None = None
    """How to read an age from the embedding (OE-CNN); None: the model has no age output."""
    rectifier: RectifierInfo | None = None
    """The rectifier the backbone runs inside, in front of its recogniser (GridFace); None: none."""

    @model_validator(mode="after")
    def _valid(self) -> "ModelCard":
        _check_input(self.input_size, self.mean, self.std, "input_size")
        if not 0 < self.embedding_size <= MAX_EMBEDDING_SIZE:
            raise ValueError(f"embedding_size must lie in [1, {MAX_EMBEDDING_SIZE}], got {self.embedding_size}")
        clash = {"input_size", "embedding_size"} & set(self.backbone_args)
        if clash:
            raise ValueError(f"backbone_args must not repeat the card's own fields: {sorted(clash)}")
        return self

    # -- what the model expects ------------------------------------------------------------------

    @property
    def input_spec(self) -> InputSpec:
        """The input the backbone expects, as an :class:`InputSpec`."""
        return InputSpec(colour_order=self.colour_order, size=self.input_size, mean=self.mean, std=self.std,
                         alignment=self.alignment)

    def _mismatches(self, spec: InputSpec) -> list[tuple[str, str]]:
        """(field, message) for every way ``spec`` differs from what the model expects."""
        problems = []
        if spec.colour_order != self.colour_order:
            problems.append(("colour_order", f"model expects {self.colour_order}, got {spec.colour_order}"))
        if tuple(spec.size) != tuple(self.input_size):
            problems.append(("size", f"model expects {self.input_size[0]}x{self.input_size[1]} (HxW) images, "
                                     f"got {spec.size[0]}x{spec.size[1]}"))
        if spec.alignment is not None and spec.alignment != self.alignment:
            problems.append(("alignment", f"model expects faces aligned to {self.alignment}, got {spec.alignment}"))
        # The input's per-channel mean/std are compared in the model's colour order.
        mean, std = (spec.mean, spec.std) if spec.colour_order == self.colour_order else (spec.mean[::-1], spec.std[::-1])
        if not (_same(mean, self.mean) and _same(std, self.std)):
            problems.append(("normalisation", f"model expects {self.input_spec.describe_normalisation()}, "
                                              f"got {spec.describe_normalisation()}"))
        return problems

    def mismatches(self, spec: InputSpec) -> list[str]:
        """Every way ``spec`` differs from what the model expects (empty when it matches)."""
        return [message for _, message in self._mismatches(spec)]

    def check(self, spec: InputSpec) -> None:
        """Raise :class:`ModelCardMismatch` unless ``spec`` is exactly what the model expects."""
        problems = self.mismatches(spec)
        if problems:
            raise ModelCardMismatch(self.name, problems)

    def check_input(self, images: torch.Tensor, spec: InputSpec | None = None) -> None:
        """Check a batch (N, 3, H, W): its size, its value range, and (if given) its declared ``spec``.

        The value range check catches the commonest silent error, raw 0-255 pixels fed to a model
        that expects normalised ones (or the reverse), without knowing how the batch was made.
        """
        if spec is not None:
            self.check(spec)
        h, w = self.input_size
        if images.ndim != 4 or images.shape[1] != 3 or tuple(images.shape[2:]) != (h, w):
            raise ModelCardMismatch(self.name, [f"model expects (N, 3, {h}, {w}) images, got {tuple(images.shape)}"])
        if not images.is_floating_point():
            raise ModelCardMismatch(self.name, [f"model expects float images normalised as "
                                                f"{self.input_spec.describe_normalisation()}, got {images.dtype}"])
        if images.numel() == 0:
            return
        problems = []
        lows = images.amin(dim=(0, 2, 3)).tolist()
        highs = images.amax(dim=(0, 2, 3)).tolist()
        for channel, ((lo, hi), low, high) in enumerate(zip(self.input_spec.value_range, lows, highs)):
            slack = 0.01 * (hi - lo)
            if not (math.isfinite(low) and math.isfinite(high)) or low < lo - slack or high > hi + slack:
                problems.append(f"channel {channel} spans [{low:.4g}, {high:.4g}], outside [{lo:.4g}, {hi:.4g}] "
                                f"that {self.input_spec.describe_normalisation()} gives for 0-255 pixels "
                                f"(raw pixels, or another normalisation?)")
        if problems:
            raise ModelCardMismatch(self.name, problems)

    # -- converting input ---------------------------------------------------------------------------

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """0-255 pixels (..., 3, H, W) in the model's colour order -> float32 ``(x - mean) / std``."""
        mean = torch.tensor(self.mean, dtype=torch.float32, device=pixels.device).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32, device=pixels.device).view(3, 1, 1)
        return (pixels.to(torch.float32) - mean) / std

    def prepare(self, images: torch.Tensor, spec: InputSpec) -> torch.Tensor:
        """Convert a batch described by ``spec`` to the model's colour order and normalisation.

        Size and alignment cannot be converted exactly (that needs the landmarks), so a mismatch
        there raises :class:`ModelCardMismatch`. Returns ``images`` itself when nothing changes.
        """
        problems = self._mismatches(spec)
        fatal = [message for field, message in problems if field in ("size", "alignment")]
        if fatal:
            raise ModelCardMismatch(self.name, fatal)
        if not problems:
            return images
        mean = torch.tensor(spec.mean, dtype=torch.float32, device=images.device).view(3, 1, 1)
        std = torch.tensor(spec.std, dtype=torch.float32, device=images.device).view(3, 1, 1)
        pixels = images.to(torch.float32) * std + mean
        if spec.colour_order != self.colour_order:
            pixels = pixels.flip(-3)
        logger.debug("%s: converted input from %s to %s", self.name, spec.describe(), self.input_spec.describe())
        return self.normalise(pixels)

    # -- building and describing ------------------------------------------------------------------

    def build_backbone(self) -> torch.nn.Module:
        """The card's backbone with freshly initialised weights (``store.load_model`` fills them).

        The card's input and embedding sizes go to the constructor when it takes them; a wrapper that does not
        (GridFace: its recogniser's sizes are in ``backbone_args.recognizer_args``) must come out with them."""
        from facesphere.backbones import BACKBONES, build_backbone

        parameters = inspect.signature(BACKBONES.get(self.backbone)).parameters
        takes_all = any(p.kind is p.VAR_KEYWORD for p in parameters.values())
        sizes = {k: v for k, v in (("embedding_size", self.embedding_size), ("input_size", self.input_size))
                 if takes_all or k in parameters}
        backbone = build_backbone(self.backbone, **sizes, **self.backbone_args)
        built = (tuple(int(v) for v in backbone.input_size), int(backbone.embedding_size))
        if built != (tuple(self.input_size), self.embedding_size):
            raise ValueError(f"card {self.name!r}: {self.backbone}({_describe_args(self.backbone_args)}) takes "
                             f"{built[0]} input to {built[1]}-d embeddings, the card says {tuple(self.input_size)} -> "
                             f"{self.embedding_size}")
        return backbone

    def describe(self) -> str:
        """A few human-readable lines: architecture, expected input, provenance, published figures."""
        args = _describe_args(self.backbone_args)
        lines = [
            f"{self.name}: {self.backbone}({args}), {self.embedding_size}-d embeddings",
            f"  input:     {self.input_spec.describe()}",
            f"  source:    {self.source}",
            f"  licence:   {self.licence}",
        ]
        lines += [f"  published: {figure.describe()}" for figure in self.published]
        if self.age_branch is not None:
            lines.append(f"  age:       {self.age_branch.slope:.4g}·‖x‖ + {self.age_branch.intercept:.4g} years "
                         f"(from the embedding norm, OE-CNN)")
        if self.rectifier is not None:
            lines.append(f"  rectifier: {self.rectifier.describe()}")
        if self.notes:
            lines.append(f"  notes:     {self.notes}")
        return "\n".join(lines)

    def to_json(self) -> str:
        return self.model_dump_json(indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes) -> "ModelCard":
        return cls.model_validate_json(text)



def _describe_args(args: dict[str, Any]) -> str:
    """``k=v, ...`` in name order; a nested dict as ``{k=v, ...}``."""
    return ", ".join(f"{k}={'{' + _describe_args(v) + '}' if isinstance(v, dict) else v}"
                     for k, v in sorted(args.items()))


def _card_arg(value: Any) -> bool:
    """A value a card can hold as a backbone argument: a scalar, or one level of ``{str: scalar}``."""
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_scalar(v) for k, v in value.items())
    return _is_scalar(value)


def training_card(backbone: torch.nn.Module, name: str, backbone_name: str, backbone_args: dict[str, Any] | None = None,
                  source: str = "facesphere training run") -> ModelCard:
    """The card of a backbone trained by facesphere: RGB, ``(x - 127.5) / 128``, its own input size.

    A backbone with ``card_fields()`` adds the card fields it names (GridFace: its ``rectifier``)."""
    size = tuple(int(v) for v in backbone.input_size)
    args = {k: v for k, v in (backbone_args or {}).items()
            if k not in ("input_size", "embedding_size") and _card_arg(v)}
    fields = backbone.card_fields() if callable(getattr(backbone, "card_fields", None)) else {}
    try:
        alignment = template_for_size(size).name
    except ValueError:  # a size no template makes: the card says so rather than guessing
        alignment = f"unspecified_{size[0]}x{size[1]}"
    return ModelCard(name=name, backbone=backbone_name, backbone_args=args, input_size=size, colour_order="RGB",
                     mean=FACESPHERE_MEAN, std=FACESPHERE_STD, alignment=alignment,
                     embedding_size=int(backbone.embedding_size), licence="as the training data's terms", source=source,
                     **fields)


__all__ = [
    "AgeBranch",
    "ModelCard",
    "InputSpec",
    "PublishedFigure",
    "RectifierInfo",
    "ModelCardMismatch",
    "input_spec_of",
    "FACESPHERE_MEAN",
    "FACESPHERE_STD",
    "training_card",
]
