"""Inputs of the face pipeline: folder listings report what they skip, a bad array in a batch is an error of its
own, and a huge or foreign file is refused by its size and first bytes before it is read."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from conftest import require_data
from PIL import Image
from typer.testing import CliRunner

from facesphere.cli.main import app
from facesphere.data import images as images_module
from facesphere.data.folders import ImageFolderDataset, list_images
from facesphere.data.images import DEFAULT_MAX_BYTES, ImageError, load_image
from facesphere.pipeline import FaceAnalyzer

RETINAFACE = "weights/retinaface_mnet025_biubug6/official_release/mobilenet0.25_Final.pth"
FACE = "data/cacd_vs_fold1/CACD_VS/0000_0.jpg"


@pytest.fixture(scope="module")
def face() -> np.ndarray:
    return load_image(require_data(FACE))


@pytest.fixture(scope="module")
def analyzer():
    from facesphere.detect import build_detector

    return FaceAnalyzer(build_detector("retinaface", require_data(RETINAFACE)))


def _mixed_folder(folder: Path, face: np.ndarray) -> dict[str, str | None]:
    """jpg + gif + txt + hidden file + hidden folder; name -> the reason it must be skipped (None: read)."""
    folder.mkdir(parents=True)
    Image.fromarray(face).save(folder / "a.jpg", quality=95)
    Image.fromarray(face).save(folder / "b.gif")
    (folder / "notes.txt").write_text("not an image\n")
    (folder / "README").write_text("no extension\n")
    Image.fromarray(face).save(folder / ".hidden.jpg", quality=95)
    (folder / ".cache").mkdir()
    Image.fromarray(face).save(folder / ".cache" / "c.jpg", quality=95)
    return {"a.jpg": None, "b.gif": None, "notes.txt": "unsupported file type .txt",
            "README": "unsupported file type (no extension)", ".hidden.jpg": "hidden file", ".cache": "hidden folder"}


def test_folder_listing_names_every_skipped_entry_with_its_reason(tmp_path, face):
    expected = _mixed_folder(tmp_path / "in", face)
    images, skipped = list_images(tmp_path / "in")
    assert [p.name for p in images] == ["a.jpg", "b.gif"]
    assert {s.path.name: s.reason for s in skipped} == {k: v for k, v in expected.items() if v}


def test_gif_is_read_named_or_in_a_folder_as_its_first_frame(tmp_path, face):
    frames = [Image.fromarray(face), Image.fromarray(255 - face)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    first = load_image(tmp_path / "anim.gif")
    reference = np.asarray(Image.open(tmp_path / "anim.gif").convert("RGB"))
    np.testing.assert_array_equal(first, reference)
    assert np.abs(first.astype(int) - face.astype(int)).mean() < 20  # the first frame, not the inverted second


def test_cli_detect_lists_skipped_files_in_the_json_and_one_log_line(tmp_path, face):
    expected = _mixed_folder(tmp_path / "in", face)
    out = tmp_path / "faces.json"
    result = CliRunner().invoke(app, ["detect", str(tmp_path / "in"), "--detector-weights",
                                      str(require_data(RETINAFACE)), "--out", str(out)])
    assert result.exit_code == 0, result.output
    entries = {Path(e["source"]).name: e for e in json.loads(out.read_text())}
    assert set(entries) == set(expected)
    for name, reason in expected.items():
        if reason is None:
            assert len(entries[name]["faces"]) == 1, name
        else:
            assert entries[name]["skipped"] == reason, name
    log = " ".join(result.output.split())  # the log handler wraps long lines
    assert log.count("WARNING") == 1 and "WARNING skipped 4 entries in" in log, log
    assert "1 hidden file, 1 hidden folder, 2 unsupported file type ((no extension), .txt)" in log, log


def test_training_folder_reader_reports_what_it_skipped(tmp_path, face, caplog):
    small = face[::8, ::8]
    root = tmp_path / "train"
    expected = _mixed_folder(root / "alice", small)
    _mixed_folder(root / "bob", small)
    Image.fromarray(small).save(root / "stray.jpg")
    (root / ".DS_Store").write_bytes(b"\0")
    with caplog.at_level(logging.WARNING):
        ds = ImageFolderDataset(root)
    assert len(ds) == 4 and ds.classes == ["alice", "bob"]
    reasons = {str(s.path.relative_to(root)): s.reason for s in ds.skipped}
    want = {f"{person}/{name}": why for person in ("alice", "bob") for name, why in expected.items() if why}
    want.update({"stray.jpg": "file directly under the root (not in a class folder)", ".DS_Store": "hidden file"})
    assert reasons == want
    lines = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(lines) == 1 and "skipped 10 entries" in lines[0], lines


BAD_ARRAYS = {
    "0x0": np.zeros((0, 0, 3), np.uint8),
    "0xN": np.zeros((0, 40, 3), np.uint8),
    "2 channels": np.zeros((40, 40, 2), np.uint8),
    "5 channels": np.zeros((40, 40, 5), np.uint8),
    "float64 out of range": np.full((40, 40, 3), 300.0),
    "object": np.empty((4, 4, 3), dtype=object),
    "1-D": np.zeros(120, np.uint8),
    "ragged list": [[1, 2], [3]],
    "None": None,
}


@pytest.mark.parametrize("position", [0, 1, 2])
@pytest.mark.parametrize("kind", sorted(BAD_ARRAYS))
def test_a_bad_array_in_a_batch_is_an_error_of_its_own_at_its_index(analyzer, face, kind, position):
    good = [face, np.ascontiguousarray(face[:, ::-1])]
    alone = [analyzer.analyze([image], embed=False)[0] for image in good]
    batch = list(good)
    batch.insert(position, BAD_ARRAYS[kind])
    results = analyzer.analyze(batch, embed=False)
    assert len(results) == 3
    bad = results[position]
    assert bad.error is not None and bad.source == f"<array {position}>" and bad.error.startswith(f"<array {position}>:")
    for result, reference in zip([r for i, r in enumerate(results) if i != position], alone):
        assert result.error is None and len(result.faces) == len(reference.faces) == 1
        np.testing.assert_array_equal(result.faces[0].box, reference.faces[0].box)
        np.testing.assert_array_equal(result.faces[0].crop, reference.faces[0].crop)


def test_a_non_contiguous_array_is_analysed_like_its_contiguous_copy(analyzer, face):
    strided = face[:, ::-1]  # negative stride
    assert not strided.flags.c_contiguous
    a, b = analyzer.analyze([strided, np.ascontiguousarray(strided)], embed=False)
    np.testing.assert_array_equal(a.faces[0].box, b.faces[0].box)


def test_a_huge_foreign_file_is_refused_before_reading(tmp_path, face, analyzer):
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(face).save(folder / "a.jpg", quality=95)
    with open(folder / "huge.jpg", "wb") as handle:
        handle.truncate(5 * 2**30)  # sparse: costs no disk
    (folder / "fake.png").write_bytes(b"MZ\x90\x00" + b"\0" * 1000)  # an executable named .png
    Image.fromarray(face).save(folder / "z.png")
    reads: list[tuple[str, int]] = []

    class SpyingFile(io.FileIO):
        def read(self, size=-1):
            reads.append((str(self.name), size))
            return super().read(size)

    def spying_open(file, mode="r"):
        assert mode == "rb"
        return SpyingFile(file, "r")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(images_module, "open", spying_open, raising=False)
        results = {Path(r.source).name: r for r in analyzer.analyze(sorted(folder.iterdir()), embed=False)}
    assert "exceeds the limit of" in results["huge.jpg"].error and str(folder / "huge.jpg") in results["huge.jpg"].error
    assert "not a recognised image format" in results["fake.png"].error
    assert len(results["a.jpg"].faces) == 1 and len(results["z.png"].faces) == 1
    assert not any(name.endswith("huge.jpg") for name, _ in reads), reads  # not even opened
    assert [n for name, n in reads if name.endswith("fake.png")] == [16], reads  # only the magic bytes
    assert all(n == -1 or n <= DEFAULT_MAX_BYTES + 1 for _, n in reads)


def test_size_cap_is_configurable(tmp_path, face):
    path = tmp_path / "a.png"
    Image.fromarray(face).save(path)
    size = path.stat().st_size
    with pytest.raises(ImageError, match=f"{size} bytes exceeds the limit of {size - 1}"):
        load_image(path, max_bytes=size - 1)
    assert load_image(path, max_bytes=size).shape == face.shape
    assert load_image(path, max_bytes=None).shape == face.shape
