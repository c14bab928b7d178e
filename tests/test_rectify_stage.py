"""The GridFace rectifier in deployment: its card, the rectify stage, the analyser's refusals and the CLI.

A tiny gridface model (2x2 grid in front of a 32-d MobileFaceNet) is saved as a model folder; the stage on its
identity-initialised rectifier must give the crops back, a known homography must reproduce OpenCV's
``warpPerspective``, degenerate homographies must keep the aligned crop, and the CLI must draw and report.
"""

from __future__ import annotations

import json
import logging

import cv2
import numpy as np
import pytest
import torch
from conftest import require_data
from PIL import Image
from typer.testing import CliRunner

from facesphere.backbones import build_backbone
from facesphere.backbones.rectifier import warp_cells
from facesphere.models.card import ModelCard, ModelCardMismatch, training_card
from facesphere.models.rectifier import NotARectifier, load_rectifier
from facesphere.models.store import CARD_FILE, load_model, save_model
from facesphere.pipeline import FaceAnalyzer

IMAGE = "data/face_recognition_examples/examples/obama_small.jpg"
SCRFD = "weights/scrfd_500m_kps_onnx/scrfd_500m_bnkps.onnx"
GRID_ARGS = {"recognizer": "mobilefacenet", "recognizer_args": {"embedding_size": 32}, "grid": 2}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny gridface model folder and a plain MobileFaceNet one (its recogniser's kind)."""
    root = tmp_path_factory.mktemp("rectify_models")
    torch.manual_seed(0)
    gridface = build_backbone("gridface", **GRID_ARGS).eval()
    plain = build_backbone("mobilefacenet", embedding_size=32).eval()
    grid_card = training_card(gridface, "tiny-grid", "gridface", GRID_ARGS)
    plain_card = training_card(plain, "tiny-plain", "mobilefacenet", {"embedding_size": 32})
    return {"gridface": save_model(root / "gridface", gridface, grid_card),
            "plain": save_model(root / "plain", plain, plain_card)}


def _crops(count: int, seed: int = 0) -> np.ndarray:
    """Smooth random 112x112 RGB crops (low-frequency noise, so bilinear sampling differences stay small)."""
    small = np.random.default_rng(seed).integers(0, 256, (count, 14, 14, 3)).astype(np.float32)
    smooth = np.stack([cv2.resize(c, (112, 112), interpolation=cv2.INTER_CUBIC) for c in small])
    return smooth.clip(0, 255).round().astype(np.uint8)


class _Fixed(torch.nn.Module):
    """A rectifier that applies given homographies (N, n*n, 3, 3) with the real per-cell warp."""

    def __init__(self, homographies: torch.Tensor, grid: int) -> None:
        super().__init__()
        self.homographies, self.grid = homographies, grid

    def forward(self, images):
        h = self.homographies.to(images.dtype)
        return warp_cells(images, h, self.grid), h


def test_card_keeps_recognizer_args_and_rectifier_round_trip(models):
    card = load_model(models["gridface"])[1]
    assert card.rectifier is not None and card.rectifier.grid == 2 and card.rectifier.kind == "local_homographies"
    assert card.backbone_args["recognizer_args"] == {"embedding_size": 32}
    assert ModelCard.from_json(card.to_json()) == card
    assert "rectifier: 2x2 local homographies" in card.describe()
    old = json.loads((models["plain"] / CARD_FILE).read_text())
    old.pop("rectifier")  # a card written before rectifiers existed
    assert ModelCard.model_validate_json(json.dumps(old)).rectifier is None
    with pytest.raises(ValueError):  # one level of nesting only
        ModelCard.model_validate({**card.model_dump(), "backbone_args": {"a": {"b": {"c": 1}}}})


def test_a_training_run_is_a_rectifier_too(models, tmp_path):
    """A run folder's newest checkpoint gets its card from the backbone (``card_fields``): the rectifier is on it."""
    backbone = load_model(models["gridface"])[0]
    (tmp_path / "checkpoints").mkdir()
    torch.save({"config": {"name": "run", "model": {"backbone": "gridface", "backbone_args": GRID_ARGS}}, "step": 3,
                "model": {f"backbone.{k}": v for k, v in backbone.state_dict().items()}},
               tmp_path / "checkpoints" / "step_00000003.pt")
    stage = load_rectifier(tmp_path)
    assert stage.card.rectifier.grid == 2 and stage.card.backbone_args["recognizer_args"] == {"embedding_size": 32}
    crops = _crops(1)
    assert np.abs(stage.run(crops)[0].astype(int) - crops).max() <= 1


def test_identity_rectifier_returns_the_crops(models):
    stage = load_rectifier(models["gridface"])
    crops = _crops(3)
    out, produced = stage.run(crops)
    assert out.dtype == np.uint8 and out.shape == crops.shape
    assert np.abs(out.astype(int) - crops).max() <= 1
    assert produced == {"rectification": [{"status": "ok", "cells": 0}] * 3}


def test_known_homography_matches_opencv(models):
    stage = load_rectifier(models["gridface"])
    angle, scale, (tx, ty) = np.deg2rad(8.0), 1.1, (3.0, -2.0)
    centre = np.array([[1, 0, 55.5], [0, 1, 55.5], [0, 0, 1]])
    rotate = np.array([[scale * np.cos(angle), -scale * np.sin(angle), tx],
                       [scale * np.sin(angle), scale * np.cos(angle), ty], [0, 0, 1]])
    known = centre @ rotate @ np.linalg.inv(centre) @ np.array([[1, 0, 0], [0, 1, 0], [2e-4, -1e-4, 1]])
    stage.rectifier = _Fixed(torch.tensor(known).expand(2, 4, 3, 3).clone(), 2)  # the same H in every cell
    crops = _crops(2, seed=1)
    out, produced = stage.run(crops)
    assert produced["rectification"] == [{"status": "ok", "cells": 0}] * 2
    ys, xs = np.mgrid[0:112, 0:112]
    mapped = np.einsum("ij,jhw->ihw", known, np.stack([xs, ys, np.ones_like(xs)]))
    inside = ((mapped[:2] / mapped[2]) >= 1).all(0) & ((mapped[:2] / mapped[2]) <= 110).all(0)
    assert inside.mean() > 0.6
    for crop, mine in zip(crops, out):  # WARP_INVERSE_MAP: H maps output pixels to input pixels, as ours
        reference = cv2.warpPerspective(crop, known, (112, 112), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP)
        diff = np.abs(mine.astype(int) - reference)[inside]
        assert diff.max() <= 2 and diff.mean() < 0.3


def test_degenerate_faces_keep_their_crop_and_are_reported(models, caplog):
    stage = load_rectifier(models["gridface"])
    eye = torch.eye(3, dtype=torch.float64)
    mirror = torch.tensor([[-1.0, 0, 111], [0, 1, 0], [0, 0, 1]], dtype=torch.float64)  # folds: orientation flips
    homographies = eye.expand(3, 4, 3, 3).clone()
    homographies[1, 2] = mirror  # one folding cell
    homographies[2, :, 0, 0] = float("nan")  # a diverged localiser: every cell non-finite
    stage.rectifier = _Fixed(homographies, 2)
    crops = _crops(3, seed=2)
    with caplog.at_level(logging.WARNING, logger="facesphere.models.rectifier"):
        out, produced = stage.run(crops)
    assert produced["rectification"] == [{"status": "ok", "cells": 0}, {"status": "degenerate", "cells": 1},
                                         {"status": "degenerate", "cells": 4}]
    assert np.array_equal(out[1:], crops[1:])  # the aligned crops, not garbage
    assert "2 of 3 faces have degenerate homographies" in caplog.text


class _Embedder:
    def __init__(self, card: ModelCard) -> None:
        self.card = card


def test_refusals(models, tmp_path):
    stage = load_rectifier(models["gridface"])
    plain = load_model(models["plain"])[1]
    FaceAnalyzer(None, _Embedder(plain), stages=[stage])  # the same input: accepted
    other = plain.model_copy(update={"name": "bgr-model", "colour_order": "BGR"})
    with pytest.raises(ModelCardMismatch, match=r"rectifier 'tiny-grid'.*'bgr-model'.*expects BGR, got RGB"):
        FaceAnalyzer(None, _Embedder(other), stages=[stage])
    other = plain.model_copy(update={"name": "raw-model", "mean": (0.0,) * 3, "std": (1.0,) * 3})
    with pytest.raises(ModelCardMismatch, match="raw-model.*model expects raw 0-255 pixels"):
        FaceAnalyzer(None, _Embedder(other), stages=[stage])
    with pytest.raises(ModelCardMismatch, match="'tiny-grid' rectifies inside"):
        FaceAnalyzer(None, _Embedder(stage.card), stages=[stage])
    with pytest.raises(NotARectifier, match=f"{models['plain']}: not a rectifier"):
        load_rectifier(models["plain"])
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_rectifier(tmp_path / "nowhere")


def test_cli_pictures_and_detect_report(models, tmp_path):
    from facesphere.cli.main import app

    runner = CliRunner()
    base = [str(require_data(IMAGE)), "--detector", "scrfd", "--detector-weights", str(require_data(SCRFD))]
    answer = runner.invoke(app, ["rectify", *base, "--model", str(models["gridface"]), "--out", str(tmp_path / "pics")])
    assert answer.exit_code == 0, answer.output
    faces = json.loads(answer.stdout)[0]["faces"]
    assert faces and faces[0]["rectification"] == {"status": "ok", "cells": 0}
    picture = np.asarray(Image.open(faces[0]["picture"]))
    assert picture.shape == (336, 672, 3) and picture.dtype == np.uint8
    left, right = picture[:, :336].astype(int), picture[:, 336:].astype(int)
    assert (np.abs(left - right).max(axis=2) > 60).mean() > 0.01  # the grid is drawn on the left only
    answer = runner.invoke(app, ["rectify", *base, "--model", str(models["plain"]), "--rectifier",
                                 str(models["gridface"]), "--out", str(tmp_path / "pics2")])
    assert answer.exit_code == 0, answer.output
    answer = runner.invoke(app, ["detect", *base, "--rectifier", str(models["gridface"])])
    assert answer.exit_code == 0, answer.output
    faces = json.loads(answer.stdout)[0]["faces"]
    assert faces and all(f["rectification"] == {"status": "ok", "cells": 0} for f in faces)
    answer = runner.invoke(app, ["embed", *base, "--model", str(models["gridface"]), "--rectifier",
                                 str(models["gridface"])])
    assert answer.exit_code == 2 and "rectifies inside" in answer.output


def test_rest_answers_carry_the_rectification(models, tmp_path):
    from fastapi.testclient import TestClient

    from facesphere.pipeline import AnalyzerSpec
    from facesphere.service import ServiceSettings, build_app

    key = "k" * 40
    spec = AnalyzerSpec(detector="scrfd", detector_weights=require_data(SCRFD), model=models["plain"],
                        rectifier=models["gridface"])
    app = build_app(spec, tmp_path / "gallery.sqlite", ServiceSettings(api_keys=[key], max_faces=2))
    with TestClient(app, headers={"X-API-Key": key}) as client:
        photo = require_data(IMAGE).read_bytes()
        for route in ("/v1/detect", "/v1/embed"):
            answer = client.post(route, files={"image": ("face.jpg", photo, "image/jpeg")})
            assert answer.status_code == 200, answer.text
            faces = answer.json()["faces"]
            assert faces and all(f["rectification"] == {"status": "ok", "cells": 0} for f in faces), route
