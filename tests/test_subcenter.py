"""Sub-center ArcFace: K = 1 is ArcFace, logits against a numpy brute force, gradients, the dominant sub-centre and
the drop rule on a constructed case, Partial FC (1 and 2 real processes, resharding), checkpoints, the Trainer."""

from __future__ import annotations

import io
import math
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from facesphere.heads import HEADS, IGNORE_LABEL, build_head
from facesphere.heads.partial_fc import Shard, build_partial_fc, init_centres
from facesphere.heads.subcenter import SubCenterArcFaceHead
from facesphere.objectives import ObjectiveContext, Recognition
from facesphere.objectives.resharding import reshard_classifier

D, C, K = 5, 6, 3


def _inputs(seed: int = 0, n: int = 9, classes: int = C, dim: int = D, k: int = K):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g, dtype=torch.float64) * 2
    w = torch.randn(classes, k * dim, generator=g, dtype=torch.float64)
    labels = torch.randint(0, classes, (n,), generator=g)
    labels[n // 2] = IGNORE_LABEL
    return x, w, labels


def _head(weight: torch.Tensor, k: int = K, dim: int = D, **kwargs) -> SubCenterArcFaceHead:
    head = build_head("subcenter_arcface", dim, weight.shape[0], sub_centres=k, **kwargs).double()
    with torch.no_grad():
        head.weight.copy_(weight)
    return head


def _numpy_logits(x, w, labels, k, s, m):
    """Element by element: cos θ_j = max_k cos(x, W_jk); the target becomes cos(θ + m), or cos θ - m·sin m past π - m."""
    x, w = x.numpy(), w.numpy().reshape(w.shape[0], k, -1)
    out = np.empty((x.shape[0], w.shape[0]))
    for i in range(x.shape[0]):
        for j in range(w.shape[0]):
            c = max(float(x[i] @ w[j, q]) / (np.linalg.norm(x[i]) * np.linalg.norm(w[j, q])) for q in range(k))
            if j == int(labels[i]):
                c = math.cos(math.acos(c) + m) if c > math.cos(math.pi - m) else c - m * math.sin(m)
            out[i, j] = s * c
    return torch.from_numpy(out)


# ----------------------------------------------------------------------------- logits and gradients


@pytest.mark.parametrize("kwargs", [{}, {"margin": 1.2}, {"easy_margin": True}, {"scale": 16.0, "margin": 0.0}])
def test_one_sub_centre_is_exactly_arcface(kwargs):
    x, w, labels = _inputs(k=1)
    head = _head(w, k=1, **kwargs)
    arcface = build_head("arcface", D, C, **kwargs).double()
    with torch.no_grad():
        arcface.weight.copy_(w)
    torch.testing.assert_close(head(x, labels), arcface(x, labels), rtol=0, atol=0)


@pytest.mark.parametrize("margin", [0.5, 1.3])
def test_logits_match_a_numpy_brute_force(margin):
    x, w, labels = _inputs(seed=1)
    head = _head(w, scale=10.0, margin=margin)
    expected = _numpy_logits(x, w, labels, K, 10.0, margin)
    torch.testing.assert_close(head(x, labels), expected, rtol=1e-12, atol=1e-12)
    # a subset of classes (what Partial FC passes) gives those columns, labels re-indexed into the subset
    rows = torch.tensor([0, 2, 3, 5])
    sub_labels = torch.where(torch.isin(labels, rows), torch.searchsorted(rows, labels.clamp(min=0)), IGNORE_LABEL)
    torch.testing.assert_close(head.logits(x, w[rows], sub_labels), _numpy_logits(x, w[rows], sub_labels, K, 10.0, margin),
                               rtol=1e-12, atol=1e-12)


def test_gradcheck_away_from_ties():
    x, w, labels = _inputs(seed=2, n=4, classes=3)
    head = _head(w, scale=4.0)
    cos = head.class_cosine(x, w)
    per = F.normalize(x, dim=1) @ F.normalize(w.view(-1, D), dim=1).T
    top2 = per.view(len(x), 3, K).topk(2, dim=2).values
    assert float((top2[..., 0] - top2[..., 1]).min()) > 1e-3 and float(cos.abs().max()) < 0.999  # no ties, no ±1
    assert torch.autograd.gradcheck(lambda a, b: head.exact_logits(a, b, labels),
                                    (x.clone().requires_grad_(True), w.clone().requires_grad_(True)))


def test_only_the_winning_sub_centre_gets_gradient():
    x, w, labels = _inputs(seed=3, n=1)
    labels[0] = 2
    head = _head(w)
    F.cross_entropy(head(x, labels), labels).backward()
    winners = (F.normalize(x, dim=1) @ F.normalize(w.view(-1, D), dim=1).T).view(C, K).argmax(dim=1)
    grad = head.weight.grad.view(C, K, D)
    for j in range(C):
        for q in range(K):
            assert bool(grad[j, q].abs().sum() > 0) == (q == int(winners[j])), (j, q)


# ----------------------------------------------------------------------------- dominant sub-centre and drop rule


def _constructed():
    """Class 0: sub-centres e0, e1; 10 samples near e0, 2 near e1. Class 1: sub-centres e3, e4, 3 samples near e4."""
    e = torch.eye(D, dtype=torch.float64)
    w = torch.stack([torch.cat([e[0], e[1]]), torch.cat([e[3], e[4]])])
    g = torch.Generator().manual_seed(4)
    near = lambda axis, n: e[axis] + 0.1 * torch.randn(n, D, generator=g, dtype=torch.float64)  # noqa: E731
    x = torch.cat([near(0, 10), near(1, 2), near(4, 3)])
    labels = torch.tensor([0] * 12 + [1] * 3)
    return w, x, labels, e


def _at_angle(e, degrees: float) -> torch.Tensor:
    """A unit vector at ``degrees`` from e0, in the plane of e0 and e2 (away from every other sub-centre)."""
    a = math.radians(degrees)
    return (math.cos(a) * e[0] + math.sin(a) * e[2]).unsqueeze(0)


def test_dominant_sub_centre_is_kept_and_far_samples_are_dropped():
    w, x, labels, e = _constructed()
    head = _head(w, k=2, drop_step=5, scale=8.0, margin=0.3).train()
    head.update(0)
    assert head.screen(x, labels) is None and not head.is_collapsed
    assert head.counts.tolist() == [[10, 2], [0, 3]]
    head.update(4)
    assert not head.is_collapsed
    head.update(5)
    assert head.is_collapsed and head.dominant.tolist() == [0, 1]
    torch.testing.assert_close(head.centres(), torch.stack([e[0], e[4]]), rtol=0, atol=0)

    probe = torch.cat([_at_angle(e, 80.0), _at_angle(e, 60.0), _at_angle(e, 74.0), _at_angle(e, 76.0)])
    drop = head.screen(probe, torch.tensor([0, 0, 0, 0]))
    assert drop.tolist() == [True, False, False, True]
    assert head.dropped.tolist() == [2, 0]
    # the samples near e1 (class 0's non-dominant sub-centre, 90° away) are now noise as well
    assert head.screen(x, labels).tolist() == [False] * 10 + [True, True] + [False] * 3
    assert int(head.dropped.sum()) == 4
    head.update(6)
    assert head.counts.tolist() == [[10, 2], [0, 3]], "no counting after the drop"


def test_after_the_drop_logits_are_arcface_on_the_dominant_centres():
    w, x, labels, _ = _constructed()
    head = _head(w, k=2, drop_step=1, scale=8.0, margin=0.3).train()
    head.screen(x, labels)
    head.update(1)
    arcface = build_head("arcface", D, 2, scale=8.0, margin=0.3).double()
    with torch.no_grad():
        arcface.weight.copy_(head.centres())
    torch.testing.assert_close(head(x, labels), arcface(x, labels), rtol=0, atol=0)


def test_a_dropped_sample_adds_nothing_to_the_loss_or_gradients():
    w, x, labels, e = _constructed()
    objective = Recognition(ObjectiveContext("r", embedding_size=D, num_classes=2), head="subcenter_arcface",
                            head_args={"sub_centres": 2, "drop_step": 1, "scale": 8.0, "margin": 0.3}).double()
    head = objective.head
    with torch.no_grad():
        head.weight.copy_(w)
    head.screen(x, labels)
    head.update(1)
    noisy = torch.cat([x[:10], _at_angle(e, 80.0), x[12:]])  # one far sample of class 0 among clean ones
    target = torch.cat([labels[:10], torch.tensor([0]), labels[12:]])
    z = noisy.clone().requires_grad_(True)
    loss = objective({"embedding": z}, {"label": target})["r"]
    loss.backward()
    assert torch.equal(z.grad[10], torch.zeros(D, dtype=torch.float64)), "a dropped row is not even a negative"
    clean = torch.cat([noisy[:10], noisy[11:]])
    arcface = build_head("arcface", D, 2, scale=8.0, margin=0.3).double()
    with torch.no_grad():
        arcface.weight.copy_(head.centres())
    reference = F.cross_entropy(arcface(clean, torch.cat([target[:10], target[11:]])), torch.cat([target[:10], target[11:]]))
    torch.testing.assert_close(loss.detach(), reference.detach(), rtol=1e-12, atol=1e-12)
    # every sample dropped: the loss is 0 with zero gradients, not nan
    far = _at_angle(e, 100.0).repeat(3, 1).requires_grad_(True)
    empty = objective({"embedding": far}, {"label": torch.zeros(3, dtype=torch.long)})["r"]
    empty.backward()
    assert float(empty.detach()) == 0.0 and torch.equal(far.grad, torch.zeros_like(far))


def test_counting_window_and_no_drop_by_default():
    w, x, labels, _ = _constructed()
    head = _head(w, k=2, drop_step=10, count_steps=3).train()
    for step in range(10):
        head.update(step)
        head.screen(x, labels)
    assert head.counts.tolist() == [[30, 6], [0, 9]], "only steps 7, 8, 9 count"
    never = _head(w, k=2).train()
    never.update(10**9)
    assert not never.is_collapsed and never.screen(x, labels) is None
    evaluating = _head(w, k=2).eval()
    evaluating.screen(x, labels)
    assert int(evaluating.counts.sum()) == 0, "evaluation batches are not counted"


@pytest.mark.parametrize("kwargs", [{"sub_centres": 0}, {"sub_centres": 2.0}, {"drop_step": -1}, {"drop_angle": 0.0},
                                    {"drop_angle": 181.0}, {"count_steps": 0}, {"margin": 2.0}])
def test_bad_hyper_parameters_are_refused(kwargs):
    with pytest.raises(ValueError):
        build_head("subcenter_arcface", D, C, **kwargs)


def test_registered_under_its_name():
    assert HEADS.get("subcenter_arcface") is SubCenterArcFaceHead
    assert build_head("subcenter_arcface", D, C).weight.shape == (C, 3 * D)


# ----------------------------------------------------------------------------- checkpoints


def test_state_dict_round_trip_keeps_counts_choice_and_drops():
    w, x, labels, e = _constructed()
    head = _head(w, k=2, drop_step=1).train()
    head.screen(x, labels)
    fresh = _head(torch.zeros_like(w), k=2, drop_step=1)
    fresh.load_state_dict(head.state_dict())
    assert torch.equal(fresh.counts, head.counts) and not fresh.is_collapsed
    head.update(1)
    head.screen(_at_angle(e, 80.0), torch.tensor([0]))
    buffer = io.BytesIO()
    torch.save(head.state_dict(), buffer)
    buffer.seek(0)
    loaded = _head(torch.zeros_like(w), k=2, drop_step=1)
    loaded.load_state_dict(torch.load(buffer, weights_only=True))
    assert loaded.is_collapsed
    for name in ("weight", "counts", "dominant", "dropped", "collapsed"):
        assert torch.equal(getattr(loaded, name), getattr(head, name)), name
    torch.testing.assert_close(loaded(x, labels), head(x, labels), rtol=0, atol=0)


# ----------------------------------------------------------------------------- Partial FC


def _pair(sample_rate: float):
    """A sharded (Partial FC, 1 process) and a plain Recognition objective with the same centres."""
    args = {"head": "subcenter_arcface", "head_args": {"sub_centres": 3, "drop_step": 2, "scale": 8.0, "margin": 0.3,
                                                        "drop_angle": 70.0}}
    context = ObjectiveContext("r", embedding_size=D, num_classes=C, seed=7)
    sharded = Recognition(context, partial_fc=True, sample_rate=sample_rate, **args).double().train()
    plain = Recognition(context, **args).double().train()
    plain.head.load_state_dict(sharded.head.head.state_dict())
    return sharded, plain


def test_partial_fc_at_rate_one_equals_the_plain_head_before_and_after_the_drop():
    sharded, plain = _pair(1.0)
    g = torch.Generator().manual_seed(8)
    for step in range(4):
        x = torch.randn(16, D, generator=g, dtype=torch.float64)
        labels = torch.randint(0, C, (16,), generator=g)
        results = []
        for objective in (sharded, plain):
            objective.update(step)
            objective.zero_grad()
            z = x.clone().requires_grad_(True)
            loss = objective({"embedding": z}, {"label": labels})["r"]
            loss.backward()
            results.append((loss.detach(), z.grad, objective.head.weight.grad))
        for a, b in zip(*results):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)
    head = sharded.head.head
    assert head.is_collapsed and torch.equal(head.dominant, plain.head.dominant)
    assert torch.equal(head.dropped, plain.head.dropped) and int(head.dropped.sum()) > 0, "the drop must have bitten"
    assert torch.equal(head.counts, plain.head.counts) and int(head.counts.sum()) == 32


def test_partial_fc_sampled_loss_leaves_dropped_rows_out():
    sharded, _ = _pair(0.5)
    pfc = sharded.head
    g = torch.Generator().manual_seed(9)
    x = torch.randn(16, D, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 2, (16,), generator=g)
    pfc.train()
    for step in range(3):
        pfc.update(step)
        loss = pfc(x, labels)
    head = pfc.head
    keep = head.screen(x, labels).logical_not()  # screen is a pure function of the state after the drop
    assert 0 < int(keep.sum()) < 16
    index, remapped = pfc.sample(labels)
    logits = head.exact_logits(x[keep], head.centres()[index], remapped[keep])
    torch.testing.assert_close(loss, F.cross_entropy(logits, remapped[keep]), rtol=1e-12, atol=1e-12)


def test_partial_fc_init_and_resharding_keep_whole_classes():
    classes = 11
    whole = init_centres(classes, Shard.of(classes, 0, 1), K * D, seed=5)
    saved = []
    for rank in range(3):
        shard = Shard.of(classes, rank, 3)
        pfc = build_partial_fc("subcenter_arcface", D, classes, seed=5, shard=shard, drop_step=0)
        torch.testing.assert_close(pfc.head.weight.detach(), whole[shard.start:shard.end], rtol=0, atol=0)
        optimizer = torch.optim.SGD(pfc.head.parameters(), lr=0.1, momentum=0.9)
        pfc.head.weight.grad = torch.ones_like(pfc.head.weight)
        optimizer.step()
        head = pfc.head
        ids = torch.arange(shard.start, shard.end)
        head.counts.copy_(torch.stack([ids, 2 * ids, 3 * ids], dim=1))
        head.dropped.copy_(ids + 100)
        pfc.update(0)
        assert head.dominant.tolist() == ([2] * shard.size if shard.start else [0] + [2] * (shard.size - 1))
        saved.append({"class_start": shard.start, "class_end": shard.end, "num_classes": classes,
                      "head": head.state_dict(), "optimizer": optimizer.state_dict()})
    for world in (1, 2):
        for rank in range(world):
            context = ObjectiveContext("r", embedding_size=D, num_classes=classes, seed=1, rank=rank, world_size=world)
            objective = Recognition(context, head="subcenter_arcface", head_args={"drop_step": 0}, partial_fc=True)
            optimizer = torch.optim.SGD(objective.parameters(), lr=0.1, momentum=0.9)
            objective.load_shards(saved[::-1], optimizer)
            head, shard = objective.head.head, objective.head.shard
            ids = torch.arange(shard.start, shard.end)
            assert head.is_collapsed
            torch.testing.assert_close(head.weight.detach(), whole[shard.start:shard.end] - 0.1, rtol=0, atol=1e-7)
            assert head.counts.tolist() == torch.stack([ids, 2 * ids, 3 * ids], dim=1).tolist()
            assert head.dropped.tolist() == (ids + 100).tolist()
            assert head.dominant.tolist() == [0 if i == 0 else 2 for i in ids.tolist()]
            momentum = optimizer.state_dict()["state"][0]["momentum_buffer"]
            assert momentum.shape == (shard.size, K * D)


CLASSES, BATCH = 9, 8


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(10)
    x = torch.randn(world * BATCH, D, generator=g, dtype=torch.float64)
    labels = torch.randint(0, CLASSES, (world * BATCH,), generator=g)
    pfc = build_partial_fc("subcenter_arcface", D, CLASSES, seed=4, sub_centres=2, drop_step=1, drop_angle=60.0,
                           scale=8.0, margin=0.3).double().train()
    mine = slice(rank * BATCH, (rank + 1) * BATCH)
    losses, grads = [], []
    for step in range(2):
        pfc.update(step)
        pfc.zero_grad()
        z = x[mine].clone().requires_grad_(True)
        loss = pfc(z, labels[mine])
        loss.backward()
        losses.append(loss.detach())
        grads.append(z.grad)
    head = pfc.head
    torch.save({"losses": losses, "grad_x": grads, "grad_w": head.weight.grad, "counts": head.counts,
                "dropped": head.dropped}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_two_processes_drop_the_same_rows_as_one():
    """2 gloo processes, classes sharded: counts, the drop and loss/gradients equal one process with every class."""
    import tempfile

    world = 2
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(world, os.path.join(tmp, "init"), tmp), nprocs=world, join=True)
        parts = [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=True) for r in range(world)]
    g = torch.Generator().manual_seed(10)
    x = torch.randn(world * BATCH, D, generator=g, dtype=torch.float64)
    labels = torch.randint(0, CLASSES, (world * BATCH,), generator=g)
    pfc = build_partial_fc("subcenter_arcface", D, CLASSES, seed=4, sub_centres=2, drop_step=1, drop_angle=60.0,
                           scale=8.0, margin=0.3).double().train()
    for step in range(2):
        pfc.update(step)
        pfc.zero_grad()
        z = x.clone().requires_grad_(True)
        loss = pfc(z, labels)
        loss.backward()
        for p in parts:
            torch.testing.assert_close(p["losses"][step], loss.detach(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(torch.cat([p["grad_x"][step] for p in parts]) / world, z.grad, rtol=1e-10, atol=1e-14)
    head = pfc.head
    assert int(head.dropped.sum()) > 0, "the drop must have bitten"
    for name in ("counts", "dropped"):
        assert torch.equal(torch.cat([p[name] for p in parts]), getattr(head, name)), name
    torch.testing.assert_close(torch.cat([p["grad_w"] for p in parts]), head.weight.grad, rtol=1e-10, atol=1e-14)


# ----------------------------------------------------------------------------- the Trainer


TINY = [
    "model.backbone=sphereface4", "model.backbone_args={embedding_size: 32, input_size: [32, 32]}",
    "model.head=subcenter_arcface",
    "model.head_args={scale: 16.0, margin: 0.2, sub_centres: 2, drop_step: 3, drop_angle: 75.0}",
    "data.kind=synthetic", "data.synthetic.num_identities=8", "data.synthetic.samples_per_identity=4",
    "data.batch_size=8", "data.num_workers=0", "optim.lr=0.05", "train.log_every=1", "train.tensorboard=false",
    "train.progress=false", "eval.enabled=false", "train.steps=6", "train.checkpoint_every=4",
]


@pytest.mark.parametrize("partial_fc", [False, True])
def test_training_reaches_the_drop_and_resumes_past_it(tmp_path, partial_fc):
    from facesphere.train.config import load_config
    from facesphere.train.trainer import Trainer, read_metrics

    settings = TINY + [f"output_dir={tmp_path}", "name=t", f"model.partial_fc.enabled={str(partial_fc).lower()}"]
    trainer = Trainer(load_config(None, settings))
    trainer.fit()
    rows = read_metrics(tmp_path / "t" / "metrics.csv")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6] and all(math.isfinite(r["loss"]) for r in rows)
    objective = trainer.model.objectives["recognition"]
    head = objective.head.head if partial_fc else objective.head
    assert head.is_collapsed and int(head.counts.sum()) == 3 * 8, "steps 0-2 counted, one sample each"
    resumed = Trainer(load_config(None, settings + ["train.steps=5"]))
    (tmp_path / "t" / "checkpoints" / "step_00000006.pt").unlink()
    for shard in (tmp_path / "t" / "checkpoints").glob("step_00000006.*"):
        shard.unlink()
    assert resumed.resume() and resumed.step == 4
    again = resumed.model.objectives["recognition"].head
    again = again.head if partial_fc else again
    assert again.is_collapsed and torch.equal(again.counts, head.counts) and torch.equal(again.dominant, head.dominant)
    resumed.fit()
