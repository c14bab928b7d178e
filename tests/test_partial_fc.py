"""Partial FC: equals the full classifier at r = 1 for every head, samples correctly at r < 1, and on 2 gloo
processes gives the single-process loss and gradients (a real process group, not a mock)."""

from __future__ import annotations

import itertools
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from facesphere.heads import HEADS, build_head
from facesphere.heads.base import IGNORE_LABEL
from facesphere.heads.partial_fc import PartialFC, Shard, build_partial_fc, init_centres

HEAD_ARGS = {"softmax": {"bias": False}, "sphereface": {"lambda_base": 5.0}}
EVERY_HEAD = [name for name in HEADS.names(aliases=False)]


def _full_reference(name: str, weight: torch.Tensor, embeddings: torch.Tensor, labels: torch.Tensor, step: int = 0):
    """Loss and gradients of the ordinary full classifier with the same centres."""
    head = build_head(name, embeddings.shape[1], weight.shape[0], **HEAD_ARGS.get(name, {})).double()
    with torch.no_grad():
        head.weight.copy_(weight)
    head.update(step)
    x = embeddings.clone().requires_grad_(True)
    loss = F.cross_entropy(head(x, labels), labels)
    loss.backward()
    return loss.detach(), x.grad, head.weight.grad, head


@pytest.mark.parametrize("name", EVERY_HEAD)
def test_rate_one_equals_full_classifier(name):
    torch.manual_seed(1)
    embeddings = torch.randn(12, 16, dtype=torch.float64) * 3
    labels = torch.randint(0, 40, (12,))
    pfc = build_partial_fc(name, 16, 40, sample_rate=1.0, seed=3, **HEAD_ARGS.get(name, {})).double()
    pfc.update(7)
    x = embeddings.clone().requires_grad_(True)
    loss = pfc(x, labels)
    loss.backward()
    ref_loss, ref_grad_x, ref_grad_w, ref_head = _full_reference(name, pfc.weight.detach(), embeddings, labels, step=7)
    torch.testing.assert_close(loss.detach(), ref_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad, ref_grad_x, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(pfc.weight.grad, ref_grad_w, rtol=1e-10, atol=1e-12)
    for (n, p), (_, q) in zip(pfc.head.named_parameters(), ref_head.named_parameters()):
        if n != "weight":
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["arcface", "sphereface", "normface"])
def test_sampled_loss_is_cross_entropy_over_the_kept_centres(name):
    torch.manual_seed(2)
    embeddings = torch.randn(10, 8, dtype=torch.float64)
    labels = torch.tensor([3, 3, 17, 50, 99, 0, 17, 64, 8, 8])
    pfc = build_partial_fc(name, 8, 100, sample_rate=0.1, seed=0, **HEAD_ARGS.get(name, {})).double()
    pfc.update(5)
    index, remapped = pfc.sample(labels)
    kept = index.tolist()
    assert len(kept) == max(math.ceil(0.1 * 100), len(set(labels.tolist()))) == 10
    assert set(labels.tolist()) <= set(kept) and kept == sorted(set(kept))
    assert torch.equal(index[remapped], labels)
    loss = pfc(embeddings, labels)
    head = pfc.head
    reference = F.cross_entropy(head.exact_logits(embeddings, pfc.weight[index], remapped), remapped)
    torch.testing.assert_close(loss, reference, rtol=1e-12, atol=1e-12)
    # with more positives than the quota every positive is kept
    many = torch.arange(0, 100, 4)
    index, remapped = pfc.sample(many)
    assert index.numel() == many.numel() and torch.equal(index[remapped], many)


def test_sampling_is_a_function_of_seed_and_step():
    pfc = build_partial_fc("arcface", 8, 1000, sample_rate=0.05, seed=11)
    labels = torch.tensor([1, 2, 3])
    pfc.update(4)
    first, _ = pfc.sample(labels)
    again, _ = pfc.sample(labels)
    pfc.update(5)
    other, _ = pfc.sample(labels)
    assert torch.equal(first, again) and not torch.equal(first, other)
    negatives = first[~torch.isin(first, labels)]
    assert negatives.numel() == 50 - 3


def test_shards_partition_the_classes_and_init_ignores_sharding():
    for classes, world in ((10, 3), (9000, 2), (4096 * 3 + 5, 4)):
        shards = [Shard.of(classes, r, world) for r in range(world)]
        assert shards[0].start == 0 and shards[-1].end == classes
        assert all(a.end == b.start for a, b in itertools.pairwise(shards))
        assert max(s.size for s in shards) - min(s.size for s in shards) <= 1
        whole = init_centres(classes, Shard.of(classes, 0, 1), 4, seed=5)
        torch.testing.assert_close(torch.cat([init_centres(classes, s, 4, seed=5) for s in shards]), whole, rtol=0, atol=0)
    assert abs(float(whole.std()) - 0.01) < 1e-3


def test_bad_heads_and_inputs_are_refused():
    with pytest.raises(ValueError, match="per-class parameters"):
        build_partial_fc("softmax", 8, 20)
    with pytest.raises(ValueError, match="sample_rate"):
        build_partial_fc("arcface", 8, 20, sample_rate=0.0)
    with pytest.raises(ValueError, match="at least 2 classes per rank"):
        build_partial_fc("arcface", 8, 3, shard=Shard.of(3, 1, 2))
    pfc = build_partial_fc("arcface", 8, 20)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 20\)"):
        pfc(torch.randn(2, 8), torch.tensor([0, 20]))
    with pytest.raises(ValueError, match="embeddings must be"):
        pfc(torch.randn(2, 7), torch.tensor([0, 1]))
    assert isinstance(pfc, PartialFC) and IGNORE_LABEL == -1


# ------------------------------------------------------------------------------------ two real processes
CLASSES, DIM, BATCH = 37, 8, 12


def _inputs():
    generator = torch.Generator().manual_seed(9)
    embeddings = torch.randn(BATCH, DIM, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, CLASSES, (BATCH,), generator=generator)
    return embeddings, labels


def _worker(rank: int, world: int, init_file: str, out_dir: str, name: str, rate: float) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    embeddings, labels = _inputs()
    rows = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    pfc = build_partial_fc(name, DIM, CLASSES, sample_rate=rate, seed=4, **HEAD_ARGS.get(name, {})).double()
    pfc.update(3)
    x = embeddings[rows].clone().requires_grad_(True)
    loss = pfc(x, labels[rows])
    loss.backward()
    local = torch.where((labels >= pfc.shard.start) & (labels < pfc.shard.end), labels - pfc.shard.start, -1)
    index, _ = pfc.sample(local)
    index = torch.arange(pfc.shard.size) if index is None else index
    torch.save({"loss": loss.detach(), "grad_x": x.grad, "weight": pfc.weight.detach(), "grad_w": pfc.weight.grad,
                "kept": index + pfc.shard.start,
                "extra": {n: p.grad for n, p in pfc.head.named_parameters() if n != "weight"}},
               os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.parametrize("name,rate", [("arcface", 1.0), ("normface", 1.0), ("cosface", 0.3)])
def test_two_processes_match_one_process(tmp_path, name, rate):
    world = 2
    mp.spawn(_worker, args=(world, str(tmp_path / "init"), str(tmp_path), name, rate), nprocs=world, join=True)
    parts = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]
    embeddings, labels = _inputs()
    weight = torch.cat([p["weight"] for p in parts])
    torch.testing.assert_close(weight, init_centres(CLASSES, Shard.of(CLASSES, 0, 1), DIM, seed=4).double())
    kept = torch.cat([p["kept"] for p in parts])
    head = build_head(name, DIM, CLASSES, **HEAD_ARGS.get(name, {})).double()
    with torch.no_grad():
        head.weight.copy_(weight)
    head.update(3)
    x = embeddings.clone().requires_grad_(True)
    remapped = torch.searchsorted(kept, labels)
    assert torch.equal(kept[remapped], labels), "every positive centre must be kept"
    reference = F.cross_entropy(head.exact_logits(x, head.weight[kept], remapped), remapped)
    reference.backward()
    for p in parts:
        torch.testing.assert_close(p["loss"], reference.detach(), rtol=1e-12, atol=1e-12)
    # Each rank's embedding gradient is world × its rows of the true gradient (DDP then averages the backbone).
    torch.testing.assert_close(torch.cat([p["grad_x"] for p in parts]) / world, x.grad, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(torch.cat([p["grad_w"] for p in parts]), head.weight.grad, rtol=1e-10, atol=1e-14)
    for n, q in head.named_parameters():
        if n != "weight":
            for p in parts:
                torch.testing.assert_close(p["extra"][n], q.grad, rtol=1e-10, atol=1e-14)
    if rate < 1:
        assert kept.numel() < CLASSES


def test_resharding_recuts_centres_and_momentum_for_any_process_count():
    """Shards saved by 3 ranks, re-cut for 2: centres and per-centre momentum rows land in the right place."""
    from facesphere.objectives.resharding import reshard_classifier

    classes, dim = 11, 4
    full_weight = torch.arange(classes * dim, dtype=torch.float32).view(classes, dim)
    saved = []
    for rank in range(3):
        shard = Shard.of(classes, rank, 3)
        pfc = build_partial_fc("normface", dim, classes, shard=shard)
        optimizer = torch.optim.SGD(pfc.head.parameters(), lr=0.1, momentum=0.9)
        pfc.head.weight.grad = torch.ones_like(pfc.head.weight)
        pfc.head.scale.grad = torch.tensor(1.0)
        optimizer.step()
        state = optimizer.state_dict()
        state["state"][0]["momentum_buffer"] = full_weight[shard.start:shard.end] * 10
        saved.append({"class_start": shard.start, "class_end": shard.end, "num_classes": classes,
                      "head": {"weight": full_weight[shard.start:shard.end], "scale": torch.tensor(7.0)},
                      "optimizer": state})
    for rank in range(2):
        shard = Shard.of(classes, rank, 2)
        pfc = build_partial_fc("normface", dim, classes, shard=shard)
        optimizer = torch.optim.SGD(pfc.head.parameters(), lr=0.1, momentum=0.9)
        head_state, optimizer_state = reshard_classifier(saved[::-1], shard.start, shard.end, pfc.head, optimizer)
        pfc.head.load_state_dict(head_state)
        optimizer.load_state_dict(optimizer_state)
        assert torch.equal(pfc.head.weight.detach(), full_weight[shard.start:shard.end])
        assert float(pfc.head.scale.detach()) == 7.0
        assert torch.equal(optimizer.state[pfc.head.weight]["momentum_buffer"], full_weight[shard.start:shard.end] * 10)
    with pytest.raises(ValueError, match="do not tile"):
        reshard_classifier(saved[:2], 0, 5, pfc.head, optimizer)
