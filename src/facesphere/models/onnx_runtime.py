"""Run an ONNX file written by ``export_onnx`` in ONNX Runtime, with the preprocessing its stored card prescribes.

:class:`OnnxEmbedder` reads the model card back from the file's metadata, checks that the graph's
input and output agree with it, and offers the same ``run`` (normalised batches) and ``embed``
(uint8 RGB crops, optional flip-sum) as the PyTorch twin ``models.torch_embedder.TorchEmbedder``.
Execution providers are explicit (default CPU); an unavailable one is logged, never silently
replaced (``utils.onnxrt.make_session``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import numpy as np

from facesphere.models.card import ModelCard
from facesphere.models.embedder import Embedder
from facesphere.models.export_onnx import CARD_METADATA_KEY
from facesphere.utils.onnxrt import make_session

logger = logging.getLogger(__name__)


class OnnxCardError(ValueError):
    """An ONNX file that is not a usable facesphere export (no card, or a graph the card does not describe)."""


def card_from_metadata(metadata: dict[str, str], where: str) -> ModelCard:
    """The :class:`ModelCard` stored under :data:`CARD_METADATA_KEY` in an ONNX file's metadata."""
    text = metadata.get(CARD_METADATA_KEY)
    if text is None:
        raise OnnxCardError(f"{where}: no facesphere model card in the ONNX metadata (key {CARD_METADATA_KEY!r}); "
                             f"export it with `facesphere export` / export_onnx")
    try:
        return ModelCard.from_json(text)
    except ValueError as error:
        raise OnnxCardError(f"{where}: invalid model card in the ONNX metadata: {error}") from None


def _check_io(session, card: ModelCard, where: str) -> tuple[str, str]:
    """(input name, output name), after checking the graph's shapes against the card."""
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1 or len(outputs) != 1:
        raise OnnxCardError(f"{where}: expected one input and one output, got {len(inputs)} and {len(outputs)}")
    h, w = card.input_size
    shape = list(inputs[0].shape)
    if len(shape) != 4 or shape[1:] != [3, h, w]:
        raise OnnxCardError(f"{where}: graph input {inputs[0].name!r} has shape {shape}, but the card says "
                             f"(N, 3, {h}, {w})")
    out = list(outputs[0].shape)
    if len(out) != 2 or out[1] != card.embedding_size:
        raise OnnxCardError(f"{where}: graph output {outputs[0].name!r} has shape {out}, but the card says "
                             f"(N, {card.embedding_size})")
    if inputs[0].type != "tensor(float)":
        raise OnnxCardError(f"{where}: graph input is {inputs[0].type}, expected tensor(float)")
    return inputs[0].name, outputs[0].name


class OnnxEmbedder(Embedder):
    """Embeddings from an exported ONNX file in ONNX Runtime.

    ``providers``: execution providers in order of preference (default CPU only); ``threads``:
    intra-op threads (None: ONNX Runtime's default). ``run(batch)`` takes (N, 3, H, W) float32
    normalised as ``card`` says; ``embed(images, flip=False)`` takes HxWx3 uint8 RGB crops.
    """

    def __init__(self, path: str | os.PathLike, providers: Sequence[str] | None = None,
                 threads: int | None = None) -> None:
        self.path = os.fspath(path)
        self.session = make_session(self.path, providers=providers, threads=threads)
        card = card_from_metadata(self.session.get_modelmeta().custom_metadata_map, self.path)
        self._input, self._output = _check_io(self.session, card, self.path)
        super().__init__(card, self.path)
        logger.info("%s: %s on %s", self.path, card.name, ", ".join(self.session.get_providers()))

    @property
    def providers(self) -> list[str]:
        return list(self.session.get_providers())

    def _forward(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run([self._output], {self._input: batch})[0]

    def __repr__(self) -> str:
        return f"OnnxEmbedder({self.path!r}, card={self.card.name!r}, providers={self.providers})"


__all__ = ["OnnxCardError", "OnnxEmbedder", "card_from_metadata"]
