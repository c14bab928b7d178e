"""Ages of files on disk: list files with an age column, image folders (side file, FG-NET names), RecordIO packs.

Truth is independent of the readers: ages are written by hand (or drawn) and must read back exactly, masks must
be True exactly where an age was given, and every malformed age must be refused with the file and line named.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image
from torch.utils.data import DataLoader

from conftest import require_data

from facesphere.data import (ImageFolderDataset, ImageListDataset, ListFileError, parse_list_file, read_list_file,
                             write_image_folder)
from facesphere.data.ages import AgeFileError
from facesphere.data.record_dataset import RecordDataset, describe_records, pack_folder
from facesphere.data.ages import MAX_AGE, format_age, parse_age
from facesphere.data.lists import AGE_HEADER, remap_list_file


def _png(path: Path, value: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(path)
    return path


def _same_ages(a, b) -> bool:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return a.shape == b.shape and bool(np.all((a == b) | (np.isnan(a) & np.isnan(b))))


# ------------------------------------------------------------------------------------------------ list files


def test_list_age_column_targets_masks_and_spaces(tmp_path):
    for i, name in enumerate(("a.png", "my photo.png", "c.png", "d.png")):
        _png(tmp_path / name, 40 * i)
    (tmp_path / "list.txt").write_text(f"{AGE_HEADER}\na.png 0 12\nmy photo.png 1 -\nc.png 1 3.5  # a comment\n"
                                       "d.png 0\n")
    data = ImageListDataset(tmp_path / "list.txt")
    assert data.target_names == ("label", "age")
    assert data.ages.dtype == np.float64 and _same_ages(data.ages, [12, np.nan, 3.5, np.nan])
    assert [str(p.name) for p in data.paths] == ["a.png", "my photo.png", "c.png", "d.png"]
    assert data[0][1] == {"label": 0, "age": 12.0, "age_mask": True}
    _, unknown = data[1]
    assert unknown["label"] == 1 and math.isnan(unknown["age"]) and unknown["age_mask"] is False
    # the old reader's view of the same file is unchanged: pairs, the age left out
    assert parse_list_file(tmp_path / "list.txt") == [("a.png", 0), ("my photo.png", 1), ("c.png", 1), ("d.png", 0)]


def test_list_without_header_reads_as_before(tmp_path):
    _png(tmp_path / "a b 7.png")
    (tmp_path / "list.txt").write_text("# a comment\na b 7.png 3\n")
    data = ImageListDataset(tmp_path / "list.txt")
    assert data.target_names == ("label",) and data.ages is None
    assert data[0][1] == {"label": 3}
    assert data.paths[0].name == "a b 7.png"  # no header: the digits before the label are part of the path
    entries, with_age = read_list_file(tmp_path / "list.txt")
    assert not with_age and entries[0].path == "a b 7.png" and math.isnan(entries[0].age)


def test_list_header_with_no_known_age_offers_no_age_target(tmp_path):
    _png(tmp_path / "a.png")
    (tmp_path / "list.txt").write_text(f"{AGE_HEADER}\na.png 0 -\na.png 0\n")
    data = ImageListDataset(tmp_path / "list.txt")
    assert data.target_names == ("label",) and data.ages is None and set(data[0][1]) == {"label"}


@pytest.mark.parametrize("age, reason", [
    ("abc", "is not a number"), ("-3", "is negative"), ("nan", "not a finite number"), ("inf", "not a finite number"),
    ("-inf", "not a finite number"), ("151", "above 150"), ("1e9", "above 150"), ("1_0", "is not a number"),
    ("١٢", "is not a number"), ("0x10", "is not a number"), ("12y", "is not a number"),
])
def test_list_bad_age_names_file_and_line(tmp_path, age, reason):
    (tmp_path / "list.txt").write_text(f"{AGE_HEADER}\n\na.png 0 12\nb.png 1 {age}\n")
    with pytest.raises(ListFileError, match=reason) as info:
        read_list_file(tmp_path / "list.txt")
    assert info.value.line == 4 and str(info.value).startswith(f"{tmp_path / 'list.txt'}:4: ")
    with pytest.raises(ListFileError):
        ImageListDataset(tmp_path / "list.txt")


@pytest.mark.parametrize("text, line, reason", [
    ("a.png 0\n# columns: path label age\nb.png 0 3\n", 2, "before the first entry"),
    ("# columns: path label age\n# columns: path label age\n", 2, "once"),
    ("# columns: path age label\na.png 0 3\n", 1, "unknown columns"),
    ("# columns: path label age\nmy photo.png 3\n", 2, "needs an age or '-'"),
    ("# columns: path label age\na.png\n", 2, "expected '<path> <label> <age>'"),
])
def test_list_bad_columns(tmp_path, text, line, reason):
    (tmp_path / "list.txt").write_text(text)
    with pytest.raises(ListFileError, match=reason) as info:
        read_list_file(tmp_path / "list.txt")
    assert info.value.line == line


_PATH = st.text(st.characters(codec="utf-8", exclude_categories=("Cc", "Cs", "Zl", "Zp")), min_size=1, max_size=12).map(
    lambda t: "p" + t.replace("#", "") + ".png")
_AGE = st.one_of(st.just(math.nan), st.floats(0, MAX_AGE, allow_nan=False), st.integers(0, 150).map(float))


@given(st.lists(st.tuples(_PATH, st.integers(0, 2**40), _AGE), min_size=1, max_size=8), st.booleans())
def test_any_list_with_ages_reads_back_exactly(tmp_path_factory, entries, dash):
    """Written as the contract says (path with spaces kept, ``-`` or, for a path without spaces, nothing for an
    unknown age), every entry reads back: path, label and age bit for bit, the mask where the age was given."""
    lines = []
    for path, label, age in entries:
        if math.isnan(age) and (dash or len(path.split()) > 1):
            lines.append(f"{path} {label} -\n")
        elif math.isnan(age):
            lines.append(f"{path} {label}\n")
        else:
            lines.append(f"{path} {label} {format_age(age)}\n")
    list_file = tmp_path_factory.mktemp("lists") / "list.txt"
    list_file.write_text(AGE_HEADER + "\n" + "".join(lines), encoding="utf-8")
    read, with_age = read_list_file(list_file)
    assert with_age
    assert [(e.path, e.label) for e in read] == [(path, label) for path, label, _ in entries]
    assert _same_ages([e.age for e in read], [a for *_, a in entries])


def test_parse_age_accepts_plain_decimals_only():
    assert [parse_age(t) for t in ("0", "12", "+7", "3.25", ".5", "1e1", "150")] == [0, 12, 7, 3.25, 0.5, 10, MAX_AGE]
    assert parse_age("-0") == 0


def test_remap_keeps_the_age_column(tmp_path):
    (tmp_path / "list.txt").write_text(f"{AGE_HEADER}\nmy a.png 70 12\nb.png 9 -\nc.png 70 0.5\n")
    remap_list_file(tmp_path / "list.txt", tmp_path / "new.txt")
    entries, with_age = read_list_file(tmp_path / "new.txt")
    assert with_age
    assert [(e.path, e.label) for e in entries] == [("my a.png", 1), ("b.png", 0), ("c.png", 1)]
    assert _same_ages([e.age for e in entries], [12, np.nan, 0.5])
    (tmp_path / "plain.txt").write_text("a.png 5\n")
    remap_list_file(tmp_path / "plain.txt", tmp_path / "plain_new.txt")
    assert read_list_file(tmp_path / "plain_new.txt")[1] is False


def test_list_ages_collate_into_tensors(tmp_path):
    for i in range(4):
        _png(tmp_path / f"{i}.png", 30 * i)
    (tmp_path / "list.txt").write_text(AGE_HEADER + "\n" + "".join(
        f"{i}.png {i % 2} {'-' if i == 2 else 10 * i}\n" for i in range(4)))
    data = ImageListDataset(tmp_path / "list.txt")
    images, targets = next(iter(DataLoader(data, batch_size=4)))
    assert images.shape == (4, 3, 8, 8)
    assert targets["age"].dtype in (torch.float32, torch.float64) and targets["age_mask"].dtype == torch.bool
    assert targets["age_mask"].tolist() == [True, True, False, True]
    assert targets["age"][targets["age_mask"]].tolist() == [0.0, 10.0, 30.0]
    assert torch.isnan(targets["age"][2])


# ------------------------------------------------------------------------------------------------ image folders


def _folder(root: Path, names: dict[str, list[str]]) -> Path:
    for k, (person, files) in enumerate(names.items()):
        for j, name in enumerate(files):
            _png(root / person / name, 20 * k + j)
    return root


def test_folder_side_file_ages(tmp_path, caplog):
    root = _folder(tmp_path / "set", {"alice": ["a.png", "b.png"], "bob": ["c.png"]})
    (root / "ages.csv").write_text("path,age\nalice/b.png,31.5\nbob/c.png,7\nalice/a.png,-\n")
    with caplog.at_level("WARNING"):
        data = ImageFolderDataset(root, ages="side_file")
    assert "ages.csv" not in caplog.text  # the side file is not reported as a stray file
    assert data.target_names == ("label", "age") and _same_ages(data.ages, [np.nan, 31.5, 7])
    assert [bool(data[i][1]["age_mask"]) for i in range(3)] == [False, True, True]
    plain = ImageFolderDataset(root)  # the default reads no ages, whatever lies in the root
    assert plain.ages is None and plain.target_names == ("label",) and set(plain[0][1]) == {"label"}


@pytest.mark.parametrize("text, line, reason", [
    ("path,age\nalice/a.png,12\nalice/zz.png,3\n", 3, "is not an image of"),
    ("path,age\nalice/a.png,12\nalice/a.png,13\n", 3, "listed twice"),
    ("path,age\nalice/a.png,twelve\n", 2, "is not a number"),
    ("path,age\nalice/a.png,-1\n", 2, "is negative"),
    ("path,age\nalice/a.png,nan\n", 2, "not a finite number"),
    ("path,age\nalice/a.png,12,3\n", 2, "expected 'relative/path,age'"),
    ("file,years\nalice/a.png,12\n", 1, "header 'path,age'"),
])
def test_folder_bad_side_file(tmp_path, text, line, reason):
    root = _folder(tmp_path / "set", {"alice": ["a.png"]})
    (root / "ages.csv").write_text(text)
    with pytest.raises(AgeFileError, match=reason) as info:
        ImageFolderDataset(root, ages="side_file")
    assert str(info.value).startswith(f"{root / 'ages.csv'}:{line}: ") and "\n" not in str(info.value)


@pytest.mark.parametrize("bad", ["empty", "not_utf8", "wrong_format", "huge", "directory", "missing"])
def test_folder_side_file_hostile_files(tmp_path, bad):
    """The bad-input classes of the CLI matrix, for the side file (not a CLI argument: ``--ages side_file`` reads it
    from the folder): the library raises one typed error naming the file; ``data pack`` exits 2 with one line, writing
    nothing."""
    from typer.testing import CliRunner

    from facesphere.cli.main import app

    root = _folder(tmp_path / "set", {"alice": ["a.png"]})
    side = root / "ages.csv"
    if bad == "empty":
        side.write_bytes(b"")
    elif bad == "not_utf8":
        side.write_bytes(b"path,age\nalice/a.png,\xff\xfe\n")
    elif bad == "wrong_format":
        side.write_bytes((root / "alice" / "a.png").read_bytes())
    elif bad == "huge":
        with open(side, "wb") as handle:
            handle.truncate(5 * 2**30)  # sparse: refused by its size before any read
    elif bad == "directory":
        side.mkdir()
    with pytest.raises((AgeFileError, FileNotFoundError)) as info:
        ImageFolderDataset(root, ages="side_file")
    assert str(side) in str(info.value) and "\n" not in str(info.value)
    refused = CliRunner().invoke(app, ["data", "pack", str(root), str(tmp_path / "pack"), "--ages", "side_file"])
    lines = refused.output.strip().splitlines()
    assert refused.exit_code == 2 and "Traceback" not in refused.output and "ages.csv" in lines[-1], refused.output
    assert not (tmp_path / "pack").exists()


def test_folder_side_file_missing_or_unknown_source(tmp_path):
    root = _folder(tmp_path / "set", {"alice": ["a.png"]})
    with pytest.raises(FileNotFoundError, match="ages.csv"):
        ImageFolderDataset(root, ages="side_file")
    with pytest.raises(ValueError, match="unknown age source"):
        ImageFolderDataset(root, ages="exif")


def test_folder_fgnet_names_synthetic(tmp_path):
    root = _folder(tmp_path / "set", {"001": ["001A02.JPG", "001A10b.jpg"], "002": ["002A43.jpeg", "portrait.png"]})
    data = ImageFolderDataset(root, ages="fgnet_names")
    assert _same_ages(data.ages, [2, 10, 43, np.nan])


def test_fgnet_names_on_real_files(tmp_path):
    source = require_data("data/fgnet/images")
    picks = sorted(source.iterdir())[:: 250][:4]
    root = tmp_path / "fgnet"
    for path in picks:  # links: the folder layout wants one sub-folder per subject
        (root / path.name[:3]).mkdir(parents=True, exist_ok=True)
        (root / path.name[:3] / path.name).symlink_to(path)
    data = ImageFolderDataset(root, ages="fgnet_names", image_size=(16, 16))
    expected = [int(p.name[4:6]) for p in sorted(picks, key=lambda p: (p.name[:3], p.name))]
    assert data.ages.tolist() == expected and all(data[i][1]["age_mask"] for i in range(len(data)))
    assert data.target_names == ("label", "age") and data.num_classes == len({p.name[:3] for p in picks})


# ------------------------------------------------------------------------------------------------ RecordIO


def test_pack_with_ages_round_trip(tmp_path):
    root = _folder(tmp_path / "set", {"alice": ["a.png", "b.png"], "bob": ["c.png", "d.png"]})
    (root / "ages.csv").write_text("path,age\nalice/a.png,0\nalice/b.png,69.5\nbob/d.png,21\n")
    pack_folder(root, tmp_path / "pack", ages="side_file", progress=False)
    packed = RecordDataset(tmp_path / "pack")
    assert packed.target_names == ("label", "age") and _same_ages(packed.ages, [0, 69.5, np.nan, 21])
    assert packed.labels.tolist() == [0, 0, 1, 1] and packed.layout.identity_ranges.tolist() == [[1, 3], [3, 5]]
    header, _ = packed.read_image_bytes(2)
    assert header.labels == (1.0, -1.0)  # unknown age: -1 in the record
    assert [bool(packed[i][1]["age_mask"]) for i in range(4)] == [True, True, False, True]
    assert describe_records(packed)["images_with_age"] == 3
    pack_folder(root, tmp_path / "plain", progress=False)  # no age source: scalar labels, no age target
    plain = RecordDataset(tmp_path / "plain")
    assert plain.ages is None and plain.target_names == ("label",) and plain.read_image_bytes(0)[0].labels == (0.0,)


@pytest.mark.parametrize("age, reason", [(float("nan"), "not finite"), (float("inf"), "not finite"), (200.0, "above 150")])
def test_record_bad_age_names_record(tmp_path, age, reason):
    from facesphere.data.recordio import IRHeader, RecordIOError, RecordIOWriter, pack

    with RecordIOWriter(tmp_path / "train.rec", tmp_path / "train.idx") as writer:
        writer.write(pack(IRHeader(0, (0.0, 30.0), 1, 0), _png_bytes()), key=1)  # no record 0: a plain pack
        writer.write(pack(IRHeader(0, (0.0, age), 2, 0), _png_bytes()), key=2)
    with pytest.raises(RecordIOError, match=reason) as info:
        RecordDataset(tmp_path)
    assert "record 2" in str(info.value)


def _png_bytes() -> bytes:
    import io

    out = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(out, format="PNG")
    return out.getvalue()


def test_cli_pack_ages_and_refusal(tmp_path):
    from typer.testing import CliRunner

    from facesphere.cli.main import app

    root = tmp_path / "set" / "001"
    root.mkdir(parents=True)
    for name in ("001A05.JPG", "001A30.JPG"):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / name, format="JPEG")
    done = CliRunner().invoke(app, ["data", "pack", str(root.parent), str(tmp_path / "pack"), "--ages", "fgnet_names"])
    assert done.exit_code == 0, done.output
    assert RecordDataset(tmp_path / "pack").ages.tolist() == [5.0, 30.0]
    refused = CliRunner().invoke(app, ["data", "pack", str(root.parent), str(tmp_path / "other"), "--ages", "exif"])
    assert refused.exit_code == 2 and "unknown age source 'exif'" in refused.output
    assert not (tmp_path / "other").exists()


def test_cli_pack_bad_side_file_is_one_line_and_writes_nothing(tmp_path):
    from typer.testing import CliRunner

    from facesphere.cli.main import app

    root = _folder(tmp_path / "set", {"alice": ["a.png"]})
    (root / "ages.csv").write_text("path,age\nalice/a.png,-4\n")
    refused = CliRunner().invoke(app, ["data", "pack", str(root), str(tmp_path / "pack"), "--ages", "side_file"])
    assert refused.exit_code == 2 and "ages.csv:2: age -4 is negative" in " ".join(refused.output.split())
    assert "Traceback" not in refused.output and not (tmp_path / "pack").exists()


# ------------------------------------------------------------------------------------------------ writers


def test_write_image_folder_keeps_ages(tmp_path):
    for i in range(4):
        _png(tmp_path / "src" / f"{i}.png", 50 * i)
    (tmp_path / "src" / "list.txt").write_text(AGE_HEADER + "\n0.png 1 4\n1.png 0 -\n2.png 1 88.25\n3.png 0 0\n")
    source = ImageListDataset(tmp_path / "src" / "list.txt")
    write_image_folder(source, tmp_path / "out")
    back = ImageFolderDataset(tmp_path / "out", ages="side_file")
    # the folder orders by label, then by sample number: source indices 1, 3 (label 0), then 0, 2 (label 1)
    assert back.labels.tolist() == [0, 0, 1, 1] and _same_ages(back.ages, source.ages[[1, 3, 0, 2]])
    for i, j in enumerate([1, 3, 0, 2]):
        assert np.array_equal(back.load_uint8(i), source.load_uint8(j))
    plain = tmp_path / "plain"
    write_image_folder(ImageFolderDataset(tmp_path / "out"), plain)
    assert not (plain / "ages.csv").exists()


def test_cleaned_lists_and_review_keep_ages(tmp_path):
    from facesphere.cleaning.lists import FLAGGED_COLUMNS, read_table, write_cleaned_lists
    from facesphere.cleaning.noise import Status
    from facesphere.cleaning.profile import NoiseProfile
    from facesphere.cleaning.review import ReviewFolder

    ages = np.array([30.0, np.nan, 2.5, 41.0, 7.0])
    status = [Status.CLEAN, Status.CLEAN, Status.FLIP, Status.OUTLIER, Status.CLEAN]
    sources = [f"/data/person {i}.png" for i in range(5)]  # spaces: the age column must keep them whole
    profile = NoiseProfile(sources=sources, labels=[0, 0, 1, 1, 1], identity_names=["a", "b"], status=status,
                           own_cosine=[0.9] * 5, other_cosine=[0.1] * 5, other_label=[1, 1, 0, 0, 0],
                           duplicate_of=[-1] * 5, identity_size=[2, 3], identity_centres=[1, 1],
                           identity_spread=[0.5, 0.5], threshold=0.3, far=1e-3, model="m", duplicate_cosine=0.95,
                           ages=ages)
    profile.save(tmp_path / "profile")
    assert _same_ages(NoiseProfile.load(tmp_path / "profile").ages, ages)
    out = tmp_path / "out"
    write_cleaned_lists(profile, out)
    entries, with_age = read_list_file(out / "kept.txt")
    assert with_age and [e.path for e in entries] == [sources[0], sources[1], sources[4]]
    assert _same_ages([e.age for e in entries], ages[[0, 1, 4]])
    assert read_table(out / "flips.tsv", FLAGGED_COLUMNS)[0]["age"] == "2.5"
    review = ReviewFolder(out)
    review.decide(2, "confirm")  # a flip kept under the suggested identity, with its age
    review.decide(3, "reject")
    entries, _ = read_list_file(out / "kept.txt")
    assert [(e.path, e.label) for e in entries][-2:] == [(sources[2], 0), (sources[3], 1)]
    assert _same_ages([e.age for e in entries], ages[[0, 1, 4, 2, 3]])
    assert read_table(out / "flips.tsv", FLAGGED_COLUMNS)[0]["decision"] == "confirmed"
    without = NoiseProfile(**{**profile.__dict__, "ages": None})
    write_cleaned_lists(without, tmp_path / "plain")
    assert read_list_file(tmp_path / "plain" / "kept.txt")[1] is False


# ------------------------------------------------------------------------------------------------ config


def test_data_config_ages_choices_and_pass_through(tmp_path):
    from typing import get_args

    from pydantic import ValidationError

    from facesphere.data.ages import FOLDER_AGE_SOURCES
    from facesphere.train.config import DataConfig, ExperimentConfig
    from facesphere.train.data_setup import build_dataset

    assert get_args(DataConfig.model_fields["ages"].annotation) == FOLDER_AGE_SOURCES
    root = _folder(tmp_path / "set", {"001": ["001A12.JPG", "001A40.JPG"]})
    cfg = ExperimentConfig.model_validate({"data": {"kind": "folder", "root": str(root), "ages": "fgnet_names",
                                                    "image_size": [8, 8]}})
    data = build_dataset(cfg)
    assert data.ages.tolist() == [12.0, 40.0] and data.target_names == ("label", "age")
    assert build_dataset(cfg.model_copy(update={"data": cfg.data.model_copy(update={"ages": "none"})})).ages is None
    with pytest.raises(ValidationError, match="is for data.kind 'folder'"):
        DataConfig.model_validate({"kind": "list", "list_file": "l.txt", "ages": "side_file"})
    with pytest.raises(ValidationError, match="ages"):
        DataConfig.model_validate({"kind": "folder", "root": str(root), "ages": "exif"})


def test_a_plain_model_trains_on_a_list_with_ages(tmp_path):
    """An age column on a run without an age objective is carried and ignored: the recognition loss trains as on a
    list without ages (the batch holds age and age_mask; nothing reads them)."""
    from facesphere.data import SyntheticFaces
    from facesphere.train.config import load_config
    from facesphere.train.trainer import Trainer, read_metrics

    write_image_folder(SyntheticFaces(4, 2, image_size=(32, 32), seed=5), tmp_path / "faces")
    files = sorted((tmp_path / "faces").rglob("*.png"))
    (tmp_path / "list.txt").write_text(AGE_HEADER + "\n" + "".join(
        f"{f.relative_to(tmp_path)} {k // 2} {'-' if k % 3 == 0 else 20 + k}\n" for k, f in enumerate(files)))
    cfg = load_config(None, [
        "data.kind=list", f"data.list_file={tmp_path / 'list.txt'}", "data.batch_size=4", "data.num_workers=0",
        "model.backbone=sphereface4", "model.backbone_args={embedding_size: 16, input_size: [32, 32]}",
        "train.steps=2", "train.log_every=1", "train.tensorboard=false", "train.progress=false", "eval.enabled=false",
        f"output_dir={tmp_path / 'runs'}", "name=aged"])
    Trainer(cfg).fit()
    rows = read_metrics(tmp_path / "runs" / "aged" / "metrics.csv")
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in rows)
