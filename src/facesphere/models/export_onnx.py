"""Export a recognition backbone to one self-describing ONNX file: dynamic batch, card in the metadata.

The file holds the graph and every weight (no external data), takes ``images`` (batch, 3, H, W)
float32 normalised as the card says, and returns ``embeddings`` (batch, D), raw (not L2-normalised),
like the backbone. The model card (``ModelCard.to_json``) is stored in the ONNX ``metadata_props``
under :data:`CARD_METADATA_KEY`, so the preprocessing travels with the file
(``models.onnx_runtime.OnnxEmbedder`` reads it back).

BatchNorm is folded into the preceding convolutions first (``backbones.fuse.fuse_batchnorm``), which
gives a smaller graph whatever runtime optimisations the consumer applies. The exporter is PyTorch's
default (``torch.export``-based, "dynamo"); if it fails on a backbone, the TorchScript exporter
(``dynamo=False``) is used instead, and the log says so. The file is written atomically.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from facesphere.backbones.base import embedding_of
from facesphere.backbones.fuse import fuse_batchnorm
from facesphere.models.card import ModelCard
from facesphere.models.torch_embedder import check_backbone_matches_card
from facesphere.utils.files import atomic_path

logger = logging.getLogger(__name__)

CARD_METADATA_KEY = "facesphere.model_card"
"""metadata_props key holding the model card's JSON."""
INPUT_NAME = "images"
OUTPUT_NAME = "embeddings"
BATCH_AXIS = "batch"
FALLBACK_OPSET = 17
"""Opset for the TorchScript fallback when none is asked for (the dynamo exporter picks its own)."""


_CHATTY_LOGGERS = {"onnxscript": logging.WARNING, "onnx_ir": logging.WARNING, "torch.onnx": logging.WARNING,
                   "torch.export": logging.WARNING, "torch._dynamo": logging.WARNING,
                   "torch.onnx._internal.exporter._registration": logging.ERROR}
"""The exporter's loggers and the level they are held at: per-pass INFO lines (hundreds per model) and
"torchvision is not installed" warnings (facesphere uses no torchvision op) are shown only at DEBUG here."""


class OnnxExportError(ValueError):
    """The backbone could not be exported to a valid ONNX file with a dynamic batch axis."""


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Keep the exporter's pass-by-pass logging and deprecation warnings out of the caller's log."""
    chatty = [logging.getLogger(name) for name in _CHATTY_LOGGERS]
    levels = [log.level for log in chatty]
    quiet = not logger.isEnabledFor(logging.DEBUG)
    try:
        if quiet:
            for log, level in zip(chatty, _CHATTY_LOGGERS.values()):
                log.setLevel(level)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)  # the backbones' input-size check, traced
            yield
    finally:
        for log, level in zip(chatty, levels):
            log.setLevel(level)


def _export_dynamo(model: nn.Module, example: torch.Tensor, path: Path, opset: int | None) -> None:
    torch.onnx.export(model, (example,), str(path), dynamo=True, external_data=False, opset_version=opset,
                      input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                      dynamic_shapes=({0: torch.export.Dim(BATCH_AXIS)},), verbose=False)


def _export_torchscript(model: nn.Module, example: torch.Tensor, path: Path, opset: int | None) -> None:
    torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=opset or FALLBACK_OPSET,
                      input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                      dynamic_axes={INPUT_NAME: {0: BATCH_AXIS}, OUTPUT_NAME: {0: BATCH_AXIS}},
                      do_constant_folding=True)


def _check_graph(proto, card: ModelCard, where: str) -> None:
    """The graph must take (batch, 3, H, W) with a symbolic batch axis and return (batch, D)."""
    def dims(value_info) -> list[int | str]:
        return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]

    inputs, outputs = list(proto.graph.input), list(proto.graph.output)
    if len(inputs) != 1 or len(outputs) != 1:
        raise OnnxExportError(f"{where}: expected one input and one output, got {len(inputs)} and {len(outputs)}")
    h, w = card.input_size
    got_in, got_out = dims(inputs[0]), dims(outputs[0])
    if len(got_in) != 4 or not isinstance(got_in[0], str) or got_in[1:] != [3, h, w]:
        raise OnnxExportError(f"{where}: input shape is {got_in}, expected [{BATCH_AXIS}, 3, {h}, {w}]")
    if len(got_out) != 2 or not isinstance(got_out[0], str) or got_out[1] != card.embedding_size:
        raise OnnxExportError(f"{where}: output shape is {got_out}, expected [{BATCH_AXIS}, {card.embedding_size}]")


class _EmbeddingOnly(nn.Module):
    """The graph's one output: the embedding, also of a backbone returning a dict (a rectifier's GridFace)."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return embedding_of(self.backbone(images))


def export_onnx(backbone: nn.Module, card: ModelCard, path: str | os.PathLike, opset: int | None = None,
                fold_bn: bool = True) -> Path:
    """Write ``backbone`` (described by ``card``) to ``path`` as one ONNX file; returns the path.

    ``opset``: ONNX opset (None: the exporter's default). ``fold_bn``: fold BatchNorm first. The
    backbone itself is not modified (a CPU float32 eval-mode copy is exported).
    """
    import onnx

    check_backbone_matches_card(backbone, card)
    model = fuse_batchnorm(backbone) if fold_bn else copy.deepcopy(backbone).eval()
    model = _EmbeddingOnly(model.to(device="cpu", dtype=torch.float32)).eval()
    h, w = card.input_size
    example = torch.zeros(2, 3, h, w)  # batch 2: a batch of 1 would be specialised as a constant
    path = Path(path)
    with atomic_path(path) as tmp:
        with _quiet_exporter():
            try:
                _export_dynamo(model, example, tmp, opset)
                exporter = "dynamo"
            except Exception as error:  # noqa: BLE001 - any exporter failure: try the other exporter
                logger.warning("%s: the dynamo ONNX exporter failed on %s (%s: %s); falling back to the TorchScript "
                               "exporter (dynamo=False)", path, type(backbone).__name__, type(error).__name__,
                               str(error).splitlines()[0] if str(error) else "")
                _export_torchscript(model, example, tmp, opset)
                exporter = "torchscript"
        proto = onnx.load(str(tmp))
        _check_graph(proto, card, str(path))
        metadata = {CARD_METADATA_KEY: card.to_json(), "facesphere.exporter": exporter,
                    "facesphere.batchnorm_folded": str(bool(fold_bn)).lower(), "facesphere.torch": torch.__version__}
        kept = [p for p in proto.metadata_props if p.key not in metadata]
        del proto.metadata_props[:]
        proto.metadata_props.extend(kept)
        for key, value in metadata.items():
            proto.metadata_props.add(key=key, value=value)
        proto.doc_string = card.describe()
        onnx.checker.check_model(proto)
        onnx.save(proto, str(tmp))
    opsets = ", ".join(f"{o.domain or 'ai.onnx'} {o.version}" for o in proto.opset_import)
    logger.info("exported %s (%s exporter, opset %s, BN %s) to %s (%.1f MB)", card.name, exporter, opsets,
                "folded" if fold_bn else "kept", path, path.stat().st_size / 1e6)
    return path


__all__ = ["CARD_METADATA_KEY", "INPUT_NAME", "OUTPUT_NAME", "OnnxExportError", "export_onnx"]
