"""Import PyTorch MobileFaceNet checkpoints of the common port (Xiaoccer/MobileFaceNet_Pytorch) into facesphere.

The port's ``MobileFacenet`` (``core/model.py``) is the same network as facesphere's
``mobilefacenet`` (Table 1 of the paper, bias-free convs, per-channel PReLU, BN eps 1e-5, linear
GDConv and 1x1 embedding conv + BN); only the module names differ:

===============================  ====================================
Xiaoccer                         facesphere ``mobilefacenet``
===============================  ====================================
conv1.{conv, bn, prelu}          features.0.{0.0, 0.1, 1}
dw_conv1.{conv, bn, prelu}       features.1.{0.0, 0.1, 1}
blocks.i.conv.{0,1,2,3,4,5,6,7}  features.(2+i).body.{0.0.0, 0.0.1, 0.1, 1.0.0, 1.0.1, 1.1, 2.0, 2.1}
conv2.{conv, bn, prelu}          features.17.{0.0, 0.1, 1}
linear7.{conv, bn}               gdconv.{0, 1}   (7x6 kernel at 112x96)
linear1.{conv, bn}               embedding.{0, 1}
===============================  ====================================

Checkpoints are read with ``torch.load(weights_only=True)`` only: a file that needs anything
beyond tensors and plain containers is refused, never unpickled.
"""

from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from facesphere.models.card import ModelCard, PublishedFigure
from facesphere.models.store import StateFiller, file_sha256, git_blob_id

logger = logging.getLogger(__name__)

STATE_DICT_KEYS = ("net_state_dict", "state_dict", "model_state_dict", "model", "net")
"""Where common training scripts keep the weights inside a checkpoint dict."""

KNOWN_SOURCES: dict[str, dict] = {
    "f0e2092e43affc0f88f6437c8d3a4b482430b7c0": dict(
        name="mobilefacenet_casia_xiaoccer",
        source="github.com/Xiaoccer/MobileFaceNet_Pytorch model/best/068.ckpt (epoch 68, CASIA-WebFace, ArcFace s=32 m=0.5)",
        licence="no licence file in the repo (all rights reserved by default); CASIA-WebFace is research-only",
        published=(
            PublishedFigure(benchmark="LFW", value=99.30, where="Xiaoccer/MobileFaceNet_Pytorch README",
                            note="SphereFace-aligned lfw-112X96; flip-concat, per-fold mean subtraction, 10-fold"),
        ),
        notes="Evaluated upstream on SphereFace-aligned 112x96 crops; ArcFace 112x112 crops cut to columns 8..103 "
              "are a different alignment and score lower.",
    ),
}


class CheckpointFormatError(ValueError):
    """A PyTorch checkpoint that cannot be read safely or has no recognisable state dict."""


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict inside a checkpoint, read with ``weights_only=True``; ``module.`` prefixes removed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointFormatError(f"{path}: refused by torch.load(weights_only=True): it holds objects other "
                                    f"than tensors and plain containers ({str(error).splitlines()[0]})") from None
    except (RuntimeError, EOFError, ValueError) as error:
        raise CheckpointFormatError(f"{path}: not a readable PyTorch checkpoint ({error})") from None
    state = loaded
    if isinstance(loaded, Mapping) and not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        key = next((k for k in STATE_DICT_KEYS if isinstance(loaded.get(k), Mapping)), None)
        if key is None:
            raise CheckpointFormatError(f"{path}: no state dict among its keys {sorted(map(str, loaded))[:10]}")
        state = loaded[key]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointFormatError(f"{path}: the state dict is not a mapping of names to tensors")
    if state and all(str(k).startswith("module.") for k in state):
        state = {str(k)[len("module."):]: v for k, v in state.items()}
    return dict(state)


def xiaoccer_mapping(num_blocks: int) -> dict[str, str]:
    """Xiaoccer module prefix -> facesphere module prefix (see the module docstring)."""
    mapping = {}
    for source, target in (("conv1", "features.0"), ("dw_conv1", "features.1")):
        mapping |= {f"{source}.conv": f"{target}.0.0", f"{source}.bn": f"{target}.0.1", f"{source}.prelu": f"{target}.1"}
    inner = ("body.0.0.0", "body.0.0.1", "body.0.1", "body.1.0.0", "body.1.0.1", "body.1.1", "body.2.0", "body.2.1")
    for i in range(num_blocks):
        mapping |= {f"blocks.{i}.conv.{k}": f"features.{2 + i}.{part}" for k, part in enumerate(inner)}
    last = f"features.{2 + num_blocks}"
    mapping |= {"conv2.conv": f"{last}.0.0", "conv2.bn": f"{last}.0.1", "conv2.prelu": f"{last}.1",
                "linear7.conv": "gdconv.0", "linear7.bn": "gdconv.1", "linear1.conv": "embedding.0",
                "linear1.bn": "embedding.1"}
    return mapping


def import_xiaoccer(path: str | os.PathLike, name: str | None = None) -> tuple[nn.Module, ModelCard]:
    """Convert a Xiaoccer MobileFaceNet checkpoint into (facesphere ``mobilefacenet`` in eval mode, card)."""
    from facesphere.backbones import build_backbone
    from facesphere.backbones.mobilefacenet import BOTTLENECKS

    path = Path(path)
    state = load_state_dict(path)
    for key in ("linear7.conv.weight", "linear1.conv.weight", "conv1.conv.weight"):
        if key not in state:
            raise CheckpointFormatError(f"{path}: not a Xiaoccer MobileFaceNet state dict (no {key!r}); "
                                        f"first keys: {', '.join(list(state)[:8])}")
    kernel = state["linear7.conv.weight"].shape[2:]
    input_size = (16 * int(kernel[0]), 16 * int(kernel[1]))  # 7x6 GDConv <- 112x96 input
    embedding_size = int(state["linear1.conv.weight"].shape[0])
    model = build_backbone("mobilefacenet", embedding_size=embedding_size, input_size=input_size)

    num_blocks = sum(n for _, _, n, _ in BOTTLENECKS)
    mapping = xiaoccer_mapping(num_blocks)
    filler = StateFiller(model, state, path.name)
    for key in state:
        prefix, _, leaf = key.rpartition(".")
        target = mapping.get(prefix)
        if target is None:
            continue  # left unused: finish() lists it
        filler.copy(f"{target}.{leaf}", key)
    model = filler.finish().eval()

    known = KNOWN_SOURCES.get(git_blob_id(path), {})
    card = ModelCard(
        name=name or known.get("name", "mobilefacenet_xiaoccer"),
        backbone="mobilefacenet",
        input_size=input_size,
        colour_order="RGB",
        mean=(127.5, 127.5, 127.5),
        std=(128.0, 128.0, 128.0),
        alignment="sphereface_112x96" if input_size == (112, 96) else f"arcface_{input_size[0]}x{input_size[1]}",
        embedding_size=embedding_size,
        licence=known.get("licence", "not recorded: check the source's terms"),
        source=known.get("source", f"PyTorch checkpoint {path}"),
        notes=("Converted from the Xiaoccer MobileFaceNet_Pytorch layout by renaming only (same network, "
               "BN eps 1e-5). " + known.get("notes", "")).strip(),
        published=known.get("published", ()),
        source_files={path.name: file_sha256(path)},
    )
    logger.info("imported %s: mobilefacenet %dx%d, %d tensors", card.name, *input_size, len(state))
    return model, card


__all__ = ["import_xiaoccer", "load_state_dict", "xiaoccer_mapping", "CheckpointFormatError", "KNOWN_SOURCES"]
