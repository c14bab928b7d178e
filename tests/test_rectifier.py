"""The GridFace rectifier core: per-cell warps, continuity loss, degeneracy, and the gridface/stn backbones."""

from __future__ import annotations

import logging

import kornia
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from facesphere.backbones import BACKBONES, build_backbone
from facesphere.backbones.rectifier import (
    STEP,
    GlobalSTN,
    GridFace,
    Rectifier,
    RectifierDiverged,
    cell_frames,
    continuity_loss,
    degenerate_cells,
    homographies_from_deltas,
    warp_cells,
)
from facesphere.evaluate.embeddings import extract_embeddings
from facesphere.models.card import ModelCard
from facesphere.models.torch_embedder import TorchEmbedder

SMALL = {"recognizer": "mobilefacenet", "recognizer_args": {"input_size": (32, 32), "embedding_size": 16}}


def _homography(seed: int, strength: float = 1.0) -> torch.Tensor:
    """A mild random homography (float64) in pixel coordinates of a ~32-112 px image."""
    g = torch.Generator().manual_seed(seed)
    r = lambda: float(torch.rand((), generator=g, dtype=torch.float64) - 0.5) * 2 * strength  # noqa: E731
    return torch.tensor([[1 + 0.1 * r(), 0.1 * r(), 3 * r()], [0.1 * r(), 1 + 0.1 * r(), 3 * r()],
                         [1e-3 * r(), 1e-3 * r(), 1.0]], dtype=torch.float64)


def _smooth_image(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """Smooth random images (sums of Gaussian blobs), so bilinear sampling has useful gradients."""
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                            indexing="ij")
    out = torch.zeros(n, 3, size, size)
    for _ in range(6):
        cx, cy = torch.rand(2, n, 1, 1, generator=g) * size
        amp = torch.randn(n, 3, 1, 1, generator=g)
        out += amp * torch.exp(-((xs - cx) ** 2 + (ys - cy) ** 2)[:, None] / (2 * (size / 6) ** 2))
    return out


# ---------------------------------------------------------------- warps


def test_identity_parametrisation_is_exact_and_warp_returns_the_input():
    """Δ = 0 gives exactly the identity homography in every cell; the warp returns the input (to float32
    rounding of the pixel normalisation), also for sizes not divisible by the grid."""
    for grid, size in [(1, (112, 112)), (4, (112, 112)), (3, (10, 13))]:
        hom = homographies_from_deltas(torch.zeros(2, grid * grid, 3, 3), grid, size)
        assert torch.equal(hom, torch.eye(3).expand_as(hom))
        x = torch.randn(2, 3, *size)
        assert torch.allclose(warp_cells(x, hom, grid), x, atol=1e-4, rtol=0)
    x = torch.randn(2, 3, 112, 112)
    rectified, hom = Rectifier((112, 112), grid=4)(x)  # zero-initialised last layer
    assert torch.equal(hom, torch.eye(3).expand(2, 16, 3, 3))
    assert torch.allclose(rectified, x, atol=1e-4, rtol=0)


@pytest.mark.parametrize("grid", [1, 4, 3])
def test_replicated_global_homography_matches_kornia_warp_perspective(grid):
    """One global homography in every cell is the plain perspective warp (kornia maps src -> dst, so it gets H^-1)."""
    x = torch.randn(2, 3, 40, 40, dtype=torch.float64)
    hom = torch.stack([_homography(1), _homography(2)])
    ours = warp_cells(x, hom[:, None].expand(2, grid * grid, 3, 3), grid)
    ref = kornia.geometry.transform.warp_perspective(x, torch.linalg.inv(hom), (40, 40), align_corners=True)
    assert torch.allclose(ours, ref, atol=1e-10)


def test_each_cell_uses_its_own_homography_brute_force():
    """Integer translations per cell on a 10x13 image with a 3x3 grid (cells 3-4 px): every output pixel equals
    the input pixel its own cell's translation names, or 0 outside (brute-force loop over pixels)."""
    grid, (h, w) = 3, (10, 13)
    rng = np.random.default_rng(0)
    shifts = rng.integers(-3, 4, size=(grid * grid, 2))
    hom = torch.eye(3, dtype=torch.float64).repeat(1, grid * grid, 1, 1)
    hom[0, :, 0, 2] = torch.from_numpy(shifts[:, 0]).double()
    hom[0, :, 1, 2] = torch.from_numpy(shifts[:, 1]).double()
    x = torch.randn(1, 2, h, w, dtype=torch.float64)
    out = warp_cells(x, hom, grid)
    for y in range(h):
        for xx in range(w):
            k = min(int((y + 0.5) * grid / h), grid - 1) * grid + min(int((xx + 0.5) * grid / w), grid - 1)
            sx, sy = xx + shifts[k, 0], y + shifts[k, 1]
            want = x[0, :, sy, sx] if 0 <= sx < w and 0 <= sy < h else torch.zeros(2, dtype=torch.float64)
            assert torch.allclose(out[0, :, y, xx], want, atol=1e-9), (y, xx)


def test_gradcheck_warp_and_continuity():
    """Analytic gradients of the warp (image and homographies) and of the continuity loss match finite differences."""
    torch.manual_seed(0)
    x = torch.randn(1, 1, 6, 6, dtype=torch.float64, requires_grad=True)
    hom = torch.stack([_homography(s, 0.1) for s in range(4)])[None]  # (1, 4, 3, 3), non-integer sampling points
    with torch.inference_mode():  # the per-size caches built here stay usable by autograd afterwards
        warp_cells(x.detach(), hom, 2), continuity_loss(hom, 2, (6, 6))
    hom.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: warp_cells(a, b, 2), (x, hom))
    assert torch.autograd.gradcheck(lambda b: continuity_loss(b, 2, (6, 6)), (hom,))
    deltas = torch.randn(1, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda d: homographies_from_deltas(d, 2, (6, 6)), (deltas,))


def test_warp_under_autocast_and_channels_last():
    """Sampling-grid math stays float32 under autocast; channels_last input gives channels_last output; a
    channels_last GridFace trains under bfloat16 autocast."""
    x = torch.randn(2, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    hom = torch.eye(3).repeat(2, 4, 1, 1)
    hom[..., 0, 2] = 0.37
    ref = warp_cells(x.contiguous(), hom, 2)
    out = warp_cells(x, hom, 2)
    assert out.is_contiguous(memory_format=torch.channels_last) and torch.allclose(out, ref)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rect = Rectifier((16, 16), 2)
        rectified, h = rect(x)
        assert h.dtype == torch.float32 and torch.allclose(warp_cells(x, hom, 2), ref)
    assert rectified.shape == x.shape
    # frozen recogniser: its BN uses running statistics (in training mode a batch of 2 normalises the gradient away)
    model = build_backbone("gridface", **SMALL, grid=2, freeze_recognizer=True).to(memory_format=torch.channels_last)
    model.rectifier.localiser.head.bias.data.normal_(0, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last))
    assert out["homographies"].dtype == torch.float32 and out["rectified"].dtype == torch.float32
    out["embedding"].float().square().sum().backward()
    assert model.rectifier.localiser.head.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------- continuity


@settings(max_examples=25)  # each example builds homographies at three grids; 25 keep it ~1 s
@given(st.integers(0, 10_000), st.sampled_from([2, 3, 4]))
def test_continuity_is_zero_for_a_global_homography_through_the_cell_parametrisation(seed, grid):
    """A global H expressed in each cell's own frame (Δ_k = L^-1 (H - I) R_k^-1 / STEP) gives cells that agree at
    every shared corner: the loss is 0 (to rounding), and the cells reproduce H."""
    size = (28, 36)
    hom = _homography(seed)
    left, right = cell_frames(grid, size, dtype=torch.float64)
    deltas = (torch.linalg.inv(left) @ (hom - torch.eye(3, dtype=torch.float64)) @ torch.linalg.inv(right) / STEP)[None]
    cells = homographies_from_deltas(deltas, grid, size)
    assert torch.allclose(cells, hom.expand_as(cells), atol=1e-10)
    assert float(continuity_loss(cells, grid, size)[0]) < 1e-20


def test_continuity_closed_form_for_one_translated_cell():
    """2x2 grid, only cell 0 translated by (tx, ty): 5 of the 10 shared corners disagree by (tx/W, ty/H), so the
    loss is 5 ((tx/W)^2 + (ty/H)^2) / (2 * 10); a second sample without the shift scores 0."""
    h, w, tx, ty = 20, 40, 3.0, -2.0
    hom = torch.eye(3, dtype=torch.float64).repeat(2, 4, 1, 1)
    hom[0, 0, 0, 2], hom[0, 0, 1, 2] = tx, ty
    loss = continuity_loss(hom, 2, (h, w))
    assert loss[0].item() == pytest.approx(((tx / w) ** 2 + (ty / h) ** 2) / 4, rel=1e-12)
    assert loss[1].item() == 0.0
    assert torch.equal(continuity_loss(hom[:, :1], 1, (h, w)), torch.zeros(2, dtype=torch.float64))


# ---------------------------------------------------------------- degeneracy


def test_degenerate_cells():
    size, grid = (32, 32), 2
    eye = torch.eye(3, dtype=torch.float64)
    hom = eye.repeat(7, 4, 1, 1)
    hom[1, 0] = torch.diag(torch.tensor([-1.0, 1.0, 1.0], dtype=torch.float64))  # mirrored: orientation flipped
    hom[2, 1] = torch.diag(torch.tensor([0.1, 0.1, 1.0], dtype=torch.float64))  # collapsed: area ratio 1/100
    hom[3, 2, 0, 0] = float("nan")  # diverged
    hom[4, 3, 2, 0] = -0.05  # the cell's far corners fall behind the camera (w <= 0)
    hom[5, 0] = torch.diag(torch.tensor([5.0, 5.0, 1.0], dtype=torch.float64))  # blown up: area ratio 25
    hom[6] = _homography(3)  # mild: fine
    bad = degenerate_cells(hom, grid, size)
    want = torch.zeros(7, 4, dtype=torch.bool)
    want[1, 0] = want[2, 1] = want[3, 2] = want[4, 3] = want[5, 0] = True
    assert torch.equal(bad, want)
    assert not degenerate_cells(homographies_from_deltas(torch.randn(3, 16, 3, 3), 4, (112, 112)), 4,
                                (112, 112)).any()


# ---------------------------------------------------------------- the backbones


def test_gridface_and_stn_are_registered_and_describe_themselves():
    model = build_backbone("gridface", **SMALL, grid=2)
    stn = BACKBONES.build("stn", **SMALL)
    assert isinstance(model, GridFace) and isinstance(stn, GlobalSTN)
    assert (model.input_size, model.embedding_size) == ((32, 32), 16)
    assert model.card_fields() == {"rectifier": {"kind": "local_homographies", "grid": 2}}
    assert stn.grid == 1 and stn.card_fields()["rectifier"]["grid"] == 1
    x = torch.randn(3, 3, 32, 32)
    for mode in (True, False):
        out = model.train(mode)(x)
        assert out["embedding"].shape == (3, 16) and out["rectified"].shape == x.shape
        assert out["homographies"].shape == (3, 4, 3, 3) and out["degenerate"].shape == (3,)
    with pytest.raises(ValueError, match="32x32"):
        model(torch.randn(1, 3, 30, 30))


def test_embedders_read_the_embedding_of_a_dict_output():
    model = build_backbone("gridface", **SMALL, grid=2).eval()
    card = ModelCard(name="g", backbone="gridface", input_size=(32, 32), colour_order="RGB", mean=(127.5,) * 3,
                     std=(128.0,) * 3, alignment="arcface_112x112", embedding_size=16, licence="test", source="test")
    batch = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    model.rectifier.localiser.head.bias.data.normal_(0, 1)  # a non-identity warp: the embedding depends on it
    with torch.no_grad():
        want = model.recognizer(model.rectifier(torch.from_numpy(batch))[0]).numpy()
    assert np.allclose(TorchEmbedder(model, card).run(batch), want, atol=1e-4)
    got = extract_embeddings(model, torch.utils.data.TensorDataset(torch.from_numpy(batch)), flip=False,
                             normalize=False, progress=False)  # the evaluation path
    assert np.allclose(got, want, atol=1e-4)


def test_training_recovers_a_known_translation():
    """Gradients reach the localiser: learning to undo a (1.5, -1) px shift of smooth images (MSE to the un-shifted
    image) through the whole GridFace forward cuts the loss four-fold in 10 Adam steps on the zero-initialised last
    layer, and from the second step on the gradient reaches the localiser's first conv."""
    torch.manual_seed(0)
    clean = _smooth_image(4, 32)
    shift = torch.eye(3).repeat(4, 1, 1, 1)
    shift[..., 0, 2], shift[..., 1, 2] = 1.5, -1.0
    shifted = warp_cells(clean, torch.linalg.inv(shift), 1)  # shifted(p) = clean(p - t)
    model = build_backbone("gridface", recognizer="sphereface4", recognizer_args=SMALL["recognizer_args"], grid=2,
                           freeze_recognizer=True).train()
    opt = torch.optim.Adam(model.rectifier.localiser.head.parameters(), lr=0.05)
    inner = slice(4, 28)  # away from the zero-padded border
    losses = []
    for _ in range(11):
        opt.zero_grad()
        loss = (model(shifted)["rectified"] - clean)[..., inner, inner].square().mean()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.25 * losses[0], losses
    assert model.rectifier.localiser[0][0].weight.grad.abs().sum() > 0


def test_freeze_recognizer_semantics():
    model = build_backbone("gridface", **SMALL, grid=2, freeze_recognizer=True)
    model.train()
    assert model.rectifier.training and not model.recognizer.training
    assert not any(p.requires_grad for p in model.recognizer.parameters())
    stats = {k: v.clone() for k, v in model.recognizer.state_dict().items()}
    model.rectifier.localiser.head.bias.data.normal_(0, 1)  # a non-identity warp, so the embedding depends on it
    out = model(torch.randn(4, 3, 32, 32))
    out["embedding"].square().sum().backward()
    after = model.recognizer.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in stats.items())  # BN running statistics untouched
    assert model.rectifier.localiser.head.weight.grad.abs().sum() > 0
    unfrozen = build_backbone("gridface", **SMALL, grid=2)
    assert unfrozen.recognizer.training and all(p.requires_grad for p in unfrozen.recognizer.parameters())


def test_eval_falls_back_to_the_input_on_degenerate_cells_and_training_refuses_nan(caplog, monkeypatch):
    model = build_backbone("gridface", **SMALL, grid=2).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        model.rectifier.localiser.head.bias[0] = -200.0  # Δ_00 of cell 0: H_00 = 1 - 2 = -1, a mirrored cell
        with caplog.at_level(logging.WARNING, logger="facesphere.backbones.rectifier"):
            out = model(x)
        assert out["degenerate"].tolist() == [True, True, True]
        assert torch.equal(out["rectified"], x)
        assert torch.equal(out["homographies"], torch.eye(3).expand(3, 4, 3, 3))
        assert torch.allclose(out["embedding"], model.recognizer(x))
        assert "3 of 3 faces" in caplog.text
        hom = torch.eye(3).repeat(2, 4, 1, 1)  # a mixed batch: sample 0 mildly shifted, sample 1 with a mirrored cell
        hom[0, :, 0, 2] = 0.5
        hom[1, 3, 0, 0] = -1.0
        monkeypatch.setattr(model.rectifier, "homographies", lambda images: hom)
        out = model(x[:2])
        assert out["degenerate"].tolist() == [False, True]
        assert torch.allclose(out["rectified"][0], warp_cells(x[:1], hom[:1], 2)[0])
        assert torch.equal(out["rectified"][1], x[1])
        assert torch.equal(out["homographies"][0], hom[0])
        assert torch.equal(out["homographies"][1], torch.eye(3).expand(4, 3, 3))
        monkeypatch.undo()
        model.rectifier.localiser.head.bias[0] = float("nan")
        model.train()
        with pytest.raises(RectifierDiverged, match="non-finite homographies for 3 of 3"):
            model(x)
