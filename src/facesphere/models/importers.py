"""Importers of public weights: name -> how it recognises its files and how it converts them.

Each :class:`Importer` converts one family of public checkpoints into (facesphere backbone in eval
mode, :class:`ModelCard`). :data:`IMPORTERS` is the one table: ``import_weights(source, kind)`` uses
the importer named ``kind``, or with ``kind="auto"`` the automatic importer whose file suffix the
source has. A source may be the checkpoint file, a folder holding exactly one, or (MXNet) the
``-symbol.json`` beside the one ``-NNNN.params``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from torch import nn

from facesphere.models.card import ModelCard
from facesphere.models.import_mxnet import import_insightface
from facesphere.models.import_torch import import_xiaoccer
from facesphere.registry import Registry

__all__ = ["IMPORTERS", "Importer", "KINDS", "checkpoint_file", "import_weights"]


@dataclass(frozen=True)
class Importer:
    """Converts files ending in one of ``suffixes``; ``auto``: chosen by that suffix when no kind is given."""

    name: str
    suffixes: tuple[str, ...]
    convert: Callable[..., tuple[nn.Module, ModelCard]]
    summary: str
    auto: bool = True

    def __call__(self, path: Path, name: str | None = None) -> tuple[nn.Module, ModelCard]:
        return self.convert(path, name=name)


IMPORTERS: Registry[tuple[nn.Module, ModelCard]] = Registry("importer")

_TORCH_SUFFIXES = (".ckpt", ".pth", ".pt", ".tar")
for _importer in (
    Importer("insightface", (".params",), partial(import_insightface, arch="auto"),
             "InsightFace MXNet MobileFaceNet or iResNet, architecture detected from the weights"),
    Importer("insightface_mobilefacenet", (".params",), partial(import_insightface, arch="mobilefacenet"),
             "InsightFace MXNet MobileFaceNet", auto=False),
    Importer("insightface_iresnet", (".params",), partial(import_insightface, arch="iresnet"),
             "InsightFace MXNet iResNet", auto=False),
    Importer("xiaoccer", _TORCH_SUFFIXES, import_xiaoccer, "Xiaoccer PyTorch MobileFaceNet (SphereFace 112x96)"),
):
    IMPORTERS.register(_importer.name)(_importer)

KINDS = ("auto", *IMPORTERS.names())
"""Importer names accepted by :func:`import_weights`."""


def _importer(kind: str) -> Importer:
    try:
        return IMPORTERS.get(kind)  # type: ignore[return-value]
    except KeyError:
        raise ValueError(f"unknown kind {kind!r}; expected one of {', '.join(KINDS)}") from None


def _candidates(wanted: Importer | None) -> list[Importer]:
    """``[wanted]``, or for None every automatic importer."""
    return [wanted] if wanted else [i for i in map(IMPORTERS.get, IMPORTERS.names()) if i.auto]  # type: ignore[attr-defined]


def _resolve(source: Path, kind: str) -> tuple[Importer, Path]:
    """(importer, checkpoint file) for a file, an MXNet symbol file, or a folder holding exactly one checkpoint."""
    wanted = None if kind == "auto" else _importer(kind)
    if source.name.endswith("-symbol.json") and source.is_file():  # the one checkpoint beside an MXNet symbol
        prefix = source.name[: -len("-symbol.json")]
        params = sorted(source.parent.glob(f"{prefix}-*.params"))
        if len(params) != 1:
            raise ValueError(f"{source}: expected one {prefix}-NNNN.params beside it, found {[p.name for p in params]}")
        source = params[0]
    elif source.is_dir():
        found = sorted(p for p in source.iterdir()
                       if p.is_file() and any(p.suffix in i.suffixes for i in _candidates(wanted)))
        if len(found) != 1:
            raise ValueError(f"{source}: cannot tell which checkpoint to import (found {[p.name for p in found]}); "
                             f"pass the file itself")
        source = found[0]
    elif not source.is_file():
        raise FileNotFoundError(f"{source}: no such file or folder")
    if wanted is not None:
        return wanted, source
    for importer in _candidates(None):
        if source.suffix in importer.suffixes:
            return importer, source
    raise ValueError(f"{source}: unknown checkpoint type {source.suffix!r}; pass kind= one of {', '.join(KINDS)}")


def import_weights(source: str | os.PathLike, kind: str = "auto", name: str | None = None) -> tuple[nn.Module, ModelCard]:
    """Convert public weights into (facesphere backbone in eval mode, card).

    ``source`` is a checkpoint file or a folder holding one (MXNet: ``*-NNNN.params`` with its
    ``-symbol.json`` beside it). ``kind`` is one of :data:`KINDS`; "auto" decides by file type.
    """
    importer, path = _resolve(Path(source), kind)
    return importer(path, name=name)


def checkpoint_file(source: str | os.PathLike, kind: str = "auto") -> Path:
    """The checkpoint file ``source`` names for importer ``kind``: itself, the one in a folder, or (MXNet) the
    ``-NNNN.params`` beside a ``-symbol.json``."""
    return _resolve(Path(source), kind)[1]
