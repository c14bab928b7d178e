"""Review of flagged images (facesphere.cleaning.review, `facesphere clean review`, the /v1/review API): each decision
rewrites the list files as the decision says, atomically (kill -9 at random moments), without losing another
reviewer's decisions, and never touches a source image."""

from __future__ import annotations

import json
import subprocess
import threading
from unittest import mock
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from _faults import kill_loop
from _noisy_set import LAYOUT, hashes, make_noisy_set
from _training import cli, env

from facesphere.cleaning.lists import DECISIONS, FLAGGED_COLUMNS, FLAGGED_FILES, read_table, write_cleaned_lists
from facesphere.cleaning.noise import Status
from facesphere.cleaning.review import ReviewError, ReviewFolder
from facesphere.data.lists import parse_list_file

FLAGGED = {3: "flip", 10: "flip", 6: "outlier", 7: "duplicate"}


@pytest.fixture
def folder(tmp_path):
    profile, images = make_noisy_set(tmp_path)
    write_cleaned_lists(profile, tmp_path / "out")
    return tmp_path / "out", profile, images, hashes(images)


def expected_kept(profile, decisions: dict[int, str]) -> list[tuple[str, int]]:
    """kept.txt as the rules say, written out here: clean images, then the decided ones in index order."""
    kept = [(profile.sources[i], label) for i, (label, status, _, _) in enumerate(LAYOUT) if status == Status.CLEAN]
    for index in sorted(decisions):
        label, _, other, _ = LAYOUT[index]
        if decisions[index] == "rejected":
            kept.append((profile.sources[index], label))
        elif decisions[index] == "confirmed" and FLAGGED[index] == "flip":
            kept.append((profile.sources[index], other))
    return kept


def decisions_on_disk(out: Path) -> dict[int, str]:
    return {int(r["index"]): r["decision"] for name in FLAGGED_FILES.values()
            for r in read_table(out / name, FLAGGED_COLUMNS)}


def test_decisions_rewrite_the_lists_as_they_say_and_can_change(folder):
    out, profile, images, before = folder
    review = ReviewFolder(out)
    assert [(i.kind, i.index) for i in review.items(pending_only=True)] == [
        ("flip", 3), ("flip", 10), ("outlier", 6), ("duplicate", 7)]
    steps = [(3, "confirm"), (6, "reject"), (7, "confirm"), (10, "reject"), (3, "reject"), (7, "reject"),
             (6, "confirm"), (10, "pending")]
    decisions = {}
    for index, action in steps:
        item = review.decide(index, action)
        decisions[index] = {"confirm": "confirmed", "reject": "rejected", "pending": "pending"}[action]
        assert item.decision == decisions[index]
        assert decisions_on_disk(out) == {**{i: "pending" for i in FLAGGED}, **decisions}
        assert parse_list_file(out / "kept.txt") == expected_kept(profile, decisions), (index, action)
    snapshot = {name: (out / name).read_bytes() for name in ("kept.txt", *FLAGGED_FILES.values())}
    review.decide(3, "reject")  # idempotent: the same decision again changes nothing
    assert {name: (out / name).read_bytes() for name in snapshot} == snapshot
    assert [i.index for i in review.items(pending_only=True)] == [10]
    assert hashes(images) == before


def test_a_confirmed_flip_trains_under_the_suggested_identity(folder):
    from facesphere.data.lists import ImageListDataset

    out, profile, _, _ = folder
    ReviewFolder(out).decide(3, "confirm")
    dataset = ImageListDataset(out / "kept.txt", image_size=(24, 20))
    assert dataset.labels.tolist()[-1] == 1 and dataset.load_uint8(len(dataset) - 1).shape == (24, 20, 3)


def test_refusals_name_the_problem_and_change_nothing(folder, tmp_path):
    out, _, _, _ = folder
    review = ReviewFolder(out)
    before = hashes(out)
    with pytest.raises(ReviewError, match="not flagged"):
        review.decide(0, "confirm")  # a clean image
    with pytest.raises(ReviewError, match="decision 'maybe'"):
        review.decide(3, "maybe")
    with pytest.raises(ReviewError, match="not named in the review lists"):
        review.thumbnail(11)  # the unreadable image is in no list a reviewer sees
    with pytest.raises(ReviewError, match="not named"):
        review.image_path(999)
    assert review.image_path(4) and len(review.thumbnail(4)) > 100  # the image a duplicate repeats may be shown
    assert hashes(out) == before
    with pytest.raises(FileNotFoundError, match="kept.txt"):
        ReviewFolder(tmp_path / "images")
    with pytest.raises(NotADirectoryError):
        ReviewFolder(out / "kept.txt")


def test_two_reviewers_never_lose_each_others_decisions(folder):
    out, profile, _, _ = folder
    actions = {3: ["confirm", "reject"] * 5 + ["confirm"], 6: ["reject", "confirm"] * 5 + ["reject"],
               7: ["confirm", "reject"] * 5 + ["confirm"], 10: ["reject", "pending"] * 5 + ["reject"]}
    errors = []

    def reviewer(indices):
        try:
            session = ReviewFolder(out)  # each its own session, opened before the other's decisions
            for k in range(11):
                for index in indices:
                    session.decide(index, actions[index][k])
        except Exception as error:  # noqa: BLE001 - reported by the assertion below
            errors.append(error)

    threads = [threading.Thread(target=reviewer, args=(ids,)) for ids in ([3, 6], [7, 10])]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    final = {3: "confirmed", 6: "rejected", 7: "confirmed", 10: "rejected"}
    assert decisions_on_disk(out) == final
    assert parse_list_file(out / "kept.txt") == expected_kept(profile, final)


WRITER = """
import random
from facesphere.cleaning.review import ReviewFolder
review = ReviewFolder({out!r})
rng = random.Random()
print("ready", flush=True)
while True:
    review.decide(rng.choice([3, 6, 7, 10]), rng.choice(["confirm", "reject", "pending"]))
    print("decided", flush=True)
"""


@pytest.mark.slow  # four writer processes (FACESPHERE_FAULT_SCALE multiplies them), each importing the toolkit
def test_a_kill_at_any_moment_leaves_whole_lists_and_the_next_session_repairs_kept(folder):
    out, profile, images, before = folder

    def check(run: int) -> None:
        decisions = decisions_on_disk(out)  # every .tsv reads whole, with a valid decision per row
        assert set(decisions) == set(FLAGGED) and set(decisions.values()) <= set(DECISIONS)
        kept = parse_list_file(out / "kept.txt")  # whole, with the review marker
        assert (out / "kept.txt").read_text().count("# reviewed:") == 1
        decided = {i: d for i, d in decisions.items() if d != "pending"}
        # the kill may fall between a decision's two writes: kept.txt is then one decision behind
        behind = [expected_kept(profile, {**decided, index: other} if other != "pending" else
                                {i: d for i, d in decided.items() if i != index})
                  for index in FLAGGED for other in DECISIONS]
        assert kept == expected_kept(profile, decided) or kept in behind, run
        ReviewFolder(out).sync()
        assert parse_list_file(out / "kept.txt") == expected_kept(profile, decided)

    result = kill_loop(WRITER.format(out=str(out)), check, runs=4, max_delay_s=1.0)
    assert result.mid_write >= result.runs // 2 and result.writes > 3 * result.runs, result
    assert hashes(images) == before


def _in_process(argv: list[str], stdin: str, capfd, monkeypatch) -> tuple[int, str, str]:
    """``run_app`` as ``python -m facesphere`` calls it, reading ``stdin``."""
    import io
    import logging

    from facesphere.cli.errors import run_app
    from facesphere.cli.main import app

    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    capfd.readouterr()
    try:
        code = run_app(app, ["--default-malloc", *argv])
    finally:
        for handler in logging.getLogger().handlers[:]:
            logging.getLogger().removeHandler(handler)
    out, err = capfd.readouterr()
    return code, out, err


def test_cli_review_takes_answers_from_piped_input(folder, capfd, monkeypatch):
    out, profile, images, before = folder
    done = subprocess.run(cli("clean", "review", str(out)), input="c\nmaybe\nr\ns\nq\n", env=env(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"confirmed": 1, "rejected": 1, "skipped": 1, "pending": 2}
    assert "flip #3:" in done.stderr and "answer c, r, s or q" in done.stderr
    assert decisions_on_disk(out) == {3: "confirmed", 10: "rejected", 6: "pending", 7: "pending"}
    assert parse_list_file(out / "kept.txt") == expected_kept(profile, {3: "confirmed", 10: "rejected"})
    code, stdout, _ = _in_process(["clean", "review", str(out)], "", capfd, monkeypatch)  # the end of input quits
    assert code == 0 and json.loads(stdout)["pending"] == 2
    code, _, stderr = _in_process(["clean", "review", str(out / "nowhere")], "", capfd, monkeypatch)
    assert code == 2 and stderr.strip().splitlines()[-1].startswith("error: ")
    assert "nowhere" in stderr and "Traceback" not in stderr
    assert hashes(images) == before


PATH_TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="/\0"), min_size=1, max_size=12)


@st.composite
def profiles(draw):
    """A profile of up to 12 images with any status, any names (tabs, quotes, newlines, ' #', markup) and paths."""
    from facesphere.cleaning.profile import NoiseProfile

    n = draw(st.integers(1, 12))
    classes = draw(st.integers(1, 4))
    labels = draw(st.lists(st.integers(0, classes - 1), min_size=n, max_size=n))
    status = draw(st.lists(st.sampled_from(list(Status)), min_size=n, max_size=n))
    other = [draw(st.sampled_from([c for c in range(classes) if c != label] or [-1])) for label in labels]
    status = [Status.CLEAN if s == Status.FLIP and o < 0 else s for s, o in zip(status, other)]
    duplicate_of = [draw(st.integers(0, i - 1)) if s == Status.DUPLICATE and i else -1 for i, s in enumerate(status)]
    status = [Status.CLEAN if s == Status.DUPLICATE and d < 0 else s for s, d in zip(status, duplicate_of)]
    names = draw(st.lists(PATH_TEXT, min_size=n, max_size=n, unique=True))
    cosines = st.floats(-1, 1, width=32)
    return NoiseProfile(
        sources=[f"/data/{name}" for name in names], labels=labels, status=status,
        identity_names=draw(st.lists(st.text(max_size=8), min_size=classes, max_size=classes)),
        own_cosine=draw(st.lists(cosines, min_size=n, max_size=n)),
        other_cosine=draw(st.lists(cosines, min_size=n, max_size=n)), other_label=other, duplicate_of=duplicate_of,
        identity_size=[labels.count(c) for c in range(classes)], identity_centres=[1] * classes,
        identity_spread=[0.5] * classes, threshold=0.3, far=1e-3, model="m", duplicate_cosine=0.95)


@given(profile=profiles(), steps=st.lists(st.tuples(st.integers(0, 11), st.sampled_from(["confirm", "reject", "pending"])),
                                         max_size=4))
def test_any_profile_and_decisions_round_trip_through_the_list_readers(tmp_path_factory, profile, steps):
    from facesphere.cleaning.lists import list_path

    out = tmp_path_factory.mktemp("prop")
    with mock.patch("os.fsync"):  # durability is the kill test's; here ~15 fsyncs per example would take seconds
        _round_trip(profile, steps, out, list_path)


def _round_trip(profile, steps, out, list_path):
    write_cleaned_lists(profile, out)
    listable = []
    for source in profile.sources:
        try:
            listable.append(list_path(source) == source)
        except ValueError:
            listable.append(False)
    kinds = {Status.FLIP: "flip", Status.OUTLIER: "outlier", Status.DUPLICATE: "duplicate"}
    flagged = {i: kinds[Status(s)] for i, s in enumerate(profile.status) if s in kinds and listable[i]}
    review = ReviewFolder(out)
    assert {item.index: item.kind for item in review.items()} == flagged
    for item in review.items():
        assert (item.path, item.label, item.identity) == (profile.sources[item.index], profile.labels[item.index],
                                                         profile.identity_names[profile.labels[item.index]])
    decisions = {}
    for index, action in steps:
        if index not in flagged:
            with pytest.raises(ReviewError):
                review.decide(index, action)
            continue
        review.decide(index, action)
        decisions[index] = {"confirm": "confirmed", "reject": "rejected", "pending": "pending"}[action]
    kept = [(profile.sources[i], int(profile.labels[i])) for i, s in enumerate(profile.status)
            if s == Status.CLEAN and listable[i]]
    for index in sorted(decisions):
        if decisions[index] == "rejected":
            kept.append((profile.sources[index], int(profile.labels[index])))
        elif decisions[index] == "confirmed" and flagged[index] == "flip":
            kept.append((profile.sources[index], int(profile.other_label[index])))
    assert parse_list_file(out / "kept.txt") == kept
    unreadable = read_table(out / "unreadable.tsv", ("index", "path", "label", "identity", "reason"))
    assert [int(r["index"]) for r in unreadable] == [i for i, s in enumerate(profile.status)
                                                     if s == Status.UNREADABLE or not listable[i]]


def test_records_of_a_pack_are_shown_from_the_pack_by_key(tmp_path):
    import numpy as np
    from PIL import Image

    from facesphere.cleaning.review import load_source
    from facesphere.data.images import ImageError
    from facesphere.data.record_dataset import RecordDataset, pack_folder

    for name in ("a", "b"):
        (tmp_path / "people" / name).mkdir(parents=True)
        for k in range(2):
            Image.fromarray(np.full((20, 16, 3), 60 * k + 100 * (name == "b"), np.uint8)).save(
                tmp_path / "people" / name / f"{k}.png")
    pack_folder(tmp_path / "people", tmp_path / "packed")
    dataset = RecordDataset(tmp_path / "packed")
    for index in range(len(dataset)):
        assert "#" in dataset.source(index)
        assert np.array_equal(load_source(dataset.source(index)), dataset.decode(index))
    with pytest.raises(ImageError, match="cannot read the record"):
        load_source(f"{dataset.rec_path}#99999")
