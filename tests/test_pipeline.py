"""The whole pipeline on real photos: analyser, card enforcement, thresholds, the CLI, and the bad-input suite."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import require_data
from PIL import Image
from typer.testing import CliRunner

from facesphere.cli.main import app
from facesphere.data.images import load_image
from facesphere.models.card import ModelCardMismatch
from facesphere.pipeline import FaceAnalyzer, ThresholdMismatch, calibrate_threshold

RETINAFACE = "weights/retinaface_mnet025_biubug6/official_release/mobilenet0.25_Final.pth"
GROUP = "data/insightface_fixtures/python-package/insightface/data/images/t1.jpg"
CACD = "data/cacd_vs_fold1/CACD_VS"


@pytest.fixture(scope="module")
def detector():
    from facesphere.detect import build_detector

    return build_detector("retinaface", require_data(RETINAFACE))


@pytest.fixture(scope="module")
def y1_folder(tmp_path_factory) -> Path:
    from facesphere.models import import_weights
    from facesphere.models.store import save_model

    folder = tmp_path_factory.mktemp("models") / "y1"
    save_model(folder, *import_weights(require_data("weights/mobilefacenet_insightface_y1")))
    return folder


@pytest.fixture(scope="module")
def analyzer(detector, y1_folder):
    from facesphere.models.torch_embedder import TorchEmbedder

    return FaceAnalyzer(detector, TorchEmbedder.from_folder(y1_folder))


def _cacd(name: str) -> Path:
    return require_data(CACD) / name


def test_group_photo_gives_every_face_with_crop_and_unit_embedding(analyzer):
    result = analyzer.analyze([require_data(GROUP)])[0]
    assert result.error is None and len(result.faces) == 6
    areas = [(f.box[2] - f.box[0]) * (f.box[3] - f.box[1]) for f in result.faces]
    assert areas == sorted(areas, reverse=True)
    for face in result.faces:
        x1, y1, x2, y2 = face.box
        assert ((face.landmarks >= [x1, y1]) & (face.landmarks <= [x2, y2])).all()
        assert face.crop.shape == (112, 112, 3) and face.crop.dtype == np.uint8
        assert abs(np.linalg.norm(face.embedding) - 1) < 1e-5
    # six different people: no two faces of the photo match as well as a genuine pair does
    embeddings = np.stack([f.embedding for f in result.faces])
    similarity = embeddings @ embeddings.T
    assert similarity[~np.eye(6, dtype=bool)].max() < 0.5


def test_genuine_cross_age_pairs_score_above_impostors(analyzer):
    # CACD-VS fold 1: pairs 0000-0199 are genuine, 0200-0399 impostor (file numbering)
    genuine = [analyzer.compare(*[analyzer.analyze([_cacd(f"{k:04d}_{i}.jpg")])[0].faces[0] for i in (0, 1)]).cosine
               for k in range(4)]
    impostor = [analyzer.compare(*[analyzer.analyze([_cacd(f"{k:04d}_{i}.jpg")])[0].faces[0] for i in (0, 1)]).cosine
                for k in range(200, 204)]
    assert min(genuine) > max(impostor)


def test_model_card_decides_the_crop_and_mismatches_are_refused(detector, y1_folder):
    from facesphere.models.torch_embedder import TorchEmbedder

    embedder = TorchEmbedder.from_folder(y1_folder)
    with pytest.raises(ModelCardMismatch, match="model expects faces aligned to arcface_112x112"):
        FaceAnalyzer(detector, embedder, alignment="sphereface_112x96")
    threshold = calibrate_threshold(np.r_[np.linspace(0.3, 0.9, 50), np.linspace(-0.2, 0.2, 1000)],
                                    np.r_[np.ones(50, bool), np.zeros(1000, bool)], 1e-2, "another-model", 128)
    with pytest.raises(ThresholdMismatch):
        FaceAnalyzer(detector, embedder, threshold=threshold)
    sphere = FaceAnalyzer(detector, None, alignment="sphereface_112x96")
    assert sphere.analyze([_cacd("0000_0.jpg")], embed=False)[0].faces[0].crop.shape == (112, 96, 3)


# ------------------------------------------------------------------------------------------ bad input


def _png_declaring(path: Path, width: int, height: int) -> None:
    """A valid 8x8 PNG whose header then claims width x height (a decompression bomb's signature)."""
    Image.new("RGB", (8, 8)).save(path)
    data = bytearray(path.read_bytes())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4:ihdr + 12] = struct.pack(">II", width, height)
    data[ihdr + 17:ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(data[ihdr:ihdr + 17])))
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("inputs")
    face = load_image(_cacd("0000_0.jpg"))  # 250x250, one face
    files = {name: folder / name for name in ("face.jpg", "not_an_image.jpg", "truncated.jpg", "one_pixel.png",
                                              "bomb.png", "grayscale.jpg", "rgba.png", "sixteen_bit.png",
                                              "exif_rotated.jpg", "no_face.png", "empty.jpg")}
    Image.fromarray(face).save(files["face.jpg"], quality=95)
    files["not_an_image.jpg"].write_text("this is a text file with a .jpg name\n")
    files["truncated.jpg"].write_bytes(files["face.jpg"].read_bytes()[:4000])
    Image.new("RGB", (1, 1), (120, 90, 80)).save(files["one_pixel.png"])
    _png_declaring(files["bomb.png"], 50_000, 50_000)
    Image.fromarray(face).convert("L").save(files["grayscale.jpg"], quality=95)
    rgba = np.dstack([face, np.full(face.shape[:2], 255, np.uint8)])
    rgba[:20, :, 3] = 0
    Image.fromarray(rgba, "RGBA").save(files["rgba.png"])
    gray16 = (np.asarray(Image.fromarray(face).convert("L"), dtype=np.uint16) * 257)
    Image.fromarray(gray16).save(files["sixteen_bit.png"])
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated 90° counter-clockwise; display rotates it back clockwise
    Image.fromarray(np.ascontiguousarray(np.rot90(face, 1))).save(files["exif_rotated.jpg"], exif=exif.tobytes(),
                                                                  quality=95)
    Image.new("RGB", (320, 240), (128, 128, 128)).save(files["no_face.png"])
    files["empty.jpg"].write_bytes(b"")
    return files


def test_bad_input_suite_gives_each_file_a_clear_result(analyzer, bad_inputs):
    results = {Path(r.source).name: r for r in analyzer.analyze(list(bad_inputs.values()))}
    assert len(results) == len(bad_inputs)
    errors = {name: r.error for name, r in results.items() if r.error}
    assert set(errors) == {"not_an_image.jpg", "truncated.jpg", "bomb.png", "empty.jpg"}
    assert "not a recognised image format" in errors["not_an_image.jpg"]
    assert "truncated" in errors["truncated.jpg"]
    assert "decompression bomb" in errors["bomb.png"]
    assert "empty file" in errors["empty.jpg"]
    assert not results["one_pixel.png"].faces and not results["no_face.png"].faces
    reference = results["face.jpg"].faces[0]
    for name in ("grayscale.jpg", "rgba.png", "sixteen_bit.png", "exif_rotated.jpg"):
        faces = results[name].faces
        assert len(faces) == 1, name
        eyes_y, mouth_y = faces[0].landmarks[:2, 1].mean(), faces[0].landmarks[3:, 1].mean()
        assert eyes_y < mouth_y, f"{name}: the face must be upright"
        assert analyzer.compare(faces[0], reference).cosine > 0.6, name
    np.testing.assert_allclose(results["exif_rotated.jpg"].faces[0].box, reference.box, atol=6)


def test_cli_detect_on_a_folder_with_bad_files(bad_inputs, tmp_path):
    weights = require_data(RETINAFACE)
    folder = bad_inputs["face.jpg"].parent
    out = tmp_path / "faces.json"
    result = CliRunner().invoke(app, ["detect", str(folder), "--detector-weights", str(weights), "--out", str(out)])
    assert result.exit_code == 0, result.output
    entries = {Path(e["source"]).name: e for e in json.loads(out.read_text())}
    assert len(entries) == len(bad_inputs)
    assert "error" in entries["bomb.png"] and len(entries["face.jpg"]["faces"]) == 1
    face = entries["face.jpg"]["faces"][0]
    assert len(face["box"]) == 4 and len(face["landmarks"]) == 5 and 0 < face["score"] <= 1


def test_cli_exit_code_says_whether_any_input_was_read_and_out_must_be_a_file(bad_inputs, tmp_path):
    """Every input unreadable: the JSON lists why, and the exit code is 1 (0 as soon as one photo is read). An
    --out naming a folder is refused before any work, by the option itself."""
    weights = require_data(RETINAFACE)
    unreadable = [bad_inputs["bomb.png"], bad_inputs["empty.jpg"]]
    out = tmp_path / "faces.json"
    failed = CliRunner().invoke(app, ["detect", *map(str, unreadable), "--detector-weights", str(weights),
                                      "--out", str(out)])
    assert failed.exit_code == 1 and "none of the 2 inputs could be read" in " ".join(failed.output.split())
    assert all("error" in entry for entry in json.loads(out.read_text()))
    mixed = CliRunner().invoke(app, ["detect", *map(str, unreadable), str(bad_inputs["face.jpg"]),
                                     "--detector-weights", str(weights), "--out", str(out)])
    assert mixed.exit_code == 0, mixed.output
    folder = CliRunner().invoke(app, ["detect", str(bad_inputs["face.jpg"]), "--detector-weights", str(weights),
                                      "--out", str(tmp_path)])
    assert folder.exit_code == 2 and "directory" in folder.output and "Traceback" not in folder.output


def test_cli_verify_and_draw(y1_folder, tmp_path):
    weights = require_data(RETINAFACE)
    runner = CliRunner()
    common = ["--model", str(y1_folder), "--detector-weights", str(weights)]
    same = runner.invoke(app, ["verify", str(_cacd("0001_0.jpg")), str(_cacd("0001_1.jpg")), *common,
                               "--out", str(tmp_path / "same.json")])
    other = runner.invoke(app, ["verify", str(_cacd("0201_0.jpg")), str(_cacd("0201_1.jpg")), *common,
                                "--out", str(tmp_path / "other.json")])
    assert same.exit_code == 0 and other.exit_code == 0, same.output + other.output
    cos_same = json.loads((tmp_path / "same.json").read_text())["cosine"]
    cos_other = json.loads((tmp_path / "other.json").read_text())["cosine"]
    assert cos_same > cos_other
    drawn = runner.invoke(app, ["draw", str(require_data(GROUP)), "--out-dir", str(tmp_path / "drawn"),
                                "--detector-weights", str(weights)])
    assert drawn.exit_code == 0, drawn.output
    (png,) = (tmp_path / "drawn").glob("*.png")
    original, painted = load_image(require_data(GROUP)), load_image(png)
    assert painted.shape == original.shape and (painted != original).any(axis=2).mean() > 0.002
    missing = runner.invoke(app, ["verify", str(_cacd("0001_0.jpg")), str(tmp_path / "nope.jpg"), *common])
    assert missing.exit_code == 2 and "file not found" in missing.output


def test_cli_calibrate_then_verify_with_the_threshold(y1_folder, tmp_path):
    """A threshold calibrated on labelled photo pairs through the pipeline, then used by verify."""
    weights = require_data(RETINAFACE)
    rows = ["path1,path2,same"]
    rows += [f"{_cacd(f'{k:04d}_0.jpg')},{_cacd(f'{k:04d}_1.jpg')},1" for k in range(10)]
    rows += [f"{_cacd(f'{k:04d}_0.jpg')},{_cacd(f'{k:04d}_1.jpg')},0" for k in range(200, 220)]
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("\n".join(rows) + "\n")
    runner = CliRunner()
    common = ["--model", str(y1_folder), "--detector-weights", str(weights)]
    done = runner.invoke(app, ["calibrate", str(pairs), *common, "--far", "0.05", "--out", str(tmp_path / "t.json")])
    assert done.exit_code == 0, done.output
    threshold = json.loads((tmp_path / "t.json").read_text())
    assert threshold["model"] == "mobilefacenet_insightface_y1" and threshold["calibration_pairs"] == {
        "genuine": 10, "impostor": 20}
    assert threshold["measured_far"] <= 0.05
    verdicts = {}
    for name, (a, b) in {"same": ("0002_0.jpg", "0002_1.jpg"), "other": ("0202_0.jpg", "0202_1.jpg")}.items():
        out = tmp_path / f"{name}.json"
        result = runner.invoke(app, ["verify", str(_cacd(a)), str(_cacd(b)), *common, "--threshold",
                                     str(tmp_path / "t.json"), "--out", str(out)])
        assert result.exit_code == 0, result.output
        verdicts[name] = json.loads(out.read_text())
        assert verdicts[name]["threshold"] == threshold["value"]
        assert verdicts[name]["same"] == (verdicts[name]["cosine"] >= threshold["value"])
    assert verdicts["same"]["same"] and not verdicts["other"]["same"]


def test_analyser_with_68_point_landmarks(detector):
    from facesphere.align import PFLD68, five_from_68

    analyzer = FaceAnalyzer(detector, None, landmarker=PFLD68(require_data("weights/pfld68_cunjian_onnx/pfld.onnx")))
    face = analyzer.analyze([_cacd("0000_0.jpg")], embed=False)[0].faces[0]
    assert face.landmarks68.shape == (68, 2)
    x1, y1, x2, y2 = face.box
    width = x2 - x1
    assert ((face.landmarks68 >= [x1 - 0.1 * width, y1 - 0.1 * width]) &
            (face.landmarks68 <= [x2 + 0.1 * width, y2 + 0.1 * width])).all()
    # the 68 points' eyes, nose and mouth agree with the detector's 5 points
    inter_ocular = np.linalg.norm(face.landmarks[0] - face.landmarks[1])
    assert np.linalg.norm(five_from_68(face.landmarks68) - face.landmarks, axis=1).mean() < 0.15 * inter_ocular
    assert "landmarks68" in face.to_dict()
