"""The bad-input matrix: every CLI command that reads a file × every class of bad input, in one table.

Each row gives one command one bad input (every other argument valid) and checks the contract: the documented exit
code (2: input refused; 1: a batch command none of whose inputs could be read, the JSON listing why), one line
``error: ...`` on stderr naming the input, no traceback, a malicious pickle never run, and nothing written or changed
(every file under the row's folder and the shared fixtures hashed before and after).

The commands and their path parameters are read from the typer app itself: a command that takes a path and has no
row here (nor a reasoned entry in ``OPT_OUT``) fails ``test_every_path_parameter_has_rows``.

Rows run in-process through ``facesphere.cli.errors.run_app`` (the function ``python -m facesphere`` calls), with
stderr captured at the file descriptor, except rows that could allocate without bound (huge files, huge declared
sizes) and one row per command, which run ``python -m facesphere`` as a subprocess under a 3 GB address-space limit:
these prove the real entry point and keep a runaway allocation out of the test process.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import re
import resource
import shutil
import struct
import subprocess
import traceback
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
from _training import cli, env
from conftest import require_data

from facesphere.cli.main import app

IMAGE = "data/face_recognition_examples/examples/obama_small.jpg"
OTHER_IMAGE = "data/face_recognition_examples/examples/two_people.jpg"
SCRFD = "weights/scrfd_500m_kps_onnx/scrfd_500m_bnkps.onnx"
RETINAFACE = "weights/retinaface_mnet025_biubug6/Final_Retinaface.pth"
PFLD = "weights/pfld68_cunjian_onnx/pfld.onnx"
XIAOCCER = "weights/mobilefacenet_casia_xiaoccer/068.ckpt"
Y1 = "weights/mobilefacenet_insightface_y1"
GENDERAGE = "weights/genderage_insightface"
SMALL_BIN = "data/insightface_fixtures/recognition/arcface_paddle/test_tipc/data/small_lfw.bin"
HUGE = 5 * 2**30  # a sparse 5 GB file
REFUSE_S = 90  # a subprocess row that has not answered by then hangs (an import costs ~3 s on two shared cores)
ADDRESS_SPACE = 3 * 2**30  # subprocess rows: a runaway allocation fails instead of swapping the machine
UNWRITABLE = Path("/sys/facesphere_matrix_out")  # not writable even by root
ERROR_LINE = re.compile(r"^(error: |\S+ ERROR )")  # a refusal, or the error log line of a batch that read nothing

# --- the table ----------------------------------------------------------------------------------------------------
# command -> (valid argv with {placeholders}, {path parameter: (kind, how the bad value is passed)}).
# "how": a {placeholder} of the argv, or option flags appended before the bad value.
DETECTOR = ["--detector", "scrfd", "--detector-weights", "{scrfd}"]
COMMANDS: dict[str, tuple[list[str], dict[str, tuple[str, str]]]] = {
    "detect": (["detect", "{image}", *DETECTOR], {
        "inputs": ("batch_image", "{image}"), "detector_weights": ("detector_weights", "{scrfd}"),
        "landmarks68": ("landmarker", "--landmarks68"),
        "landmarker_weights": ("landmarker", "--landmarker pfld68 --landmarker-weights"),
        "age_model": ("age_model", "--age-model"), "rectifier": ("model", "--rectifier"),
        "out": ("out_file", "--out")}),
    "align": (["align", "{image}", "--out-dir", "{out_dir}", *DETECTOR], {
        "inputs": ("batch_image", "{image}"), "out_dir": ("out_dir", "{out_dir}"),
        "detector_weights": ("detector_weights", "{scrfd}"), "model": ("model", "--model"), "out": ("out_file", "--out")}),
    "embed": (["embed", "{image}", "--model", "{model}", *DETECTOR], {
        "inputs": ("batch_image", "{image}"), "model": ("model", "{model}"),
        "detector_weights": ("detector_weights", "{scrfd}"), "age_model": ("age_model", "--age-model"),
        "rectifier": ("model", "--rectifier"), "out": ("out_file", "--out")}),
    "verify": (["verify", "{image}", "{image2}", "--model", "{model}", *DETECTOR], {
        "image1": ("image", "{image}"), "image2": ("image", "{image2}"), "model": ("model", "{model}"),
        "detector_weights": ("detector_weights", "{scrfd}"), "threshold": ("threshold", "--threshold"),
        "out": ("out_file", "--out")}),
    "draw": (["draw", "{image}", "--out-dir", "{out_dir}", *DETECTOR], {
        "inputs": ("batch_image", "{image}"), "out_dir": ("out_dir", "{out_dir}"),
        "detector_weights": ("detector_weights", "{scrfd}"), "landmarks68": ("landmarker", "--landmarks68"),
        "landmarker_weights": ("landmarker", "--landmarker pfld68 --landmarker-weights")}),
    "calibrate": (["calibrate", "{pairs}", "--model", "{model}", "--out", "{out}", "--far", "0.5", *DETECTOR], {
        "pairs": ("pairs", "{pairs}"), "model": ("model", "{model}"), "out": ("out_file", "{out}"),
        "detector_weights": ("detector_weights", "{scrfd}")}),
    "serve": (["serve", "--gallery", "{gallery}", "--model", "{model}", "--api-keys", "{keys}", *DETECTOR], {
        "gallery": ("new_gallery", "{gallery}"), "model": ("model", "{model}"),
        "detector_weights": ("detector_weights", "{scrfd}"), "api_keys": ("text", "{keys}"),
        "threshold": ("threshold", "--threshold"), "review": ("folder", "--review"),
        "age_model": ("age_model", "--age-model"), "rectifier": ("model", "--rectifier")}),
    "rectify": (["rectify", "{image}", "--model", "{gridface}", "--out", "{out_dir}", *DETECTOR], {
        "inputs": ("batch_image", "{image}"), "model": ("model", "{gridface}"), "rectifier": ("model", "--rectifier"),
        "out_dir": ("out_dir", "{out_dir}"), "detector_weights": ("detector_weights", "{scrfd}")}),
    "import": (["import", "{xiaoccer}", "{out_dir}"], {
        "source": ("checkpoint", "{xiaoccer}"), "output": ("out_dir", "{out_dir}")}),
    "export": (["export", "{model}", "{out_dir}", "--no-check"], {
        "source": ("model", "{model}"), "output": ("out_dir", "{out_dir}")}),
    "eval": (["eval", "{model}", "{protocol}", "{eval_pairs}", "--out", "{out_dir}", "--device", "cpu", "--no-flip"], {
        "model": ("model", "{model}"), "data": ("bin", "{eval_pairs}"), "out": ("out_dir", "{out_dir}")}),
    "train": (["train", "{config}", "--set", "output_dir={out_dir}", "--set", "train.steps=1"],
              {"config": ("config", "{config}")}),  # one step: a config wrongly accepted ends the row quickly
    "config": (["config", "{config}"], {"config": ("config", "{config}")}),
    "quickstart": (["quickstart", "--output-dir", "{out_dir}", "--steps", "1"], {"output_dir": ("out_dir", "{out_dir}")}),
    "data synth": (["data", "synth", "{out_dir}", "--identities", "2", "--samples", "1", "--height", "16",
                    "--width", "16"], {"output": ("out_dir", "{out_dir}")}),
    "data pack": (["data", "pack", "{people}", "{out_dir}"], {
        "folder": ("folder", "{people}"), "out_dir": ("out_dir", "{out_dir}")}),
    "data remap-list": (["data", "remap-list", "{list}", "{out}"], {
        "list_file": ("list", "{list}"), "out": ("out_file", "{out}")}),
    "data inspect": (["data", "inspect", "{rec}", "--samples", "2"], {
        "path": ("records", "{rec}"), "sheet": ("out_file", "--sheet")}),
    "gallery enrol": (["gallery", "enrol", "{gallery}", "{people}", "--model", "{model}", *DETECTOR], {
        "gallery": ("new_gallery", "{gallery}"), "folder": ("folder", "{people}"), "model": ("model", "{model}"),
        "detector_weights": ("detector_weights", "{scrfd}")}),
    "gallery list": (["gallery", "list", "{gallery}"], {"gallery": ("gallery", "{gallery}"), "out": ("out_file", "--out")}),
    "gallery remove": (["gallery", "remove", "{gallery}", "alice"], {"gallery": ("gallery", "{gallery}")}),
    "gallery check": (["gallery", "check", "{gallery}"], {"gallery": ("gallery", "{gallery}")}),
    "clean profile": (["clean", "profile", "{people}", "--model", "{model}", "--threshold", "{threshold}", "--out",
                       "{out_dir}"], {
        "data": ("folder", "{people}"), "model": ("model", "{model}"), "threshold": ("threshold", "{threshold}"),
        "out": ("out_dir", "{out_dir}")}),
    "clean report": (["clean", "report", "{people}"], {"folder": ("folder", "{people}")}),
    "clean review": (["clean", "review", "{people}"], {"folder": ("folder", "{people}")}),
}
# Path-like parameters typed as str (a file or a built-in name) that the introspection cannot see.
STR_PATHS = {("train", "config"), ("config", "config"), ("train", "resume")}
OPT_OUT = {
    ("train", "resume"): "needs a built training run; checkpoint refusals are tests/test_resume_compat.py and "
                         "tests/test_checkpoint.py",
}

# kind -> the classes of bad input that apply to it.
FILE_CLASSES = ("missing", "empty", "truncated", "wrong_format", "huge_file", "directory")
CLASSES = {
    "image": FILE_CLASSES + ("huge_declared",),
    "batch_image": FILE_CLASSES + ("huge_declared",),
    "detector_weights": FILE_CLASSES + ("wrong_model", "malicious_pickle"),
    "landmarker": FILE_CLASSES + ("wrong_model",),
    "model": FILE_CLASSES + ("wrong_model", "malicious_pickle", "huge_declared"),
    "checkpoint": FILE_CLASSES + ("wrong_model", "malicious_pickle"),
    "bin": FILE_CLASSES + ("malicious_pickle",),
    "records": FILE_CLASSES + ("huge_declared",),
    "gallery": FILE_CLASSES,
    # a missing one is created; an empty one too (a concurrent creator may have just made the file: race-free creation)
    "new_gallery": ("truncated", "wrong_format", "huge_file", "directory"),
    "config": ("missing", "empty", "wrong_format", "huge_file", "directory"),
    "text": ("missing", "empty", "wrong_format", "huge_file", "directory"),
    "list": ("missing", "empty", "wrong_format", "huge_file", "directory"),
    "threshold": ("missing", "empty", "wrong_format", "huge_file", "directory"),
    "pairs": ("missing", "empty", "wrong_format", "huge_file", "directory"),
    "folder": ("missing", "empty", "not_a_folder"),
    "out_file": ("unwritable", "directory"),
    "out_dir": ("unwritable", "not_a_folder"),
    # a gender/age model folder (model-symbol.json + model-0000.params) or either file
    "age_model": ("missing", "empty", "truncated", "directory", "no_symbol", "wrong_model", "huge_file"),
}
SUFFIX = {"image": ".jpg", "batch_image": ".jpg", "detector_weights": ".pth", "landmarker": ".onnx", "model": ".pt",
          "checkpoint": ".ckpt", "bin": ".bin", "records": ".rec", "gallery": ".db", "new_gallery": ".db",
          "config": ".yaml", "text": ".txt", "list": ".txt", "threshold": ".json", "pairs": ".csv", "folder": "", "out_file": ".json",
          "out_dir": "", "age_model": ""}
SUBPROCESS_CLASSES = {"huge_file", "huge_declared"}
# A batch command over image inputs exits 1 when none could be read (the JSON lists why): the documented contract.
BATCH_EXIT_ONE = {"batch_image": {"missing", "empty", "truncated", "wrong_format", "huge_file", "huge_declared"}}

class Row(NamedTuple):
    command: str
    param: str
    kind: str
    bad: str

    @property
    def id(self) -> str:
        return f"{self.command.replace(' ', '-')}:{self.param}:{self.bad}"


def _rows() -> list[Row]:
    """Every (command, parameter, class); a slow class (a subprocess reading a huge file) runs for the first
    parameter of each kind only: every command reads a kind through the same library loader."""
    rows, slow_done = [], set()
    for command, (_, params) in COMMANDS.items():
        for param, (kind, _) in params.items():
            for bad in CLASSES[kind]:
                if bad in SUBPROCESS_CLASSES:
                    if (kind, bad) in slow_done:
                        continue
                    slow_done.add((kind, bad))
                rows.append(Row(command, param, kind, bad))
    return rows


ROWS = _rows()
# The first row of these commands also runs as `python -m facesphere` (the real entry point).
SUBPROCESS_PROOF = {next(r for r in ROWS if r.command == c).id
                    for c in ("detect", "embed", "import", "eval", "data inspect", "gallery list", "train")}


# --- valid fixtures (one set per session) -------------------------------------------------------------------------
def _png(width: int, height: int) -> bytes:
    """A PNG declaring ``width`` x ``height`` pixels (valid chunks and CRCs) with almost no pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.fixture(scope="session")
def valid(tmp_path_factory) -> dict[str, Path]:
    from PIL import Image

    from facesphere.backbones import build_backbone
    from facesphere.data import SyntheticFaces, write_image_folder
    from facesphere.data.record_dataset import pack_folder
    from facesphere.gallery import Gallery
    from facesphere.models import import_weights
    from facesphere.models.card import training_card
    from facesphere.models.store import save_model
    from facesphere.pipeline.threshold import calibrate_threshold
    from facesphere.train.config import dump_config, load_config

    root = tmp_path_factory.mktemp("valid")
    files = {"image": require_data(IMAGE), "scrfd": require_data(SCRFD), "retinaface": require_data(RETINAFACE),
             "pfld": require_data(PFLD), "xiaoccer": require_data(XIAOCCER), "bin": require_data(SMALL_BIN)}
    backbone, card = import_weights(require_data(Y1))
    files["model"] = save_model(root / "y1", backbone, card)
    grid_args = {"recognizer": "mobilefacenet", "recognizer_args": {"embedding_size": 32}, "grid": 2}
    gridface = build_backbone("gridface", **grid_args)
    files["gridface"] = save_model(root / "gridface", gridface,
                                   training_card(gridface, "gridface", "gridface", grid_args))
    with Gallery(root / "gallery.db", card) as gallery:
        vector = np.random.default_rng(0).standard_normal(card.embedding_size).astype(np.float32)
        gallery.enrol("alice", [vector / np.linalg.norm(vector)])
    files["gallery"] = root / "gallery.db"
    files["people"] = root / "people"
    for name in ("alice", "bob"):
        (files["people"] / name).mkdir(parents=True)
        for k in range(2):
            Image.fromarray(np.full((32, 32, 3), 40 * k + (name == "bob") * 100, np.uint8)).save(
                files["people"] / name / f"{k}.png")
    pack_folder(files["people"], root / "packed")
    files["rec"] = root / "packed"
    calibrate_threshold(np.linspace(-1, 1, 20), np.arange(20) >= 10, 0.1, card.name, card.embedding_size,
                        card.weights_sha256).save(root / "threshold.json")
    files["threshold"] = root / "threshold.json"
    (root / "keys.txt").write_text("k" * 40 + "\n")
    files["keys"] = root / "keys.txt"
    (root / "list.txt").write_text("".join(f"people/{n}/{k}.png {7 * (n == 'bob')}\n" for n in ("alice", "bob") for k in range(2)))
    files["list"] = root / "list.txt"
    other = require_data(OTHER_IMAGE)
    (root / "pairs.csv").write_text(f"{files['image']},{files['image']},1\n{files['image']},{other},0\n"
                                    f"{other},{files['image']},0\n")  # FAR 0.5 needs two impostor pairs
    faces = root / "faces"  # the csv protocol's data: 4 identities x 3 images, 3 folds of genuine and impostor pairs
    write_image_folder(SyntheticFaces(4, 3, image_size=(112, 112), seed=3), faces)
    ids = sorted(p.name for p in faces.iterdir())
    rows = ["path1,path2,same,fold"]
    for k in range(3):
        first, second = (sorted(p.name for p in (faces / i).iterdir()) for i in ids[k:k + 2])
        rows += [f"{ids[k]}/{first[0]},{ids[k]}/{first[1]},1,{k}", f"{ids[k]}/{first[0]},{ids[k + 1]}/{second[0]},0,{k}"]
    (faces / "pairs.csv").write_text("\n".join(rows) + "\n")
    files["eval_pairs"] = faces / "pairs.csv"
    files["pairs"] = root / "pairs.csv"
    (root / "config.yaml").write_text(dump_config(load_config("quickstart", [])))
    files["config"] = root / "config.yaml"
    return files


def _real(valid: dict[str, Path], kind: str) -> Path:
    """The real file of a kind, whose prefix makes the truncated input."""
    return {"image": valid["image"], "batch_image": valid["image"], "detector_weights": valid["retinaface"],
            "landmarker": valid["pfld"], "model": valid["model"] / "model.safetensors", "checkpoint": valid["xiaoccer"],
            "bin": valid["bin"], "records": valid["rec"] / "train.rec", "gallery": valid["gallery"],
            "new_gallery": valid["gallery"], "config": valid["config"], "text": valid["keys"], "list": valid["list"],
            "threshold": valid["threshold"], "pairs": valid["pairs"]}[kind]


def _malicious_pickle(marker: Path) -> bytes:
    """A protocol-0 pickle whose load would run ``touch marker`` (GLOBAL posix.system, then REDUCE)."""
    return b"cposix\nsystem\n(V" + f"touch {marker}".encode() + b"\ntR."


def make_bad(row: Row, valid: dict[str, Path], where: Path) -> Path:
    """Build the row's bad input under ``where``; its file name names the class."""
    kind, bad = row.kind, row.bad
    path = where / f"{bad}{SUFFIX[kind]}"
    if bad == "missing":
        return path
    if bad == "unwritable":
        return UNWRITABLE / f"out{SUFFIX[kind]}" if kind == "out_file" else UNWRITABLE
    if bad == "directory":
        path.mkdir()
        return path
    if bad == "not_a_folder":
        path = where / "not_a_folder.txt"
        path.write_text("a file, not a folder\n")
        return path
    if kind == "folder" and bad == "empty":
        path.mkdir()
        return path
    if kind == "age_model" and bad in ("truncated", "no_symbol", "wrong_model", "huge_file"):
        return _bad_age_model(bad, path)
    if bad == "empty":
        path.write_bytes(b"")
    elif bad == "huge_file":
        with open(path, "wb") as handle:
            handle.truncate(HUGE)
    elif bad == "malicious_pickle":
        path.write_bytes(_malicious_pickle(where / "MARKER"))
    elif bad == "wrong_format":  # an image where anything else is expected, text where an image is
        path.write_bytes(b"this is a text file, not an image\n" if kind in ("image", "batch_image")
                         else valid["image"].read_bytes())
    elif bad == "truncated":
        real = _real(valid, kind)
        if kind == "model":  # a model folder whose weights file lost its end
            path = where / "truncated"
            shutil.copytree(valid["model"], path)
            (path / "model.safetensors").write_bytes(real.read_bytes()[: real.stat().st_size // 2])
        elif kind == "records":  # a data set folder whose train.rec lost its end
            path = where / "truncated"
            shutil.copytree(valid["rec"], path)
            (path / "train.rec").write_bytes(real.read_bytes()[: real.stat().st_size // 2])
        else:
            path.write_bytes(real.read_bytes()[: max(1, real.stat().st_size // 2)])
    elif bad == "wrong_model":  # another kind of network's real weights
        source = {"detector_weights": valid["xiaoccer"], "landmarker": valid["scrfd"], "model": valid["retinaface"],
                  "checkpoint": valid["retinaface"]}[kind]
        shutil.copy(source, path)
    elif bad == "huge_declared":
        if kind in ("image", "batch_image"):
            path = where / "huge_declared.png"
            path.write_bytes(_png(100_000, 100_000))
        elif kind == "records":  # one RecordIO record declaring 2**29 - 1 bytes, indexed at offset 0
            path.write_bytes(struct.pack("<II", 0xCED7230A, 2**29 - 1) + b"\0" * 64)
            path.with_suffix(".idx").write_text("0\t0\n")
        elif kind == "model":  # a model folder whose safetensors header declares 2**50 bytes
            path = where / "huge_declared"
            shutil.copytree(valid["model"], path)
            (path / "model.safetensors").write_bytes(struct.pack("<Q", 2**50) + b"{}")
        else:
            raise AssertionError(f"no huge declared size for {kind}")
    else:
        raise AssertionError(f"no builder for {kind} x {bad}")
    return path


def _bad_age_model(bad: str, path: Path) -> Path:
    """A gender/age model folder whose params lost their end, that lacks its graph, that holds another network
    (the recognition model y1), or whose params file is 5 GB (sparse)."""
    source = require_data(Y1 if bad == "wrong_model" else GENDERAGE)
    path.mkdir()
    for name in ("model-symbol.json", "model-0000.params"):
        if not (bad == "no_symbol" and name == "model-symbol.json"):
            shutil.copy(source / name, path / name)
    params = path / "model-0000.params"
    if bad == "truncated":
        params.write_bytes(params.read_bytes()[: params.stat().st_size // 2])
    elif bad == "huge_file":
        with open(params, "r+b") as handle:
            handle.truncate(HUGE)
    return path


def build_argv(row: Row, valid: dict[str, Path], where: Path, bad: Path) -> list[str]:
    """The command's valid arguments with the row's parameter replaced by ``bad``."""
    template, params = COMMANDS[row.command]
    gallery = where / "gallery.db"
    if "{gallery}" in template and row.kind not in ("gallery", "new_gallery"):
        shutil.copy(valid["gallery"], gallery)  # a command that may write it gets its own copy
    values = {**{k: str(v) for k, v in valid.items()}, "image2": str(valid["image"]), "out_dir": str(where / "out"),
              "out": str(where / "out.json"), "gallery": str(gallery), "protocol": "csv"}
    how = params[row.param][1]
    if how.startswith("{"):
        values[how[1:-1]] = str(bad)
        extra = []
    else:
        extra = [*how.split(), str(bad)]
    if row.kind == "bin":  # an InsightFace .bin: the bin protocol
        values["protocol"] = "bin"
    argv = [part.format(**values) for part in template] + extra
    if row.kind == "detector_weights":  # .pth weights: the PyTorch detector
        argv[argv.index("--detector") + 1] = "retinaface"
    return argv


# --- running a row ------------------------------------------------------------------------------------------------
def _snapshot(*roots: Path) -> dict[str, str]:
    """Every file and folder under the roots: content hash (or 'dir'); sparse huge files by size only."""
    state = {}
    for root in roots:
        for path in [root, *root.rglob("*")] if root.is_dir() else [root]:
            if path.is_dir():
                state[str(path)] = "dir"
            elif path.stat().st_size > 2**26:
                state[str(path)] = f"size {path.stat().st_size} mtime {path.stat().st_mtime_ns}"
            else:
                state[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return state


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))


def run_subprocess(argv: list[str], cwd: Path) -> tuple[int, str]:
    """``python -m facesphere`` under the address-space limit; no answer within ``REFUSE_S`` fails the row."""
    try:
        done = subprocess.run(cli(*argv), capture_output=True, text=True, env=env(), cwd=cwd, timeout=REFUSE_S,
                              preexec_fn=_limit_memory)
    except subprocess.TimeoutExpired as late:
        return -1, f"(no answer within {REFUSE_S} s)\n{late.stderr or ''}"
    return done.returncode, done.stderr


def run_in_process(argv: list[str], capfd, monkeypatch) -> tuple[int, str]:
    """``run_app`` as ``python -m facesphere`` calls it; a bug's traceback is printed as Python would (exit 1)."""
    import uvicorn

    from facesphere.cli.errors import run_app

    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: None)  # a serve row that is not refused returns 0
    capfd.readouterr()
    try:
        code = run_app(app, ["--default-malloc", *argv])  # this process's allocator is left as it is
    except Exception:
        traceback.print_exc()
        code = 1
    finally:
        for handler in logging.getLogger().handlers[:]:  # the CLI's handler writes to this row's captured stderr
            logging.getLogger().removeHandler(handler)
    return code, capfd.readouterr().err


@pytest.mark.parametrize("row", [pytest.param(r, id=r.id) for r in ROWS])
def test_bad_input_is_refused_in_one_line(row: Row, valid, tmp_path, capfd, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a command defaulting to ./runs writes into the row's folder
    where = tmp_path / "row"
    where.mkdir()
    bad = make_bad(row, valid, where)
    argv = build_argv(row, valid, where, bad)
    shared = [valid["model"], valid["gridface"], valid["gallery"], valid["rec"], valid["threshold"], valid["keys"],
              valid["pairs"], valid["config"], valid["people"], valid["eval_pairs"].parent]
    before = _snapshot(tmp_path, *shared)
    if row.bad in SUBPROCESS_CLASSES or row.id in SUBPROCESS_PROOF:
        code, stderr = run_subprocess(argv, tmp_path)
    else:
        code, stderr = run_in_process(argv, capfd, monkeypatch)
    after = _snapshot(tmp_path, *shared)

    expected = 1 if row.bad in BATCH_EXIT_ONE.get(row.kind, ()) else 2
    shown = f"argv: {' '.join(argv)}\nexit {code}\nstderr:\n{stderr[-3000:]}"
    assert "Traceback" not in stderr, shown
    assert code == expected, shown
    errors = [line for line in stderr.splitlines() if ERROR_LINE.match(line)]
    assert len(errors) == 1, shown
    assert stderr.rstrip().splitlines()[-1] == errors[0], shown  # the refusal is the last word
    named = bad.name if row.bad != "unwritable" else str(UNWRITABLE)
    assert named in (errors[0] if expected == 2 else stderr), shown
    assert not (where / "MARKER").exists(), "the malicious pickle ran"
    assert after == before, shown + f"\nchanged: {sorted(set(after.items()) ^ set(before.items()))}"


# --- the table covers the app -------------------------------------------------------------------------------------
def _app_path_parameters() -> set[tuple[str, str]]:
    """(command, parameter) of every parameter of the typer app typed as a path, sub-groups included."""
    found = set()

    def walk(typer_app, prefix: str) -> None:
        for command in typer_app.registered_commands:
            name = f"{prefix}{command.name or command.callback.__name__}"
            for parameter in inspect.signature(command.callback).parameters.values():
                if "Path" in str(parameter.annotation):
                    found.add((name, parameter.name))
        for group in typer_app.registered_groups:
            walk(group.typer_instance, f"{prefix}{group.name} ")

    walk(app, "")
    return found


def test_every_path_parameter_has_rows():
    """A new command (or option) that reads or writes a path cannot be added without a row or a reasoned opt-out."""
    table = {(command, param) for command, (_, params) in COMMANDS.items() for param in params}
    missing = (_app_path_parameters() | STR_PATHS) - table - set(OPT_OUT)
    assert not missing, f"path parameters without bad-input rows: {sorted(missing)}"
    stale = table - _app_path_parameters() - STR_PATHS
    assert not stale, f"rows for parameters the app no longer has: {sorted(stale)}"
    assert {kind for _, params in COMMANDS.values() for kind, _ in params.values()} <= set(CLASSES)
