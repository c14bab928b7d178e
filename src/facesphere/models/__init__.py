"""Public weights in facesphere: model cards, the stored-model format, and importers.

A stored model is a folder with ``model.safetensors`` and ``card.json`` (:func:`save_model`,
:func:`load_model`). The card records the input the weights expect (colour order, size, alignment,
normalisation) and refuses mismatching input (:class:`ModelCardMismatch`). Importers convert
InsightFace MXNet checkpoints (MobileFaceNet, iResNet; no MXNet needed) and the Xiaoccer PyTorch
MobileFaceNet; :func:`import_weights` picks one from the files (``models.importers.IMPORTERS``).
"""

from __future__ import annotations

from facesphere.models.card import InputSpec, ModelCard, ModelCardMismatch, PublishedFigure, input_spec_of
from facesphere.models.import_mxnet import UnsupportedModel, import_insightface
from facesphere.models.import_torch import CheckpointFormatError, import_xiaoccer
from facesphere.models.importers import IMPORTERS, KINDS, import_weights
from facesphere.models.mxnet_params import MXNetFormatError
from facesphere.models.runs import CheckpointError, load_backbone, load_embedder
from facesphere.models.store import WeightMismatch, load_model, save_model

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
    "IMPORTERS",
    "WeightMismatch",
    "MXNetFormatError",
    "UnsupportedModel",
    "CheckpointFormatError",
]
