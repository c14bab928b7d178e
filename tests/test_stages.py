"""The open pipeline: named per-face extras, stages plugged in from outside the analyser, the landmarker and
index-kind registries, the one verify decision, typed errors -> HTTP codes, and models served from a training run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import require_data
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from facesphere.align.landmarkers import LANDMARKERS, build_landmarker
from facesphere.detect.base import Detections, Detector
from facesphere.detect.canvas import Placement
from facesphere.pipeline import AnalyzerSpec, FaceAnalyzer, build_analyzer, decide

SCRFD = "weights/scrfd_500m_kps_onnx/scrfd_500m_bnkps.onnx"
CACD = "data/cacd_vs_fold1/CACD_VS"
GROUP = "data/insightface_fixtures/python-package/insightface/data/images/t1.jpg"
KEY = "stage-test-key-0123456789"


# ------------------------------------------------------------------------------------------ stages defined here
class BoxCentre:
    """A landmarks-phase stage: each box's centre, plus an offset read from its 'weights' file."""

    name, phase, outputs = "box_centre", "landmarks", ("box_centre",)

    def __init__(self, weights_path=None, offset: float = 0.0) -> None:
        self.offset = float(Path(weights_path).read_text()) if weights_path else offset
        self.calls: list[str] = []

    def run(self, image, boxes):
        self.calls.append("landmarks")
        return {"box_centre": (boxes[:, :2] + boxes[:, 2:]) / 2 + self.offset}


if "box_centre" not in LANDMARKERS:
    LANDMARKERS.register("box_centre")(BoxCentre)


class Invert:
    """A rectify-phase stage: the photographic negative of every crop."""

    name, phase, outputs = "invert", "rectify", ()

    def __init__(self, calls: list[str]) -> None:
        self.calls = calls

    def run(self, crops):
        self.calls.append("rectify")
        return 255 - crops


class Brightness:
    """An attributes-phase stage: mean crop brightness, and what it was given (to check the phase's inputs)."""

    name, phase, outputs = "brightness", "attributes", ("brightness",)

    def __init__(self, calls: list[str]) -> None:
        self.calls = calls
        self.seen = None

    def run(self, crops, embeddings):
        self.calls.append("attributes")
        self.seen = (crops.copy(), None if embeddings is None else embeddings.copy())
        return {"brightness": crops.reshape(len(crops), -1).mean(axis=1)}


# ------------------------------------------------------------------------------------------ a tiny training run
@pytest.fixture(scope="module")
def run_folder(tmp_path_factory) -> Path:
    """``runs/tiny`` as the trainer leaves it: config + backbone weights under ``model.backbone.*``."""
    from facesphere.backbones import build_backbone

    torch.manual_seed(0)
    backbone = build_backbone("mobilefacenet")
    for module in backbone.modules():  # batch-norm statistics of real activations, as after training
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.momentum = None
            module.reset_running_stats()
    with torch.no_grad():
        for _ in range(4):
            backbone(torch.rand(16, 3, 112, 112) * 2 - 1)
    backbone.eval()
    run = tmp_path_factory.mktemp("runs") / "tiny"
    (run / "checkpoints").mkdir(parents=True)
    state = {"config": {"name": "tiny", "model": {"backbone": "mobilefacenet", "backbone_args": {}}},
             "model": {f"backbone.{k}": v for k, v in backbone.state_dict().items()}, "step": 2}
    torch.save(state, run / "checkpoints" / "step_00000002.pt")
    return run


@pytest.fixture(scope="module")
def spec(run_folder) -> AnalyzerSpec:
    return AnalyzerSpec(detector="scrfd", detector_weights=require_data(SCRFD), model=run_folder, threads=1)


# ------------------------------------------------------------------------------------------ detections
class _Scripted(Detector):
    """A detector answering fixed candidates, with a per-face tag and a point-valued extra."""

    point_extras = frozenset({"nose"})

    def __init__(self, boxes, scores, **options) -> None:
        super().__init__(input_size=(64, 64), **options)
        self.boxes, self.scores = np.asarray(boxes, np.float32), np.asarray(scores, np.float32)

    def _predict(self, canvases, score_threshold):
        points = np.repeat(((self.boxes[:, :2] + self.boxes[:, 2:]) / 2)[:, None], 5, axis=1)
        extras = {"tag": np.arange(len(self.boxes)), "nose": points[:, 2].copy()}
        return [(self.boxes, self.scores, points, extras) for _ in canvases]


def test_detection_extras_stay_with_their_faces_through_size_filter_nms_and_cap():
    # canvas pixels; the 128x128 photo is letterboxed to 64x64 (scale 0.5), so photo = canvas * 2
    boxes = [[0, 0, 10, 10], [1, 1, 11, 11], [30, 30, 34, 34], [40, 40, 60, 60], [20, 0, 30, 12]]
    scores = [0.6, 0.9, 0.95, 0.7, 0.8]
    detector = _Scripted(boxes, scores)
    found = detector.detect([np.zeros((128, 128, 3), np.uint8)], min_face_size=10, max_faces=3)[0]
    # candidate 2 is too small (8 photo pixels), 0 overlaps 1 (IoU 0.68) and scores lower; top 3 of the rest by score
    assert found.extras["tag"].tolist() == [1, 4, 3]
    np.testing.assert_allclose(found.boxes, np.asarray(boxes, np.float32)[[1, 4, 3]] * 2)
    np.testing.assert_allclose(found.extras["nose"], found.landmarks[:, 2])  # mapped to the photo like the landmarks
    reordered = found.select([2, 0])
    assert reordered.extras["tag"].tolist() == [3, 1] and reordered.boxes[0, 0] == 80
    with pytest.raises(ValueError, match="'pose' must have one entry per face"):
        found.with_extras({"pose": np.zeros((2, 3))})
    with pytest.raises(ValueError, match="already present"):
        found.with_extras({"tag": np.zeros(3)})
    assert Detector._finish((np.zeros((0, 4)), np.zeros(0), np.zeros((0, 5, 2)), {}), Placement(1, 1, (64, 64)),
                            0.4, 0, None).extras == {}


# ------------------------------------------------------------------------------------------ stages in the analyser
def test_stages_run_in_phase_order_and_rectify_changes_what_the_embedder_sees(spec):
    calls: list[str] = []
    landmarks, invert, brightness = BoxCentre(), Invert(calls), Brightness(calls)
    landmarks.calls = calls
    # given out of order: the analyser runs them by phase
    analyzer = build_analyzer(spec, stages=[brightness, invert, landmarks])
    result = analyzer.analyze([require_data(GROUP)])[0]
    assert calls == ["landmarks", "rectify", "attributes"]
    faces = result.faces
    assert len(faces) == 6
    crops = np.stack([f.crop for f in faces])
    expected = analyzer.embedder.embed(255 - crops, flip=True)
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(np.stack([f.embedding for f in faces]), expected, atol=1e-5)
    plain = analyzer.embedder.embed(crops, flip=True)
    plain /= np.linalg.norm(plain, axis=1, keepdims=True)
    assert np.abs(np.stack([f.embedding for f in faces]) - plain).max() > 0.05, "rectification must matter"
    np.testing.assert_allclose(analyzer.embed_crops(crops), expected, atol=1e-5)  # embed_crops rectifies too
    # the attribute stage saw the aligned (not rectified) crops and the final embeddings, largest face first
    seen_crops, seen_embeddings = brightness.seen
    np.testing.assert_array_equal(seen_crops, crops)
    np.testing.assert_allclose(seen_embeddings, [f.embedding for f in faces])
    for face in faces:
        out = face.to_dict()
        assert out["box_centre"] == pytest.approx(((face.box[:2] + face.box[2:]) / 2).tolist(), abs=1e-4)
        assert out["brightness"] == pytest.approx(face.crop.mean(), abs=1e-4)
        assert set(out) == {"box", "score", "landmarks", "box_centre", "brightness", "embedding", "age", "age_source"}
        assert out["age"] is None and out["age_source"] is None  # a run's model has no age branch: null, no guess
    json.dumps(result.to_dict())
    # without embedding, attributes still run and get no embeddings; rectify does not run
    calls.clear()
    assert analyzer.analyze([require_data(GROUP)], embed=False)[0].faces[0].embedding is None
    assert calls == ["landmarks", "attributes"] and brightness.seen[1] is None


def test_malformed_stages_are_refused_with_their_name():
    detector = _Scripted([[0, 0, 10, 10]], [0.9])

    class Shouting(BoxCentre):
        name, phase, outputs = "shout", "landmarks", ("score",)

    class Late(BoxCentre):
        name, phase = "late", "after_everything"

    with pytest.raises(ValueError, match="'shout': output name 'score' is reserved"):
        FaceAnalyzer(detector, stages=[Shouting()])
    with pytest.raises(ValueError, match="unknown phase 'after_everything'; use landmarks, rectify, attributes"):
        FaceAnalyzer(detector, stages=[Late()])
    with pytest.raises(ValueError, match="both add 'box_centre'"):
        FaceAnalyzer(detector, stages=[BoxCentre(), BoxCentre()])
    with pytest.raises(TypeError, match="lacks name, phase, outputs or run"):
        FaceAnalyzer(detector, stages=[object()])

    class Liar(BoxCentre):
        def run(self, image, boxes):
            return {"box_centre": np.zeros((len(boxes) + 1, 2))}

    with pytest.raises(ValueError, match="'box_centre' must have one entry per face"):
        FaceAnalyzer(detector, stages=[Liar()]).analyze([np.zeros((128, 128, 3), np.uint8)])


def test_landmarker_registry_builds_by_name_and_refuses_unknown_names(tmp_path):
    weights = tmp_path / "offset.txt"
    weights.write_text("1.5")
    stage = build_landmarker("box_centre", weights)
    assert stage.run(None, np.array([[0.0, 0, 4, 2]]))["box_centre"].tolist() == [[3.5, 2.5]]
    with pytest.raises(KeyError, match="unknown landmarker 'prnet'; known: .*pfld68"):
        build_landmarker("prnet", weights)
    pfld = build_landmarker("pfld68", require_data("weights/pfld68_cunjian_onnx/pfld.onnx"))
    assert pfld.outputs == ("landmarks68",) and pfld.phase == "landmarks"


def test_cli_detect_and_rest_detect_carry_a_stage_extra(spec, tmp_path):
    from facesphere.cli.main import app
    from facesphere.gallery import Gallery, LiveGallery
    from facesphere.service import ServiceSettings, create_app

    weights = tmp_path / "offset.txt"
    weights.write_text("0.25")
    out = tmp_path / "faces.json"
    photo = require_data(CACD) / "0001_0.jpg"
    done = CliRunner().invoke(app, ["detect", str(photo), "--detector", "scrfd", "--detector-weights",
                                    str(require_data(SCRFD)), "--landmarker", "box_centre", "--landmarker-weights",
                                    str(weights), "--out", str(out)])
    assert done.exit_code == 0, done.output
    (face,) = json.loads(out.read_text())[0]["faces"]
    box = np.array(face["box"])
    assert face["box_centre"] == pytest.approx((box[:2] + box[2:]) / 2 + 0.25, abs=0.01)

    analyzer = build_analyzer(spec, stages=[BoxCentre(offset=0.25), Brightness([])])
    live = LiveGallery(Gallery(tmp_path / "g.sqlite", analyzer.embedder.card))
    settings = ServiceSettings(api_keys=[KEY])
    with TestClient(create_app(analyzer, live, settings), headers={"X-API-Key": KEY}) as client:
        answer = client.post("/v1/detect", files={"image": ("a.jpg", photo.read_bytes(), "image/jpeg")})
        assert answer.status_code == 200
        (served,) = answer.json()["faces"]
        assert served["box_centre"] == pytest.approx(face["box_centre"], abs=0.02)
        direct = analyzer.analyze([photo])[0].faces[0]
        assert served["brightness"] == pytest.approx(float(direct.crop.mean()), abs=1e-3)
        identified = client.post("/v1/identify", files={"image": ("a.jpg", photo.read_bytes(), "image/jpeg")})
        assert "box_centre" in identified.json()["faces"][0]
    live.close()


# ------------------------------------------------------------------------------------------ serving a training run
def test_serve_a_model_from_a_training_run_folder(spec, run_folder, tmp_path):
    from facesphere.models.runs import load_embedder
    from facesphere.service import ServiceSettings, build_app

    settings = ServiceSettings(api_keys=[KEY], match_threshold=0.5)
    app = build_app(spec, tmp_path / "g.sqlite", settings, index="flat")
    photos = {name: (require_data(CACD) / name).read_bytes() for name in ("0001_0.jpg", "0002_0.jpg")}
    with TestClient(app, headers={"X-API-Key": KEY}) as client:
        info = client.get("/v1/info").json()
        assert info["model"] == "tiny-step2" and info["embedding_size"] == 128 and info["threshold"] == 0.5
        embedded = client.post("/v1/embed", files={"image": ("a.jpg", photos["0001_0.jpg"], "image/jpeg")}).json()
        # the served embedding is the checkpoint's backbone on the aligned crop (loaded independently here)
        checkpoint = load_embedder(run_folder / "checkpoints" / "step_00000002.pt")
        crop = app.state.service.analyzer.analyze([require_data(CACD) / "0001_0.jpg"])[0].faces[0].crop
        expected = checkpoint.embed(crop[None], flip=True)[0]
        np.testing.assert_allclose(embedded["faces"][0]["embedding"], expected / np.linalg.norm(expected), atol=1e-5)
        for name, data in photos.items():
            made = client.post("/v1/identities", data={"name": name[:4]}, files={"images": (name, data, "image/jpeg")})
            assert made.status_code == 201
        found = client.post("/v1/identify", files={"image": ("a.jpg", photos["0002_0.jpg"], "image/jpeg")}).json()
        assert found["faces"][0]["matches"][0] == {"name": "0002", "score": pytest.approx(1.0, abs=1e-4), "known": True}
    app.state.service.gallery.close()


def test_every_model_option_accepts_a_training_run(run_folder, tmp_path):
    import typer

    from facesphere.cli.main import app

    out = tmp_path / "embedded.json"
    done = CliRunner().invoke(app, ["embed", str(require_data(CACD) / "0001_0.jpg"), "--model", str(run_folder),
                                    "--detector", "scrfd", "--detector-weights", str(require_data(SCRFD)),
                                    "--out", str(out)])
    assert done.exit_code == 0, done.output
    payload = json.loads(out.read_text())
    assert payload["model"] == "tiny-step2" and len(payload["images"][0]["faces"][0]["embedding"]) == 128
    root = typer.main.get_command(app)
    for path in (["embed"], ["verify"], ["align"], ["calibrate"], ["serve"], ["gallery", "enrol"]):
        command = root
        for part in path:
            command = command.commands[part]
        (option,) = [p for p in command.params if "--model" in p.opts]
        assert "training run folder" in option.help and "checkpoint file" in option.help, path


# ------------------------------------------------------------------------------------------ one decision, one table
def test_one_verify_decision_everywhere(tmp_path):
    from facesphere.gallery import SearchIndex
    from facesphere.pipeline import calibrate_threshold

    scores = np.array([-0.2, 0.29999, 0.3, 0.7])
    assert decide(scores, 0.3).tolist() == [False, False, True, True]
    assert decide(0.3, 0.3) is True and decide(0.1, 0.3) is False and decide(0.9, None) is None
    threshold = calibrate_threshold(np.r_[np.linspace(0.5, 0.9, 20), np.linspace(-0.3, 0.3, 200)],
                                    np.r_[np.ones(20, bool), np.zeros(200, bool)], 0.01, "m", 4)
    np.testing.assert_array_equal(threshold.decide(scores), decide(scores, threshold.value))
    templates = np.eye(4, dtype=np.float32)
    index = SearchIndex(list("abcd"), templates, kind="flat")
    query = np.array([0.3, 0.2, 0.1, 0.0], np.float32)
    matches = index.search(query, k=4, threshold=0.5)[0]
    cosines = query / np.linalg.norm(query)
    assert [m.known for m in matches] == [bool(decide(cosines[ord(m.name) - 97], 0.5)) for m in matches]


def test_index_kinds_come_from_a_registry_and_unknown_ones_are_refused():
    from facesphere.gallery import INDEX_KINDS, SearchIndex, resolve_kind

    assert INDEX_KINDS.names() == ["flat", "hnsw", "ivfpq"]
    assert resolve_kind("auto", 10) == "flat" and resolve_kind("auto", 200_000) == "ivfpq"
    with pytest.raises(ValueError, match="unknown index kind 'annoy'; use auto, flat, hnsw, ivfpq"):
        SearchIndex(["a"], np.ones((1, 4)), kind="annoy")
    with pytest.raises(ValueError, match="unknown index storage 'fp8'; use fp32, fp16, int8"):
        SearchIndex(["a"], np.ones((1, 4)), kind="flat", storage="fp8")


def test_typed_errors_map_to_status_codes():
    from facesphere.data.images import ImageError, ImageTooLarge
    from facesphere.gallery import GalleryError, GalleryNotFound, UnknownIdentity
    from facesphere.pipeline import NoFaceFound
    from facesphere.service.app import BadMetadata, TooManyFiles, status_of

    expected = {ImageTooLarge("x.png", "too big"): 413, ImageError("x.png", "broken"): 400, NoFaceFound("x"): 422,
                UnknownIdentity("x"): 404, GalleryNotFound("x"): 422, GalleryError("x"): 422, BadMetadata("x"): 422,
                TooManyFiles("x"): 413, RuntimeError("x"): 500}
    assert {type(e).__name__: status_of(e) for e in expected} == {type(e).__name__: s for e, s in expected.items()}


def test_two_runs_of_one_name_are_two_models_for_galleries(run_folder, tmp_path):
    """A run's card carries the SHA-256 of its weights: a gallery bound to one run refuses another run that has
    the same name and step but other weights, and accepts the same weights again."""
    from facesphere.gallery import Gallery, GalleryError
    from facesphere.models.runs import load_backbone

    state = torch.load(run_folder / "checkpoints" / "step_00000002.pt", weights_only=True)
    other = tmp_path / "tiny"
    (other / "checkpoints").mkdir(parents=True)
    first_key = next(k for k in state["model"] if k.endswith("weight"))
    state["model"][first_key] = state["model"][first_key] + 1e-3
    torch.save(state, other / "checkpoints" / "step_00000002.pt")
    cards = [load_backbone(path)[1] for path in (run_folder, other, run_folder)]
    assert cards[0].name == cards[1].name == "tiny-step2"
    assert cards[0].weights_sha256 == cards[2].weights_sha256 != cards[1].weights_sha256
    Gallery(tmp_path / "g.sqlite", cards[0]).close()
    Gallery(tmp_path / "g.sqlite", cards[2]).close()
    with pytest.raises(GalleryError, match="cannot be mixed"):
        Gallery(tmp_path / "g.sqlite", cards[1])
