"""Import InsightFace's MXNet recognition models (MobileFaceNet, iResNet) into facesphere backbones.

No MXNet is needed: weights come from :mod:`facesphere.models.mxnet_params`, and the optional
``-symbol.json`` supplies what the weights alone do not say, each BatchNorm's eps and fix_gamma,
each convolution's kernel/stride/pad/groups (checked against ours), and the input normalisation.

Layer correspondence, MobileFaceNet (InsightFace ``fmobilefacenet.py``, blocks (1, 4, 6, 2)):

=============================  =================================  ==================================
InsightFace                    facesphere ``mobilefacenet``       op
=============================  =================================  ==================================
conv_1                         features.0                         conv3x3 s2 + BN + PReLU
conv_2_dw                      features.1                         dw conv3x3 + BN + PReLU
dconv_23                       features.2   (t=2, 64, s2)         Bottleneck without skip
res_3_block0..3                features.3..6                      Bottleneck with skip
dconv_34                       features.7   (t=4, 128, s2)
res_4_block0..5                features.8..13
dconv_45                       features.14  (t=4, 128, s2)
res_5_block0..1                features.15..16
conv_6sep                      features.17                        conv1x1 512 + BN + PReLU
conv_6dw7_7                    gdconv                             global dw conv + BN (linear)
pre_fc1 (fc1_weight) + fc1     embedding (1x1 conv + BN)          FC + BN(fix_gamma), bias folded
=============================  =================================  ==================================

Inside a block, ``<block>_conv_sep`` / ``_conv_dw`` / ``_conv_proj`` are ``body.0`` / ``body.1`` /
``body.2``; each layer ``<p>`` has ``<p>_conv2d_weight``, ``<p>_batchnorm_{gamma,beta,moving_mean,
moving_var}`` and (non-linear layers) ``<p>_relu_gamma``.

iResNet (InsightFace ``fresnet.py``, unit v3, output "E"): ``conv0``/``bn0``/``relu0`` -> ``stem``;
``stage{s}_unit{u}_{bn1, conv1, bn2, relu1, conv2, bn3, conv1sc, sc}`` -> ``stages[s-1][u-1].{bn1,
conv1.0, conv1.1, prelu, conv2.0, conv2.1, shortcut.0, shortcut.1}``; ``bn1`` -> ``bn``;
``pre_fc1`` -> ``embedding.0``; ``fc1`` -> ``embedding.1``.

Exact conversions (eval mode): a fix_gamma BN gets gamma = 1 whatever is stored; the backbone's
``bn_eps`` is the eps most BNs use, and any other BN's eps difference is added to its running
variance; an FC bias feeding a BN through our bias-free 1x1 conv is subtracted from the BN's
running mean; the graph's ``(x - 127.5) * 0.0078125`` becomes the card's mean/std.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from facesphere.models.card import ModelCard, PublishedFigure
from facesphere.models.mxnet_params import (
    BatchNormSettings,
    MXNetFormatError,
    MXNetSymbol,
    load_params,
    parse_symbol,
    strip_prefixes,
)
from facesphere.models.store import StateFiller, file_sha256, git_blob_id

logger = logging.getLogger(__name__)

# Known public files, by their GitHub blob id: card metadata the weights themselves cannot carry.
KNOWN_SOURCES: dict[str, dict] = {
    "b10c56e08685173665e4110b052cac396afe9bfb": dict(
        name="mobilefacenet_insightface_y1",
        source=("InsightFace MobileFaceNet 'model-y1-test2' (ArcFace, MS1M-refine-v1), "
                "github.com/deepinsight/insightface/issues/214; files from github.com/honghuCode/mobileFacenet-ncnn model-y1/model-y1-test2/"),
        licence=("no licence file in the hosting repo; InsightFace code is MIT, its pretrained models and MS1M "
                 "are for non-commercial research use only"),
        published=(
            PublishedFigure(benchmark="LFW", value=99.50, where="InsightFace model zoo, github.com/deepinsight/insightface/issues/214",
                            note="flip-sum, 10-fold"),
            PublishedFigure(benchmark="CFP-FP", value=88.94, where="InsightFace model zoo, github.com/deepinsight/insightface/issues/214"),
            PublishedFigure(benchmark="AgeDB-30", value=95.91, where="InsightFace model zoo, github.com/deepinsight/insightface/issues/214"),
        ),
    ),
}

DEFAULT_LICENCE = "not recorded: check the source's terms (InsightFace models: non-commercial research use)"


class UnsupportedModel(ValueError):
    """A checkpoint whose layout is not one the importers know."""


@dataclass
class _Plan:
    """What to copy where: (kind, target module path, MXNet node name) plus conversion facts for the card."""

    layers: list[tuple[str, str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def conv_bn(self, target: str, conv: str, bn: str, prelu: str | None = None, prelu_target: str | None = None) -> None:
        self.layers += [("conv", f"{target}.0", conv), ("bn", f"{target}.1", bn)]
        if prelu is not None:
            self.layers.append(("prelu", prelu_target or "", prelu))


def read_insightface(params_path: str | os.PathLike, symbol_path: str | os.PathLike | None = None
                     ) -> tuple[dict, MXNetSymbol | None]:
    """(params without arg:/aux: prefixes, parsed symbol or None), checked to agree with each other."""
    params = strip_prefixes(load_params(params_path))
    symbol = parse_symbol(symbol_path) if symbol_path is not None else None
    if symbol is not None:
        stray = [name for name in params if name not in symbol or symbol[name].op != "null"]
        if stray:
            raise MXNetFormatError(f"{params_path}: {len(stray)} arrays are not variables of {symbol_path} "
                                   f"(different models?): {', '.join(stray[:10])}")
    return params, symbol


def find_symbol(params_path: str | os.PathLike) -> Path | None:
    """The ``<prefix>-symbol.json`` next to ``<prefix>-NNNN.params``, if present."""
    path = Path(params_path)
    match = re.match(r"(.*)-\d{4}\.params$", path.name)
    candidate = path.with_name(f"{match.group(1)}-symbol.json") if match else None
    return candidate if candidate is not None and candidate.is_file() else None


def detect_architecture(params: dict) -> str:
    """"mobilefacenet" or "iresnet" from InsightFace's parameter names."""
    if "conv_1_conv2d_weight" in params and "conv_6dw7_7_conv2d_weight" in params:
        return "mobilefacenet"
    if "conv0_weight" in params and any(name.startswith("stage1_unit1_") for name in params):
        return "iresnet"
    raise UnsupportedModel("not an InsightFace MobileFaceNet or iResNet checkpoint; first names: "
                           + ", ".join(sorted(params)[:12]))


# ------------------------------------------------------------------------------------------------
# Layer plans


def mobilefacenet_plan(model: nn.Module) -> _Plan:
    """The InsightFace name of every layer of facesphere's ``mobilefacenet`` (see the module docstring)."""
    from facesphere.backbones.mobilefacenet import BOTTLENECKS

    plan = _Plan()
    plan.conv_bn("features.0.0", "conv_1_conv2d", "conv_1_batchnorm", "conv_1_relu", "features.0.1")
    plan.conv_bn("features.1.0", "conv_2_dw_conv2d", "conv_2_dw_batchnorm", "conv_2_dw_relu", "features.1.1")
    index, stage, block = 2, 2, 0
    for _, _, repeats, stride in BOTTLENECKS:
        for i in range(repeats):
            if i == 0 and stride == 2:  # InsightFace's DResidual: a downsampling block, no skip
                name, stage, block = f"dconv_{stage}{stage + 1}", stage + 1, 0
            else:
                name, block = f"res_{stage}_block{block}", block + 1
            unit = model.features[index]
            if unit.use_residual != name.startswith("res_"):
                raise UnsupportedModel(f"features.{index} skip connection does not match InsightFace's {name}")
            body = f"features.{index}.body"
            for k, part in enumerate(("conv_sep", "conv_dw")):
                plan.conv_bn(f"{body}.{k}.0", f"{name}_{part}_conv2d", f"{name}_{part}_batchnorm",
                             f"{name}_{part}_relu", f"{body}.{k}.1")
            plan.conv_bn(f"{body}.2", f"{name}_conv_proj_conv2d", f"{name}_conv_proj_batchnorm")
            index += 1
    plan.conv_bn(f"features.{index}.0", "conv_6sep_conv2d", "conv_6sep_batchnorm", "conv_6sep_relu",
                 f"features.{index}.1")
    plan.conv_bn("gdconv", "conv_6dw7_7_conv2d", "conv_6dw7_7_batchnorm")
    plan.layers += [("fc_conv", "embedding.0", "pre_fc1"), ("bn", "embedding.1", "fc1")]
    return plan


def iresnet_plan(model: nn.Module) -> _Plan:
    """The InsightFace name of every layer of facesphere's ``iresnet<depth>`` (see the module docstring)."""
    plan = _Plan()
    plan.conv_bn("stem.0", "conv0", "bn0", "relu0", "stem.1")
    for s, stage in enumerate(model.stages):
        for u, unit in enumerate(stage):
            name, target = f"stage{s + 1}_unit{u + 1}", f"stages.{s}.{u}"
            plan.layers.append(("bn", f"{target}.bn1", f"{name}_bn1"))
            plan.conv_bn(f"{target}.conv1", f"{name}_conv1", f"{name}_bn2", f"{name}_relu1", f"{target}.prelu")
            plan.conv_bn(f"{target}.conv2", f"{name}_conv2", f"{name}_bn3")
            if not isinstance(unit.shortcut, nn.Identity):
                plan.conv_bn(f"{target}.shortcut", f"{name}_conv1sc", f"{name}_sc")
    plan.layers += [("bn", "bn", "bn1"), ("fc", "embedding.0", "pre_fc1"), ("bn", "embedding.1", "fc1")]
    return plan


# ------------------------------------------------------------------------------------------------
# Filling


def _bn_settings(plan: _Plan, symbol: MXNetSymbol | None, defaults: dict[str, BatchNormSettings],
                 fallback: BatchNormSettings) -> dict[str, BatchNormSettings]:
    names = [node for kind, _, node in plan.layers if kind == "bn"]
    if symbol is None:
        return {name: defaults.get(name, fallback) for name in names}
    missing = [name for name in names if name not in symbol or symbol[name].op != "BatchNorm"]
    if missing:
        raise UnsupportedModel(f"symbol has no BatchNorm node for: {', '.join(missing[:10])}")
    return {name: symbol.batchnorm(name) for name in names}


def _fc_names(symbol: MXNetSymbol | None, params: dict, node: str) -> tuple[str, str | None]:
    """(weight, bias) parameter names of FullyConnected ``node``; InsightFace's GDC head calls the weight fc1_weight."""
    if symbol is not None and node in symbol:
        fc = symbol[node]
        inputs = [symbol.nodes[i].name for i in fc.inputs]
        return inputs[1], (inputs[2] if len(inputs) > 2 else None)
    weight = next((n for n in (f"{node}_weight", "fc1_weight") if n in params), f"{node}_weight")
    bias = f"{node}_bias" if f"{node}_bias" in params else None
    return weight, bias


def _check_conv(filler: StateFiller, conv: nn.Conv2d, symbol: MXNetSymbol, node: str, target: str) -> None:
    """Compare the symbol's Convolution attributes with ours (shapes alone miss stride and padding)."""
    if node not in symbol or symbol[node].op != "Convolution":
        filler.problems.append(f"symbol has no Convolution node {node!r}")
        return
    n = symbol[node]
    ours = dict(kernel=tuple(conv.kernel_size), stride=tuple(conv.stride), pad=tuple(conv.padding),
                num_group=conv.groups, num_filter=conv.out_channels)
    theirs = dict(kernel=n.attr("kernel"), stride=n.attr("stride", (1, 1)), pad=n.attr("pad", (0, 0)),
                  num_group=n.attr("num_group", 1), num_filter=n.attr("num_filter"))
    theirs = {k: (tuple(v) if isinstance(v, tuple) else v) for k, v in theirs.items()}
    if len(theirs["stride"]) == 1:
        theirs["stride"] = theirs["stride"] * 2
    for key, value in ours.items():
        if theirs[key] != value:
            filler.problems.append(f"{node}: {key} {theirs[key]} in the symbol, {value} in {target}")


def _fill(model: nn.Module, params: dict, symbol: MXNetSymbol | None, plan: _Plan,
          settings: dict[str, BatchNormSettings], bn_eps: float, what: str) -> nn.Module:
    filler = StateFiller(model, params, what)
    modules = dict(model.named_modules())
    fc_bias: torch.Tensor | None = None  # an FC bias waiting to be folded into the next BN's mean
    folded_eps = []
    for kind, target, node in plan.layers:
        if kind == "conv":
            filler.copy(f"{target}.weight", f"{node}_weight")
            if symbol is not None:
                _check_conv(filler, modules[target], symbol, node, target)
        elif kind == "prelu":
            filler.copy(f"{target}.weight", f"{node}_gamma")
        elif kind in ("fc", "fc_conv"):
            weight_name, bias_name = _fc_names(symbol, params, node)
            shape = tuple(model.state_dict()[f"{target}.weight"].shape)
            # (D, C) FC weight -> (D, C, 1, 1) for our 1x1 conv; a wrong size is left for put() to report
            filler.copy(f"{target}.weight", weight_name,
                        lambda w, shape=shape: w.reshape(shape) if w.numel() == math.prod(shape) else w)
            if bias_name is not None:
                if kind == "fc":
                    filler.copy(f"{target}.bias", bias_name)
                else:  # our 1x1 conv has no bias: BN(Wx + b) == BN'(Wx) with running_mean' = running_mean - b
                    fc_bias = filler.take(bias_name)
        elif kind == "bn":
            bn = settings[node]
            gamma = filler.take(f"{node}_gamma")
            if bn.fix_gamma and gamma is not None:
                if not torch.all(gamma == 1):
                    logger.debug("%s: fix_gamma, stored gamma ignored (range %.4g..%.4g)", node, gamma.min(), gamma.max())
                gamma = torch.ones_like(gamma)
            filler.put(f"{target}.weight", gamma, f"{node}_gamma")
            filler.copy(f"{target}.bias", f"{node}_beta")
            mean = filler.take(f"{node}_moving_mean")
            if fc_bias is not None and mean is not None:
                mean, fc_bias = mean - fc_bias, None
                plan.notes.append(f"FC bias folded into {node}'s running mean")
            filler.put(f"{target}.running_mean", mean, f"{node}_moving_mean")
            var = filler.take(f"{node}_moving_var")
            if var is not None and bn.eps != bn_eps:
                shifted = var.double() + (bn.eps - bn_eps)
                if not torch.all(shifted > 0):
                    filler.problems.append(f"{node}: eps {bn.eps:g} cannot be folded into a running variance "
                                           f"for bn_eps {bn_eps:g} (variance too small)")
                var = shifted.to(var.dtype)
                folded_eps.append(f"{node} (eps {bn.eps:g})")
            filler.put(f"{target}.running_var", var, f"{node}_moving_var")
            if f"{target}.num_batches_tracked" in filler.target:
                filler.put(f"{target}.num_batches_tracked", torch.tensor(0, dtype=torch.long), "(none in MXNet)")
        else:  # pragma: no cover - plans only use the kinds above
            raise AssertionError(kind)
    if fc_bias is not None:
        filler.problems.append("an FC bias was not followed by a BatchNorm to fold it into")
    if folded_eps:
        plan.notes.append(f"BN eps differing from bn_eps={bn_eps:g} folded into running variances: " + ", ".join(folded_eps))
    return filler.finish()


def _common_eps(settings: dict[str, BatchNormSettings]) -> float:
    return Counter(s.eps for s in settings.values()).most_common(1)[0][0]


def _input_normalisation(symbol: MXNetSymbol | None, first_conv: str, plan: _Plan) -> tuple[float, float]:
    if symbol is None:
        plan.notes.append("no symbol: input normalisation assumed to be InsightFace's (x - 127.5) / 128")
        return 127.5, 128.0
    mean, std, last = symbol.input_affine("data")
    conv_inputs = [symbol.nodes[i].name for i in symbol[first_conv].inputs]
    if last not in conv_inputs:
        raise UnsupportedModel(f"the graph does more than scalar arithmetic between 'data' and {first_conv} "
                               f"(it reads {conv_inputs[0]!r}); not supported")
    plan.notes.append(f"graph input arithmetic recorded as mean {mean:g}, std {std:g} (not baked into the weights)")
    return mean, std


# ------------------------------------------------------------------------------------------------
# Entry points


def import_insightface(params_path: str | os.PathLike, symbol_path: str | os.PathLike | None = None,
                       arch: str = "auto", name: str | None = None) -> tuple[nn.Module, ModelCard]:
    """Convert an InsightFace MXNet checkpoint into (facesphere backbone in eval mode, card).

    ``symbol_path`` defaults to the ``-symbol.json`` next to the params file; without one, BN
    settings and input normalisation follow InsightFace's code defaults (logged in the card notes).
    ``arch`` is "auto", "mobilefacenet" or "iresnet".
    """
    from facesphere.backbones import build_backbone
    from facesphere.backbones.iresnet import LAYERS

    params_path = Path(params_path)
    if symbol_path is None:
        symbol_path = find_symbol(params_path)
    params, symbol = read_insightface(params_path, symbol_path)
    arch = detect_architecture(params) if arch == "auto" else arch
    what = f"{params_path.name}"
    if arch == "mobilefacenet":
        fc_weight, _ = _fc_names(symbol, params, "pre_fc1")
        if fc_weight not in params or params[fc_weight].ndim != 2:
            raise UnsupportedModel(f"{what}: no 2-D FC weight {fc_weight!r} for the embedding layer")
        kernel = params["conv_6dw7_7_conv2d_weight"].shape[2:]
        input_size = (16 * int(kernel[0]), 16 * int(kernel[1]))  # four stride-2 convs: the GDConv covers H/16 x W/16
        embedding_size = int(params[fc_weight].shape[0])
        probe = build_backbone("mobilefacenet", embedding_size=embedding_size, input_size=input_size)
        plan = mobilefacenet_plan(probe)
        conv_bn = BatchNormSettings(eps=1e-3, fix_gamma=False, momentum=0.9, use_global_stats=False)
        defaults = {"fc1": BatchNormSettings(eps=2e-5, fix_gamma=True, momentum=0.9, use_global_stats=False)}
        settings = _bn_settings(plan, symbol, defaults, conv_bn)
        backbone_name, args, first_conv = "mobilefacenet", {}, "conv_1_conv2d"
    elif arch == "iresnet":
        units = Counter(m.group(1) for n in params if (m := re.match(r"stage(\d+)_unit\d+_conv1_weight$", n)))
        counts = tuple(units.get(str(s), 0) for s in (1, 2, 3, 4))
        depth = next((d for d, layers in LAYERS.items() if layers == counts), None)
        if depth is None:
            raise UnsupportedModel(f"{what}: units per stage {counts} match no iResNet depth {sorted(LAYERS)}")
        fc_weight, _ = _fc_names(symbol, params, "pre_fc1")
        if fc_weight not in params or params[fc_weight].ndim != 2:
            raise UnsupportedModel(f"{what}: no 2-D FC weight {fc_weight!r} for the embedding layer")
        embedding_size, features = (int(x) for x in params[fc_weight].shape)
        side = round((features / 512) ** 0.5)
        if side * side * 512 != features:
            raise UnsupportedModel(f"{what}: FC input {features} is not 512 x a square map")
        input_size = (16 * side, 16 * side)
        probe = build_backbone(f"iresnet{depth}", embedding_size=embedding_size, input_size=input_size)
        plan = iresnet_plan(probe)
        settings = _bn_settings(plan, symbol, {"fc1": BatchNormSettings(2e-5, True, 0.9, False)},
                                BatchNormSettings(2e-5, False, 0.9, False))
        backbone_name, args, first_conv = f"iresnet{depth}", {}, "conv0"
    else:
        raise UnsupportedModel(f"unknown InsightFace architecture {arch!r} (expected mobilefacenet or iresnet)")

    bn_eps = _common_eps(settings)
    if bn_eps != 1e-5:
        args["bn_eps"] = bn_eps
    model = build_backbone(backbone_name, embedding_size=embedding_size, input_size=input_size, **args)
    model = _fill(model, params, symbol, plan, settings, bn_eps, what).eval()
    fixed = [n for n, s in settings.items() if s.fix_gamma]
    if fixed:
        plan.notes.append(f"fix_gamma BatchNorms (gamma set to 1): {', '.join(fixed)}")
    mean, std = _input_normalisation(symbol, first_conv, plan)

    files = {params_path.name: file_sha256(params_path)}
    if symbol_path is not None:
        files[Path(symbol_path).name] = file_sha256(symbol_path)
    known = KNOWN_SOURCES.get(git_blob_id(params_path), {})
    card = ModelCard(
        name=name or known.get("name", f"insightface_{backbone_name}"),
        backbone=backbone_name,
        backbone_args=args,
        input_size=input_size,
        colour_order="RGB",
        mean=(mean,) * 3,
        std=(std,) * 3,
        alignment="arcface_112x112" if input_size == (112, 112) else f"arcface_{input_size[0]}x{input_size[1]}",
        embedding_size=embedding_size,
        licence=known.get("licence", DEFAULT_LICENCE),
        source=known.get("source", f"InsightFace MXNet checkpoint {params_path}"),
        notes="Converted from MXNet by facesphere. " + "; ".join(plan.notes) + ".",
        published=known.get("published", ()),
        source_files=files,
    )
    logger.info("imported %s: %s, %d tensors", card.name, backbone_name, len(params))
    return model, card


__all__ = [
    "import_insightface",
    "read_insightface",
    "find_symbol",
    "detect_architecture",
    "mobilefacenet_plan",
    "iresnet_plan",
    "UnsupportedModel",
    "KNOWN_SOURCES",
]
