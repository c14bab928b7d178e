"""Public weights in facesphere: model cards, the stored-model format, and importers.

A stored model is a folder with ``model.safetensors`` and ``card.json`` (:func:`save_model`,
:func:`load_model`). The card records the input the weights expect (colour order, size, alignment,
normalisation) and refuses mismatching input (:class:`ModelCardMismatch`). Importers convert
InsightFace MXNet checkpoints (MobileFaceNet, iResNet; no MXNet needed) and the Xiaoccer PyTorch
MobileFaceNet; :func:`import_weights` picks one from the files.
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from facesphere.models.card import InputSpec, ModelCard, ModelCardMismatch, PublishedFigure, input_spec_of
from facesphere.models.import_mxnet import UnsupportedModel, import_insightface
from facesphere.models.import_torch import CheckpointFormatError, import_xiaoccer
from facesphere.models.mxnet_params import MXNetFormatError
from facesphere.models.runs import CheckpointError, load_backbone, load_embedder
from facesphere.models.store import WeightMismatch, load_model, save_model

KINDS = ("auto", "insightface", "insightface_mobilefacenet", "insightface_iresnet", "xiaoccer")
"""Importer names accepted by :func:`import_weights`."""

_TORCH_SUFFIXES = (".ckpt", ".pth", ".pt", ".tar")


def _resolve(source: Path, kind: str) -> tuple[str, Path]:
    """(importer, file) for a file or a folder holding exactly one checkpoint."""
    if source.is_dir():
        params = sorted(source.glob("*.params"))
        torch_files = sorted(p for p in source.iterdir() if p.suffix in _TORCH_SUFFIXES)
        if kind.startswith("insightface") or (kind == "auto" and params and not torch_files):
            if len(params) != 1:
                raise ValueError(f"{source}: expected one *.params file, found {[p.name for p in params]}")
            return ("insightface" if kind == "auto" else kind), params[0]
        if kind in ("auto", "xiaoccer") and len(torch_files) == 1 and not (kind == "auto" and params):
            return "xiaoccer", torch_files[0]
        raise ValueError(f"{source}: cannot tell which checkpoint to import (found "
                         f"{[p.name for p in params + torch_files]}); pass the file itself")
    if not source.is_file():
        raise FileNotFoundError(f"{source}: no such file or folder")
    if source.name.endswith("-symbol.json"):  # an MXNet symbol: import the one checkpoint beside it
        prefix = source.name[: -len("-symbol.json")]
        params = sorted(source.parent.glob(f"{prefix}-*.params"))
        if len(params) != 1:
            raise ValueError(f"{source}: expected one {prefix}-NNNN.params beside it, found {[p.name for p in params]}")
        return ("insightface" if kind == "auto" else kind), params[0]
    if kind != "auto":
        return kind, source
    if source.suffix == ".params":
        return "insightface", source
    if source.suffix in _TORCH_SUFFIXES:
        return "xiaoccer", source
    raise ValueError(f"{source}: unknown checkpoint type {source.suffix!r}; pass kind= one of {KINDS}")


def import_weights(source: str | os.PathLike, kind: str = "auto", name: str | None = None) -> tuple[nn.Module, ModelCard]:
    """Convert public weights into (facesphere backbone in eval mode, card).

    ``source`` is a checkpoint file or a folder holding one (MXNet: ``*-NNNN.params`` with its
    ``-symbol.json`` beside it). ``kind`` is one of :data:`KINDS`; "auto" decides by file type.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {', '.join(KINDS)}")
    importer, path = _resolve(Path(source), kind)
    if importer == "xiaoccer":
        return import_xiaoccer(path, name=name)
    arch = {"insightface": "auto", "insightface_mobilefacenet": "mobilefacenet", "insightface_iresnet": "iresnet"}[importer]
    return import_insightface(path, arch=arch, name=name)


__all__ = [
    "ModelCard",
    "InputSpec",
    "PublishedFigure",
    "ModelCardMismatch",
    "input_spec_of",
    "save_model",
    "load_model",
    "load_backbone",
    "load_embedder",
    "CheckpointError",
    "import_weights",
    "import_insightface",
    "import_xiaoccer",
    "KINDS",
    "WeightMismatch",
    "MXNetFormatError",
    "UnsupportedModel",
    "CheckpointFormatError",
]
