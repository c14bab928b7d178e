"""``facesphere gallery enrol | list | check | remove`` on real photos."""

from __future__ import annotations

import json
import shutil

import numpy as np
from conftest import require_data
from PIL import Image
from typer.testing import CliRunner

from facesphere.cli.main import app
from facesphere.gallery import Gallery

SCRFD = "weights/scrfd_500m_kps_onnx/scrfd_500m_bnkps.onnx"
CACD = "data/cacd_vs_fold1/CACD_VS"


def test_enrol_a_folder_then_list_check_remove(tmp_path):
    from facesphere.models import import_weights
    from facesphere.models.store import save_model

    save_model(tmp_path / "y1", *import_weights(require_data("weights/mobilefacenet_insightface_y1")))
    people = tmp_path / "people"
    for pair in ("0001", "0002", "0003"):
        (people / f"p{pair}").mkdir(parents=True)
        for k in (0, 1):
            shutil.copy(require_data(CACD) / f"{pair}_{k}.jpg", people / f"p{pair}")
    Image.fromarray(np.full((120, 120, 3), 90, np.uint8)).save(people / "p0003" / "blank.png")
    (people / "p0003" / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    gallery = tmp_path / "g.sqlite"
    runner = CliRunner()
    enrolled = runner.invoke(app, ["gallery", "enrol", str(gallery), str(people), "--model", str(tmp_path / "y1"),
                                   "--detector", "scrfd", "--detector-weights", str(require_data(SCRFD))])
    assert enrolled.exit_code == 0, enrolled.output
    listed = runner.invoke(app, ["gallery", "list", str(gallery), "--out", str(tmp_path / "list.json")])
    assert listed.exit_code == 0, listed.output
    payload = json.loads((tmp_path / "list.json").read_text())
    assert payload["model"] == "mobilefacenet_insightface_y1"
    assert [(i["name"], i["templates"]) for i in payload["identities"]] == [("p0001", 2), ("p0002", 2), ("p0003", 2)]
    assert runner.invoke(app, ["gallery", "check", str(gallery)]).exit_code == 0
    removed = runner.invoke(app, ["gallery", "remove", str(gallery), "p0002"])
    assert removed.exit_code == 0, removed.output
    unknown = runner.invoke(app, ["gallery", "remove", str(gallery), "nobody"])
    assert unknown.exit_code == 2 and "no identity named 'nobody'" in unknown.output
    with Gallery(gallery) as store:
        assert [i.name for i in store.identities()] == ["p0001", "p0003"]
    missing = runner.invoke(app, ["gallery", "list", str(tmp_path / "nope.sqlite")])
    assert missing.exit_code == 2 and "no such gallery" in missing.output


def test_read_commands_refuse_a_folder_in_one_line(tmp_path):
    """A folder given as the gallery is refused by name, with no traceback and nothing created in it."""
    runner = CliRunner()
    for command in (["gallery", "list", str(tmp_path)], ["gallery", "remove", str(tmp_path), "alice"]):
        result = runner.invoke(app, command)
        assert result.exit_code != 0 and "Traceback" not in result.output, command
        assert "not a gallery file (a folder" in " ".join(result.output.split()), result.output  # rich wraps lines
    assert list(tmp_path.iterdir()) == []


def test_read_commands_leave_a_foreign_or_empty_database_unchanged(tmp_path):
    """`gallery list` on another application's SQLite file, an empty file and a non-database file: refused in one
    line, and every byte of the file (and the absence of -wal/-shm files) is as before."""
    import sqlite3

    foreign = tmp_path / "other.db"
    db = sqlite3.connect(foreign)
    db.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, text TEXT)")
    db.execute("INSERT INTO notes (text) VALUES ('keep me')")
    db.commit()
    db.close()
    empty = tmp_path / "empty.db"
    empty.write_bytes(b"")
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"not sqlite at all" * 100)
    runner = CliRunner()
    for path in (foreign, empty, garbage):
        before = path.read_bytes()
        for command in (["gallery", "list", str(path)], ["gallery", "remove", str(path), "alice"],
                        ["gallery", "check", str(path)]):
            result = runner.invoke(app, command)
            assert result.exit_code == 2 and "Traceback" not in result.output, (command, result.output)
            assert "not a facesphere gallery" in " ".join(result.output.split()), result.output
        assert path.read_bytes() == before, path
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.db", "garbage.db", "other.db"]
