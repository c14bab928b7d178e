"""Noise profiling (cleaning.profile): statuses against sets whose noise is known by construction, scores against
brute force, the on-disk store and the profile files, the edge cases, and one real set with a photo misfiled."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import require_data

from facesphere.cleaning.embedstore import EmbeddingStore, embed_to_store
from facesphere.cleaning.noise import Status
from facesphere.cleaning.profile import NoiseProfile, flip_cut, profile_embeddings

LFW = "data/lfw_112x112/lfw-112X112"
Y1 = "weights/mobilefacenet_insightface_y1"


def _unit(x):
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _clustered(rng, identities=40, per=10, dim=64, noise=0.6):
    """(directions, true labels, embeddings): each image its identity's direction plus noise of relative norm ``noise``."""
    directions = _unit(rng.standard_normal((identities, dim)))
    labels = np.repeat(np.arange(identities), per)
    return directions, labels, _unit(directions[labels] + noise * _unit(rng.standard_normal((len(labels), dim))))


def _profile(embeddings, labels, threshold=0.5, **options):
    return profile_embeddings(embeddings, labels, threshold, far=1e-3, model="synthetic", **options)


def test_statuses_match_the_injected_noise():
    rng = np.random.default_rng(0)
    _, truth, emb = _clustered(rng, dim=96)
    labels = truth.copy()
    flips = np.array([3, 57, 211, 388])
    labels[flips] = (truth[flips] + np.array([5, 11, 1, 20])) % 40
    outliers = np.array([14, 120, 301])
    emb[outliers] = _unit(rng.standard_normal((3, emb.shape[1])))
    copies = {150: 22, 260: 259, 399: 5}  # later index -> earlier original, within and across identities
    for later, earlier in copies.items():
        emb[later] = _unit(emb[earlier] + 1e-3 * rng.standard_normal(emb.shape[1]))
    expected = np.full(len(labels), Status.CLEAN)
    expected[flips], expected[outliers], expected[list(copies)] = Status.FLIP, Status.OUTLIER, Status.DUPLICATE
    # image 22 (identity 2) now also sits, as a copy, in identity 15: the earlier copy keeps its own status
    profile = _profile(emb, labels)
    np.testing.assert_array_equal(profile.status, expected)
    np.testing.assert_array_equal(profile.other_label[flips], truth[flips])  # the suggestion is the true identity
    assert {i: int(profile.duplicate_of[i]) for i in copies} == copies
    assert (profile.duplicate_of[[i for i in range(len(labels)) if i not in copies]] == -1).all()
    summary = profile.summary()
    assert (summary["flip"], summary["outlier"], summary["duplicate"], summary["clean"]) == (4, 3, 3, 390)
    # the search used above exact_search_limit (copies found on a 64-d projection, re-scored exactly) agrees
    approximate = _profile(emb, labels, exact_search_limit=0)
    np.testing.assert_array_equal(approximate.duplicate_of, profile.duplicate_of)
    np.testing.assert_array_equal(approximate.status, expected)
    assert summary["flip_rate"] == pytest.approx(4 / 400) and summary["outlier_rate"] == pytest.approx(3 / 400)


def test_flip_cut_holds_the_clean_images_nearest_other_cosines_at_the_far():
    own = np.r_[np.full(2000, 0.8), 0.2, 0.2, np.nan]
    other = np.r_[np.linspace(0.0, 0.6, 2000), 0.45, 0.65, 0.7]  # two far-from-own images, one single-image identity
    member = np.ones(len(own), bool)
    cut = flip_cut(own, other, member, 0.3, far=1e-2)
    assert cut == pytest.approx(np.quantile(np.linspace(0.0, 0.6, 2000), 0.99))  # only the 2000 clean ones count
    assert flip_cut(own, other, member, 0.7, far=1e-2) == 0.7  # never below T
    assert flip_cut(own[:50], other[:50], member[:50], 0.3, far=1e-2) == 0.3  # < 1/FAR clean images: T
    # in a profile: an image far from its own identity that passes T only against the best of many others is an
    # outlier, not a flip; one far above the clean images' nearest-other cosines is a flip
    rng = np.random.default_rng(3)
    _, labels, emb = _clustered(rng, identities=150, per=8, dim=32, noise=0.9)
    emb[::40] = _unit(rng.standard_normal((30, 32)))  # 30 photos of nobody in the set
    plain = _profile(emb, labels, threshold=0.3)
    assert plain.flip_cut > 0.3 and plain.threshold == 0.3
    flagged = plain.status == Status.FLIP
    assert (plain.other_cosine[flagged] >= plain.flip_cut).all()
    loose = (plain.own_cosine < 0.3) & (plain.other_cosine >= 0.3) & (plain.other_cosine < plain.flip_cut)
    assert loose[::40].sum() >= 10 and (plain.status[loose] == Status.OUTLIER).all()


def test_scores_match_brute_force_leave_one_out_and_nearest_other():
    rng = np.random.default_rng(1)
    _, labels, emb = _clustered(rng, identities=30, per=7, dim=32, noise=0.9)
    labels[::13] = rng.integers(0, 30, len(labels[::13]))  # uneven sizes and some noise
    profile = _profile(emb, labels, threshold=0.3, max_centres=1)
    sums = np.zeros((30, 32))
    np.add.at(sums, labels, emb.astype(np.float64))
    own_sums = sums[labels] - emb
    expected_own = np.einsum("ij,ij->i", emb, own_sums) / np.linalg.norm(own_sums, axis=1)
    np.testing.assert_allclose(profile.own_cosine, expected_own, atol=2e-5)
    to_centres = emb @ _unit(sums).T
    to_centres[np.arange(len(labels)), labels] = -np.inf
    np.testing.assert_array_equal(profile.other_label, to_centres.argmax(1))
    np.testing.assert_allclose(profile.other_cosine, to_centres.max(1), atol=2e-5)
    # the inverted-list search (used above exact_search_limit) finds the same nearest other identities here
    approximate = _profile(emb, labels, threshold=0.3, max_centres=1, exact_search_limit=0)
    assert (approximate.other_label == profile.other_label).mean() > 0.9
    found = approximate.other_label == profile.other_label
    np.testing.assert_allclose(approximate.other_cosine[found], profile.other_cosine[found], atol=2e-5)


def test_two_mode_identity_is_not_noise_but_a_small_misfiled_cluster_is():
    rng = np.random.default_rng(2)
    dim = 64
    directions, labels, emb = _clustered(rng, identities=20, per=8, dim=dim, noise=0.3)
    # identity 0: two sessions far apart (12 + 5 photos), both clearly one label's own
    a, b = directions[0], _unit(0.1 * directions[0] + _unit(rng.standard_normal(dim)))
    session = _unit(np.r_[np.tile(a, (12, 1)), np.tile(b, (5, 1))] + 0.3 * _unit(rng.standard_normal((17, dim))))
    # and two photos of identity 7 misfiled under identity 0
    misfiled = _unit(directions[7] + 0.3 * _unit(rng.standard_normal((2, dim))))
    emb = np.r_[emb[labels != 0], session, misfiled]
    labels = np.r_[labels[labels != 0], np.zeros(19, np.int64)]
    two = _profile(emb, labels, threshold=0.5)
    first = len(labels) - 19
    assert two.identity_centres[0] == 2 and (two.identity_centres[1:] == 1).all()
    assert (two.status[first:first + 17] == Status.CLEAN).all()
    assert (two.status[-2:] == Status.FLIP).all() and (two.other_label[-2:] == 7).all()
    one = _profile(emb, labels, threshold=0.5, max_centres=1)  # one centre: the second session looks like noise
    assert (one.status[first + 12:first + 17] != Status.CLEAN).all()


def test_store_chunks_give_the_array_profile_and_files_round_trip(tmp_path):
    rng = np.random.default_rng(3)
    _, labels, emb = _clustered(rng, identities=12, per=9, dim=16)
    store = EmbeddingStore.create(tmp_path / "store", 16, {"set": "x"})
    for start in range(0, len(emb), 25):
        store.append(emb[start:start + 25], np.ones(len(emb[start:start + 25]), bool), np.zeros(len(emb[start:start + 25]), "S16"))
    with pytest.raises(ValueError, match="incomplete"):
        EmbeddingStore.open(tmp_path / "store")
    store.finish()
    from_disk = _profile(EmbeddingStore.open(tmp_path / "store"), labels)
    in_memory = _profile(emb, labels, chunk_size=7)
    for name in ("status", "other_label", "duplicate_of", "identity_centres"):
        np.testing.assert_array_equal(getattr(from_disk, name), getattr(in_memory, name))
    np.testing.assert_allclose(from_disk.own_cosine, in_memory.own_cosine, atol=1e-6)
    from_disk.save(tmp_path / "profile")
    loaded = NoiseProfile.load(tmp_path / "profile")
    for name in ("labels", "status", "own_cosine", "other_cosine", "other_label", "duplicate_of", "identity_size",
                 "identity_centres", "identity_spread"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(from_disk, name))
        assert getattr(loaded, name).dtype == getattr(from_disk, name).dtype
    assert (loaded.sources, loaded.identity_names, loaded.problems, loaded.threshold, loaded.model) == (
        from_disk.sources, from_disk.identity_names, from_disk.problems, from_disk.threshold, from_disk.model)
    # damaged: the arrays changed under the json, the json cut short, the arrays missing
    arrays = tmp_path / "profile" / "profile.npz"
    arrays.write_bytes(arrays.read_bytes()[:-10] + b"0123456789")
    for damage in (None, "cut", "gone"):
        if damage == "cut":
            meta = tmp_path / "profile" / "profile.json"
            meta.write_text(meta.read_text()[:100])
        elif damage == "gone":
            arrays.unlink()
        with pytest.raises(ValueError) as error:
            NoiseProfile.load(tmp_path / "profile")
        assert str(tmp_path / "profile") in str(error.value) and "\n" not in str(error.value)


def test_edge_cases_are_reported_not_raised():
    rng = np.random.default_rng(4)
    _, labels, emb = _clustered(rng, identities=1, per=12, dim=32, noise=0.5)
    emb[5] = _unit(rng.standard_normal(32))
    one = _profile(emb, labels)
    assert one.status[5] == Status.OUTLIER and (np.delete(one.status, 5) == Status.CLEAN).all()
    assert np.isnan(one.other_cosine).all() and (one.other_label == -1).all()
    assert any("only one identity" in p["reason"] for p in one.problems)
    # single-image identities: own_cosine undefined, reported once with the count, never outliers
    _, labels, emb = _clustered(rng, identities=10, per=5, dim=32, noise=0.5)
    labels = np.r_[labels, 10, 11, 12]
    emb = np.r_[emb, _unit(rng.standard_normal((3, 32)))]
    singles = _profile(emb, labels, identity_names=[f"p{i}" for i in range(13)])
    assert np.isnan(singles.own_cosine[-3:]).all() and (singles.status[-3:] == Status.CLEAN).all()
    assert np.isnan(singles.identity_spread[10:]).all() and (singles.identity_size[10:] == 1).all()
    notes = [p["reason"] for p in singles.problems if "one image" in p["reason"]]
    assert len(notes) == 1 and notes[0].startswith("3 identities")
    # unreadable images: UNREADABLE, left out; none readable: a ValueError naming the set
    valid = np.ones(len(labels), bool)
    valid[[0, 7]] = False
    partly = _profile(emb, labels, valid=valid, problems=[{"source": "a.jpg", "reason": "cannot decode"}])
    assert (partly.status[[0, 7]] == Status.UNREADABLE).all() and partly.summary()["readable"] == len(labels) - 2
    assert partly.problems[0] == {"source": "a.jpg", "reason": "cannot decode"} and partly.identity_size[0] == 4
    with pytest.raises(ValueError, match="my set: no readable image"):
        _profile(emb, labels, valid=np.zeros(len(labels), bool), set_name="my set")


def _digest_tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def y1(tmp_path_factory):
    from facesphere.models import import_weights
    from facesphere.models.store import save_model

    folder = tmp_path_factory.mktemp("models") / "y1"
    save_model(folder, *import_weights(require_data(Y1)))
    return folder


def test_real_faces_misfiled_photo_is_a_flip_with_the_right_suggestion(y1, tmp_path):
    """Three LFW people, one photo of the second copied into the first's folder, one corrupt file: the photo is
    flagged FLIP suggesting its real owner, the corrupt file UNREADABLE, and the set is left byte for byte."""
    from facesphere.cleaning.profile import profile_set
    from facesphere.models.runs import load_embedder
    from facesphere.pipeline.threshold import Threshold

    people = ["Alejandro_Toledo", "Ariel_Sharon", "Serena_Williams"]
    root = tmp_path / "set"
    for name in people:
        (root / name).mkdir(parents=True)
        for image in sorted((require_data(LFW) / name).glob("*.jpg"))[:5]:
            shutil.copy(image, root / name / image.name)
    misfiled = sorted((root / people[1]).glob("*.jpg"))[0]
    shutil.move(misfiled, root / people[0] / misfiled.name)
    (root / people[2] / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    before = _digest_tree(root)
    card = load_embedder(y1).card
    threshold = Threshold(value=0.3, target_far=1e-3, model=card.name, embedding_size=card.embedding_size,
                          calibration_pairs={"genuine": 1, "impostor": 1000}, measured_far=1e-3,
                          weights_sha256=card.weights_sha256)
    with pytest.raises(ValueError, match="inside the set's folder"):
        profile_set(root, y1, threshold, root / "profile", progress=False, workers=0)
    profile = profile_set(root, y1, threshold, tmp_path / "out", progress=False, workers=0, batch_size=16)
    assert _digest_tree(root) == before
    index = {Path(s).name: i for i, s in enumerate(profile.sources)}
    moved = index[misfiled.name]
    assert profile.identity_names == people and profile.labels[moved] == 0
    assert profile.status[moved] == Status.FLIP and profile.other_label[moved] == 1
    broken = index["broken.jpg"]
    assert profile.status[broken] == Status.UNREADABLE
    assert [p["source"] for p in profile.problems if p["source"].endswith("broken.jpg")] == [str(root / people[2] / "broken.jpg")]
    flagged = {Path(profile.sources[i]).name for i in np.flatnonzero(profile.status != Status.CLEAN)}
    assert flagged == {misfiled.name, "broken.jpg"}
    assert NoiseProfile.load(tmp_path / "out").status.tolist() == profile.status.tolist()
    # the same images through a list file naming one missing file: reported, not fatal
    lines = [f"{Path(s).relative_to(root)} {label}" for s, label in zip(profile.sources, profile.labels) if label < 2]
    (root / "list.txt").write_text("\n".join([*lines, "Ariel_Sharon/missing.jpg 1"]) + "\n")
    listed = profile_set(root / "list.txt", y1, threshold, tmp_path / "out_list", progress=False, workers=0)
    assert listed.status[-1] == Status.UNREADABLE and "not found" in listed.problems[0]["reason"]
    assert listed.status[[Path(s).name for s in listed.sources].index(misfiled.name)] == Status.FLIP


def test_embedding_store_resumes_an_interrupted_run(y1, tmp_path):
    from facesphere.cleaning.sources import open_labelled_set
    from facesphere.models.runs import load_embedder

    embedder = load_embedder(y1)
    dataset, _ = open_labelled_set(_tiny_set(tmp_path), (112, 112))
    full = embed_to_store(dataset, embedder, tmp_path / "full", key={"k": 1}, batch_size=2, chunk_size=2, progress=False)
    partial = EmbeddingStore.create(tmp_path / "part", embedder.embedding_size, {"k": 1, "chunk_size": 2, "flip": True})
    partial.append(next(full.chunks())[1], np.ones(2, bool), full.hashes()[:2])  # a run killed after one chunk
    resumed = embed_to_store(dataset, embedder, tmp_path / "part", key={"k": 1}, batch_size=2, chunk_size=2, progress=False)
    assert json.loads((tmp_path / "part" / "store.json").read_text())["chunks"] == [2, 2, 1]
    np.testing.assert_allclose(np.concatenate([c for _, c in resumed.chunks()]),
                               np.concatenate([c for _, c in full.chunks()]), atol=1e-6)
    assert (resumed.hashes() == full.hashes()).all()


def _tiny_set(tmp_path: Path) -> Path:
    root = tmp_path / "tiny"
    for name in ("Alejandro_Toledo", "Ariel_Sharon"):
        (root / name).mkdir(parents=True)
        for image in sorted((require_data(LFW) / name).glob("*.jpg"))[:3 if name == "Ariel_Sharon" else 2]:
            shutil.copy(image, root / name / image.name)
    return root


def test_calibrate_aligned_pairs_without_a_detector(y1, tmp_path):
    from PIL import Image
    from typer.testing import CliRunner

    from facesphere.cli.main import app
    from facesphere.data.images import load_image

    people = {name: sorted((require_data(LFW) / name).glob("*.jpg"))[:2] for name in ("Alejandro_Toledo", "Ariel_Sharon")}
    (a1, a2), (b1, b2) = people.values()
    pairs = tmp_path / "pairs.csv"
    pairs.write_text(f"path1,path2,same\n{a1},{a2},1\n{b1},{b2},1\n{a1},{b1},0\n{a2},{b2},0\n{a1},{b2},0\n")
    out = tmp_path / "threshold.json"
    done = CliRunner().invoke(app, ["calibrate", str(pairs), "--aligned", "--model", str(y1), "--far", "0.5",
                                    "--out", str(out)])
    assert done.exit_code == 0, done.output
    saved = json.loads(out.read_text())
    assert saved["model"] == "mobilefacenet_insightface_y1" and saved["calibration_pairs"] == {"genuine": 2, "impostor": 3}
    # the threshold is the library's on these five cosines: recomputed here from the embedder directly
    from facesphere.models.runs import load_embedder
    from facesphere.pipeline.threshold import calibrate_threshold

    embedder = load_embedder(y1)
    emb = {p: embedder.embed(load_image(p), flip=True)[0] for p in (a1, a2, b1, b2)}
    scores = [float(emb[x] @ emb[y]) for x, y in ((a1, a2), (b1, b2), (a1, b1), (a2, b2), (a1, b2))]
    expected = calibrate_threshold(np.array(scores), np.array([1, 1, 0, 0, 0], bool), 0.5, "m", 128)
    assert saved["value"] == pytest.approx(expected.value, abs=1e-5)
    # a crop of another size is refused naming the model; no detector weights without --aligned is refused
    Image.fromarray(np.zeros((100, 100, 3), np.uint8)).save(tmp_path / "small.png")
    pairs.write_text(f"{tmp_path / 'small.png'},{a1},0\n{a2},{b1},0\n")
    refused = CliRunner().invoke(app, ["calibrate", str(pairs), "--aligned", "--model", str(y1), "--far", "0.5",
                                       "--out", str(tmp_path / "t2.json")])
    assert refused.exit_code == 2 and "mobilefacenet_insightface_y1" in refused.output
    assert not (tmp_path / "t2.json").exists()
    missing = CliRunner().invoke(app, ["calibrate", str(pairs), "--model", str(y1), "--out", str(tmp_path / "t3.json")])
    assert missing.exit_code == 2 and "--detector-weights" in missing.output


def test_sources_read_folders_lists_and_packs_alike(tmp_path):
    """The three layouts open to the same images; digests are of the stored bytes (a pack keeps JPEGs as they are)."""
    from facesphere.cleaning.sources import open_labelled_set, read_image
    from facesphere.data.record_dataset import pack_folder

    root = _tiny_set(tmp_path)
    folder, names = open_labelled_set(root, (112, 112))
    assert names == ["Alejandro_Toledo", "Ariel_Sharon"] and len(folder) == 5
    (tmp_path / "list.txt").write_text("".join(f"{p} {label}\n" for p, label in folder.samples))
    listed, list_names = open_labelled_set(tmp_path / "list.txt", (112, 112))
    pack_folder(root, tmp_path / "pack", progress=False)
    packed, pack_names = open_labelled_set(tmp_path / "pack", (112, 112))
    assert list_names == pack_names == ["0", "1"]
    for index, path in enumerate(folder.paths):
        digest = hashlib.blake2b(path.read_bytes(), digest_size=16).digest()
        for dataset in (folder, listed, packed):
            image, got = read_image(dataset, index)
            assert got == digest and image.shape == (112, 112, 3) and dataset.labels[index] == folder.labels[index]
    with pytest.raises(FileNotFoundError, match="no such image folder, list file or RecordIO pack"):
        open_labelled_set(tmp_path / "nothing", (112, 112))
