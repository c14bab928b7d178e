"""A stored GridFace / STN model's rectifier as a ``rectify`` pipeline stage, in front of any recogniser.

GridFace (arXiv 1808.06210, Sec. 3.2) warps each cell of an n x n grid over the aligned crop with its own
homography before the recogniser sees it; the plain STN is the n = 1 case. :func:`load_rectifier` takes the
rectifier out of a stored ``gridface`` / ``stn`` model (model folder, run folder or checkpoint,
``models.runs.load_backbone``) with the input its card describes (size, colour order, mean/std, alignment),
and :class:`RectifyStage` runs it on uint8 crops: the crops are normalised as the card says, warped in float,
de-normalised and rounded back to uint8, so the embedder behind it preprocesses them as usual.

A face whose homographies are degenerate (a cell folding over itself, a corner behind the camera, an area
ratio outside [1/16, 16], or a non-finite value from a diverged localiser:
``backbones.rectifier.degenerate_cells``) keeps its aligned crop (never a garbage crop), is logged, and its
per-face output ``rectification`` says so: ``{"status": "degenerate", "cells": k}`` (k of the n*n cells),
else ``{"status": "ok", "cells": 0}``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from facesphere.models.card import InputSpec, ModelCard

logger = logging.getLogger(__name__)

RECTIFIER_BACKBONES = ("gridface", "stn")
"""Backbones whose ``.rectifier`` can be deployed as a stage (``backbones.rectifier``)."""


class NotARectifier(ValueError):
    """A model given as a rectifier that has none (not a gridface / stn model)."""


@dataclass(frozen=True)
class Rectified:
    """What the rectifier did to a batch of M crops: the crops the embedder gets (degenerate faces keep their
    aligned crop), the homographies (M, n*n, 3, 3) mapping output pixels to input pixels, and the degenerate
    cells (M, n*n) bool."""

    crops: np.ndarray
    homographies: np.ndarray
    degenerate: np.ndarray

    @property
    def faces_degenerate(self) -> np.ndarray:
        """(M,) bool: the faces that kept their aligned crop."""
        return self.degenerate.any(axis=1)

    def report(self) -> list[dict[str, object]]:
        """The per-face ``rectification`` output."""
        return [{"status": "degenerate" if cells else "ok", "cells": int(cells)}
                for cells in self.degenerate.sum(axis=1)]


class RectifyStage:
    """The ``rectify`` stage of a stored rectifier (``facesphere.pipeline.stages``): uint8 RGB crops in, rectified
    uint8 RGB crops and the per-face ``rectification`` out. ``card`` is the rectifier's model card; ``input_spec``
    the crops it takes (and gives), which the analyser requires to be the embedder's."""

    name = "rectifier"
    phase = "rectify"
    outputs = ("rectification",)

    def __init__(self, rectifier: torch.nn.Module, card: ModelCard, device: str | torch.device = "cpu",
                 source: str = "") -> None:
        if card.rectifier is None:
            raise NotARectifier(f"{source or card.name}: model {card.name!r} ({card.backbone}) has no rectifier")
        self.rectifier = rectifier.to(device).eval()
        self.card = card
        self.grid = card.rectifier.grid
        self.device = torch.device(device)
        self.source = source or card.name

    @property
    def input_spec(self) -> InputSpec:
        return self.card.input_spec

    @property
    def alignment(self) -> str:
        """The crop template the rectifier was trained on (the analyser refuses another)."""
        return self.card.alignment

    def describe(self) -> str:
        return f"rectifier of {self.card.name} ({self.source}): {self.card.rectifier.describe()}"

    def rectify(self, crops: np.ndarray) -> Rectified:
        """Rectify aligned (M, H, W, 3) uint8 RGB crops of the card's size (module doc)."""
        from facesphere.backbones.rectifier import degenerate_cells

        crops = np.asarray(crops)
        h, w = self.card.input_size
        if crops.dtype != np.uint8 or crops.ndim != 4 or crops.shape[1:] != (h, w, 3):
            raise ValueError(f"{self.describe()}: expects (M, {h}, {w}, 3) uint8 RGB crops, got {crops.dtype} "
                             f"{crops.shape}")
        cells = self.grid * self.grid
        if len(crops) == 0:
            return Rectified(crops.copy(), np.zeros((0, cells, 3, 3)), np.zeros((0, cells), dtype=bool))
        pixels = torch.from_numpy(np.ascontiguousarray(crops)).to(self.device).permute(0, 3, 1, 2)
        if self.card.colour_order == "BGR":
            pixels = pixels.flip(1)
        mean = torch.tensor(self.card.mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(self.card.std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        with torch.inference_mode():
            warped, homographies = self.rectifier(self.card.normalise(pixels))
            bad = degenerate_cells(homographies, self.grid, (h, w)).cpu().numpy().astype(bool)
            out = warped.float() * std + mean
            if self.card.colour_order == "BGR":
                out = out.flip(1)
            finite = torch.isfinite(out).flatten(1).all(dim=1).cpu().numpy()
            out = out.nan_to_num(0.0).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        bad[~finite] = True  # a non-finite output pixel: the whole face is refused
        faces = bad.any(axis=1)
        out[faces] = crops[faces]
        if faces.any():
            logger.warning("%s: %d of %d faces have degenerate homographies (%d cells); they keep their aligned crop",
                           self.describe(), int(faces.sum()), len(crops), int(bad.sum()))
        return Rectified(out, homographies.detach().double().cpu().numpy(), bad)

    def run(self, crops: np.ndarray) -> tuple[np.ndarray, dict[str, list]]:
        """The ``rectify`` phase: (rectified crops, {"rectification": per-face report})."""
        done = self.rectify(crops)
        return done.crops, {"rectification": done.report()}

    def __repr__(self) -> str:
        return f"RectifyStage({self.card.name!r}, grid={self.grid}, source={self.source!r})"


def load_rectifier(path: str | os.PathLike, device: str | torch.device = "cpu") -> RectifyStage:
    """The rectifier of a stored ``gridface`` / ``stn`` model (model folder, run folder or checkpoint) as a stage.

    Anything else is refused naming ``path`` (:class:`NotARectifier`); a model folder's card is read first, so a
    recogniser without a rectifier is refused before its weights are loaded."""
    from facesphere.models.runs import load_backbone
    from facesphere.models.store import CARD_FILE, load_card

    path = Path(path)
    if path.is_dir() and (path / CARD_FILE).is_file():
        _refuse_unless_rectifier(load_card(path), path)
    backbone, card, described = load_backbone(path, device)
    _refuse_unless_rectifier(card, path)
    rectifier = getattr(backbone, "rectifier", None)
    if not isinstance(rectifier, torch.nn.Module):
        raise NotARectifier(f"{path}: backbone {card.backbone} has no rectifier module")
    stage = RectifyStage(rectifier, card, device=device, source=described["path"])
    logger.info("%s", stage.describe())
    return stage


def _refuse_unless_rectifier(card: ModelCard, path: Path) -> None:
    if card.rectifier is None or card.backbone not in RECTIFIER_BACKBONES:
        raise NotARectifier(f"{path}: not a rectifier: model {card.name!r} is a {card.backbone} without one "
                            f"(give a {' or '.join(RECTIFIER_BACKBONES)} model)")


__all__ = ["NotARectifier", "RECTIFIER_BACKBONES", "Rectified", "RectifyStage", "load_rectifier"]
