"""GridFace rectification (Zhou et al., "GridFace", arXiv 1808.06210): a grid of local homographies.

A small localisation CNN looks at the face and predicts one homography per cell of an n x n grid
over the output image; every output pixel is sampled from the input through its own cell's
homography, so a misaligned crop is rectified piecewise before recognition (the rectification
module of the paper, its Fig. 2). Neighbouring cells are tied by a corner-continuity loss so the
pieces meet. n = 1 is one global homography, the plain spatial transformer (STN) baseline. The
layer sizes, the parametrisation and the continuity loss follow Megvii's simplified GridSTN
(their MegEngine reference design of the paper), since the paper's own code is not public.

Conventions (shared with the rest of the toolkit):

- Homographies are (N, n*n, 3, 3) in PIXEL coordinates (x right, y down, pixel centres at the
  integers 0..W-1) and map an OUTPUT pixel (x, y, 1) to the INPUT pixel it samples. Cell
  k = row * n + col.
- The continuous image [-0.5, W-0.5] x [-0.5, H-0.5] is split evenly into n x n cells (boundaries at
  c * W / n - 0.5); a pixel belongs to the cell holding its centre. When W is divisible by n this is
  cell (r, c) = output x in [c*W/n, (c+1)*W/n); otherwise the cells are floor/ceil(W/n) pixels wide.
- Parametrisation (GridSTN): S = diag(W, H, 1) (normalised -> pixel units) and B_k the translation
  by the cell's offset (c/n, r/n) in normalised units. GridSTN maps a cell's LOCAL pixel q (origin at
  the cell's first pixel) by S (B_k + 0.01 Δ_k) S^-1; a global output pixel is q = T_k^-1 p with
  T_k = S B_k S^-1, so H_k = S (B_k + 0.01 Δ_k) S^-1 T_k^-1 = I + 0.01 S Δ_k S^-1 T_k^-1. The last
  form is what is computed, so Δ = 0 (the zero-initialised last layer) is exactly the identity on the
  whole image, and the 0.01 keeps early steps small (one unit of Δ moves a point by ~W/100 px).

Warping is one sampling grid built with kornia point transforms and one ``grid_sample`` (bilinear,
``align_corners=True``, zero padding, i.e. grey in the normalised input ``(x - 127.5) / 128``).
"""

from __future__ import annotations

import logging
from functools import lru_cache

import torch
import torch.nn.functional as F
from kornia.geometry.conversions import normalize_pixel_coordinates
from kornia.geometry.linalg import transform_points
from torch import Tensor, nn

from facesphere.backbones.base import BACKBONES, Backbone
from facesphere.backbones.fuse import ConvBN, check_input

logger = logging.getLogger(__name__)

STEP = 0.01
"""Scale of the localiser's raw outputs Δ in H_k = S (B_k + STEP Δ_k) S^-1 T_k^-1 (GridSTN)."""

AREA_RATIO = 16.0
"""A cell whose projected area changes by more than this factor (either way) counts as degenerate."""


class RectifierDiverged(ValueError):
    """The localiser produced non-finite homographies during training (a diverged run)."""


# ----------------------------------------------------------------------------------------------
# Cell geometry


def _boundaries(length: int, grid: int) -> list[float]:
    """Cell boundaries along one axis in pixel coordinates: c * length / grid - 0.5, c = 0..grid."""
    return [c * length / grid - 0.5 for c in range(grid + 1)]


def _check_grid(grid: int, size: tuple[int, int]) -> None:
    if grid < 1 or min(size) < grid:
        raise ValueError(f"rectifier grid must be 1..{min(size)} for {size[0]}x{size[1]} images, got {grid}")


def cell_frames(grid: int, size: tuple[int, int], device=None, dtype=torch.float32) -> tuple[Tensor, Tensor]:
    """(L (3, 3), R (n*n, 3, 3)) with H_k = I + STEP * L Δ_k R_k: L = S, R_k = S^-1 T_k^-1 (module docstring)."""
    height, width = size
    scale = torch.diag(torch.tensor([width, height, 1.0], dtype=torch.float64))
    inverse = torch.diag(torch.tensor([1.0 / width, 1.0 / height, 1.0], dtype=torch.float64))  # no inv op to export
    right = torch.zeros(grid * grid, 3, 3, dtype=torch.float64)
    for r in range(grid):
        for c in range(grid):
            to_local = torch.tensor([[1, 0, -c * width / grid], [0, 1, -r * height / grid], [0, 0, 1]],
                                    dtype=torch.float64)  # T_k^-1: global output pixel -> the cell's local pixel
            right[r * grid + c] = inverse @ to_local
    return scale.to(device, dtype), right.to(device, dtype)


def cell_corners(grid: int, size: tuple[int, int], device=None, dtype=torch.float32) -> Tensor:
    """Each cell's corners (n*n, 4, 2) in output pixels, ordered top-left, top-right, bottom-right, bottom-left."""
    height, width = size
    xs, ys = _boundaries(width, grid), _boundaries(height, grid)
    corners = [[(xs[c], ys[r]), (xs[c + 1], ys[r]), (xs[c + 1], ys[r + 1]), (xs[c], ys[r + 1])]
               for r in range(grid) for c in range(grid)]
    return torch.tensor(corners, device=device, dtype=dtype)


def homographies_from_deltas(deltas: Tensor, grid: int, size: tuple[int, int]) -> Tensor:
    """H_k = I + STEP * S Δ_k S^-1 T_k^-1 for raw outputs ``deltas`` (N, n*n, 3, 3); exact identity at Δ = 0."""
    left, right = cell_frames(grid, size, deltas.device, deltas.dtype)
    eye = torch.eye(3, device=deltas.device, dtype=deltas.dtype)
    return eye + STEP * (left @ deltas @ right)


@lru_cache(maxsize=64)
@torch.inference_mode(False)  # cached tensors must stay usable by autograd even if first built under inference
def _pixel_layout(grid: int, size: tuple[int, int], device: torch.device, dtype: torch.dtype
                  ) -> tuple[Tensor, Tensor]:
    """Per-cell pixel coordinates padded to equal blocks, and the index putting them back in image order.

    Returns ``points`` (n*n, Ly*Lx, 2) float (x, y) with Ly, Lx the largest cell height/width (smaller
    cells repeat their last row/column), and ``order`` (H*W,) long: flat index into (n*n * Ly*Lx) of
    every output pixel in row-major image order. Cached per device and dtype: built once, not per batch.
    """
    height, width = size

    def axis(length: int):
        cell = torch.clamp(((torch.arange(length) + 0.5) * grid / length).floor().long(), max=grid - 1)
        start = torch.tensor([int((cell < c).sum()) for c in range(grid)])
        count = torch.bincount(cell, minlength=grid)
        span = int(count.max())
        slot = torch.arange(span)
        coords = (start[:, None] + torch.minimum(slot[None, :], count[:, None] - 1)).double()  # (n, span)
        return cell, torch.arange(length) - start[cell], coords, span

    row, iy, ycoords, ly = axis(height)
    col, ix, xcoords, lx = axis(width)
    px = xcoords[None, :, None, :].expand(grid, grid, ly, lx)
    py = ycoords[:, None, :, None].expand(grid, grid, ly, lx)
    points = torch.stack([px, py], dim=-1).reshape(grid * grid, ly * lx, 2)
    cell = row[:, None] * grid + col[None, :]
    order = (cell * ly + iy[:, None]) * lx + ix[None, :]
    return points.to(device, dtype), order.reshape(-1).to(device)


# ----------------------------------------------------------------------------------------------
# Warping, continuity, degeneracy


def warp_cells(images: Tensor, homographies: Tensor, grid: int,
               layout: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """Rectify ``images`` (N, C, H, W): each output pixel sampled through its own cell's homography.

    ``homographies`` is (N, n*n, 3, 3) (output pixel -> input pixel). One sampling grid (N, H, W, 2)
    is built with kornia's ``transform_points`` on every cell's pixels at once, then one bilinear
    ``grid_sample`` (``align_corners=True``: pixel centres at -1 and 1, zero padding). The grid math
    runs in float32 (float64 stays float64) even under autocast; the result has the input's dtype
    and memory format. Differentiable in both arguments. ``layout``: the ``(points, order)`` of this grid
    and size, precomputed (a :class:`Rectifier` keeps them as buffers, so an exported graph holds them as
    constants); default: built once per grid, size, device and dtype.
    """
    n_img, _, height, width = images.shape
    _check_grid(grid, (height, width))
    if homographies.shape != (n_img, grid * grid, 3, 3):
        raise ValueError(f"expected homographies of shape ({n_img}, {grid * grid}, 3, 3), "
                         f"got {tuple(homographies.shape)}")
    dtype = torch.float64 if images.dtype == torch.float64 else torch.float32
    points, order = layout or _pixel_layout(grid, (height, width), images.device, dtype)
    with torch.autocast(images.device.type, enabled=False):
        hom = homographies.to(dtype).reshape(n_img * grid * grid, 3, 3)
        pts = points.repeat(n_img, 1, 1)  # (N*n*n, Ly*Lx, 2)
        mapped = transform_points(hom, pts).reshape(n_img, -1, 2)
        mapped = mapped[:, order].reshape(n_img, height, width, 2)
        sampling = normalize_pixel_coordinates(mapped, height, width)
        out = F.grid_sample(images.to(dtype), sampling, mode="bilinear", padding_mode="zeros", align_corners=True)
    if images.is_contiguous(memory_format=torch.channels_last) and not images.is_contiguous():
        out = out.contiguous(memory_format=torch.channels_last)
    return out.to(images.dtype)


def _project(homographies: Tensor, points: Tensor) -> Tensor:
    """Homogeneous images (N, K, P, 3) of points (K, P, 2) under (N, K, 3, 3)."""
    ones = torch.ones_like(points[..., :1])
    return torch.einsum("nkij,kpj->nkpi", homographies, torch.cat([points, ones], dim=-1))


@lru_cache(maxsize=32)
@torch.inference_mode(False)
def _shared_corners(grid: int) -> tuple[Tensor, Tensor]:
    """Pairs of (cell * 4 + corner) indices naming the same grid vertex in two neighbouring cells.

    Right neighbours share two corners, down neighbours two, both diagonals one (as in GridSTN).
    """
    tl, tr, br, bl = range(4)
    a, b = [], []

    def pair(cell_a, corner_a, cell_b, corner_b):
        a.append(cell_a * 4 + corner_a)
        b.append(cell_b * 4 + corner_b)

    for r in range(grid):
        for c in range(grid):
            k = r * grid + c
            if c + 1 < grid:
                pair(k, tr, k + 1, tl)
                pair(k, br, k + 1, bl)
            if r + 1 < grid:
                pair(k, bl, k + grid, tl)
                pair(k, br, k + grid, tr)
            if r + 1 < grid and c + 1 < grid:
                pair(k, br, k + grid + 1, tl)
                pair(k + 1, bl, k + grid, tr)
    return torch.tensor(a, dtype=torch.long), torch.tensor(b, dtype=torch.long)


def continuity_loss(homographies: Tensor, grid: int, size: tuple[int, int]) -> Tensor:
    """Per-sample corner disagreement of neighbouring cells (N,): GridSTN's continuity loss (arXiv 1808.06210).

    Every grid vertex shared by two cells (right, down and diagonal neighbours) is projected by both
    cells' homographies; the difference, divided by the image size (W for x, H for y), is squared and
    averaged over shared corners and both coordinates. Zero for any global homography replicated to all
    cells; zero for n = 1 (no neighbours).
    """
    n_img = homographies.shape[0]
    height, width = size
    _check_grid(grid, size)
    if grid == 1:
        return homographies.new_zeros(n_img)
    with torch.autocast(homographies.device.type, enabled=False):
        hom = homographies if homographies.dtype == torch.float64 else homographies.float()
        corners = cell_corners(grid, size, hom.device, hom.dtype)
        xyw = _project(hom, corners).reshape(n_img, grid * grid * 4, 3)
        xy = xyw[..., :2] / xyw[..., 2:]
        a, b = (idx.to(hom.device) for idx in _shared_corners(grid))
        scale = torch.tensor([width, height], device=hom.device, dtype=hom.dtype)
        diff = (xy[:, a] - xy[:, b]) / scale
        return diff.square().mean(dim=(1, 2))


def geometry_error(homographies: Tensor, target: Tensor, grid: int, size: tuple[int, int]) -> Tensor:
    """Per-sample disagreement (N,) of the cells' homographies with a known rectifying homography ``target`` (N, 3, 3).

    Every cell's four corners are projected by its own homography and by ``target``; the difference, divided by
    the image size (W for x, H for y), is squared and averaged over corners and coordinates. With synthetic
    misalignment the target is known exactly (the ``misalignment`` target), so this supervises the geometry
    directly: a warm start for a rectifier before it learns from the recogniser.
    """
    n_img = homographies.shape[0]
    height, width = size
    _check_grid(grid, size)
    if target.shape != (n_img, 3, 3):
        raise ValueError(f"expected target homographies of shape ({n_img}, 3, 3), got {tuple(target.shape)}")
    with torch.autocast(homographies.device.type, enabled=False):
        hom = homographies if homographies.dtype == torch.float64 else homographies.float()
        corners = cell_corners(grid, size, hom.device, hom.dtype)
        ours = _project(hom, corners)
        theirs = _project(target.to(hom.dtype)[:, None].expand_as(hom), corners)
        diff = ours[..., :2] / ours[..., 2:] - theirs[..., :2] / theirs[..., 2:]
        scale = torch.tensor([width, height], device=hom.device, dtype=hom.dtype)
        return (diff / scale).square().mean(dim=(1, 2, 3))


def degenerate_cells(homographies: Tensor, grid: int, size: tuple[int, int]) -> Tensor:
    """(N, n*n) bool: cells whose homography cannot give a usable rectification.

    A cell is degenerate when its homography has a non-finite entry, maps any of its corners behind the
    camera (w <= 0), folds (the projected corner quad is not convex with the identity's orientation:
    the signed areas of the four corner triangles are not all positive), or changes the cell's area by
    more than ``AREA_RATIO`` either way.
    """
    n_img = homographies.shape[0]
    _check_grid(grid, size)
    with torch.no_grad(), torch.autocast(homographies.device.type, enabled=False):
        hom = homographies.double().reshape(n_img, grid * grid, 3, 3)
        corners = cell_corners(grid, size, hom.device, hom.dtype)
        xyw = _project(hom, corners)  # (N, K, 4, 3)
        w = xyw[..., 2]
        xy = xyw[..., :2] / w.unsqueeze(-1)
        nxt, prv = xy.roll(-1, dims=2), xy.roll(1, dims=2)
        u, v = nxt - xy, prv - xy
        turns = u[..., 0] * v[..., 1] - u[..., 1] * v[..., 0]  # > 0 at every corner for the identity
        area = 0.5 * (xy[..., 0] * nxt[..., 1] - nxt[..., 0] * xy[..., 1]).sum(-1)
        x0, y0 = corners[:, 0, 0], corners[:, 0, 1]
        x2, y2 = corners[:, 2, 0], corners[:, 2, 1]
        ratio = area / ((x2 - x0) * (y2 - y0))
        bad = ~torch.isfinite(hom).all(dim=(-2, -1))
        bad |= ~torch.isfinite(xy).all(dim=(-2, -1))
        bad |= (w <= 0).any(-1)
        bad |= (turns <= 0).any(-1)
        bad |= ~((ratio >= 1 / AREA_RATIO) & (ratio <= AREA_RATIO))
    return bad


# ----------------------------------------------------------------------------------------------
# Localiser and rectifier


class BasicBlock(nn.Module):
    """ResNet basic block: conv3x3 (stride s) -> BN -> ReLU -> conv3x3 -> BN, plus a 1x1 projection skip."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.body = nn.Sequential(ConvBN(in_channels, out_channels, 3, stride, 1), nn.ReLU(inplace=True),
                                  ConvBN(out_channels, out_channels, 3, 1, 1))
        self.skip = (nn.Identity() if stride == 1 and in_channels == out_channels
                     else ConvBN(in_channels, out_channels, 1, stride))

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.body(x) + self.skip(x))


class Localiser(nn.Sequential):
    """The localisation CNN of Megvii's GridSTN (arXiv 1808.06210's rectification net): image -> Δ (N, 9 n^2).

    conv3x3 3->8 stride 2 + BN + ReLU -> maxpool 2 -> basic blocks 8->16, 16->32 (s2), 32->64 (s2) ->
    global average pool -> FC 64 -> ReLU -> FC 9 n^2. The last FC is zero-initialised, so every cell
    starts at the identity. Global pooling makes it work at any input size.
    """

    def __init__(self, grid: int) -> None:
        super().__init__(
            ConvBN(3, 8, 3, 2, 1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            BasicBlock(8, 16), BasicBlock(16, 32, 2), BasicBlock(32, 64, 2),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 64), nn.ReLU(inplace=True),
            nn.Linear(64, 9 * grid * grid),
        )
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    @property
    def head(self) -> nn.Linear:
        """The last, zero-initialised layer (its bias sets the homographies of a constant input)."""
        return self[-1]


class Rectifier(nn.Module):
    """Localiser + per-cell warp: images (N, 3, H, W) -> (rectified (N, 3, H, W), homographies (N, n*n, 3, 3))."""

    def __init__(self, input_size: tuple[int, int] = (112, 112), grid: int = 4) -> None:
        super().__init__()
        self.input_size = tuple(int(s) for s in input_size)
        self.grid = int(grid)
        _check_grid(self.grid, self.input_size)
        self.localiser = Localiser(self.grid)
        points, order = _pixel_layout(self.grid, self.input_size, torch.device("cpu"), torch.float64)
        self.register_buffer("layout_points", points.clone(), persistent=False)  # follows .to(device)
        self.register_buffer("layout_order", order.clone(), persistent=False)

    def homographies(self, images: Tensor) -> Tensor:
        """The predicted cell homographies (N, n*n, 3, 3), float32 (float64 for float64 input)."""
        deltas = self.localiser(images)
        dtype = torch.float64 if deltas.dtype == torch.float64 else torch.float32
        with torch.autocast(images.device.type, enabled=False):
            deltas = deltas.to(dtype).reshape(-1, self.grid * self.grid, 3, 3)
            return homographies_from_deltas(deltas, self.grid, self.input_size)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        homographies = self.homographies(images)
        points = self.layout_points.to(homographies.dtype)
        return warp_cells(images, homographies, self.grid, (points, self.layout_order)), homographies


# ----------------------------------------------------------------------------------------------
# Rectifier + recogniser as one backbone


@BACKBONES.register("gridface")
class GridFace(Backbone):
    """A rectifier in front of any registered recogniser, trained end to end (arXiv 1808.06210): images -> dict.

    ``forward`` returns ``{"embedding", "rectified", "homographies", "degenerate"}`` in train and eval
    mode. Training: non-finite homographies raise :class:`RectifierDiverged`. Eval: a sample with any
    degenerate cell (:func:`degenerate_cells`) is passed through un-rectified (its homographies become
    the identity and ``degenerate`` is True), with a logged warning, rather than embedding a garbage crop.
    ``freeze_recognizer`` fixes the recogniser (no gradients, BN statistics frozen: always in eval mode).
    """

    # ``recognizer_args`` defaults to {} (never mutated), not None, so that a config that omits it and a card that
    # records it empty resolve to the same arguments.
    def __init__(self, recognizer: str = "mobilefacenet", recognizer_args: dict = {},  # noqa: B006
                 grid: int = 4, freeze_recognizer: bool = False) -> None:
        super().__init__()
        self.recognizer: Backbone = BACKBONES.build(recognizer, **dict(recognizer_args))
        self.input_size = tuple(self.recognizer.input_size)
        self.embedding_size = self.recognizer.embedding_size
        self.grid = int(grid)
        self.rectifier = Rectifier(self.input_size, self.grid)
        self.freeze_recognizer = bool(freeze_recognizer)
        if self.freeze_recognizer:
            self.recognizer.requires_grad_(False)
            self.recognizer.eval()

    def train(self, mode: bool = True) -> GridFace:
        super().train(mode)
        if self.freeze_recognizer:
            self.recognizer.eval()
        return self

    def card_fields(self) -> dict:
        """What a model card records so the recogniser is always served behind this rectifier."""
        return {"rectifier": {"kind": "local_homographies", "grid": self.grid}}

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        check_input(images, self.input_size, type(self).__name__)
        rectified, homographies = self.rectifier(images)
        if self.training:
            bad = ~torch.isfinite(homographies).all(dim=(-3, -2, -1))
            if bool(bad.any()):
                raise RectifierDiverged(f"rectifier diverged: non-finite homographies for {int(bad.sum())} of "
                                        f"{images.shape[0]} images")
            degenerate = torch.zeros(images.shape[0], dtype=torch.bool, device=images.device)
        else:  # branch-free, so an exported graph (ONNX) keeps the fallback; only the warning needs eager mode
            degenerate = degenerate_cells(homographies, self.grid, self.input_size).any(dim=1)
            keep = degenerate[:, None, None, None]
            rectified = torch.where(keep, images.to(rectified.dtype), rectified)
            eye = torch.eye(3, device=homographies.device, dtype=homographies.dtype)
            homographies = torch.where(keep, eye.expand_as(homographies), homographies)
            if not (torch.jit.is_tracing() or torch.compiler.is_compiling()) and bool(degenerate.any()):
                logger.warning("rectifier: %d of %d faces have degenerate cell homographies; they are embedded "
                               "un-rectified", int(degenerate.sum()), images.shape[0])
        outputs = {"rectified": rectified, "homographies": homographies, "degenerate": degenerate}
        if not self.training or self.needed_outputs is None or "embedding" in self.needed_outputs:
            outputs["embedding"] = self.recognizer(rectified)  # skipped when training the rectification alone
        return outputs


@BACKBONES.register("stn")
class GlobalSTN(GridFace):
    """The baseline: one global homography (a plain spatial transformer), i.e. GridFace with grid 1."""

    def __init__(self, recognizer: str = "mobilefacenet", recognizer_args: dict = {},  # noqa: B006
                 freeze_recognizer: bool = False) -> None:
        super().__init__(recognizer, recognizer_args, grid=1, freeze_recognizer=freeze_recognizer)


__all__ = [
    "GlobalSTN",
    "GridFace",
    "Localiser",
    "Rectifier",
    "RectifierDiverged",
    "cell_corners",
    "cell_frames",
    "continuity_loss",
    "degenerate_cells",
    "geometry_error",
    "homographies_from_deltas",
    "warp_cells",
]
