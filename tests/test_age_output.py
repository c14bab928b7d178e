"""Ages as an output: the embedding norm through a card's age branch (OE-CNN, arXiv 1810.07599) for the PyTorch and
ONNX Runtime embedders, checked against the backbone run by hand; the gender/age estimator's precedence; JSON nulls
when nothing estimates an age; the REST answers and the CLI carrying them; the estimator's alignment refusal."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import require_data
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from facesphere.models.card import AgeBranch, ModelCardMismatch

SCRFD = "weights/scrfd_500m_kps_onnx/scrfd_500m_bnkps.onnx"
Y1 = "weights/mobilefacenet_insightface_y1"
GENDERAGE = "weights/genderage_insightface"
GROUP = "data/insightface_fixtures/python-package/insightface/data/images/t1.jpg"
BRANCH = AgeBranch(slope=2.5, intercept=-7.0)
KEY = "age-test-key-0123456789"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """The imported y1 as two model folders: as imported (no age branch) and with ``BRANCH`` on its card."""
    from facesphere.models import import_weights
    from facesphere.models.store import save_model

    root = tmp_path_factory.mktemp("age_models")
    backbone, card = import_weights(require_data(Y1))
    plain = save_model(root / "plain", backbone, card)
    aged = save_model(root / "aged", backbone, card.model_copy(update={"age_branch": BRANCH}))
    return {"plain": plain, "aged": aged, "backbone": backbone, "card": card}


def _by_hand(backbone, card, crops: np.ndarray, flip: bool) -> tuple[np.ndarray, np.ndarray]:
    """(unit embeddings, norms) from the backbone called directly: the views' raw outputs summed, norms averaged."""
    x = card.normalise(torch.from_numpy(crops).permute(0, 3, 1, 2))
    with torch.no_grad():
        views = [backbone(x).double()] + ([backbone(torch.flip(x, dims=[-1])).double()] if flip else [])
    summed = sum(views)
    norms = torch.stack([v.norm(dim=1) for v in views]).mean(dim=0)
    return torch.nn.functional.normalize(summed, dim=1).numpy(), norms.numpy()


@pytest.fixture(scope="module")
def crops(folders):
    from facesphere.detect import build_detector
    from facesphere.pipeline import FaceAnalyzer

    analyzer = FaceAnalyzer(build_detector("scrfd", require_data(SCRFD)), max_faces=3)
    return np.stack([f.crop for f in analyzer.analyze([require_data(GROUP)], embed=False)[0].faces])


@pytest.mark.parametrize("flip", [False, True])
def test_torch_embedder_norms_are_the_backbones_and_one_pass(folders, crops, flip):
    from facesphere.models.runs import load_embedder

    embedder = load_embedder(folders["aged"])
    assert embedder.card.age_branch == BRANCH
    calls = []
    forward = embedder._forward
    embedder._forward = lambda batch: calls.append(len(batch)) or forward(batch)
    vectors, norms = embedder.embed_with_norms(crops, flip=flip)
    assert calls == [len(crops) * (2 if flip else 1)]  # one forward pass, both views in it
    unit, expected = _by_hand(folders["backbone"], folders["card"], crops, flip)
    np.testing.assert_allclose(norms, expected, rtol=1e-5)
    np.testing.assert_allclose(vectors, unit, atol=1e-5)
    np.testing.assert_allclose(vectors, embedder.embed(crops, flip=flip), atol=1e-6)  # the same embeddings as embed()
    np.testing.assert_allclose(BRANCH.predict(norms), 2.5 * expected - 7.0, rtol=1e-6)


@pytest.mark.slow  # the ONNX export of y1 takes ~25 s on two shared cores
def test_onnx_embedder_gives_the_same_norms_and_keeps_the_branch(folders, crops, tmp_path):
    from facesphere.models.export_onnx import export_onnx
    from facesphere.models.onnx_runtime import OnnxEmbedder

    card = folders["card"].model_copy(update={"age_branch": BRANCH})
    embedder = OnnxEmbedder(export_onnx(folders["backbone"], card, tmp_path / "aged.onnx"))
    assert embedder.card.age_branch == BRANCH
    vectors, norms = embedder.embed_with_norms(crops, flip=True)
    unit, expected = _by_hand(folders["backbone"], folders["card"], crops, True)
    np.testing.assert_allclose(norms, expected, rtol=1e-4)
    np.testing.assert_allclose(vectors, unit, atol=1e-4)


@pytest.fixture(scope="module")
def analyzers(folders):
    from facesphere.pipeline import build_analyzer

    common = dict(detector="scrfd", detector_weights=require_data(SCRFD), max_faces=3, threads=1)
    return {"plain": build_analyzer(model=folders["plain"], **common),
            "aged": build_analyzer(model=folders["aged"], **common),
            "estimator": build_analyzer(model=folders["aged"], age_model=require_data(GENDERAGE), **common)}


def test_analyzer_ages_come_from_the_norm_and_are_null_without_a_branch(analyzers, folders):
    aged = analyzers["aged"].analyze([require_data(GROUP)])[0]
    crops = np.stack([f.crop for f in aged.faces])
    _, norms = _by_hand(folders["backbone"], folders["card"], crops, flip=True)  # the analyser flips by default
    assert analyzers["aged"].age_source == "norm"
    for face, norm in zip(aged.faces, norms):
        assert face.extras["age_source"] == "norm"
        assert face.extras["age"] == pytest.approx(BRANCH.slope * norm + BRANCH.intercept, rel=1e-5)
        assert json.loads(json.dumps(face.to_dict()))["age"] == pytest.approx(face.extras["age"], abs=1e-4)
    # the same faces without embedding, or with a model without an age branch: null, never a guess
    for result in (analyzers["aged"].analyze([require_data(GROUP)], embed=False)[0],
                   analyzers["plain"].analyze([require_data(GROUP)])[0]):
        assert len(result.faces) == 3
        for face in result.faces:
            out = json.loads(json.dumps(result.to_dict()))["faces"][0]
            assert out["age"] is None and out["age_source"] is None and "gender" not in out
    assert analyzers["plain"].age_source is None


def test_the_estimator_takes_precedence_over_the_norm(analyzers):
    from facesphere.models.genderage import load_genderage

    estimator = analyzers["estimator"]
    assert estimator.age_source == "genderage_insightface"
    for embed in (True, False):  # with or without embeddings: the estimator only needs the crops
        faces = estimator.analyze([require_data(GROUP)], embed=embed)[0].faces
        truth = load_genderage(require_data(GENDERAGE)).predict(np.stack([f.crop for f in faces]))
        for face, age, gender in zip(faces, truth.age, truth.gender):
            out = json.loads(json.dumps(face.to_dict()))
            assert out["age_source"] == "genderage_insightface" and out["age"] == age and out["gender"] == gender


def test_an_estimator_for_arcface_crops_refuses_another_template():
    from facesphere.detect import build_detector
    from facesphere.models.genderage import load_genderage
    from facesphere.pipeline import FaceAnalyzer

    with pytest.raises(ModelCardMismatch, match="genderage_insightface: expects faces aligned to arcface_112x112, "
                                                "but this analyser aligns them to sphereface_112x96"):
        FaceAnalyzer(build_detector("scrfd", require_data(SCRFD)), alignment="sphereface_112x96",
                     stages=[load_genderage(require_data(GENDERAGE))])


def test_rest_answers_carry_the_age(analyzers, tmp_path):
    from facesphere.gallery import Gallery, LiveGallery
    from facesphere.service import ServiceSettings, create_app

    photo = require_data(GROUP).read_bytes()
    for kind, source in (("aged", "norm"), ("plain", None), ("estimator", "genderage_insightface")):
        analyzer = analyzers[kind]
        live = LiveGallery(Gallery(tmp_path / f"{kind}.sqlite", analyzer.embedder.card))
        settings = ServiceSettings(api_keys=[KEY], max_faces=3)
        with TestClient(create_app(analyzer, live, settings), headers={"X-API-Key": KEY}) as client:
            assert client.get("/v1/info").json()["age_source"] == source
            for route in ("/v1/detect", "/v1/embed", "/v1/identify"):
                faces = client.post(route, files={"image": ("t1.jpg", photo, "image/jpeg")}).json()["faces"]
                assert len(faces) == 3 and all(f["age_source"] == (None if route == "/v1/detect" and kind == "aged"
                                                                    else source) for f in faces), (kind, route)
                assert all((f["age"] is None) == (f["age_source"] is None) for f in faces)
            schema = client.get("/openapi.json").json()["components"]["schemas"]["FaceOut"]["properties"]
            assert {"age", "age_source"} <= set(schema)
        live.close()


def test_cli_embed_and_detect_print_ages(folders, tmp_path):
    from facesphere.cli.main import app

    runner = CliRunner()
    base = [str(require_data(GROUP)), "--detector", "scrfd", "--detector-weights", str(require_data(SCRFD)),
            "--max-faces", "2"]
    answer = runner.invoke(app, ["embed", *base, "--model", str(folders["aged"])])
    assert answer.exit_code == 0, answer.output
    assert json.loads(answer.stdout)["age_source"] == "norm"
    faces = json.loads(answer.stdout)["images"][0]["faces"]
    assert [f["age_source"] for f in faces] == ["norm", "norm"] and all(isinstance(f["age"], float) for f in faces)
    answer = runner.invoke(app, ["detect", *base, "--age-model", str(require_data(GENDERAGE))])
    assert answer.exit_code == 0, answer.output
    faces = json.loads(answer.stdout)[0]["faces"]
    assert all(f["age_source"] == "genderage_insightface" and f["gender"] in ("male", "female") for f in faces)
    answer = runner.invoke(app, ["detect", *base, "--age-model", str(tmp_path / "nowhere")])
    assert answer.exit_code == 2 and "nowhere: no such file or folder" in answer.output
