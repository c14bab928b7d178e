"""Any stored model (model folder, training run, checkpoint) -> a model folder or one ONNX file, checked.

:func:`export_model` reads ``source`` through :func:`facesphere.models.runs.load_backbone` (a model
folder, a run folder's newest checkpoint, or a checkpoint file) and writes ``out``: an ``.onnx``
file (``models.export_onnx``) or otherwise a model folder (``model.safetensors`` + ``card.json``,
``models.store.save_model``). The card keeps what the run's objectives put on it: a run trained with
``age_from_norm`` has its ``age_branch`` (OE-CNN), any other has none. The written model is then loaded back as a deployment embedder
(``load_embedder``) and must give the embeddings of the source backbone on the same random crops:
1 - cos at most :data:`CHECK_TOLERANCE` (float32 reorderings in ONNX Runtime give about 1e-7; a
model folder reloads bit for bit).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from facesphere.models.card import ModelCard
from facesphere.models.embedder import Embedder
from facesphere.models.embedding_parity import EmbeddingParity, compare_embeddings
from facesphere.models.runs import load_backbone, load_embedder
from facesphere.models.store import CARD_FILE, WEIGHTS_FILE, save_model
from facesphere.models.torch_embedder import TorchEmbedder

logger = logging.getLogger(__name__)

__all__ = ["CHECK_TOLERANCE", "ExportMismatch", "Exported", "export_model"]

CHECK_TOLERANCE = 1e-4
"""Largest 1 - cos(source backbone, exported model) accepted by the check."""

CHECK_CROPS = 4


class ExportMismatch(ValueError):
    """The exported model does not reproduce the source's embeddings (the written file is kept for inspection)."""


@dataclass(frozen=True)
class Exported:
    """What :func:`export_model` wrote: ``path``, ``kind`` ("onnx" or "model folder"), its card, and the check."""

    path: Path
    kind: str
    card: ModelCard
    source: str
    parity: EmbeddingParity | None


def _existing(out: Path, onnx: bool) -> list[str]:
    if onnx:
        return [out.name] if out.exists() else []
    return [f for f in (CARD_FILE, WEIGHTS_FILE) if (out / f).exists()]


def check_export(reference: Embedder, exported: Embedder, where: str) -> EmbeddingParity:
    """Embeddings of ``CHECK_CROPS`` seeded random crops by both; :class:`ExportMismatch` beyond the tolerance."""
    h, w = reference.card.input_size
    crops = np.random.default_rng(0).integers(0, 256, (CHECK_CROPS, h, w, 3), dtype=np.uint8)
    parity = compare_embeddings(reference.embed(crops, normalize=False), exported.embed(crops, normalize=False))
    if parity.max_cosine_difference > CHECK_TOLERANCE:
        raise ExportMismatch(f"{where}: the exported model disagrees with the source (max 1 - cos "
                             f"{parity.max_cosine_difference:.2e} > {CHECK_TOLERANCE:g}); the file is kept for inspection")
    return parity


def export_model(source: str | os.PathLike, out: str | os.PathLike, *, name: str | None = None,
                 overwrite: bool = False, check: bool = True, opset: int | None = None,
                 fold_bn: bool = True) -> Exported:
    """Write the model at ``source`` to ``out`` (``.onnx``: one ONNX file; anything else: a model folder).

    ``name`` renames the model in its card. An existing ``out`` (ONNX file, or a folder already holding
    a model) is refused unless ``overwrite``. ``check`` reloads what was written and compares its
    embeddings with the source backbone's (module doc). ``opset`` and ``fold_bn`` apply to ONNX only.
    """
    out = Path(out)
    onnx = out.suffix.lower() == ".onnx"
    existing = _existing(out, onnx)
    if existing and not overwrite:
        raise FileExistsError(f"{out} already holds {', '.join(existing)}; pass overwrite (--overwrite) to replace it")
    backbone, card, described = load_backbone(source)
    if name is not None:
        card = ModelCard.from_json(card.model_copy(update={"name": name}).to_json())  # re-validated
    if onnx:
        from facesphere.models.export_onnx import export_onnx

        export_onnx(backbone, card, out, opset=opset, fold_bn=fold_bn)
    else:
        save_model(out, backbone, card)
    parity = None
    if check:
        reference = TorchEmbedder(backbone, card, source=described["path"])
        parity = check_export(reference, load_embedder(out), str(out))
        logger.info("%s vs %s: %s", out, described["path"], parity.describe())
    kind = "onnx" if onnx else "model folder"
    logger.info("wrote %s %s from %s %s (%s)", kind, out, described["kind"], described["path"],
                card.input_spec.describe())
    return Exported(path=out, kind=kind, card=card, source=described["path"], parity=parity)
