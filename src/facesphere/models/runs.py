"""Every stored form of an embedding model, read one way: model folders, ``.onnx`` files, training runs.

A training checkpoint (``runs/<name>/checkpoints/step_XXXXXXXX.pt``) holds the run's config and the
backbone's weights under ``model.backbone.*``; it is read with ``torch.load(weights_only=True)`` and
given the card of a facesphere-trained backbone (:func:`facesphere.models.card.training_card`), with the
card fields its objectives saved under ``card`` (an ``age_branch``).
:func:`load_backbone` and :func:`load_embedder` accept any of these forms, so the CLI, the service,
evaluation and the gallery load models through one door.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from facesphere.models.card import ModelCard, training_card

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^step_(\d{8})\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable or does not fit the model."""


def list_checkpoints(folder: str | os.PathLike) -> list[Path]:
    """The ``step_XXXXXXXX.pt`` files of a folder, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if CHECKPOINT_PATTERN.match(p.name))


def latest_checkpoint(folder: str | os.PathLike) -> Path | None:
    found = list_checkpoints(folder)
    return found[-1] if found else None


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A checkpoint's state, read with ``torch.load(weights_only=True)`` (no pickled code runs)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises several unrelated types for corrupt or unsafe files
        raise CheckpointError(f"cannot read checkpoint {path}: {error}") from None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint file, or the newest one of a run folder (``checkpoints/``) or a checkpoint folder."""
    path = Path(path)
    if path.is_dir():
        found = latest_checkpoint(path / "checkpoints") or latest_checkpoint(path)
        if found is None:
            raise FileNotFoundError(f"{path}: neither a model folder (card.json) nor a run/checkpoint folder")
        return found
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such model folder or checkpoint")
    return path


def state_sha256(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 of a state dict (names, dtypes, shapes and bytes, in name order): the identity of a checkpoint's
    weights, so two runs of the same name never pass for one model (galleries and thresholds bind to it)."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def backbone_from_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu"
                             ) -> tuple[nn.Module, ModelCard, dict[str, Any]]:
    """(backbone in eval mode, card, description) from a training checkpoint file."""
    from facesphere.backbones import build_backbone

    path = Path(path)
    state = load_checkpoint(path, "cpu")
    try:
        config, weights = state["config"], state["model"]
        backbone_name = config["model"]["backbone"]
        backbone_args = dict(config["model"].get("backbone_args") or {})
    except (KeyError, TypeError):
        raise CheckpointError(f"{path}: not a facesphere training checkpoint (no config/model entries)") from None
    backbone = build_backbone(backbone_name, **backbone_args)
    prefix = "backbone."
    backbone.load_state_dict({k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}, strict=True)
    backbone.to(device).eval()
    step = int(state.get("step", 0))
    card = training_card(backbone, f"{config.get('name', 'run')}-step{step}", backbone_name, backbone_args,
                         source=f"facesphere training checkpoint {path}")
    fields = {**(state.get("card") or {}), "weights_sha256": state_sha256(backbone.state_dict())}
    try:  # the objectives' card fields (an age branch) are re-validated like a card.json
        card = ModelCard.model_validate({**card.model_dump(), **fields})
    except ValueError as error:
        raise CheckpointError(f"{path}: its card fields {sorted(fields)} are invalid: {' '.join(str(error).split())}") from None
    logger.info("loaded %s (step %d) from %s", backbone_name, step, path)
    return backbone, card, {"kind": "training checkpoint", "path": str(path), "step": step}


def load_backbone(path: str | os.PathLike, device: str | torch.device = "cpu"
                  ) -> tuple[nn.Module, ModelCard, dict[str, Any]]:
    """(backbone in eval mode, card, description) from a model folder, a checkpoint or a run folder."""
    from facesphere.models.store import CARD_FILE, load_model

    path = Path(path)
    if path.is_dir() and (path / CARD_FILE).is_file():
        backbone, card = load_model(path, device=device)
        return backbone, card, {"kind": "model folder", "path": str(path)}
    return backbone_from_checkpoint(resolve_checkpoint(path), device)


def load_embedder(path: str | os.PathLike, device: str | torch.device = "cpu", threads: int | None = None):
    """An :class:`~facesphere.models.embedder.Embedder` for any stored model.

    An ``.onnx`` file runs in ONNX Runtime (``threads`` intra-op threads); a model folder, a training
    checkpoint or a run folder runs in PyTorch on ``device``.
    """
    path = Path(path)
    if path.suffix.lower() == ".onnx":
        from facesphere.models.onnx_runtime import OnnxEmbedder

        return OnnxEmbedder(path, threads=threads)
    from facesphere.models.torch_embedder import TorchEmbedder

    backbone, card, described = load_backbone(path, device)
    return TorchEmbedder(backbone, card, device=device, source=described["path"])


__all__ = ["CHECKPOINT_PATTERN", "CheckpointError", "backbone_from_checkpoint", "latest_checkpoint",
           "list_checkpoints", "load_backbone", "load_checkpoint", "load_embedder", "resolve_checkpoint",
           "state_sha256"]
