"""Evaluation protocols: pair-file parsers, the safe .bin reader, identification metrics, FG-NET / CACD-VS, reports."""

from __future__ import annotations

import io
import json
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from facesphere.data.images import to_tensor
from facesphere.align.templates import ARCFACE_POINTS_112
from facesphere.align.similarity import align_similarity, umeyama
from facesphere.evaluate.age import (
    cacd_vs_cv_folds,
    evaluate_cacd_vs,
    fgnet_five_points,
    fgnet_identification,
    fgnet_subject_folds,
    fgnet_verification,
    fgnet_verification_pairs,
    parse_cacd_vs,
    parse_fgnet,
    read_pts,
)
from facesphere.evaluate.binsets import BinFormatError, UnsafePickleError, load_bin, read_bin
from facesphere.evaluate.contact_sheet import PairTile, select_failures, write_failure_sheet
from facesphere.evaluate.identification import cmc, leave_one_out_cmc, open_set_identification
from facesphere.evaluate.lfw import PairsFileError, lfw_pair_paths, parse_lfw_pairs
from facesphere.evaluate.pairs_csv import read_pairs_csv
from facesphere.evaluate.pairset_eval import evaluate_pairset
from facesphere.evaluate.pairsets import PairSet
from facesphere.evaluate.verification import _interpolated_threshold, val_at_far
from facesphere.models.preprocess import ImagePreprocess
from facesphere.evaluate.protocols import list_protocols, run_protocol
from conftest import require_data

LFW_PAIRS = "data/lfw_meta/facenet/data/pairs.txt"
LFW_ROOT = "data/lfw_112x112/lfw-112X112"
SMALL_BIN = "data/insightface_fixtures/recognition/arcface_paddle/test_tipc/data/small_lfw.bin"


def _png(colour, size=(112, 112)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size[1], size[0]), tuple(int(c) for c in colour)).save(buf, format="PNG")
    return buf.getvalue()


# --------------------------------------------------------------------------- LFW pairs.txt


@pytest.mark.shared_data
def test_lfw_official_pairs_map_onto_aligned_images():
    pairs_path, root = require_data(LFW_PAIRS), require_data(LFW_ROOT)
    pairs = parse_lfw_pairs(pairs_path)
    assert len(pairs) == 6000
    for fold in range(10):
        block = pairs[600 * fold : 600 * (fold + 1)]
        assert all(p.fold == fold for p in block)
        assert all(p.same for p in block[:300]) and not any(p.same for p in block[300:])
    p1, p2, same, folds = lfw_pair_paths(pairs_path, root)  # raises if any image is missing
    assert len(p1) == len(p2) == 6000 and same.sum() == 3000
    assert np.array_equal(np.bincount(folds), [600] * 10)
    assert len({*p1, *p2}) == 7701
    assert all(p.is_file() for p in p1 + p2)


def test_lfw_pairs_errors_name_the_line(tmp_path):
    bad = tmp_path / "pairs.txt"
    bad.write_text("1\t2\nA\t1\t2\nB\t1\t3\nC\t1\tD\t1\nE\t1\t2\n")
    with pytest.raises(PairsFileError, match=r"pairs.txt:5: expected a mismatched pair.*got a matched pair"):
        parse_lfw_pairs(bad)
    bad.write_text("1\t1\nA\tx\t2\nC\t1\tD\t1\n")
    with pytest.raises(PairsFileError, match=r":2: image number 'x' is not an integer"):
        parse_lfw_pairs(bad)
    bad.write_text("2\t1\nA\t1\t2\nC\t1\tD\t1\n")
    with pytest.raises(PairsFileError, match=r"4 pairs, found 2"):
        parse_lfw_pairs(bad)
    good = tmp_path / "dev.txt"  # single-number header, as pairsDevTrain.txt
    good.write_text("1\nA\t1\t2\nA\t1\tB\t1\n")
    pairs = parse_lfw_pairs(good)
    assert [(p.name1, p.num1, p.name2, p.num2, p.same, p.fold) for p in pairs] == [
        ("A", 1, "A", 2, True, 0), ("A", 1, "B", 1, False, 0)]
    (tmp_path / "A").mkdir()
    (tmp_path / "A" / "A_0001.jpg").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match=r"2 image\(s\).*line 2: .*A_0002.jpg"):
        lfw_pair_paths(good, tmp_path)


# --------------------------------------------------------------------------- .bin reader


@pytest.mark.shared_data
def test_small_lfw_bin_loads():
    images, issame = load_bin(require_data(SMALL_BIN))
    assert images.shape == (20, 112, 112, 3) and images.dtype == np.uint8
    assert issame.dtype == bool and issame.shape == (10,) and issame.all()
    ps = PairSet.from_bin(require_data(SMALL_BIN))
    assert len(ps) == 10 and ps.num_images <= 20
    for k in range(10):  # deduplication keeps every pair's pixels
        assert np.array_equal(ps.load(ps.left[k]), images[2 * k])
        assert np.array_equal(ps.load(ps.right[k]), images[2 * k + 1])


@pytest.mark.parametrize("variant", ["bytes4", "bytes2", "uint8_column", "uint8_flat"])
def test_bin_formats_round_trip(tmp_path, variant):
    blobs = [_png((10 * k, 50, 200 - 10 * k)) for k in range(6)]
    issame = [True, False, True]
    if variant == "bytes4":
        obj, protocol = (blobs, issame), 4
    elif variant == "bytes2":  # Python 3 protocol 2 pickles bytes through _codecs.encode
        obj, protocol = (blobs, issame), 2
    elif variant == "uint8_column":  # the Paddle layout of small_lfw.bin
        obj, protocol = ([np.frombuffer(b, np.uint8).reshape(-1, 1) for b in blobs], issame), 3
    else:
        obj, protocol = ([np.frombuffer(b, np.uint8) for b in blobs], issame), 4
    path = tmp_path / "set.bin"
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    encoded, same = read_bin(path)
    assert encoded == blobs and same.tolist() == issame
    images, _ = load_bin(path)
    assert images.shape == (6, 112, 112, 3)
    assert tuple(images[3, 0, 0]) == (30, 50, 170)


class _SystemPayload:
    def __init__(self, sentinel):
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


class _EvalPayload:
    def __init__(self, sentinel):
        self.sentinel = sentinel

    def __reduce__(self):
        return (eval, (f"open({str(self.sentinel)!r}, 'w').close()",))


def _getattr_payload(sentinel) -> bytes:
    # builtins.getattr(builtins.__import__('os'), 'system')('touch sentinel'), written by hand (protocol 0)
    return (b"cbuiltins\ngetattr\n(cbuiltins\n__import__\n(Vos\ntRVsystem\ntR(Vtouch "
            + str(sentinel).encode() + b"\ntR.")


@pytest.mark.parametrize("kind", ["os.system", "builtins.eval", "builtins.getattr", "numpy object array"])
def test_malicious_bin_is_refused_without_running_code(tmp_path, kind):
    sentinel = tmp_path / "sentinel"
    blob = _png((1, 2, 3))
    if kind == "os.system":
        data = pickle.dumps(([blob, _SystemPayload(sentinel)], [True]), protocol=4)
        expected = r"global (posix|os|nt)\.system"
    elif kind == "builtins.eval":
        data = pickle.dumps(([blob, blob], [_EvalPayload(sentinel)]), protocol=2)
        expected = r"global (__builtin__|builtins)\.eval"
    elif kind == "builtins.getattr":
        data = _getattr_payload(sentinel)
        expected = r"global builtins\.getattr"
    else:
        payload = np.array([np.frombuffer(blob, np.uint8), _SystemPayload(sentinel)], dtype=object)
        data = pickle.dumps(([payload, blob], [True]), protocol=4)
        expected = r"dtype .*O.* is not allowed"
    path = tmp_path / "evil.bin"
    path.write_bytes(data)
    with pytest.raises(UnsafePickleError, match=expected):
        read_bin(path)
    with pytest.raises(UnsafePickleError):
        load_bin(path)
    assert not sentinel.exists()


@pytest.mark.parametrize("data", [
    b"\x80\x02cnumpy\ndtype\n}X\x0c\x00\x00\x00__defaults__N\x85sb.",  # BUILD with a dict state
    b"\x80\x02cnumpy\ndtype\nN}X\x0c\x00\x00\x00__defaults__N\x85s\x86b.",  # BUILD with slot state (setattr)
    b"\x80\x02cnumpy\nndarray\n}X\x01\x00\x00\x00aNsb.",
])
def test_allowed_globals_cannot_be_modified(tmp_path, data):
    path = tmp_path / "x.bin"
    path.write_bytes(data)
    with pytest.raises(UnsafePickleError, match="refusing to set state"):
        read_bin(path)


def test_control_the_system_payload_is_live(tmp_path):
    """The payload above really executes under plain pickle: the refusal test is meaningful."""
    sentinel = tmp_path / "control"
    pickle.loads(pickle.dumps(_SystemPayload(sentinel)))
    assert sentinel.exists()


def test_bin_structure_errors(tmp_path):
    path = tmp_path / "x.bin"
    path.write_bytes(pickle.dumps(([_png((0, 0, 0))] * 3, [True])))
    with pytest.raises(BinFormatError, match="3 images for 1 pairs"):
        read_bin(path)
    path.write_bytes(b"not a pickle")
    with pytest.raises(BinFormatError, match="not a readable pickle"):
        read_bin(path)


# --------------------------------------------------------------------------- CSV pairs


def test_csv_pairs(tmp_path):
    for name in ("a.png", "b.png", "c.png"):
        (tmp_path / name).write_bytes(_png((0, 0, 0)))
    csv_path = tmp_path / "pairs.csv"
    csv_path.write_text("path1,path2,same,fold\na.png,b.png,1,0\n\n# comment\na.png,c.png,different,1\nb.png,c.png,True,1\n")
    p1, p2, same, folds = read_pairs_csv(csv_path)
    assert [p.name for p in p1] == ["a.png", "a.png", "b.png"] and same.tolist() == [True, False, True]
    assert folds.tolist() == [0, 1, 1]
    ps = PairSet.from_csv(csv_path)
    assert ps.num_images == 3 and ps.left.tolist() == [0, 0, 1] and ps.right.tolist() == [1, 2, 2]
    csv_path.write_text("a.png,b.png,yes\nb.png,c.png,no\n")  # no header, no folds
    _, _, same, folds = read_pairs_csv(csv_path)
    assert same.tolist() == [True, False] and folds is None
    csv_path.write_text("a.png,b.png,1\nb.png,c.png,maybe\n")
    with pytest.raises(ValueError, match=r"pairs.csv:2: 'maybe' is not a same/different label"):
        read_pairs_csv(csv_path)
    csv_path.write_text("a.png,b.png,1,0\nb.png,c.png,0\n")
    with pytest.raises(ValueError, match=r":2: either every row has a fold column"):
        read_pairs_csv(csv_path)
    csv_path.write_text("a.png,zzz.png,1\n")
    with pytest.raises(FileNotFoundError, match=r":1: image .*zzz.png"):
        read_pairs_csv(csv_path)


# --------------------------------------------------------------------------- identification


def _brute_ranks(probes, plabels, gallery, glabels, distractors=None, exclude=None):
    """Per probe: (rank of first mate, best mated score, top non-mated score) from the full sorted list."""
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    p, g = unit(probes), unit(gallery)
    d = unit(distractors) if distractors is not None else np.zeros((0, p.shape[1]))
    out = []
    for i in range(p.shape[0]):
        entries = [(float(p[i] @ g[j]), glabels[j] == plabels[i]) for j in range(g.shape[0])
                   if exclude is None or exclude[i] != j]
        entries += [(float(p[i] @ d[j]), False) for j in range(d.shape[0])]
        mated = [s for s, m in entries if m]
        nonmated = [s for s, m in entries if not m]
        if not mated:
            out.append((0, -np.inf, max(nonmated)))
            continue
        best = max(mated)
        out.append((1 + sum(s >= best for s in nonmated), best, max(nonmated) if nonmated else -np.inf))
    return out


def test_cmc_matches_brute_force_with_distractors_and_chunking():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(12, 16))
    glabels = np.repeat(np.arange(12), 3)
    gallery = centres[glabels] + 0.9 * rng.normal(size=(36, 16))
    plabels = rng.integers(0, 12, size=40)
    probes = centres[plabels] + 0.9 * rng.normal(size=(40, 16))
    distractors = rng.normal(size=(50, 16))
    brute = _brute_ranks(probes, plabels, gallery, glabels, distractors)
    ranks = np.array([r for r, _, _ in brute])
    for block in (1 << 22, 7, 100):  # one block; tiny blocks (row and column chunking)
        result = cmc(probes, plabels, gallery, glabels, distractors, block_elements=block)
        assert np.array_equal(result.ranks, ranks)
        for k in (1, 5, 10):
            assert result.accuracy(k) == pytest.approx(np.mean(ranks <= k))
    d = result.to_dict()
    assert {"rank_1", "rank_5", "rank_10", "cmc"} <= d.keys() and d["num_distractors"] == 50
    assert 0 < d["rank_1"] < d["rank_10"] <= 1
    with pytest.raises(ValueError, match="no same-identity gallery entry"):
        cmc(probes, plabels + 100, gallery, glabels)


def test_leave_one_out_cmc_matches_brute_force():
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(8), [3, 4, 2, 5, 3, 1, 4, 2])
    emb = rng.normal(size=(8, 10))[labels] + 1.2 * rng.normal(size=(labels.size, 10))
    brute = _brute_ranks(emb, labels, emb, labels, exclude=np.arange(labels.size))
    ranks = np.array([r for r, _, _ in brute])
    result = leave_one_out_cmc(emb, labels, block_elements=11)
    assert result.num_skipped == 1  # the identity with a single image
    assert np.array_equal(result.ranks, ranks[ranks > 0])


def test_open_set_tpir_matches_brute_force():
    rng = np.random.default_rng(2)
    centres = rng.normal(size=(30, 12))
    glabels = np.arange(20)  # identities 20..29 are not enrolled: non-mated searches
    gallery = centres[glabels] + 0.7 * rng.normal(size=(20, 12))
    plabels = np.concatenate([rng.integers(0, 20, 150), rng.integers(20, 30, 150)])
    probes = centres[plabels] + 0.7 * rng.normal(size=(300, 12))
    distractors = rng.normal(size=(25, 12))
    targets = (0.3, 0.1, 0.02, 1e-3)
    got = open_set_identification(probes, plabels, gallery, glabels, distractors, fpir_targets=targets,
                                  block_elements=13)
    brute = _brute_ranks(probes, plabels, gallery, glabels, distractors)
    mated = np.array([r > 0 for r, _, _ in brute])
    nm_top = np.array([t for (r, _, t) in brute if r == 0])
    assert got["num_mated"] == 150 and got["num_nonmated"] == 150
    for target in targets:
        # the lowest candidate threshold (a non-mated top score, or -inf) whose FPIR is within the target
        feasible = [t for t in np.r_[-np.inf, nm_top] if np.mean(nm_top > t) <= target]
        key = format(target, "g")
        if target * nm_top.size < 1:
            assert got["tpir_at_fpir"][key] is None
            continue
        t = min(feasible)
        hits = [m and r == 1 and b > t for (r, b, _), m in zip(brute, mated)]
        assert got["tpir_at_fpir"][key] == pytest.approx(sum(hits) / mated.sum())
        assert got["achieved_fpir"][key] <= target


# --------------------------------------------------------------------------- FG-NET and alignment


@pytest.mark.shared_data
def test_fgnet_parsing_and_landmarks():
    root = require_data("data/fgnet")
    images = parse_fgnet(root)
    assert len(images) == 1002
    assert len({im.subject for im in images}) == 82
    ages = np.array([im.age for im in images])
    assert ages.min() == 0 and ages.max() == 69
    assert sum(im.tag != "" for im in images) == 28  # a/b photos taken at the same age
    first = next(im for im in images if im.stem == "001A02")
    assert (first.subject, first.age) == (1, 2)
    for im in images[::50]:
        pts = read_pts(im.points_path)
        assert pts.shape == (68, 2)
        five = fgnet_five_points(pts)
        assert five[0, 0] < five[1, 0] and five[3, 0] < five[4, 0]  # template order: image-left first
    pairs = fgnet_verification_pairs(images, min_age_gap=10, seed=0)
    assert pairs.same.sum() == (~pairs.same).sum() == 2563
    subj = np.array([im.subject for im in images])
    age = ages
    for l, r, s in zip(pairs.left, pairs.right, pairs.same):
        assert abs(age[l] - age[r]) >= 10 and (subj[l] == subj[r]) == s
    again = fgnet_verification_pairs(images, min_age_gap=10, seed=0)
    assert np.array_equal(again.left, pairs.left) and np.array_equal(again.right, pairs.right)


def _fake_fgnet(root, subjects: int, rng) -> list:
    """An FG-NET-shaped folder (names and empty landmark files only; nothing here decodes them)."""
    (root / "images").mkdir(parents=True)
    (root / "points").mkdir()
    for subject in range(1, subjects + 1):
        for age in sorted(rng.choice(70, size=int(rng.integers(1, 14)), replace=False)):
            (root / "images" / f"{subject:03d}A{age:02d}.JPG").write_bytes(b"")
            (root / "points" / f"{subject:03d}a{age:02d}.pts").write_text("")
    return parse_fgnet(root)


def test_fgnet_subject_folds_are_disjoint_cover_everyone_and_are_deterministic(tmp_path):
    rng = np.random.default_rng(3)
    images = _fake_fgnet(tmp_path / "fgnet", 82, rng)
    subjects = np.array([im.subject for im in images])
    folds = fgnet_subject_folds(images, k=5, seed=0)
    assert folds.shape == (len(images),) and set(folds.tolist()) == set(range(5))  # every image, every fold used
    for s in np.unique(subjects):
        assert np.unique(folds[subjects == s]).size == 1  # subject-disjoint
    people = [np.unique(subjects[folds == f]).size for f in range(5)]
    assert sum(people) == 82 and sorted(people) == [16, 16, 16, 17, 17]  # evenly: sizes differ by at most one
    assert np.array_equal(fgnet_subject_folds(images, k=5, seed=0), folds)
    assert not np.array_equal(fgnet_subject_folds(images, k=5, seed=1), folds)
    # a fold belongs to the person, not to the image's position in the list
    order = rng.permutation(len(images))
    assert np.array_equal(fgnet_subject_folds([images[i] for i in order], k=5, seed=0), folds[order])
    with pytest.raises(ValueError, match="between 2 and the number of subjects"):
        fgnet_subject_folds(images, k=83)


def test_fgnet_protocols_on_a_subset_match_brute_force(tmp_path):
    rng = np.random.default_rng(4)
    root = tmp_path / "fgnet"
    images = _fake_fgnet(root, 30, rng)
    subjects = np.array([im.subject for im in images])
    ages = np.array([im.age for im in images])
    centres = rng.normal(size=(31, 16))
    emb = centres[subjects] + 1.2 * rng.normal(size=(len(images), 16))  # some probes miss at rank 1
    fold = fgnet_subject_folds(images, k=3, seed=0) == 1
    keep = np.flatnonzero(fold)
    got = fgnet_identification(None, root, embeddings=emb, subset=fold)
    assert got == fgnet_identification(None, root, embeddings=emb, subset=keep)  # mask or indices alike
    unit = emb[keep] / np.linalg.norm(emb[keep], axis=1, keepdims=True)
    sims = unit @ unit.T
    np.fill_diagonal(sims, -np.inf)
    sub = subjects[keep]
    mated = np.array([(sub == sub[i]).sum() > 1 for i in range(keep.size)])
    hits = sub[np.argmax(sims, axis=1)] == sub
    assert got["num_probes"] == mated.sum() and got["rank_1"] == pytest.approx(hits[mated].mean())
    assert got["num_subjects"] == np.unique(sub).size
    report = fgnet_verification(None, root, embeddings=emb, subset=fold, min_age_gap=10)
    pairs = fgnet_verification_pairs([images[k] for k in keep], min_age_gap=10)
    i, j = np.triu_indices(keep.size, 1)
    genuine = ((sub[i] == sub[j]) & (np.abs(ages[keep][i] - ages[keep][j]) >= 10)).sum()
    assert pairs.same.sum() == genuine and report["num_images"] == keep.size
    assert report["accuracy_mean"] == evaluate_pairset(None, pairs, embeddings=emb[keep])["accuracy_mean"]
    with pytest.raises(ValueError, match="one entry per image"):
        fgnet_identification(None, root, embeddings=emb, subset=fold[1:])
    with pytest.raises(ValueError, match="indices into the"):
        fgnet_verification(None, root, embeddings=emb, subset=np.array([0, len(images)]))
    with pytest.raises(ValueError, match="embeddings for"):
        fgnet_verification(None, root, embeddings=emb[1:], subset=fold)


def test_five_points_and_pts_format(tmp_path):
    pts = np.arange(136, dtype=float).reshape(68, 2)
    five = fgnet_five_points(pts)
    assert np.allclose(five, pts[[31, 36, 67, 48, 54]])  # FG-NET markup: pupils, nose tip, mouth corners
    with pytest.raises(ValueError):
        fgnet_five_points(pts[:67])
    f = tmp_path / "x.pts"
    f.write_bytes(b"version: 1\r\nn_points: 68\r\n{\r\n" + b"".join(b"%g %g\r\n" % tuple(p) for p in pts) + b"}\r\n")
    assert np.array_equal(read_pts(f), pts)


def test_umeyama_and_alignment_land_on_the_template():
    rng = np.random.default_rng(3)
    angle, scale, shift = 0.4, 2.3, np.array([61.0, 47.0])
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    src = ARCFACE_POINTS_112 @ (scale * rot).T + shift  # the template seen in a bigger, rotated photo
    m = umeyama(src, ARCFACE_POINTS_112)
    mapped = np.c_[src, np.ones(5)] @ m.T
    assert np.allclose(mapped[:, :2], ARCFACE_POINTS_112, atol=1e-9)
    noisy = src + rng.normal(scale=0.5, size=src.shape)
    m2 = umeyama(noisy, ARCFACE_POINTS_112)
    assert np.allclose(m2[:2, :2], m[:2, :2], atol=0.05)
    # image check: bright discs at the eye centres of a 300x300 photo land on the template's eyes
    image = np.zeros((300, 300, 3), np.uint8)
    yy, xx = np.mgrid[:300, :300]
    for x, y in src[:2]:
        image[(xx - x) ** 2 + (yy - y) ** 2 <= 36] = 255
    aligned = align_similarity(image, src)
    assert aligned.shape == (112, 112, 3)
    mask = aligned[..., 0].astype(float)
    for (tx, ty) in ARCFACE_POINTS_112[:2]:
        win = (np.abs(xx[:112, :112] - tx) < 12) & (np.abs(yy[:112, :112] - ty) < 12)
        w = mask * win
        cx, cy = (w * xx[:112, :112]).sum() / w.sum(), (w * yy[:112, :112]).sum() / w.sum()
        # pixel centres: warpAffine maps output pixel (x, y) from input (x, y) under the same matrix
        assert abs(cx - tx) < 1.0 and abs(cy - ty) < 1.0


# --------------------------------------------------------------------------- CACD-VS


@pytest.mark.shared_data
def test_cacd_vs_fold_parsing():
    ps = parse_cacd_vs(require_data("data/cacd_vs_fold1"))
    assert len(ps) == 400 and ps.same.sum() == 200 and ps.num_images == 800
    assert set(ps.folds.tolist()) == {1}
    assert ps.same[:200].all() and not ps.same[200:].any()  # pair ids 0000-0199 genuine
    sub = cacd_vs_cv_folds(ps.same, ps.folds)
    for k in range(10):
        assert (ps.same[sub == k]).sum() == 20 and (~ps.same[sub == k]).sum() == 20


def test_cacd_vs_several_folds(tmp_path):
    folder = tmp_path / "CACD_VS"
    folder.mkdir()
    for pair in (0, 250, 400, 799, 1300):  # folds 1, 1, 2, 2, 4 (partial folds are allowed)
        for half in (0, 1):
            (folder / f"{pair:04d}_{half}.jpg").write_bytes(b"")
    ps = parse_cacd_vs(tmp_path)
    assert ps.folds.tolist() == [1, 1, 2, 2, 4] and ps.same.tolist() == [True, False, True, False, True]
    assert cacd_vs_cv_folds(ps.same, ps.folds).tolist() == [1, 1, 2, 2, 4]
    # embeddings given (photos aligned and embedded by the caller, e.g. once for several models): the accuracy is
    # that of the scores, with the same folds; the files themselves are never read (they are empty here)
    left, right = [[1, 0], [1, 0], [0, 1], [1, 0], [1, 1]], [[1, 0.1], [0, 1], [0.1, 1], [0, 1], [1, 1.2]]
    emb = np.array(left + right)  # rows: the pairs' left photos, then their right ones (from_path_pairs' order)
    report = evaluate_cacd_vs(None, tmp_path, embeddings=emb)
    assert report["accuracy_mean"] == 1.0 and report["alignment"] == "by the caller (embeddings given)"
    assert report == {**evaluate_pairset(None, ps, embeddings=emb, folds=ps.folds), "cacd_folds": [1, 2, 4],
                      "fold_scheme": "leave-one-official-fold-out", "alignment": "by the caller (embeddings given)"}
    (folder / "1300_1.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="pair 1300"):
        parse_cacd_vs(tmp_path)


# --------------------------------------------------------------------------- contact sheet, preprocessing


def test_contact_sheet_writes_png(tmp_path):
    rng = np.random.default_rng(4)
    tiles = [PairTile(rng.integers(0, 255, (112, 112, 3), dtype=np.uint8),
                      rng.integers(0, 255, (250, 200, 3), dtype=np.uint8), 0.5 - 0.1 * k, 0.3, f"pair {k}")
             for k in range(5)]
    path = write_failure_sheet(tmp_path / "out" / "failures.png", tiles[:3], tiles[3:], tile=64, columns=2)
    with Image.open(path) as im:
        assert im.format == "PNG" and im.mode == "RGB" and im.size[0] > 4 * 64
    assert [p.name for p in path.parent.iterdir()] == ["failures.png"]  # no temporary left behind
    fa, fr = select_failures([0.9, 0.1, 0.7, 0.2, 0.6], [False, True, False, True, True], [0.5, 0.5, 0.8, 0.5, 0.5])
    assert fa.tolist() == [0] and fr.tolist() == [1, 3]


def test_image_preprocess():
    img = np.random.default_rng(5).integers(0, 256, (112, 112, 3), dtype=np.uint8)
    assert torch.equal(ImagePreprocess()(img), to_tensor(img))
    with pytest.raises(ValueError, match="align it first"):
        ImagePreprocess()(img[:100])
    assert ImagePreprocess(resize=True)(img[:100]).shape == (3, 112, 112)
    bgr = ImagePreprocess(mean=(1.0, 2.0, 3.0), std=2.0, channel_order="BGR")(img)
    assert torch.allclose(bgr[0], torch.from_numpy((img[..., 2].astype(np.float32) - 1.0) / 2.0))
    assert torch.allclose(bgr[2], torch.from_numpy((img[..., 0].astype(np.float32) - 3.0) / 2.0))


# --------------------------------------------------------------------------- VAL@FAR and evaluate_pairset


def test_interpolated_threshold_closed_form():
    imp = np.linspace(0.0, 1.0, 2001)[1:]  # 2000 impostors; m_k = the k-th highest
    scores = np.r_[imp, [0.99, 0.98]]
    same = np.r_[np.zeros(2000, bool), [True, True]]
    m = np.sort(imp)[::-1]
    assert _interpolated_threshold(scores, same, 1e-3) == pytest.approx(m[1])  # FAR 2/2000 at m_2
    assert _interpolated_threshold(scores, same, 1.25e-3) == pytest.approx((m[1] + m[2]) / 2)
    assert _interpolated_threshold(scores, same, 1e-4) is None  # below 1/2000


def _colour_pairset(n_ids=10, per_id=4):
    """Images of uniform colour; identity = hue direction; brightness varies within identity."""
    rng = np.random.default_rng(6)
    base = rng.uniform(-1, 1, size=(n_ids, 3))
    images, labels = [], []
    for i in range(n_ids):
        for k in range(per_id):
            colour = 127.5 + 120 * np.clip(base[i] * (0.6 + 0.1 * k) + rng.normal(scale=0.15, size=3), -1, 1)
            images.append(np.full((112, 112, 3), np.round(colour), dtype=np.uint8))
            labels.append(i)
    labels = np.array(labels)
    i, j = np.triu_indices(len(labels), 1)
    gen = np.flatnonzero(labels[i] == labels[j])[:20]
    imp = np.flatnonzero(labels[i] != labels[j])[::7][: gen.size]
    chosen = np.r_[gen, imp]
    order = np.argsort(np.r_[np.arange(gen.size) * 2, np.arange(gen.size) * 2 + 1])  # interleave the classes
    chosen = chosen[order]
    return PairSet("colours", images, i[chosen], j[chosen], labels[i[chosen]] == labels[j[chosen]])


def test_evaluate_pairset_closed_form(tmp_path):
    ps = _colour_pairset()
    seen = []

    def mean_colour(x: torch.Tensor) -> torch.Tensor:  # closed form: the normalised mean colour
        seen.append(x.shape[0])
        return x.mean(dim=(2, 3))

    report = evaluate_pairset(mean_colour, ps, out_dir=tmp_path / "eval", batch_size=16)
    assert sum(seen) == 2 * ps.num_images  # each distinct image once (+ its mirror)
    colours = np.stack([(im[0, 0].astype(np.float64) - 127.5) / 128 for im in ps.images])
    unit = colours / np.linalg.norm(colours, axis=1, keepdims=True)
    scores = np.einsum("kd,kd->k", unit[ps.left], unit[ps.right])
    from facesphere.evaluate.verification import verification_report

    expected = verification_report(scores, ps.same)
    for key in ("accuracy_mean", "auc", "eer", "best_threshold", "tar_at_far"):
        assert report[key] == pytest.approx(expected[key], abs=1e-6)
    assert report["num_images"] == ps.num_images and report["name"] == "colours"
    assert set(report["val_at_far"]) == {"far_target", "val_mean", "val_std", "far_mean", "thresholds"}
    assert report["val_at_far"]["val_mean"] is None  # 18 training impostors cannot measure FAR 1e-3
    loose = val_at_far(scores, ps.same, far_target=0.1)
    assert loose["val_mean"] is not None and 0 <= loose["far_mean"] <= 1
    for name in ("roc", "det", "failures", "report"):
        assert os.path.getsize(report["files"][name]) > 0
    saved = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert saved["accuracy_mean"] == pytest.approx(report["accuracy_mean"])


def test_protocol_registry_runs_csv(tmp_path):
    assert {"lfw", "bin", "csv", "cacd_vs", "fgnet_identification", "fgnet_verification"} <= set(list_protocols())
    ps = _colour_pairset(6, 3)
    names = []
    for k, image in enumerate(ps.images):
        names.append(f"img{k}.png")
        Image.fromarray(image).save(tmp_path / names[-1])
    lines = [f"{names[a]},{names[b]},{int(s)}" for a, b, s in zip(ps.left, ps.right, ps.same)]
    (tmp_path / "pairs.csv").write_text("\n".join(lines) + "\n")
    result = run_protocol("csv", lambda x: x.mean(dim=(2, 3)), tmp_path / "pairs.csv", n_folds=5, flip=False)
    assert result["protocol"] == "csv" and result["num_pairs"] == len(ps)
    with pytest.raises(KeyError, match="unknown evaluation protocol"):
        run_protocol("nope", None, tmp_path)


def test_pair_set_formats_are_one_table_for_loading_and_protocols(tmp_path):
    from facesphere.evaluate.pairsets import PAIRSET_FORMATS, load_pairset

    assert set(PAIRSET_FORMATS.names()) == {"bin", "csv", "lfw"} and set(PAIRSET_FORMATS.names()) <= set(list_protocols())
    ps = _colour_pairset(6, 3)
    images = tmp_path / "images"
    images.mkdir()
    for k, image in enumerate(ps.images):
        Image.fromarray(image).save(images / f"img{k}.png")
    lines = [f"img{a}.png,img{b}.png,{int(s)}" for a, b, s in zip(ps.left, ps.right, ps.same)]
    (tmp_path / "pairs.csv").write_text("\n".join(lines) + "\n")
    loaded = load_pairset(tmp_path / "pairs.csv", root=images)  # the suffix picks the format
    assert loaded.num_images == ps.num_images and loaded.same.tolist() == ps.same.tolist()
    # the protocol of the same name takes the format's own options (root=) besides the evaluation's
    result = run_protocol("csv", lambda x: x.mean(dim=(2, 3)), tmp_path / "pairs.csv", root=images, n_folds=5,
                          flip=False)
    assert result["num_pairs"] == len(ps) and result["num_images"] == ps.num_images
    with pytest.raises(ValueError, match="pass kind= one of bin, csv, lfw"):
        load_pairset(tmp_path / "pairs.tsv")
    with pytest.raises(KeyError, match="unknown pair-set format 'tsv'; known: bin, csv, lfw"):
        load_pairset(tmp_path / "pairs.csv", kind="tsv")


@pytest.mark.parametrize("mode", ["sum", "concat"])
def test_flip_augmentation_is_one_definition_for_numpy_and_torch(mode):
    from facesphere.models.flip import embed_flipped, flip_mode

    x = np.random.default_rng(0).standard_normal((2, 3, 4, 5)).astype(np.float32)
    flat = lambda batch: batch.reshape(batch.shape[0], -1)  # noqa: E731  (f = flatten: the result is readable)
    mirrored = x[..., ::-1].reshape(2, -1)
    expected = x.reshape(2, -1) + mirrored if mode == "sum" else np.hstack([x.reshape(2, -1), mirrored])
    assert np.array_equal(embed_flipped(flat, x, mode), expected)
    assert np.array_equal(embed_flipped(flat, torch.from_numpy(x), mode).numpy(), expected)
    assert np.array_equal(embed_flipped(flat, x, flip_mode(False)), x.reshape(2, -1))
    with pytest.raises(ValueError, match="flip must be True, False, 'sum' or 'concat'"):
        flip_mode("mean")
