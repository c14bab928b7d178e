"""Similarity alignment onto named templates, and thresholds calibrated for a target FAR."""

from __future__ import annotations

import numpy as np
import pytest

from facesphere.align.similarity import align_faces, umeyama
from facesphere.align.templates import ARCFACE_POINTS_112, SPHEREFACE_POINTS_112x96, get_template, template_for_size
from facesphere.pipeline.threshold import Threshold, ThresholdMismatch, calibrate_threshold


def _dots(points: np.ndarray, size: tuple[int, int], radius: float = 5.0) -> np.ndarray:
    """A black image with a bright disc centred (sub-pixel) on each point."""
    yy, xx = np.mgrid[:size[0], :size[1]]
    image = np.zeros((*size, 3), dtype=np.uint8)
    for x, y in points:
        image[(xx - x) ** 2 + (yy - y) ** 2 <= radius**2] = 255
    return image


def _centroid(image: np.ndarray, x: float, y: float, half: int = 5) -> np.ndarray:
    y0, x0 = int(round(y)) - half, int(round(x)) - half
    window = image[y0:y0 + 2 * half + 1, x0:x0 + 2 * half + 1, 1].astype(np.float64)
    yy, xx = np.mgrid[y0:y0 + 2 * half + 1, x0:x0 + 2 * half + 1]
    return np.array([(window * xx).sum(), (window * yy).sum()]) / window.sum()


@pytest.mark.parametrize("name", ["arcface_112x112", "sphereface_112x96"])
def test_a_rotated_scaled_face_lands_on_the_template(name):
    template = get_template(name)
    angle, scale, shift = np.deg2rad(25), 2.7, np.array([180.0, 90.0])
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    photo_points = template.points @ (scale * rot).T + shift
    photo = _dots(photo_points, (480, 640))
    crop = align_faces(photo, photo_points[None], name)[0]
    assert crop.shape == (*template.size, 3)
    for i, point in enumerate(template.points):
        # warpAffine samples pixel centres at integer coordinates, as the points are given
        assert np.abs(_centroid(crop, *point) - point).max() < 0.15, f"point {i} of {name} is off the template"
    matrix = umeyama(photo_points, template.points)
    assert np.allclose(matrix[:2, :2] @ matrix[:2, :2].T, np.eye(2) / scale**2, atol=1e-9)


def test_templates_are_the_published_points():
    # SphereFace's 96x112 points; ArcFace's 112x112 crop adds 8 px of width on each side.
    assert np.allclose(ARCFACE_POINTS_112 - SPHEREFACE_POINTS_112x96, [[8, 0]] * 5)
    assert np.allclose(ARCFACE_POINTS_112[0], [38.2946, 51.6963])
    with pytest.raises(ValueError, match="unknown alignment template"):
        get_template("mtcnn_160")
    with pytest.raises(ValueError, match="no alignment template"):
        template_for_size((100, 80))
    with pytest.raises(ValueError, match="finite"):
        umeyama(np.full((5, 2), np.nan), ARCFACE_POINTS_112)


def test_one_rule_maps_a_crop_size_to_its_template():
    arcface, sphereface, double = (template_for_size(size) for size in ((112, 112), (112, 96), (224, 224)))
    assert (arcface.name, arcface.size) == ("arcface_112x112", (112, 112))
    assert np.array_equal(arcface.points[0], [38.2946, 51.6963])  # insightface's arcface_dst
    assert (sphereface.name, sphereface.size) == ("sphereface_112x96", (112, 96))
    assert np.allclose(sphereface.points, arcface.points - [8.0, 0.0])  # same face, 8 px less width each side
    assert (double.name, double.size) == ("arcface_224x224", (224, 224))
    assert np.allclose(double.points, 2 * arcface.points)
    for template in (arcface, sphereface, double):  # the name leads back to the same template
        got = get_template(template.name)
        assert got.size == template.size and np.array_equal(got.points, template.points)
    small = template_for_size((64, 64))  # an ArcFace crop resized to 64x64, as the loaders resize training crops
    assert small.name == "arcface_64x64" and np.allclose(small.points, arcface.points * 64 / 112)
    with pytest.raises(ValueError, match="arcface_NxN"):
        get_template("arcface_200x100")
    with pytest.raises(ValueError):
        arcface.points[0, 0] = 0.0  # shared templates are read-only


def test_every_layer_names_the_template_the_same_way():
    from facesphere.backbones import build_backbone
    from facesphere.models.card import training_card
    from facesphere.models.preprocess import cropped_alignment

    for size in ((112, 112), (112, 96), (224, 224)):
        backbone = build_backbone("mobilefacenet", embedding_size=8, input_size=size)
        assert training_card(backbone, "t", "mobilefacenet").alignment == template_for_size(size).name
    odd = build_backbone("mobilefacenet", embedding_size=8, input_size=(120, 96))
    assert training_card(odd, "t", "mobilefacenet").alignment == "unspecified_120x96"
    # a centre 112x96 crop of an ArcFace 112x112 crop is exactly a SphereFace crop; other crops are unknown
    assert cropped_alignment("arcface_112x112", (112, 112), (112, 96)) == "sphereface_112x96"
    assert cropped_alignment("arcface_224x224", (224, 224), (112, 112)) is None


def test_threshold_meets_the_target_far_and_guards_its_model(tmp_path):
    rng = np.random.default_rng(0)
    impostor = rng.uniform(-0.2, 0.4, 20_000)
    genuine = rng.uniform(0.3, 0.9, 2_000)
    scores = np.concatenate([genuine, impostor])
    same = np.concatenate([np.ones(2000, bool), np.zeros(20_000, bool)])
    t = calibrate_threshold(scores, same, 1e-3, model="y1", embedding_size=128)
    assert t.measured_far <= 1e-3 and (impostor >= t.value).sum() == 20
    ranked = np.sort(impostor)
    assert ranked[-21] < t.value <= ranked[-20]  # above the 21st highest impostor score: FAR exactly 1e-3
    assert t.measured_tar == pytest.approx((genuine >= t.value).mean())
    t.save(tmp_path / "t.json")
    loaded = Threshold.load(tmp_path / "t.json")
    assert loaded == t and list(loaded.decide([t.value, t.value - 1e-9])) == [True, False]
    loaded.check_model("y1", 128)
    with pytest.raises(ThresholdMismatch, match="calibrate it for this model"):
        loaded.check_model("xiaoccer", 128)
    bound = calibrate_threshold(scores, same, 1e-3, model="y1", embedding_size=128, weights_sha256="a" * 64)
    bound.check_model("y1", 128, "a" * 64)
    bound.check_model("y1", 128)  # a card without a hash (an imported model folder's is never missing)
    with pytest.raises(ThresholdMismatch, match="other weights"):
        bound.check_model("y1", 128, "b" * 64)  # a second run of the same name and step
    with pytest.raises(ValueError, match="cannot be measured with 20000 impostor pairs"):
        calibrate_threshold(scores, same, 1e-5, model="y1", embedding_size=128)
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="not a facesphere threshold file"):
        Threshold.load(tmp_path / "bad.json")
