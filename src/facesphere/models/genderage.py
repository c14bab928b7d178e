"""InsightFace's light gender/age model (MXNet, 2018) in PyTorch, read without MXNet, and its pipeline stage.

The model (InsightFace ``gender-age/``: a MobileNetV1-style network, ``fmobilenet.py``) takes a 112x112
ArcFace-aligned RGB face as raw 0..255 pixels (the graph itself computes ``(x - 127.5) * 0.0078125``) and
ends in ``fc1``, 202 numbers: ``[0:2]`` the gender logits (index 1 = male) and ``[2:202]`` 100 pairs of
logits of binary "age > k" classifiers, k = 0..99, so the age is the number of pairs whose argmax is 1
(``face_model.get_ga``: ``age = sum(argmax(a.reshape(100, 2), axis=1))``).

Reading: the ``-NNNN.params`` arrays through :mod:`facesphere.models.mxnet_params` and their agreement with
the ``-symbol.json`` graph through :func:`facesphere.models.import_mxnet.read_insightface`; the network is
built from the graph itself, one PyTorch layer per MXNet operator, named after its node (Convolution,
BatchNorm with the node's eps and fix_gamma — gamma taken as 1 where fixed, Activation relu, LeakyReLU
prelu, global average Pooling, Flatten, FullyConnected). Sizes are checked before anything is decoded. The
files are read in place each time (about 1 MB, a fraction of a second): no converted copy is written, so the
weights, whose terms are InsightFace's (non-commercial research), stay where the user keeps them; the
licence is logged on every load and shown by :meth:`GenderAgeModel.describe`.

:class:`GenderAgeModel` is also an ``attributes`` pipeline stage (``facesphere.pipeline.stages``): on the
analyser's aligned crops it adds ``age`` (years, float) and ``gender`` (``"male"`` / ``"female"``).
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from facesphere.models.import_mxnet import UnsupportedModel, find_symbol, read_insightface
from facesphere.models.importers import checkpoint_file
from facesphere.models.mxnet_params import MXNetSymbol
from facesphere.models.store import StateFiller, git_blob_id
from facesphere.utils.files import check_text_size

logger = logging.getLogger(__name__)

INPUT_SIZE = (112, 112)
ALIGNMENT = "arcface_112x112"
OUTPUTS = 202  # 2 gender logits + 100 x 2 "age > k" logits
MAX_PARAMS_BYTES = 64 * 2**20
"""A gender/age ``.params`` file larger than this is not the light model (the real one is 1.1 MB)."""
MAX_SYMBOL_BYTES = 4 * 2**20
LICENCE = ("InsightFace: code MIT; its training data and pretrained models are for non-commercial research use "
           "only (github.com/deepinsight/insightface)")
KNOWN_BLOBS = {"35118adad56c0bc987e7b872b35beb10953e687e":
               "InsightFace gender-age/model/model-0000.params (commit eda10e8, 2018-10-28)"}


class GenderAgeNet(nn.Module):
    """The MXNet graph as a chain of PyTorch layers: raw 0..255 RGB (N, 3, 112, 112) -> ``fc1`` (N, 202)."""

    def __init__(self, layers: list[tuple[str, nn.Module]], mean: float, std: float) -> None:
        super().__init__()
        self.layers = nn.Sequential(OrderedDict(layers))
        self.mean, self.std = float(mean), float(std)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.layers((pixels - self.mean) / self.std)


def decode(outputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``fc1`` outputs (N, 202) -> (ages in years, probability of "male"), as InsightFace's ``get_ga`` reads them
    (age = number of "age > k" classifiers voting yes; gender = softmax of the first two logits)."""
    outputs = np.asarray(outputs, dtype=np.float64)
    if outputs.ndim != 2 or outputs.shape[1] != OUTPUTS:
        raise ValueError(f"gender/age outputs must be (N, {OUTPUTS}), got {outputs.shape}")
    ages = np.argmax(outputs[:, 2:].reshape(len(outputs), 100, 2), axis=2).sum(axis=1).astype(np.float64)
    logits = outputs[:, :2] - outputs[:, :2].max(axis=1, keepdims=True)
    male = np.exp(logits[:, 1]) / np.exp(logits).sum(axis=1)
    return ages, male


@dataclass(frozen=True)
class GenderAge:
    """Per face: ``age`` in years, ``male`` the probability of "male", ``gender`` "male" where it is > 0.5."""

    age: np.ndarray
    male: np.ndarray

    @property
    def gender(self) -> np.ndarray:
        return np.where(self.male > 0.5, "male", "female")


def _chain(symbol: MXNetSymbol, start: str) -> list:
    """The operator nodes from ``start`` to the graph's output, refusing anything but a single chain."""
    if len(symbol.heads) != 1:
        raise UnsupportedModel(f"{symbol.source}: expected one output, the graph has {len(symbol.heads)}")
    head, current, chain = symbol.heads[0], symbol[start].index, []
    while current != head:
        consumers = [n for n in symbol.nodes if n.op != "null" and current in n.inputs]
        if len(consumers) != 1 or consumers[0].inputs[0] != current:
            raise UnsupportedModel(f"{symbol.source}: node {symbol.nodes[current].name!r} does not feed exactly one "
                                   f"layer (a branching graph is not the gender/age network)")
        chain.append(consumers[0])
        current = consumers[0].index
    return chain


def _build(symbol: MXNetSymbol, params: dict[str, np.ndarray], what: str) -> GenderAgeNet:
    """One PyTorch layer per node of the chain, named after it, filled from ``params`` (each consumed once)."""
    mean, std, start = symbol.input_affine("data")
    layers: list[tuple[str, nn.Module]] = []
    channels: int | None = None  # feature width, from the weights' shapes
    flat = False
    for node in _chain(symbol, start):
        names = [symbol.nodes[i].name for i in node.inputs]
        if node.op == "Convolution":
            weight = params.get(names[1])
            if weight is None or weight.ndim != 4:
                raise UnsupportedModel(f"{what}: {node.name} has no 4-D weight {names[1]!r}")
            groups = int(node.attr("num_group", 1))
            layer: nn.Module = nn.Conv2d(int(weight.shape[1]) * groups, int(node.attr("num_filter")),
                                         tuple(node.attr("kernel")), stride=tuple(node.attr("stride", (1, 1))),
                                         padding=tuple(node.attr("pad", (0, 0))), groups=groups,
                                         bias=not node.attr("no_bias", False))
            channels = layer.out_channels
        elif node.op == "BatchNorm":
            if channels is None:
                raise UnsupportedModel(f"{what}: {node.name} before any weighted layer")
            bn = symbol.batchnorm(node.name)
            layer = (nn.BatchNorm1d if flat else nn.BatchNorm2d)(channels, eps=bn.eps)
        elif node.op == "Activation" and node.attr("act_type") == "relu":
            layer = nn.ReLU()
        elif node.op == "LeakyReLU" and node.attr("act_type") == "prelu" and channels is not None:
            layer = nn.PReLU(channels)
        elif node.op == "Pooling" and node.attr("global_pool") is True and node.attr("pool_type") == "avg":
            layer = nn.AdaptiveAvgPool2d(1)
        elif node.op == "Flatten":
            layer, flat = nn.Flatten(), True
        elif node.op == "FullyConnected" and flat and channels is not None:
            layer = nn.Linear(channels, int(node.attr("num_hidden")), bias=not node.attr("no_bias", False))
            channels = layer.out_features
        else:
            raise UnsupportedModel(f"{what}: operator {node.op} {dict(node.attrs)} at {node.name!r} is not part of "
                                   f"the gender/age network")
        layers.append((node.name, layer))
    net = GenderAgeNet(layers, mean, std)
    filler = StateFiller(net, params, what)
    for name, _ in layers:
        node, op = symbol[name], symbol[name].op
        names = [symbol.nodes[i].name for i in node.inputs]
        target = f"layers.{name}"
        if op in ("Convolution", "FullyConnected"):
            filler.copy(f"{target}.weight", names[1])
            if len(names) > 2:
                filler.copy(f"{target}.bias", names[2])
        elif op == "BatchNorm":
            gamma = filler.take(names[1])
            if symbol.batchnorm(name).fix_gamma and gamma is not None:
                gamma = torch.ones_like(gamma)  # MXNet ignores a fixed gamma whatever is stored
            filler.put(f"{target}.weight", gamma, names[1])
            for part, source in zip(("bias", "running_mean", "running_var"), names[2:5]):
                filler.copy(f"{target}.{part}", source)
            filler.put(f"{target}.num_batches_tracked", torch.tensor(0, dtype=torch.long), "(none in MXNet)")
        elif op == "LeakyReLU":
            filler.copy(f"{target}.weight", names[1])
    return filler.finish().eval()


def _files(path: str | os.PathLike) -> tuple[Path, Path]:
    """(params, symbol) of a folder, a ``-NNNN.params`` file or its ``-symbol.json``; sizes checked, nothing read."""
    params = checkpoint_file(path, "insightface")
    symbol = find_symbol(params)
    if symbol is None:
        raise FileNotFoundError(f"{params}: no -symbol.json beside it (the gender/age network is read from its graph)")
    size = params.stat().st_size
    if size > MAX_PARAMS_BYTES:
        raise ValueError(f"{params}: {size:,} bytes is too large for the light gender/age model "
                         f"(at most {MAX_PARAMS_BYTES:,})")
    return params, check_text_size(symbol, MAX_SYMBOL_BYTES)


class GenderAgeModel:
    """The gender/age network with what it expects, usable from Python and as an ``attributes`` pipeline stage.

    ``predict(crops)`` takes (N, 112, 112, 3) uint8 RGB ArcFace-aligned crops and returns :class:`GenderAge`;
    ``run(crops, embeddings)`` is the stage: ``{"age": (N,) years, "gender": (N,) "male"/"female"}``.
    """

    name = "genderage_insightface"
    phase = "attributes"
    outputs = ("age", "gender")
    alignment = ALIGNMENT
    input_size = INPUT_SIZE

    def __init__(self, net: GenderAgeNet, source: str, device: str | torch.device = "cpu", batch_size: int = 64,
                 licence: str = LICENCE) -> None:
        self.device = torch.device(device)
        self.net = net.to(self.device).eval()
        self.source, self.licence, self.batch_size = source, licence, int(batch_size)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu", batch_size: int = 64) -> GenderAgeModel:
        """The model of a folder holding ``model-symbol.json`` + ``model-0000.params`` (or either file)."""
        params_path, symbol_path = _files(path)
        params, symbol = read_insightface(params_path, symbol_path)
        net = _build(symbol, params, params_path.name)
        with torch.inference_mode():  # the graph must map a 112x112 crop to the 202 outputs decode() reads
            shape = tuple(net(torch.zeros(1, 3, *INPUT_SIZE)).shape)
        if shape != (1, OUTPUTS):
            raise UnsupportedModel(f"{params_path}: the network maps a 112x112 crop to {shape}, not (1, {OUTPUTS})")
        known = KNOWN_BLOBS.get(git_blob_id(params_path))
        model = cls(net, f"{known or 'InsightFace gender/age MXNet checkpoint'} at {params_path}", device, batch_size)
        logger.info("gender/age model %s; licence: %s", model.source, model.licence)
        return model

    def describe(self) -> str:
        return (f"{self.name}: 112x112 {ALIGNMENT} RGB crops (raw 0-255) -> age, gender\n"
                f"  source:  {self.source}\n  licence: {self.licence}")

    def raw_outputs(self, crops: np.ndarray) -> np.ndarray:
        """(N, 112, 112, 3) uint8 RGB crops -> ``fc1`` outputs (N, 202) float32, ``batch_size`` crops at a time."""
        crops = np.asarray(crops)
        if crops.ndim != 4 or crops.shape[1:] != (*INPUT_SIZE, 3) or crops.dtype != np.uint8:
            raise ValueError(f"{self.name} takes (N, 112, 112, 3) uint8 RGB crops aligned to {ALIGNMENT}, "
                             f"got {crops.dtype} {crops.shape}")
        out = [np.zeros((0, OUTPUTS), np.float32)]
        with torch.inference_mode():
            for start in range(0, len(crops), self.batch_size):
                batch = torch.from_numpy(np.array(crops[start:start + self.batch_size]))  # a writable copy
                pixels = batch.to(self.device).permute(0, 3, 1, 2).float()
                out.append(self.net(pixels).float().cpu().numpy())
        return np.concatenate(out)

    def predict(self, crops: np.ndarray) -> GenderAge:
        return GenderAge(*decode(self.raw_outputs(crops)))

    def run(self, crops: np.ndarray, embeddings: np.ndarray | None = None) -> dict[str, np.ndarray]:
        found = self.predict(crops)
        return {"age": found.age, "gender": found.gender}

    def __repr__(self) -> str:
        return f"GenderAgeModel({self.source!r}, device={self.device})"


def load_genderage(path: str | os.PathLike, device: str | torch.device = "cpu", batch_size: int = 64) -> GenderAgeModel:
    """:meth:`GenderAgeModel.load`: the InsightFace gender/age model of ``path`` (folder, params or symbol file)."""
    return GenderAgeModel.load(path, device=device, batch_size=batch_size)


__all__ = ["ALIGNMENT", "LICENCE", "GenderAge", "GenderAgeModel", "GenderAgeNet", "decode", "load_genderage"]
