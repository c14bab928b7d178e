"""Face detectors (RetinaFace in PyTorch, SCRFD and YuNet in ONNX Runtime) on real photos.

Floors are set so that a broken decoder, a wrong activation, a swapped colour order or a landmark
permutation fails them: measured with correct code, every detector finds all 43 dlib boxes and its
5 points lie within ~10% of the inter-ocular distance of FG-NET's manual points.
"""

from __future__ import annotations

import logging

import cv2
import numpy as np
import pytest
import torch
from conftest import require_data

from facesphere.data.images import load_image
from facesphere.detect import (
    DETECTORS,
    Detections,
    DetectorInputError,
    DetectorWeightsError,
    build_detector,
    nms,
)
from facesphere.detect.boxes import box_iou
from facesphere.detect.canvas import place
from facesphere.detect.evaluation import (
    face_at,
    interocular_error,
    match_boxes,
    read_imglab_boxes,
    recall,
)
from facesphere.detect.retinaface import (
    RetinaFaceMobileNet,
    load_retinaface,
    prior_boxes,
)
from facesphere.evaluate.age import fgnet_five_points, parse_fgnet, read_pts
from facesphere.utils.onnxrt import resolve_providers

RETINAFACE = "weights/retinaface_mnet025_biubug6/official_release/mobilenet0.25_Final.pth"
RETINAFACE_RELU = "weights/retinaface_mnet025_biubug6/Final_Retinaface.pth"
SCRFD = "weights/scrfd_500m_kps_onnx/scrfd_500m_bnkps.onnx"
YUNET = "weights/yunet_libfacedetection/onnx/yunet_n_dynamic.onnx"
DLIB = "data/landmark_samples/dlib/examples/faces"
T1 = "data/insightface_fixtures/python-package/insightface/data/images/t1.jpg"
NAMES = ("retinaface", "scrfd", "yunet")
WEIGHTS = {"retinaface": RETINAFACE, "scrfd": SCRFD, "yunet": YUNET}

pytestmark = pytest.mark.shared_data


def _build(name: str, **kwargs):
    extra = {} if name == "retinaface" else {"threads": 1}
    return build_detector(name, require_data(WEIGHTS[name]), **extra, **kwargs)


@pytest.fixture(scope="module")
def detectors():
    cache = {}

    def get(name: str):
        if name not in cache:
            cache[name] = _build(name)
        return cache[name]

    return get


@pytest.fixture(scope="module")
def t1() -> np.ndarray:
    return load_image(require_data(T1))


@pytest.fixture(scope="module")
def dlib_set() -> tuple[list[np.ndarray], list[np.ndarray]]:
    folder = require_data(DLIB)
    truth = {**read_imglab_boxes(folder / "training.xml"), **read_imglab_boxes(folder / "testing.xml")}
    return [load_image(folder / name) for name in truth], list(truth.values())


@pytest.fixture(scope="module")
def fgnet_sample() -> tuple[list[np.ndarray], list[np.ndarray]]:
    items = parse_fgnet(require_data("data/fgnet"))[::100]
    return [load_image(i.path) for i in items], [fgnet_five_points(read_pts(i.points_path)) for i in items]


# --------------------------------------------------------------------------- accuracy on real photos


@pytest.mark.parametrize("name", NAMES)
def test_recall_on_dlib_boxes(detectors, dlib_set, name):
    images, truth = dlib_set
    assert sum(len(t) for t in truth) == 43
    found = detectors(name).detect(images)
    assert recall(truth, found, 0.5) >= 0.95


@pytest.mark.parametrize("name", NAMES)
def test_landmarks_match_fgnet_manual_points(detectors, fgnet_sample, name):
    images, points = fgnet_sample
    errors = []
    for found, truth in zip(detectors(name).detect(images), points):
        k = face_at(found, truth)
        assert k >= 0, "the annotated face was not found"
        assert found.landmarks[k, 0, 0] < found.landmarks[k, 1, 0], "first eye must be the image-left one"
        errors.append(interocular_error(found.landmarks[k], truth))
    assert np.mean(errors) < 0.10, errors
    assert np.median(errors) < 0.08, errors


def test_multi_face_photo_and_agreement(detectors, t1):
    found = {name: detectors(name).detect([t1])[0] for name in NAMES}
    for name, det in found.items():
        assert len(det) >= 5, f"{name} found {len(det)} faces"
        assert np.all(np.diff(det.scores) <= 0), "faces are sorted by score"
    for a, b in [("retinaface", "scrfd"), ("retinaface", "yunet"), ("scrfd", "yunet")]:
        matched = match_boxes(found[a].boxes, found[b].boxes, 0.5) >= 0
        assert matched.sum() >= 0.8 * min(len(found[a]), len(found[b])), (a, b)


def test_relu_checkpoint_is_recognised(dlib_set):
    images, truth = dlib_set
    detector = build_detector("retinaface", require_data(RETINAFACE_RELU))
    assert detector.model.leaky == 0.0
    assert recall(truth, detector.detect(images), 0.5) >= 0.95


# --------------------------------------------------------------------------- geometry and batching


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("input_size", [(640, 640), None])
def test_batch_matches_one_by_one(detectors, dlib_set, t1, name, input_size):
    detector = detectors(name)
    previous, detector.input_size = detector.input_size, input_size
    try:
        images = [t1, dlib_set[0][0], dlib_set[0][2], t1[:301, :517]]
        together = detector.detect(images)
        for image, batched in zip(images, together):
            alone = detector.detect([image])[0]
            assert len(alone) == len(batched)
            np.testing.assert_allclose(batched.boxes, alone.boxes, atol=1e-2)
            np.testing.assert_allclose(batched.landmarks, alone.landmarks, atol=1e-2)
            np.testing.assert_allclose(batched.scores, alone.scores, atol=1e-4)
    finally:
        detector.input_size = previous


@pytest.mark.parametrize("name", NAMES)
def test_flipped_image_mirrors_coordinates(detectors, t1, name):
    width = t1.shape[1]
    found, flipped = detectors(name).detect([t1, np.ascontiguousarray(t1[:, ::-1])])
    mirrored_boxes = np.stack([width - flipped.boxes[:, 2], flipped.boxes[:, 1],
                               width - flipped.boxes[:, 0], flipped.boxes[:, 3]], axis=1)
    mirrored_points = flipped.landmarks[:, [1, 0, 2, 4, 3]].copy()  # image-left/right swap
    mirrored_points[..., 0] = width - mirrored_points[..., 0]
    matches = match_boxes(found.boxes, mirrored_boxes, 0.7)
    assert (matches >= 0).sum() >= len(found) - 1
    for i, j in enumerate(matches):
        if j < 0:
            continue
        size = found.boxes[i, 2] - found.boxes[i, 0]
        assert np.abs(found.boxes[i] - mirrored_boxes[j]).max() < 0.1 * size
        assert np.abs(found.landmarks[i] - mirrored_points[j]).max() < 0.1 * size


@pytest.mark.parametrize("name", NAMES)
def test_letterbox_maps_back_to_photo_pixels(detectors, t1, name):
    """A photo enlarged 2x (pixel repeat) is letterboxed back to the photo's own pixels: coordinates x2 exactly."""
    crop = cv2.resize(t1, (640, 443), interpolation=cv2.INTER_AREA)
    enlarged = np.repeat(np.repeat(crop, 2, axis=0), 2, axis=1)
    small, large = detectors(name).detect([crop, enlarged])
    assert len(small) >= 5 and len(large) == len(small)
    np.testing.assert_allclose(large.boxes, 2 * small.boxes, atol=1e-2)
    np.testing.assert_allclose(large.landmarks, 2 * small.landmarks, atol=1e-2)


@pytest.mark.parametrize("name", NAMES)
def test_blank_and_tiny_images_have_no_faces(detectors, name):
    detector = detectors(name)
    images = [np.zeros((1, 1, 3), np.uint8), np.zeros((480, 640, 3), np.uint8), np.full((7, 300, 3), 255, np.uint8)]
    for found in detector.detect(images):
        assert isinstance(found, Detections) and len(found) == 0
        assert found.boxes.shape == (0, 4) and found.landmarks.shape == (0, 5, 2) and found.boxes.dtype == np.float32
    assert detector.detect([]) == []


@pytest.mark.parametrize("name", NAMES)
def test_bad_arrays_raise_value_error(detectors, t1, name):
    detector = detectors(name)
    bad = [t1.astype(np.float32), t1[..., 0], np.zeros((10, 10, 4), np.uint8), np.zeros((0, 5, 3), np.uint8),
           t1.tolist()]
    for array in bad:
        with pytest.raises(ValueError, match=r"images\[1\]"):
            detector.detect([t1[:40, :40], array])
    with pytest.raises(DetectorInputError, match="sequence of images"):
        detector.detect(t1)
    with pytest.raises(ValueError, match="score_threshold"):
        detector.detect([t1], score_threshold=1.5)


def test_options_min_face_size_and_max_faces(detectors, t1):
    detector = detectors("scrfd")
    every = detector.detect([t1], score_threshold=0.3)[0]
    capped = detector.detect([t1], score_threshold=0.3, max_faces=2)[0]
    np.testing.assert_array_equal(capped.boxes, every.boxes[:2])
    sizes = np.minimum(every.boxes[:, 2] - every.boxes[:, 0], every.boxes[:, 3] - every.boxes[:, 1])
    limit = float(np.median(sizes))
    big = detector.detect([t1], score_threshold=0.3, min_face_size=limit)[0]
    assert len(big) == int((sizes >= limit).sum())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_retinaface_on_cuda_matches_cpu(detectors, t1):
    gpu = build_detector("retinaface", require_data(RETINAFACE), device="cuda")
    on_gpu, on_cpu = gpu.detect([t1])[0], detectors("retinaface").detect([t1])[0]
    assert len(on_gpu) == len(on_cpu)
    np.testing.assert_allclose(on_gpu.boxes, on_cpu.boxes, atol=0.5)


# --------------------------------------------------------------------------- weights, registry, sessions


def test_registry_names_and_unknown_detector():
    assert {"retinaface", "scrfd", "yunet"} <= set(DETECTORS.names())
    with pytest.raises(KeyError, match="unknown detector"):
        build_detector("mtcnn", "weights.pth")


def test_retinaface_weights_are_checked(tmp_path):
    state = RetinaFaceMobileNet(leaky=0.1).state_dict()
    del state["ClassHead.0.conv1x1.weight"]
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "broken.pth"
    torch.save(state, path)
    with pytest.raises(DetectorWeightsError, match="not one of the known public RetinaFace weights"):
        load_retinaface(path)
    with pytest.raises(DetectorWeightsError, match=r"missing \(1\): ClassHead.0.conv1x1.weight") as error:
        load_retinaface(path, leaky=0.1)
    assert "unexpected (1): extra.weight" in str(error.value) and str(path) in str(error.value)
    torch.save({"module." + k: v for k, v in RetinaFaceMobileNet(leaky=0.0).state_dict().items()}, path)
    assert load_retinaface(path, leaky=0.0).leaky == 0.0


RETINAFACE_FILES = {"weights/retinaface_mnet025_biubug6/official_release/mobilenet0.25_Final.pth": 0.1,
                    "weights/retinaface_mnet025_biubug6/Final_Retinaface.pth": 0.0}


@pytest.mark.parametrize("relative", sorted(RETINAFACE_FILES))
def test_re_saved_retinaface_weights_are_recognised(tmp_path, relative):
    """Known weights are recognised by their tensors, not their file: another pickle, a DataParallel prefix or a
    checkpoint wrapper still give the slope they were trained with."""
    state = torch.load(require_data(relative), map_location="cpu", weights_only=True)
    copies = {"plain.pth": {k: v.clone() for k, v in state.items()},
              "module.pth": {f"module.{k}": v for k, v in state.items()},
              "wrapped.pth": {"state_dict": state, "epoch": 7}}
    for name, obj in copies.items():
        torch.save(obj, tmp_path / name, _use_new_zipfile_serialization=name != "plain.pth")
        assert load_retinaface(tmp_path / name).leaky == RETINAFACE_FILES[relative], name


def test_fine_tuned_retinaface_weights_need_the_slope_and_the_cli_can_give_it(tmp_path):
    import json

    from typer.testing import CliRunner

    from facesphere.cli.main import app

    release = next(name for name, leaky in RETINAFACE_FILES.items() if leaky == 0.1)
    state = torch.load(require_data(release), map_location="cpu", weights_only=True)
    generator = torch.Generator().manual_seed(0)
    tuned = {k: v * (1 + 1e-3 * torch.randn(v.shape, generator=generator)) if v.is_floating_point() else v
             for k, v in state.items()}
    path = tmp_path / "fine_tuned.pth"
    torch.save(tuned, path)
    with pytest.raises(DetectorWeightsError, match="--detector-option leaky=0.1"):
        load_retinaface(path)
    photo = require_data("data/cacd_vs_fold1/CACD_VS/0000_0.jpg")
    refused = CliRunner().invoke(app, ["detect", str(photo), "--detector-weights", str(path)])
    assert refused.exit_code == 2 and "--detector-option leaky=0.1" in " ".join(refused.output.split())
    assert "Traceback" not in refused.output
    done = CliRunner().invoke(app, ["detect", str(photo), "--detector-weights", str(path),
                                    "--detector-option", "leaky=0.1", "--out", str(tmp_path / "faces.json")])
    assert done.exit_code == 0, done.output
    assert len(json.loads((tmp_path / "faces.json").read_text())[0]["faces"]) == 1
    wrong = CliRunner().invoke(app, ["detect", str(photo), "--detector-weights", str(path),
                                     "--detector-option", "slope=0.1"])
    assert wrong.exit_code == 2 and "unknown detector option(s) slope" in " ".join(wrong.output.split())


def test_onnx_detector_refuses_other_models():
    with pytest.raises(DetectorWeightsError, match="missing"):
        build_detector("yunet", require_data(SCRFD), threads=1)


def test_unavailable_provider_is_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="facesphere.utils.onnxrt"):
        chosen = resolve_providers(["cuda", "cpu"], ["CPUExecutionProvider"])
    assert chosen == ["CPUExecutionProvider"]
    assert "CUDAExecutionProvider was requested but is not available" in caplog.text
    assert resolve_providers(["cuda"], ["CUDAExecutionProvider", "CPUExecutionProvider"]) == [
        "CUDAExecutionProvider", "CPUExecutionProvider"]


# --------------------------------------------------------------------------- pieces


def test_nms_and_iou():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 10, 10]], np.float32)
    scores = np.array([0.9, 0.95, 0.5, 0.9], np.float32)
    assert nms(boxes, scores, 0.5).tolist() == [1, 2]
    assert nms(boxes, scores, 0.99).tolist() == [1, 0, 2]
    iou = box_iou(boxes[:1], boxes)
    np.testing.assert_allclose(iou, [[1.0, 81 / 119, 0.0, 1.0]], rtol=1e-6)
    assert nms(np.zeros((0, 4)), np.zeros(0), 0.5).tolist() == []


def test_prior_boxes_count_and_layout():
    priors = prior_boxes(480, 640)
    assert priors.shape == (2 * (60 * 80 + 30 * 40 + 15 * 20), 4)
    np.testing.assert_allclose(priors[:3].numpy(), [[4, 4, 16, 16], [4, 4, 32, 32], [12, 4, 16, 16]])
    model = RetinaFaceMobileNet().eval()
    with torch.no_grad():
        loc, logits, points = model(torch.zeros(1, 3, 97, 131))
    assert loc.shape[1] == prior_boxes(97, 131).shape[0] and points.shape[2] == 10 and logits.shape[2] == 2


def test_canvas_placement_is_exact():
    image = np.zeros((300, 1000, 3), np.uint8)
    canvas, placement = place(image, (640, 640), 32, (1, 2, 3))
    assert canvas.shape == (640, 640, 3) and placement.scale_x == 0.64 and placement.scale_y == 192 / 300
    np.testing.assert_array_equal(canvas[192:, 0], [[1, 2, 3]] * (640 - 192))
    np.testing.assert_allclose(placement.to_image(np.array([[640.0, 192.0]])), [[1000, 300]])
    canvas, placement = place(image[:33, :65], None, 32, (0, 0, 0))
    assert canvas.shape == (64, 96, 3) and placement.scale_x == placement.scale_y == 1.0
    canvas, placement = place(image[:100, :200], (640, 640), 32, (0, 0, 0))
    assert placement.scale_x == 1.0
    canvas, placement = place(image[:100, :200], (640, 640), 32, (0, 0, 0), upscale=True)
    assert placement.scale_x == 3.2


def test_dlib_xml_and_fgnet_markup(tmp_path):
    path = tmp_path / "boxes.xml"
    path.write_text("<dataset><images><image file='a.jpg'><box top='1' left='2' width='3' height='4'/>"
                    "<box top='0' left='0' width='9' height='9' ignore='1'/></image></images></dataset>")
    assert read_imglab_boxes(path)["a.jpg"].tolist() == [[2, 1, 5, 5]]
    path.write_text("<dataset><images>")
    with pytest.raises(ValueError, match="boxes.xml"):
        read_imglab_boxes(path)
    pts = np.arange(136, dtype=float).reshape(68, 2)
    assert fgnet_five_points(pts)[:, 0].tolist() == [62, 72, 134, 96, 108]
