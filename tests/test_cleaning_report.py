"""Cleaned list files and the noise report of a profiled set (facesphere.cleaning.lists / .report).

The list files are read back through the data readers that train on them; the report's figures are compared with
counts made here straight from the profile; a hostile identity name must reach the HTML only escaped; unreadable and
missing images are reported, never a crash; not one source file changes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from _noisy_set import HOSTILE, LAYOUT, MISSING_FILE, UNREADABLE_FILE, hashes, make_noisy_set
from PIL import Image

from facesphere.cleaning.lists import (
    FLAGGED_COLUMNS,
    UNREADABLE_COLUMNS,
    list_path,
    read_table,
    write_cleaned_lists,
)
from facesphere.cleaning.noise import Status
from facesphere.cleaning.report import check_new_output, rewrite_report, write_cleaning
from facesphere.data.lists import ImageListDataset, parse_list_file


@pytest.fixture
def noisy(tmp_path):
    profile, folder = make_noisy_set(tmp_path)
    return profile, folder, hashes(folder)


def test_lists_train_directly_and_name_every_flagged_image(noisy, tmp_path):
    profile, folder, before = noisy
    counts = write_cleaned_lists(profile, tmp_path / "out")
    status = np.array([s for _, s, _, _ in LAYOUT])
    clean = [i for i in range(len(LAYOUT)) if status[i] == Status.CLEAN]
    assert parse_list_file(tmp_path / "out" / "kept.txt") == [(profile.sources[i], LAYOUT[i][0]) for i in clean]
    dataset = ImageListDataset(tmp_path / "out" / "kept.txt", image_size=(24, 20))
    assert len(dataset) == len(clean) and dataset.labels.tolist() == [LAYOUT[i][0] for i in clean]
    image, target = dataset[0]
    assert tuple(image.shape) == (3, 24, 20) and target == {"label": 0}
    assert counts == {"kept.txt": len(clean), "flips.tsv": 2, "outliers.tsv": 1, "duplicates.tsv": 1,
                      "unreadable.tsv": 2}

    flips = read_table(tmp_path / "out" / "flips.tsv", FLAGGED_COLUMNS)
    assert [(int(r["index"]), r["identity"], int(r["suggested_label"]), r["suggested_identity"], r["decision"])
            for r in flips] == [(3, "alice", 1, "bob", "pending"), (10, HOSTILE, 0, "alice", "pending")]
    assert float(flips[0]["own_cosine"]) == pytest.approx(float(profile.own_cosine[3]), abs=1e-6)
    assert float(flips[0]["other_cosine"]) == pytest.approx(float(profile.other_cosine[3]), abs=1e-6)
    (dup,) = read_table(tmp_path / "out" / "duplicates.tsv", FLAGGED_COLUMNS)
    assert (int(dup["index"]), int(dup["duplicate_of"]), dup["duplicate_path"]) == (7, 4, profile.sources[4])
    (outlier,) = read_table(tmp_path / "out" / "outliers.tsv", FLAGGED_COLUMNS)
    assert int(outlier["index"]) == 6
    unreadable = read_table(tmp_path / "out" / "unreadable.tsv", UNREADABLE_COLUMNS)
    assert [(int(r["index"]), r["reason"]) for r in unreadable] == [
        (UNREADABLE_FILE, "not a recognised image format"), (MISSING_FILE, "file not found")]
    assert hashes(folder) == before


def test_list_paths_are_absolute_records_kept_and_unwritable_paths_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert list_path("a/b c.jpg") == str(tmp_path / "a" / "b c.jpg")
    assert list_path("/data/train.rec#17") == "/data/train.rec#17"  # RecordIO sources name records by key
    assert list_path("packs/train.rec#3") == f"{tmp_path}/packs/train.rec#3"
    for bad in ("/x/a #1.jpg", "/x/a\nb.jpg", "/x/a.jpg "):
        with pytest.raises(ValueError, match="list file cannot name"):
            list_path(bad)


def test_a_path_a_list_cannot_hold_goes_to_unreadable_not_kept(noisy, tmp_path):
    profile, _, _ = noisy
    profile.sources[0] = profile.sources[0].replace("img 0", "img #0")  # ' #' would start a comment in kept.txt
    write_cleaned_lists(profile, tmp_path / "out")
    kept = [path for path, _ in parse_list_file(tmp_path / "out" / "kept.txt")]
    assert profile.sources[0] not in kept and len(kept) == 6
    rows = read_table(tmp_path / "out" / "unreadable.tsv", UNREADABLE_COLUMNS)
    assert rows[0]["index"] == "0" and "list file cannot name" in rows[0]["reason"]


def _independent_counts(profile):
    """Counts per status and per identity, by a plain loop over the images."""
    overall = {s: 0 for s in Status}
    per = {}
    for label, status in zip(profile.labels.tolist(), profile.status.tolist()):
        overall[Status(status)] += 1
        per.setdefault(label, {s: 0 for s in Status})[Status(status)] += 1
    return overall, per


def test_report_figures_equal_counts_from_the_profile_and_html_escapes_names(noisy, tmp_path):
    profile, folder, before = noisy
    out = tmp_path / "out"
    summary = write_cleaning(profile, out)
    for name in ("report.json", "report.html", "histograms.png", "flips.png", "outliers.png", "duplicates.png"):
        assert (out / name).is_file(), name
    for name in ("histograms.png", "flips.png", "outliers.png", "duplicates.png"):
        with Image.open(out / name) as image:
            assert image.format == "PNG" and min(image.size) > 50

    report = json.loads((out / "report.json").read_text())
    overall, per = _independent_counts(profile)
    readable = len(LAYOUT) - overall[Status.UNREADABLE]
    s = report["summary"]
    assert (s["images"], s["readable"], s["clean"], s["flip"], s["outlier"], s["duplicate"], s["unreadable"]) == (
        13, readable, overall[Status.CLEAN], overall[Status.FLIP], overall[Status.OUTLIER], overall[Status.DUPLICATE],
        overall[Status.UNREADABLE])
    assert s["flip_rate"] == pytest.approx(2 / 11) and s["outlier_rate"] == pytest.approx(1 / 11)
    assert s["noise_rate"] == pytest.approx(3 / 11)
    assert summary["flip"] == 2 and summary["lists"]["kept.txt"] == 7
    for record in report["identities"]:
        counted = per[record["label"]]
        size = sum(v for k, v in counted.items() if k != Status.UNREADABLE)
        assert (record["size"], record["flips"], record["outliers"], record["duplicates"], record["unreadable"]) == (
            size, counted[Status.FLIP], counted[Status.OUTLIER], counted[Status.DUPLICATE], counted[Status.UNREADABLE])
        assert record["noise_fraction"] == pytest.approx((counted[Status.FLIP] + counted[Status.OUTLIER]) / size)
    assert report["identities"][2]["identity"] == HOSTILE and report["identities"][1]["spread"] is None
    assert [p["source"] for p in report["problems"]] == [profile.sources[UNREADABLE_FILE], profile.sources[MISSING_FILE]]

    page = (out / "report.html").read_text()
    assert "<script>" not in page and "&lt;script&gt;document.title=&#x27;pwned&#x27;&lt;/script&gt;" in page
    assert 'src="histograms.png"' in page and 'src="flips.png"' in page and 'href="kept.txt"' in page
    assert "file not found" in page and Path(profile.sources[MISSING_FILE]).name in page
    assert hashes(folder) == before


def test_report_renders_again_from_the_saved_profile_and_a_cleaned_folder_is_not_overwritten(noisy, tmp_path):
    profile, folder, before = noisy
    out = tmp_path / "out"
    profile.save(out / "profile")
    write_cleaning(profile, out)
    kept = (out / "kept.txt").read_bytes()
    (out / "report.html").unlink()
    again = rewrite_report(out)
    assert (out / "report.html").is_file() and again["flip"] == 2
    assert (out / "kept.txt").read_bytes() == kept  # the report never rewrites the lists (review decisions)
    with pytest.raises(FileExistsError, match="finished cleaning"):
        check_new_output(out)
    check_new_output(tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists()
    (tmp_path / "interrupted" / "profile" / "embeddings").mkdir(parents=True)
    check_new_output(tmp_path / "interrupted")  # an interrupted profiling resumes there
    assert hashes(folder) == before


def test_unloadable_images_are_grey_tiles_not_a_crash(noisy, tmp_path):
    profile, _, _ = noisy

    def failing(source):
        raise OSError(f"{source}: device gone")

    write_cleaning(profile, tmp_path / "out", load_image=failing)
    with Image.open(tmp_path / "out" / "flips.png") as image:
        assert image.size[0] > 100
    assert os.path.getsize(tmp_path / "out" / "report.html") > 1000


@pytest.mark.slow  # embeds a small set with a real model through `python -m facesphere`
def test_clean_profile_command_writes_lists_and_report_and_refuses_a_finished_folder(tmp_path):
    from _training import cli, env
    from conftest import require_data

    from facesphere.data import SyntheticFaces, write_image_folder
    from facesphere.models import import_weights
    from facesphere.models.store import save_model
    from facesphere.pipeline.threshold import calibrate_threshold

    write_image_folder(SyntheticFaces(3, 4, image_size=(112, 112), seed=1), tmp_path / "set")
    # hostile members: a file that is no image, and an identity of one image
    first = sorted(p for p in (tmp_path / "set").rglob("*.png"))[0]
    (first.parent / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    write_image_folder(SyntheticFaces(1, 1, image_size=(112, 112), seed=9), tmp_path / "single")
    shutil.move(next((tmp_path / "single").rglob("*.png")).parent, tmp_path / "set" / "zz_single")
    backbone, card = import_weights(require_data("weights/mobilefacenet_insightface_y1"))
    save_model(tmp_path / "y1", backbone, card)
    calibrate_threshold(np.linspace(0.0, 0.6, 20), np.arange(20) >= 10, 0.1, card.name, card.embedding_size,
                        card.weights_sha256).save(tmp_path / "threshold.json")  # a threshold near 0.3
    before = hashes(tmp_path / "set")
    argv = cli("clean", "profile", str(tmp_path / "set"), "--model", str(tmp_path / "y1"), "--threshold",
               str(tmp_path / "threshold.json"), "--out", str(tmp_path / "out"), "--batch-size", "8")
    done = subprocess.run(argv, env=env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)
    assert summary["images"] == 14 and summary["identities"] == 4 and summary["unreadable"] == 1
    assert sum(summary[k] for k in ("clean", "flip", "outlier", "duplicate", "unreadable")) == 14
    problems = json.loads((tmp_path / "out" / "report.json").read_text())["problems"]
    assert any(p["source"].endswith("broken.png") for p in problems)
    assert any("one image" in p["reason"] for p in problems)
    assert summary["lists"]["kept.txt"] == summary["clean"]
    images = {str(p) for p in (tmp_path / "set").rglob("*") if p.is_file()}
    assert {path for path, _ in parse_list_file(tmp_path / "out" / "kept.txt")} <= images
    for name in ("report.html", "report.json", "histograms.png", "flips.tsv", "profile/profile.json"):
        assert (tmp_path / "out" / name).is_file(), name
    again = subprocess.run(argv, env=env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 2 and "finished cleaning" in again.stderr.strip().splitlines()[-1]
    assert hashes(tmp_path / "set") == before
