"""Verification core: metrics against brute-force references and closed forms, pairs, embeddings, plots."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from facesphere.evaluate import (
    auc,
    best_threshold,
    cosine_scores,
    eer,
    extract_embeddings,
    kfold_accuracy,
    plot_det,
    plot_roc,
    roc,
    sample_pairs,
    tar_at_far,
    threshold_at_far,
    verification_report,
)

# --------------------------------------------------------------------------- brute-force references


def brute_best_threshold(scores, same):
    """Python loop over every candidate threshold; tie rule: lower median of the maximisers."""
    u = sorted(set(float(s) for s in scores))
    candidates = [-math.inf] + [(a + b) / 2 for a, b in zip(u[:-1], u[1:])] + [math.inf]
    accs = []
    for t in candidates:
        correct = sum((s >= t) == bool(y) for s, y in zip(scores, same))
        accs.append(correct / len(scores))
    best = max(accs)
    maximisers = [t for t, a in zip(candidates, accs) if a == best]
    return maximisers[(len(maximisers) - 1) // 2], best


def brute_kfold(scores, same, n_folds):
    n = len(scores)
    size = n // n_folds
    accs, thrs = [], []
    for f in range(n_folds):
        test = list(range(f * size, (f + 1) * size))
        train = [k for k in range(n) if k not in set(test)]
        t, _ = brute_best_threshold([scores[k] for k in train], [same[k] for k in train])
        accs.append(sum((scores[k] >= t) == bool(same[k]) for k in test) / len(test))
        thrs.append(t)
    return accs, thrs


def brute_roc_points(scores, same):
    """(far, tar) at +inf and every unique score, thresholds descending."""
    pos = [s for s, y in zip(scores, same) if y]
    neg = [s for s, y in zip(scores, same) if not y]
    thresholds = [math.inf] + sorted(set(scores), reverse=True)
    far = [sum(s >= t for s in neg) / len(neg) for t in thresholds]
    tar = [sum(s >= t for s in pos) / len(pos) for t in thresholds]
    return far, tar, thresholds


# --------------------------------------------------------------------------- k-fold accuracy


@pytest.mark.parametrize("discrete", [False, True])
def test_kfold_matches_brute_force(discrete):
    rng = np.random.default_rng(1 if discrete else 2)
    n, folds = 200, 5
    same = rng.random(n) < 0.5
    scores = rng.normal(size=n) + 1.2 * same
    if discrete:  # many exact ties exercise the tie rule and the grouping of equal scores
        scores = np.round(scores, 1)
    res = kfold_accuracy(scores, same, n_folds=folds)
    accs, thrs = brute_kfold(scores.tolist(), same.tolist(), folds)
    np.testing.assert_array_equal(res.accuracies, accs)
    np.testing.assert_allclose(res.thresholds, thrs, rtol=0, atol=1e-12)
    assert res.accuracy_mean == pytest.approx(np.mean(accs))
    assert res.accuracy_std == pytest.approx(np.std(accs))


def test_kfold_perfect_separation():
    rng = np.random.default_rng(0)
    same = np.tile([True, False], 300)
    scores = np.where(same, rng.uniform(0.6, 1.0, 600), rng.uniform(-1.0, 0.4, 600))
    res = kfold_accuracy(scores, same)
    assert res.accuracy_mean == 1.0 and res.accuracy_std == 0.0
    assert res.accuracies.shape == (10,)


def test_kfold_hand_computed():
    # fold 0 trains on fold 1 {0.7 T, 0.4 F, 0.6 F, 0.1 F}: only 0.65 separates it (4/4) -> fold 0 all correct.
    # fold 1 trains on fold 0 {0.9 T, 0.8 T, 0.3 F, 0.2 F}: 0.55 -> 0.6 F is accepted, 3/4 correct.
    scores = [0.9, 0.8, 0.3, 0.2, 0.7, 0.4, 0.6, 0.1]
    same = [1, 1, 0, 0, 1, 0, 0, 0]
    res = kfold_accuracy(scores, same, n_folds=2)
    np.testing.assert_allclose(res.thresholds, [0.65, 0.55])
    np.testing.assert_allclose(res.accuracies, [1.0, 0.75])
    assert res.accuracy_mean == pytest.approx(0.875)
    assert res.accuracy_std == pytest.approx(0.125)
    # explicit fold ids reproduce the contiguous split, in any id spelling
    res2 = kfold_accuracy(scores, same, folds=[7, 7, 7, 7, 9, 9, 9, 9])
    np.testing.assert_array_equal(res2.accuracies, res.accuracies)


def test_best_threshold_tie_rule():
    # candidates -inf .2 .4 .6 inf -> accuracies 2/4 3/4 2/4 3/4 2/4; maximisers {0.2, 0.6} -> lower median 0.2
    assert best_threshold([0.1, 0.3, 0.5, 0.7], [0, 1, 0, 1]) == (pytest.approx(0.2), 0.75)
    # three maximisers {0.2, 0.6, 1.0} -> the middle one
    thr, acc = best_threshold([0.1, 0.3, 0.5, 0.7, 0.9, 1.1], [0, 1, 0, 1, 0, 1])
    assert thr == pytest.approx(0.6) and acc == pytest.approx(4 / 6)


# --------------------------------------------------------------------------- ROC family


def test_roc_and_tar_at_far_match_brute_force():
    rng = np.random.default_rng(3)
    same = rng.random(300) < 0.4
    scores = np.round(rng.normal(size=300) + same, 1)  # ties included
    far, tar, thr = roc(scores, same)
    bfar, btar, bthr = brute_roc_points(scores.tolist(), same.tolist())
    np.testing.assert_allclose(far, bfar)
    np.testing.assert_allclose(tar, btar)
    np.testing.assert_array_equal(thr, bthr)
    assert np.all(np.diff(far) >= 0) and np.all(np.diff(tar) >= 0)

    n_neg = int((~same).sum())
    targets = (0.5, 0.1, 0.05, 0.01)
    got = tar_at_far(scores, same, targets)
    for t in targets:
        allowed = [b for f, b in zip(bfar, btar) if f * n_neg <= t * n_neg + 1e-9]
        expected = max(allowed) if t * n_neg >= 1 else None
        assert got[t] == pytest.approx(expected)
    # calibrated threshold reproduces FAR <= target
    t01 = threshold_at_far(scores, same, 0.1)
    assert np.mean(scores[~same] >= t01) <= 0.1


def test_auc_matches_mann_whitney():
    rng = np.random.default_rng(4)
    same = rng.random(400) < 0.5
    scores = np.round(rng.normal(size=400) + 0.8 * same, 1)
    pos, neg = scores[same][:, None], scores[~same][None, :]
    expected = np.mean(pos > neg) + 0.5 * np.mean(pos == neg)
    assert auc(scores, same) == pytest.approx(expected, abs=1e-12)


def test_far_below_resolution_is_unavailable():
    rng = np.random.default_rng(5)
    same = np.r_[np.ones(50, bool), np.zeros(100, bool)]
    scores = rng.normal(size=150) + same
    got = tar_at_far(scores, same, (1e-1, 1e-2, 1e-3, 1e-6))
    assert got[1e-3] is None and got[1e-6] is None
    assert got[1e-2] is not None and got[1e-1] is not None  # 1e-2 is exactly 1 / num_negatives
    assert threshold_at_far(scores, same, 1e-4) is None


def test_eer_two_gaussians_closed_form():
    # genuine ~ N(d, 1), impostor ~ N(0, 1): the EER threshold is d/2, so EER = Phi(-d/2)
    rng = np.random.default_rng(6)
    d, n = 2.0, 200_000
    scores = np.r_[rng.normal(d, 1.0, n), rng.normal(0.0, 1.0, n)]
    same = np.r_[np.ones(n, bool), np.zeros(n, bool)]
    expected = 0.5 * math.erfc(d / 2 / math.sqrt(2))
    assert eer(scores, same) == pytest.approx(expected, abs=3e-3)
    assert eer([0.9, 0.8, 0.1, 0.2], [1, 1, 0, 0]) == 0.0


def test_report_is_json_serialisable():
    rng = np.random.default_rng(7)
    same = np.tile([True, False], 300)
    scores = rng.normal(size=600) + 2 * same
    rep = verification_report(scores, same)
    text = json.dumps(rep, allow_nan=False)
    back = json.loads(text)
    assert back["num_pairs"] == 600 and len(back["fold_accuracies"]) == 10
    assert back["tar_at_far"]["1e-06"] is None and back["tar_at_far"]["0.1"] is not None
    assert 0.5 < back["auc"] <= 1.0 and 0.0 <= back["eer"] < 0.5
    assert back["accuracy_mean"] <= back["best_accuracy"] + 1e-12


@pytest.mark.parametrize(
    ("scores", "same", "message"),
    [
        ([0.1, 0.2, 0.3], [1, 0], "equal lengths"),
        ([0.1, 0.2, 0.3], [1, 1, 1], "both classes"),
        ([0.1, np.nan, 0.3], [1, 0, 1], "finite"),
        ([0.1, np.inf, 0.3], [1, 0, 1], "finite"),
        ([0.1, 0.2, 0.3], [2, 0, 1], "boolean"),
        ([], [], "empty"),
    ],
)
def test_input_validation(scores, same, message):
    for fn in (kfold_accuracy, roc, tar_at_far, auc, eer, verification_report):
        with pytest.raises(ValueError, match=message):
            fn(scores, same)


def test_fold_validation():
    with pytest.raises(ValueError, match="exceeds"):
        kfold_accuracy([0.1, 0.9, 0.2], [0, 1, 0], n_folds=10)
    with pytest.raises(ValueError, match="one id per pair"):
        kfold_accuracy([0.1, 0.9, 0.2, 0.8], [0, 1, 0, 1], folds=[0, 1])


# --------------------------------------------------------------------------- pair sampling


def _labels():
    # 40 identities with 1..6 samples (some singletons), shuffled order
    rng = np.random.default_rng(8)
    labels = np.repeat(np.arange(40), np.arange(40) % 6 + 1)
    return rng.permutation(labels)


def test_sample_pairs_properties():
    labels = _labels()
    i, j, same = sample_pairs(labels, 150, 300, seed=3)
    assert i.shape == j.shape == same.shape == (450,)
    assert same.sum() == 150
    assert np.all(i < j)
    np.testing.assert_array_equal(labels[i] == labels[j], same)
    assert len(set(zip(i.tolist(), j.tolist()))) == 450
    # genuine pairs spread evenly across identities while capacity allows
    per_id = np.bincount(labels[i[same]], minlength=40)
    capacity = np.bincount(labels) * (np.bincount(labels) - 1) // 2
    open_ids = per_id < capacity  # identities that could have taken more pairs
    assert open_ids.any()
    assert per_id[open_ids].max() - per_id[open_ids].min() <= 1
    assert np.all(per_id[~open_ids] <= per_id[open_ids].max())  # saturated ones hit their cap below the level
    # both classes interleaved by the final shuffle
    assert 0 < same[:225].sum() < 150


def test_sample_pairs_deterministic():
    labels = _labels()
    a = sample_pairs(labels, 100, 100, seed=11)
    b = sample_pairs(labels, 100, 100, seed=11)
    c = sample_pairs(labels, 100, 100, seed=12)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_sample_pairs_exhaustive_and_errors():
    labels = np.array(["a", "a", "b", "b", "c"])
    i, j, same = sample_pairs(labels, 2, 8, seed=0)  # every genuine and every impostor pair
    assert set(zip(i[same].tolist(), j[same].tolist())) == {(0, 1), (2, 3)}
    assert len(set(zip(i[~same].tolist(), j[~same].tolist()))) == 8
    with pytest.raises(ValueError, match="genuine"):
        sample_pairs(labels, 3, 1, seed=0)
    with pytest.raises(ValueError, match="impostor"):
        sample_pairs(labels, 1, 9, seed=0)


def test_enumerated_impostors_fallback_covers_the_rest():
    # the fallback used when rejection sampling stalls: uniform over all impostor pairs not yet chosen
    from facesphere.evaluate.pairs import _enumerated_impostors

    labels = np.array([2, 0, 1, 0, 2, 2])
    n = labels.size
    counts = np.bincount(labels)
    order = np.argsort(labels, kind="stable")
    starts = np.r_[0, np.cumsum(counts)]
    every = {a * n + b for a in range(n) for b in range(a + 1, n) if labels[a] != labels[b]}
    exclude = np.array(sorted(every)[:4])
    rest = _enumerated_impostors(counts, order, starts, n, len(every) - 4, exclude, np.random.default_rng(0))
    assert set(rest.tolist()) == every - set(exclude.tolist()) and rest.size == len(every) - 4


def test_sample_pairs_large_identity():
    # one identity large enough that pair ranks are unranked arithmetically, not enumerated
    labels = np.r_[np.zeros(3000, int), np.arange(1, 101)]
    i, j, same = sample_pairs(labels, 500, 2000, seed=1)
    assert len(set(zip(i.tolist(), j.tolist()))) == 2500
    np.testing.assert_array_equal(labels[i] == labels[j], same)
    assert np.all((i < j) & (j < labels.size))


# --------------------------------------------------------------------------- embeddings


class HalfMeans(nn.Module):
    """Closed-form model: per channel, the mean of the left half and the mean of the right half."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))  # so that .to(device) has something to move
        self.calls_in_eval = []

    def forward(self, x):
        self.calls_in_eval.append((not self.training) and torch.is_inference_mode_enabled())
        w = x.shape[-1] // 2
        return self.scale * torch.cat([x[..., :w].mean(dim=(2, 3)), x[..., w:].mean(dim=(2, 3))], dim=1)


def _images():
    g = torch.Generator().manual_seed(0)
    return torch.rand(7, 3, 4, 6, generator=g)


def _closed_form_halves(x):
    a = x.numpy().astype(np.float64)
    return a[..., :3].mean(axis=(2, 3)), a[..., 3:].mean(axis=(2, 3))


def _unit(v):
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_extract_embeddings_flip_sum_closed_form():
    x = _images()
    left, right = _closed_form_halves(x)
    model = HalfMeans().train()
    ds = TensorDataset(x, torch.arange(7))
    emb = extract_embeddings(model, ds, batch_size=3, progress=False)
    # mirror swaps (and reverses) the halves, so f(x) + f(flip x) = [L + R, R + L]
    expected = _unit(np.concatenate([left + right, right + left], axis=1))
    assert emb.dtype == np.float32 and emb.shape == (7, 6)
    np.testing.assert_allclose(emb, expected, atol=1e-6)
    assert model.training and all(model.calls_in_eval)

    loader = DataLoader(ds, batch_size=4, shuffle=False)
    np.testing.assert_allclose(extract_embeddings(model, loader, progress=True), emb, atol=1e-7)

    plain = extract_embeddings(model, ds, flip=False, progress=False)
    np.testing.assert_allclose(plain, _unit(np.concatenate([left, right], 1)), atol=1e-6)
    raw = extract_embeddings(model, ds, flip=True, normalize=False, progress=False)
    np.testing.assert_allclose(raw, np.concatenate([left + right, right + left], 1), atol=1e-6)
    cat = extract_embeddings(model, ds, flip="concat", progress=False)
    np.testing.assert_allclose(cat, _unit(np.concatenate([left, right, right, left], 1)), atol=1e-6)
    amp = extract_embeddings(model, ds, amp_dtype=torch.bfloat16, progress=False)
    np.testing.assert_allclose(amp, emb, atol=2e-2)
    with pytest.raises(ValueError, match="flip"):
        extract_embeddings(model, ds, flip="mirror", progress=False)


def test_cosine_scores():
    rng = np.random.default_rng(9)
    emb = rng.normal(size=(10, 5))
    i, j = np.array([0, 3, 9]), np.array([1, 3, 2])
    expected = [emb[a] @ emb[b] / np.linalg.norm(emb[a]) / np.linalg.norm(emb[b]) for a, b in zip(i, j)]
    np.testing.assert_allclose(cosine_scores(emb, i, j), expected)
    assert cosine_scores(emb, i, j)[1] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="out of range"):
        cosine_scores(emb, [0], [10])


# --------------------------------------------------------------------------- plots


def test_plots_write_png(tmp_path):
    rng = np.random.default_rng(10)
    same = np.r_[np.ones(2000, bool), np.zeros(20000, bool)]
    scores = rng.normal(size=same.size) + 2.5 * same
    far, tar, _ = roc(scores, same)
    curves = {"model A": (far, tar), "model B": (far, np.clip(tar - 0.05, 0, 1))}
    for fn, name in ((plot_roc, "roc.png"), (plot_det, "det.png")):
        path = tmp_path / "out" / name
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"stale")  # an existing file is replaced atomically
        assert fn(curves, path, title=name) == path
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        assert len(data) > 5_000
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["det.png", "roc.png"]  # no temp files left
    with pytest.raises(ValueError, match="empty"):
        plot_roc({}, tmp_path / "x.png")
