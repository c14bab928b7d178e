"""The gallery against a hostile or unlucky user: unaddressable names, two processes creating one gallery at once,
damaged database files (every command, library and CLI), identical photos under two names, and kill -9 of a writer."""

from __future__ import annotations

import hashlib
import multiprocessing
import textwrap

import numpy as np
import pytest
from _faults import kill_loop
from typer.testing import CliRunner

from facesphere.cli.main import app
from facesphere.gallery import (
    MAX_NAME_LENGTH,
    BadName,
    Gallery,
    GalleryError,
    GalleryUnusable,
    IndexDisagrees,
    open_live_gallery,
)
from facesphere.models.card import ModelCard

DIM = 16
BAD_NAMES = {
    "empty": "", "spaces": "   ", "dot": ".", "dot-dot": "..", "padded dot-dot": " .. ", "nul": "al\x00ice",
    "only nul": "\x00", "only controls": "\x01\x02\x7f", "tab inside": "al\tice", "newline": "alice\n\nbob",
    "line separator": "a\u2028b", "escape": "\x1b[31mred", "too long": "x" * (MAX_NAME_LENGTH + 1),
}
TRICKY_NAMES = ["Zoë Ångström", "李小龍", "a b  c", "100% sure", "#1 fan", "who? me", "O'Brien \"the\" 2nd",
                "<script>alert(1)</script>", "a/b", "../x", "x/..", "%2F%00", "+plus+", "back\\slash", "…"]


def _card(name: str = "y1", dim: int = DIM) -> ModelCard:
    return ModelCard(name=name, backbone="mobilefacenet", input_size=(112, 112), colour_order="RGB",
                     mean=(127.5,) * 3, std=(128.0,) * 3, alignment="arcface_112x112", embedding_size=dim,
                     licence="test", source="test")


def _unit(rng, n: int, dim: int = DIM) -> np.ndarray:
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------- names
@pytest.mark.parametrize("kind", sorted(BAD_NAMES))
def test_unaddressable_names_are_refused_by_the_library(tmp_path, kind):
    with Gallery(tmp_path / "g.sqlite", _card()) as g:
        with pytest.raises(BadName):
            g.enrol(BAD_NAMES[kind], np.ones(DIM))
        assert len(g) == 0


def test_tricky_but_addressable_names_round_trip_through_the_library(tmp_path):
    rng = np.random.default_rng(0)
    with Gallery(tmp_path / "g.sqlite", _card()) as g:
        for name in TRICKY_NAMES:
            assert g.enrol(name, _unit(rng, 1)).name == name
        assert g.enrol("  padded  ", _unit(rng, 1)).name == "padded"  # surrounding spaces are not part of a name
        assert g.enrol("x" * MAX_NAME_LENGTH, _unit(rng, 1)).templates == 1
        for name in TRICKY_NAMES:
            g.remove(name)
        assert [i.name for i in g.identities()] == ["padded", "x" * MAX_NAME_LENGTH]


@pytest.mark.parametrize("name", ["\x01\x02", "a\nb", "   ", "a\x1bb"])
def test_cli_enrol_refuses_a_folder_with_an_unaddressable_name_before_any_work(tmp_path, name):
    """The sub-folder's name is the identity: refused in one line, exit 2, before a model is loaded (the model path
    does not even exist, the detector weights are not weights) and with no gallery created."""
    people = tmp_path / "people"
    (people / name).mkdir(parents=True)
    (tmp_path / "no-detector.onnx").write_bytes(b"never read")
    result = CliRunner().invoke(app, ["gallery", "enrol", str(tmp_path / "g.sqlite"), str(people),
                                      "--model", str(tmp_path / "no-model"), "--detector", "scrfd",
                                      "--detector-weights", str(tmp_path / "no-detector.onnx")])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert "identity" in result.output and "no-model" not in result.output, result.output
    assert not (tmp_path / "g.sqlite").exists()


# ---------------------------------------------------------------------------------------------- creation race
def _create_and_enrol(path: str, name: str, seed: int, start, errors) -> None:
    try:
        start.wait(10)
        with Gallery(path, _card()) as g:
            g.enrol(name, _unit(np.random.default_rng(seed), 1))
    except BaseException as error:  # noqa: BLE001 - reported to the parent, which fails the test with it
        errors.put(f"{name}: {type(error).__name__}: {error}")


def test_two_processes_creating_the_same_gallery_both_succeed(tmp_path):
    """40 rounds of two processes released at once to create the same new file and enrol one identity each: both
    succeed, and the gallery holds both and passes its check."""
    context = multiprocessing.get_context("fork")
    errors = context.Queue()
    for round_ in range(40):
        path = tmp_path / f"race{round_}.sqlite"
        start = context.Barrier(2)
        workers = [context.Process(target=_create_and_enrol, args=(str(path), f"p{i}", i, start, errors))
                   for i in range(2)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(60)
        assert errors.empty(), f"round {round_}: {errors.get()}"
        assert [w.exitcode for w in workers] == [0, 0]
        live = open_live_gallery(path)
        assert sorted(i.name for i in live.identities()) == ["p0", "p1"]
        live.check()
        live.close()


def test_a_racing_creator_of_another_model_gets_the_typed_mismatch(tmp_path):
    path = tmp_path / "g.sqlite"
    Gallery(path, _card()).close()
    with pytest.raises(GalleryError, match="cannot be mixed"):
        Gallery(path, _card(dim=32))


# ---------------------------------------------------------------------------------------------- damaged files
def _damaged(tmp_path, kind: str):
    """A gallery of 60 identities (many pages), then damaged as ``kind``."""
    rng = np.random.default_rng(5)
    path = tmp_path / f"{kind}.sqlite"
    with Gallery(path, _card(dim=256)) as g:
        for i in range(60):
            g.enrol(f"person{i:02d}", _unit(rng, 2, 256))
    data = bytearray(path.read_bytes())
    noise = np.random.default_rng(6).integers(0, 256, len(data), dtype=np.uint8).tobytes()
    page = int.from_bytes(data[16:18], "big")
    damaged = {
        "truncated": data[:len(data) // 2],
        "header then garbage": data[:100] + noise[100:],
        "damaged data pages": data[:4 * page] + noise[4 * page:],  # schema and meta intact: found late
        "random bytes": noise,
        "text": b"name,template\nalice,0.1 0.2\n" * 200,
    }[kind]
    path.write_bytes(bytes(damaged))
    return path


DAMAGE = ["truncated", "header then garbage", "damaged data pages", "random bytes", "text"]


def _library_calls(path):
    def search():
        live = open_live_gallery(path)
        try:
            live.search(np.ones(256), k=1)
        finally:
            live.close()

    def each(call, card=None):
        with Gallery(path, card) as g:
            call(g)

    return {
        "list": lambda: each(lambda g: g.identities()),
        "get": lambda: each(lambda g: g.get("person03")),
        "templates": lambda: each(lambda g: g.identity_templates()),
        "add": lambda: each(lambda g: g.enrol("person03", _unit(np.random.default_rng(1), 1, 256))),
        "enrol with card": lambda: each(lambda g: g.enrol("new", _unit(np.random.default_rng(1), 1, 256)),
                                        _card(dim=256)),
        "remove": lambda: each(lambda g: g.remove("person03")),
        "update": lambda: each(lambda g: g.update("person03", {"a": 1})),
        "check": lambda: open_live_gallery(path).check(),
        "search": search,
    }


@pytest.mark.parametrize("kind", DAMAGE)
def test_a_damaged_gallery_is_a_typed_error_for_every_library_call_and_stays_unchanged(tmp_path, kind):
    path = _damaged(tmp_path, kind)
    before = _digest(path)
    for name, call in _library_calls(path).items():
        with pytest.raises(GalleryError) as caught:
            call()
        assert str(path) in str(caught.value) and "\n" not in str(caught.value), (name, caught.value)
        assert _digest(path) == before, f"{name} changed the damaged file"
        assert sorted(tmp_path.iterdir()) == [path], f"{name} left files next to the damaged one: {sorted(tmp_path.iterdir())}"


@pytest.mark.parametrize("kind", DAMAGE)
def test_a_damaged_gallery_is_one_line_exit_2_for_every_cli_command(tmp_path, kind):
    path = _damaged(tmp_path, kind)
    before = _digest(path)
    runner = CliRunner()
    for command in (["list"], ["remove", "person03"], ["check"], ["check", "--index", "hnsw"]):
        result = runner.invoke(app, ["gallery", command[0], str(path), *command[1:]])
        assert result.exit_code == 2, (command, result.output, result.exception)
        assert "Traceback" not in result.output and str(path.name) in result.output, (command, result.output)
        assert _digest(path) == before, command


def test_cli_enrol_into_a_damaged_gallery_is_one_line_exit_2(tmp_path):
    """`gallery enrol` (which writes) on each damaged file: one line naming it, exit 2, the file unchanged."""
    import shutil

    from conftest import require_data

    from facesphere.models import import_weights
    from facesphere.models.store import save_model

    save_model(tmp_path / "y1", *import_weights(require_data("weights/mobilefacenet_insightface_y1")))
    people = tmp_path / "people"
    (people / "alice").mkdir(parents=True)
    shutil.copy(require_data("data/cacd_vs_fold1/CACD_VS") / "0001_0.jpg", people / "alice")
    for kind in DAMAGE:
        path = _damaged(tmp_path, kind)
        before = _digest(path)
        result = CliRunner().invoke(app, ["gallery", "enrol", str(path), str(people), "--model", str(tmp_path / "y1"),
                                          "--detector", "scrfd", "--detector-weights",
                                          str(require_data("weights/scrfd_500m_kps_onnx/scrfd_500m_bnkps.onnx"))])
        assert result.exit_code == 2 and "Traceback" not in result.output, (kind, result.output, result.exception)
        assert path.name in " ".join(result.output.split()), (kind, result.output)
        assert _digest(path) == before, kind


def test_the_unusable_error_names_the_file_and_is_a_gallery_error(tmp_path):
    path = _damaged(tmp_path, "damaged data pages")
    with pytest.raises(GalleryUnusable, match=r"damaged data pages\.sqlite: cannot use the gallery database"):
        Gallery(path).identity_templates()


# ---------------------------------------------------------------------------------------------- check
def test_two_identities_holding_the_same_photo_pass_the_check_and_a_real_disagreement_fails(tmp_path):
    rng = np.random.default_rng(2)
    live = open_live_gallery(tmp_path / "g.sqlite", _card())
    photo = _unit(rng, 1)
    for name in ("twin-a", "twin-b", "twin-c"):
        live.enrol(name, photo)
    live.enrol("other", _unit(rng, 1))
    assert live.check().startswith("4 identities")
    for kind in ("flat", "hnsw"):
        live.kind = kind
        live.rebuild()
        live.check()
    live.kind = "flat"
    live.rebuild()
    live.index.put("twin-b", _unit(rng, 1))  # the index holds another template for twin-b than the store
    with pytest.raises(IndexDisagrees, match="1 templates not finding themselves"):
        live.check()
    live.close()


# ---------------------------------------------------------------------------------------------- kill -9
WRITER = textwrap.dedent("""
    import itertools, os, sys
    import numpy as np
    from facesphere.gallery import Gallery
    from facesphere.models.card import ModelCard

    path, log = sys.argv[1], sys.argv[2]
    card = ModelCard(name="y1", backbone="mobilefacenet", input_size=(112, 112), colour_order="RGB",
                     mean=(127.5,) * 3, std=(128.0,) * 3, alignment="arcface_112x112", embedding_size=64,
                     licence="test", source="test")
    rng = np.random.default_rng(os.getpid())
    gallery = Gallery(path, card)
    print("ready", flush=True)
    tag = os.getpid()
    for i in itertools.count():
        name = f"p{tag}-{i}"
        gallery.enrol(name, rng.standard_normal((2, 64)))
        with open(log, "a") as out:  # after the commit returned: acknowledged
            out.write(f"+{name}\\n")
        print(name, flush=True)
        if i % 3 == 2:
            gone = f"p{tag}-{i - 1}"
            with open(log, "a") as out:  # before: a removal in flight may or may not be applied
                out.write(f"?{gone}\\n")
            gallery.remove(gone)
            with open(log, "a") as out:
                out.write(f"-{gone}\\n")
            print(gone, flush=True)
""")


@pytest.mark.slow  # 20 writer starts, each importing torch through facesphere.models (~2 s apiece on shared cores)
def test_kill_9_while_enrolling_and_removing_loses_nothing_acknowledged(tmp_path):
    """kill_loop SIGKILLs a writer enrolling and removing identities through the library ~20 times; after each kill
    the gallery opens, its check passes, every acknowledged enrolment is there and every acknowledged removal
    gone, and beyond them at most the one enrolment each killed writer had in flight. The writer appends what it committed to a
    side file (what kill_loop collects is gone with the child's pipe when check runs)."""
    path, log = tmp_path / "g.sqlite", tmp_path / "acknowledged.txt"
    log.write_text("")
    writer = f"import sys; sys.argv = ['w', {str(path)!r}, {str(log)!r}]\n" + WRITER

    def check(run: int) -> None:
        present, removing, removed = set(), set(), set()  # acknowledged enrolments, removals in flight, removals
        for line in log.read_text().splitlines():
            mark, name = line[0], line[1:]
            {"+": present, "?": removing, "-": removed}[mark].add(name)
        present -= removing | removed
        removing -= removed
        live = open_live_gallery(path)
        try:
            live.check()
            stored = {i.name for i in live.identities()}
            assert all(i.templates == 2 for i in live.identities()), "an enrolment was half applied"
        finally:
            live.close()
        assert present <= stored, f"run {run}: lost {sorted(present - stored)}"
        assert not removed & stored, f"run {run}: came back {sorted(removed & stored)}"
        last: dict[str, int] = {}  # per writer, the last enrolment it acknowledged
        for name in present | removing | removed:
            tag, number = name.rsplit("-", 1)
            last[tag] = max(last.get(tag, -1), int(number))
        for name in stored - present - removing:  # only the enrolment each killed writer had in flight
            tag, number = name.rsplit("-", 1)
            assert int(number) == last.get(tag, -1) + 1, f"run {run}: unacknowledged {name}"

    result = kill_loop(writer, check, runs=6, max_delay_s=0.4, seed=3)
    print(f"gallery kill loop: {result}")
    assert result.mid_write >= 3 * result.runs // 4 and result.writes >= 5 * result.runs, result


# ---------------------------------------------------------------------------------------------- metadata
@pytest.mark.parametrize("metadata", [{"a": float("nan")}, {"a": [float("inf")]}, {"a": object()}, ["not", "a dict"]])
def test_metadata_json_cannot_hold_is_refused_and_nothing_is_stored(tmp_path, metadata):
    with Gallery(tmp_path / "g.sqlite", _card()) as g:
        with pytest.raises(GalleryError, match="metadata"):
            g.enrol("alice", np.ones(DIM), metadata)
        assert len(g) == 0
        g.enrol("bob", np.ones(DIM))
        with pytest.raises(GalleryError, match="metadata"):
            g.update("bob", metadata)
        assert g.get("bob").metadata == {}
