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
from PIL import Image
from torch.utils.data import DataLoader

from conftest import require_data

from facesphere.data import ImageFolderDataset, ImageListDataset, ListFileError, parse_list_file, read_list_file
from facesphere.data.ages import AgeFileError
from facesphere.data.record_dataset import RecordDataset, describe_records, pack_folder
from facesphere.data.ages import MAX_AGE, parse_age
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
