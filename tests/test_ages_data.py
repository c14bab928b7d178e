"""Ages of files on disk: list files with an age column, image folders (side file, FG-NET names), RecordIO packs.

Truth is independent of the readers: ages are written by hand (or drawn) and must read back exactly, masks must
be True exactly where an age was given, and every malformed age must be refused with the file and line named.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from facesphere.data import ImageListDataset, ListFileError, parse_list_file, read_list_file
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
