"""RetinaFace with a MobileNet-0.25 backbone (Deng et al., "RetinaFace", arXiv:1905.00641), in PyTorch.

Re-implemented from the published architecture of the widely used PyTorch port (biubug6/Pytorch_Retinaface,
config ``cfg_mnet``), so its public state_dicts load unchanged (300 keys, no ``module.`` prefix):

* ``body``: MobileNetV1 x0.25, three stages (strides 8/16/32, 64/128/256 channels); conv + BN + activation.
* ``fpn``: 1x1 lateral conv+BN+act per stage to 64 channels; top-down nearest upsampling, sum, 3x3 merge.
* ``ssh1..3``: context module: a 3x3 branch (32 ch) and 5x5/7x7 branches made of stacked 3x3 convs (16 ch
  each), concatenated then ReLU; the 32/16-channel convs directly before the concat have no activation.
* ``ClassHead``/``BboxHead``/``LandmarkHead``: per level a 1x1 conv, 2 anchors per location.

Activation: the released checkpoint (``mobilenet0.25_Final.pth``) was trained with LeakyReLU(0.1), the
older ``Final_Retinaface.pth`` with plain ReLU (``leaky=0.0``). ``leaky=None`` picks it for these two known
weights by the digest of their tensors (names, shapes, values), so a re-saved copy (another pickle, a ``module.``
prefix, a ``{"state_dict": ...}`` wrapper) is recognised too; for other weights (fine-tuned ones) it must be given:
``leaky=0.1`` in Python, ``--detector-option leaky=0.1`` on the command line.

Anchors: per level ``step`` in (8, 16, 32) and sizes ((16, 32), (64, 128), (256, 512)) square anchors
centred at ((j + 0.5) * step, (i + 0.5) * step); decoding with variances (0.1, 0.2) as in SSD.
Input: BGR minus (104, 117, 123), unscaled. :class:`RetinaFaceDetector` takes RGB and converts inside.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from facesphere.detect.base import DETECTORS, Candidates, Detector, DetectorWeightsError

logger = logging.getLogger(__name__)

MIN_SIZES = ((16, 32), (64, 128), (256, 512))
STEPS = (8, 16, 32)
VARIANCES = (0.1, 0.2)
MEAN_BGR = (104.0, 117.0, 123.0)

KNOWN_WEIGHTS = {
    # biubug6 release mobilenet0.25_Final.pth: LeakyReLU(0.1)
    "d2900a6815d385a09e0a65611c42edbcb2f6092e8e4776b0629e8eeb97f44263": 0.1,
    # biubug6 first commit Final_Retinaface.pth: ReLU
    "87ee7ed927ec34c27f732f147c429582fe0939361849f1316e38730e72adc78e": 0.0,
}
"""``facesphere.models.runs.state_sha256`` of a known public state_dict -> the activation's negative slope it was
trained with."""


def _act(leaky: float) -> nn.Module:
    return nn.LeakyReLU(leaky, inplace=True) if leaky > 0 else nn.ReLU(inplace=True)


def conv_bn(cin: int, cout: int, kernel: int = 3, stride: int = 1, leaky: float | None = 0.0,
            groups: int = 1) -> nn.Sequential:
    """Conv (no bias) + BN (+ activation unless ``leaky`` is None): keys ``.0`` conv, ``.1`` BN."""
    layers = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    if leaky is not None:
        layers.append(_act(leaky))
    return nn.Sequential(*layers)


def conv_dw(cin: int, cout: int, stride: int, leaky: float) -> nn.Sequential:
    """Depthwise-separable block: 3x3 depthwise + BN + act (keys .0-.2), 1x1 pointwise + BN + act (.3-.5)."""
    return nn.Sequential(*conv_bn(cin, cin, 3, stride, leaky, groups=cin), *conv_bn(cin, cout, 1, 1, leaky))


class MobileNetV1x025(nn.Module):
    """MobileNetV1 at width 0.25 cut into three stages with outputs at strides 8, 16 and 32."""

    channels = (64, 128, 256)

    def __init__(self, leaky: float) -> None:
        super().__init__()
        self.stage1 = nn.Sequential(conv_bn(3, 8, 3, 2, leaky), conv_dw(8, 16, 1, leaky), conv_dw(16, 32, 2, leaky),
                                    conv_dw(32, 32, 1, leaky), conv_dw(32, 64, 2, leaky), conv_dw(64, 64, 1, leaky))
        self.stage2 = nn.Sequential(conv_dw(64, 128, 2, leaky), *(conv_dw(128, 128, 1, leaky) for _ in range(5)))
        self.stage3 = nn.Sequential(conv_dw(128, 256, 2, leaky), conv_dw(256, 256, 1, leaky))

    def forward(self, x: Tensor) -> list[Tensor]:
        c1 = self.stage1(x)
        c2 = self.stage2(c1)
        return [c1, c2, self.stage3(c2)]


class FPN(nn.Module):
    """Feature pyramid: lateral 1x1 convs, top-down nearest upsampling and 3x3 merge convs."""

    def __init__(self, in_channels: tuple[int, ...], out_channels: int, leaky: float) -> None:
        super().__init__()
        self.output1 = conv_bn(in_channels[0], out_channels, 1, 1, leaky)
        self.output2 = conv_bn(in_channels[1], out_channels, 1, 1, leaky)
        self.output3 = conv_bn(in_channels[2], out_channels, 1, 1, leaky)
        self.merge1 = conv_bn(out_channels, out_channels, 3, 1, leaky)
        self.merge2 = conv_bn(out_channels, out_channels, 3, 1, leaky)

    def forward(self, features: list[Tensor]) -> list[Tensor]:
        p1, p2, p3 = self.output1(features[0]), self.output2(features[1]), self.output3(features[2])
        p2 = self.merge2(p2 + F.interpolate(p3, size=p2.shape[-2:], mode="nearest"))
        p1 = self.merge1(p1 + F.interpolate(p2, size=p1.shape[-2:], mode="nearest"))
        return [p1, p2, p3]


class SSH(nn.Module):
    """Context module: 3x3, "5x5" (two 3x3) and "7x7" (three 3x3, sharing the first) branches, concat, ReLU."""

    def __init__(self, channels: int, leaky: float) -> None:
        super().__init__()
        if channels % 4:
            raise ValueError(f"SSH channels must be a multiple of 4, got {channels}")
        quarter = channels // 4
        self.conv3X3 = conv_bn(channels, channels // 2, 3, 1, None)
        self.conv5X5_1 = conv_bn(channels, quarter, 3, 1, leaky)
        self.conv5X5_2 = conv_bn(quarter, quarter, 3, 1, None)
        self.conv7X7_2 = conv_bn(quarter, quarter, 3, 1, leaky)
        self.conv7x7_3 = conv_bn(quarter, quarter, 3, 1, None)

    def forward(self, x: Tensor) -> Tensor:
        branch5 = self.conv5X5_1(x)
        out = torch.cat([self.conv3X3(x), self.conv5X5_2(branch5), self.conv7x7_3(self.conv7X7_2(branch5))], dim=1)
        return F.relu(out)


class _Head(nn.Module):
    """A 1x1 conv predicting ``per_anchor`` numbers for each of ``anchors`` anchors per location."""

    def __init__(self, channels: int, anchors: int, per_anchor: int) -> None:
        super().__init__()
        self.per_anchor = per_anchor
        self.conv1x1 = nn.Conv2d(channels, anchors * per_anchor, 1)

    def forward(self, x: Tensor) -> Tensor:
        # (N, A*k, H, W) -> (N, H*W*A, k): anchors vary fastest, then columns, then rows.
        return self.conv1x1(x).permute(0, 2, 3, 1).reshape(x.shape[0], -1, self.per_anchor)


class RetinaFaceMobileNet(nn.Module):
    """The network: BGR-minus-mean batch (N, 3, H, W) -> loc (N, A, 4), face logits (N, A, 2), landmarks (N, A, 10)."""

    def __init__(self, leaky: float = 0.1, channels: int = 64, anchors: int = 2) -> None:
        super().__init__()
        self.leaky = leaky
        self.body = MobileNetV1x025(leaky)
        # The public port uses LeakyReLU in FPN and SSH only when out_channels <= 64, which holds here.
        neck_leaky = leaky if channels <= 64 else 0.0
        self.fpn = FPN(MobileNetV1x025.channels, channels, neck_leaky)
        self.ssh1, self.ssh2, self.ssh3 = (SSH(channels, neck_leaky) for _ in range(3))
        self.ClassHead = nn.ModuleList(_Head(channels, anchors, 2) for _ in STEPS)
        self.BboxHead = nn.ModuleList(_Head(channels, anchors, 4) for _ in STEPS)
        self.LandmarkHead = nn.ModuleList(_Head(channels, anchors, 10) for _ in STEPS)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        levels = self.fpn(self.body(x))
        levels = [self.ssh1(levels[0]), self.ssh2(levels[1]), self.ssh3(levels[2])]
        loc = torch.cat([head(f) for head, f in zip(self.BboxHead, levels)], dim=1)
        logits = torch.cat([head(f) for head, f in zip(self.ClassHead, levels)], dim=1)
        landmarks = torch.cat([head(f) for head, f in zip(self.LandmarkHead, levels)], dim=1)
        return loc, logits, landmarks


def prior_boxes(height: int, width: int, device: torch.device | str = "cpu") -> Tensor:
    """Anchors (A, 4) as centre x, centre y, width, height in pixels of a ``height`` x ``width`` input.

    Order matches the heads' output: level, row, column, anchor size.
    """
    out = []
    for step, sizes in zip(STEPS, MIN_SIZES):
        rows, cols = math.ceil(height / step), math.ceil(width / step)
        ys = (torch.arange(rows, device=device, dtype=torch.float32) + 0.5) * step
        xs = (torch.arange(cols, device=device, dtype=torch.float32) + 0.5) * step
        cy, cx = torch.meshgrid(ys, xs, indexing="ij")
        centres = torch.stack([cx, cy], dim=-1)[:, :, None, :].expand(rows, cols, len(sizes), 2)
        wh = torch.tensor(sizes, device=device, dtype=torch.float32)[None, None, :, None].expand(rows, cols, len(sizes), 2)
        out.append(torch.cat([centres, wh], dim=-1).reshape(-1, 4))
    return torch.cat(out)


def decode(loc: Tensor, landmarks: Tensor, priors: Tensor) -> tuple[Tensor, Tensor]:
    """SSD-style decoding: boxes (..., 4) x1, y1, x2, y2 and landmarks (..., 5, 2), in the priors' pixels."""
    centre, size = priors[..., :2], priors[..., 2:]
    box_centre = centre + loc[..., :2] * VARIANCES[0] * size
    box_size = size * torch.exp(loc[..., 2:] * VARIANCES[1])
    boxes = torch.cat([box_centre - box_size / 2, box_centre + box_size / 2], dim=-1)
    points = centre.unsqueeze(-2) + landmarks.reshape(*landmarks.shape[:-1], 5, 2) * VARIANCES[0] * size.unsqueeze(-2)
    return boxes, points


def load_retinaface_state(path: str | os.PathLike) -> dict[str, Tensor]:
    """The state_dict in ``path`` (``torch.load(weights_only=True)``), without a DataParallel ``module.`` prefix."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"RetinaFace weights {path} do not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # unpickling refusals and corrupt archives alike
        raise DetectorWeightsError(f"{path}: not a PyTorch state_dict loadable with weights_only=True ({error})") from error
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise DetectorWeightsError(f"{path}: expected a state_dict of tensors, got {type(state).__name__}")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def leaky_for(state: dict[str, Tensor]) -> float | None:
    """The LeakyReLU slope the known public RetinaFace weights ``state`` were trained with, or None when unknown."""
    from facesphere.models.runs import state_sha256

    return KNOWN_WEIGHTS.get(state_sha256(state))


def load_retinaface(path: str | os.PathLike, leaky: float | None = None) -> RetinaFaceMobileNet:
    """A :class:`RetinaFaceMobileNet` in eval mode with the weights of ``path``, every key checked.

    ``leaky=None`` takes the slope of known public weights (:data:`KNOWN_WEIGHTS`, re-saved copies included);
    for any other weights it must be given (0.1 for checkpoints of the current biubug6 code, 0.0 for its first
    release): the activation is not stored in the file.
    """
    from facesphere.models.store import WeightMismatch, check_state_dict

    state = load_retinaface_state(path)
    if leaky is None:
        leaky = leaky_for(state)
        if leaky is None:
            raise DetectorWeightsError(
                f"{path}: not one of the known public RetinaFace weights (e.g. fine-tuned), so the activation it was "
                "trained with is unknown; give it: --detector-option leaky=0.1 (LeakyReLU, checkpoints of the "
                "current biubug6 code) or leaky=0.0 (ReLU, its first release); in Python RetinaFaceDetector(..., "
                "leaky=0.1)")
        logger.info("%s: known weights, activation %s", Path(path).name, f"LeakyReLU({leaky})" if leaky else "ReLU")
    model = RetinaFaceMobileNet(leaky=float(leaky))
    try:
        check_state_dict(model, state, f"{path} does not fit RetinaFace MobileNet-0.25")
    except WeightMismatch as error:
        raise DetectorWeightsError(str(error)) from error
    model.load_state_dict(state, strict=True)
    return model.eval()


@DETECTORS.register("retinaface", "retinaface_mnet025")
class RetinaFaceDetector(Detector):
    """RetinaFace MobileNet-0.25 on ``device`` (CPU or CUDA); see :class:`~facesphere.detect.base.Detector` options.

    ``leaky``: activation slope (None: known files only, see :func:`load_retinaface`). Default canvas
    640x640 letterbox; ``input_size=None`` runs photos at their own size, as the published WIDER FACE
    figures were measured.
    """

    default_score_threshold = 0.5
    default_nms_threshold = 0.4
    fill_rgb = (123, 117, 104)  # the mean colour: zero after mean subtraction

    def __init__(self, weights_path: str | os.PathLike, *, leaky: float | None = None,
                 device: torch.device | str = "cpu", **options) -> None:
        super().__init__(**options)
        self.device = torch.device(device)
        self.model = load_retinaface(weights_path, leaky).to(self.device)
        self._mean = torch.tensor(MEAN_BGR, device=self.device).view(1, 3, 1, 1)
        self._priors: dict[tuple[int, int], Tensor] = {}

    def priors(self, height: int, width: int) -> Tensor:
        key = (height, width)
        if key not in self._priors:
            self._priors[key] = prior_boxes(height, width, self.device)
        return self._priors[key]

    @torch.inference_mode()
    def _predict(self, canvases: np.ndarray, score_threshold: float) -> list[Candidates]:
        x = torch.from_numpy(canvases).to(self.device).permute(0, 3, 1, 2).flip(1).float() - self._mean
        loc, logits, landmarks = self.model(x)
        priors = self.priors(*canvases.shape[1:3])
        if priors.shape[0] != loc.shape[1]:
            raise RuntimeError(f"RetinaFace: {loc.shape[1]} predictions but {priors.shape[0]} anchors")
        scores = logits.softmax(dim=-1)[..., 1]
        out = []
        for i in range(len(canvases)):
            keep = (scores[i] >= score_threshold).nonzero().squeeze(1)
            if keep.numel() > self.pre_nms_top_k:
                keep = keep[scores[i, keep].topk(self.pre_nms_top_k).indices]
            boxes, points = decode(loc[i, keep], landmarks[i, keep], priors[keep])
            out.append((boxes.cpu().numpy(), scores[i, keep].cpu().numpy(), points.cpu().numpy()))
        return out

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", leaky={self.model.leaky}, device={self.device})"
