"""Partial FC (An et al., arXiv 2203.15565): class centres sharded across ranks, sampled negatives.

Each of the R processes owns a contiguous block of the C class centres. Every step it gathers the
embeddings and labels of the whole global batch, keeps the centres of the positive classes that fall
in its block plus a random sample of its other centres (rate r, §3.2 of the paper), computes that
block's logits with the *unchanged* margin head (``MarginHead.logits`` on a centre subset; labels
outside the subset are ``IGNORE_LABEL``; rows the head screens out as label noise are left out on every
rank), and the softmax cross-entropy is normalised across ranks
by all-reducing the row maxima, the exponential sums and the target logits. No head-specific code:
any head whose logits depend only on (embedding, centre) pairs runs unchanged; a per-class bias
cannot follow a sampled subset and is refused.

Gradients: the loss is the mean over the global batch and is identical on every rank.
* The centre shard gets the exact gradient of that loss (only its own logits depend on it).
* The embeddings' gradient has one share per rank; the gather's backward sums them, keeps this
  rank's rows and multiplies by R, because DDP averages backbone gradients over the R ranks.
* Replicated head parameters (a learned scale) get their shares summed across ranks by a hook.

Sampling is a pure function of (seed, step, shard start), and initialisation of (seed, class id),
so a resumed run samples the same centres and a run on any number of ranks starts from the same
classifier.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from facesphere.heads.base import IGNORE_LABEL, MarginHead, build_head, check_inputs

INIT_BLOCK_ROWS = 4096
"""Centres are initialised in blocks of this many rows, each from its own seed, independent of sharding."""


@dataclass(frozen=True)
class Shard:
    """The half-open range [start, end) of class ids owned by one rank."""

    rank: int
    world_size: int
    start: int
    end: int

    @property
    def size(self) -> int:
        return self.end - self.start

    @classmethod
    def of(cls, num_classes: int, rank: int, world_size: int) -> Shard:
        """Contiguous split; the first ``num_classes % world_size`` ranks hold one class more."""
        base, extra = divmod(num_classes, world_size)
        start = base * rank + min(rank, extra)
        return cls(rank, world_size, start, start + base + (rank < extra))


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class _GatherRows(torch.autograd.Function):
    """All-gather along dim 0; backward: sum the ranks' gradient shares, keep this rank's rows, × world size."""

    @staticmethod
    def forward(ctx, tensor: Tensor) -> Tensor:
        world = dist.get_world_size()
        parts = [torch.empty_like(tensor) for _ in range(world)]
        dist.all_gather(parts, tensor.contiguous())
        ctx.rows, ctx.rank, ctx.world = tensor.shape[0], dist.get_rank(), world
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows] * ctx.world


class _ReplicatedSum(torch.autograd.Function):
    """All-reduce sum whose result feeds a computation repeated identically on every rank.

    Each rank's copy of the downstream loss is the same function of the sum, so the gradient of
    this rank's input is the incoming gradient itself (identity backward).
    """

    @staticmethod
    def forward(ctx, tensor: Tensor) -> Tensor:
        result = tensor.clone()
        dist.all_reduce(result, op=dist.ReduceOp.SUM)
        return result

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad


def gather_rows(tensor: Tensor) -> Tensor:
    """Concatenate every rank's ``tensor`` (equal shapes) along dim 0; differentiable as described above."""
    return _GatherRows.apply(tensor) if _distributed() else tensor


def gather_labels(labels: Tensor) -> Tensor:
    if not _distributed():
        return labels
    parts = [torch.empty_like(labels) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, labels.contiguous())
    return torch.cat(parts)


def sharded_cross_entropy(logits: Tensor, targets: Tensor, keep: Tensor | None = None) -> Tensor:
    """Mean cross-entropy when each rank holds some columns of the logits (identical value on every rank).

    ``targets`` index this rank's columns, or are IGNORE_LABEL where the target column lives on
    another rank; every row's target must live on exactly one rank. ``keep`` (bool (N,), the same
    on every rank) leaves rows out: they add neither loss nor gradient, and the mean runs over the
    kept rows (0 when none is kept).
    """
    row_max = logits.detach().amax(dim=1)
    if _distributed():
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX)
    exp_sum = torch.exp(logits - row_max.unsqueeze(1)).sum(dim=1)
    owned = targets != IGNORE_LABEL
    target_logit = torch.where(owned, logits.gather(1, targets.clamp(min=0).unsqueeze(1)).squeeze(1),
                               torch.zeros((), dtype=logits.dtype, device=logits.device))
    if _distributed():
        exp_sum = _ReplicatedSum.apply(exp_sum)
        target_logit = _ReplicatedSum.apply(target_logit)
    per_row = torch.log(exp_sum) + row_max - target_logit
    if keep is None:
        return per_row.mean()
    return torch.where(keep, per_row, torch.zeros((), dtype=per_row.dtype, device=per_row.device)).sum() \
        / keep.sum().clamp(min=1)


def init_centres(num_classes: int, shard: Shard, embedding_size: int, seed: int, std: float = 0.01) -> Tensor:
    """N(0, std²) centres of classes [shard.start, shard.end), each block of rows drawn from its own seed.

    The values of a class do not depend on how the classes are split across ranks.
    """
    rows = []
    for block in range(shard.start // INIT_BLOCK_ROWS, (shard.end - 1) // INIT_BLOCK_ROWS + 1):
        first = block * INIT_BLOCK_ROWS
        count = min(INIT_BLOCK_ROWS, num_classes - first)
        generator = torch.Generator().manual_seed(seed * 1_000_003 + block)
        values = torch.randn(count, embedding_size, generator=generator) * std
        rows.append(values[max(shard.start - first, 0):min(shard.end - first, count)])
    return torch.cat(rows)


class PartialFC(nn.Module):
    """Sharded, sampled classifier around any margin head: ``forward(embeddings, labels) -> loss``.

    Args:
        head: the margin head, built for this rank's shard (``num_classes = shard.size``); its
            ``weight`` is the shard of class centres. Use :func:`build_partial_fc`.
        num_classes: C, the total number of classes over all ranks.
        sample_rate: r in (0, 1]; each rank keeps max(ceil(r · shard size), #positives) centres.
        seed: seeds the negative sampling (with the step and the shard start).
    """

    def __init__(self, head: MarginHead, num_classes: int, sample_rate: float = 1.0, seed: int = 0,
                 shard: Shard | None = None) -> None:
        super().__init__()
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        self.shard = shard or Shard.of(num_classes, *_rank_and_world())
        if head.num_classes != self.shard.size:
            raise ValueError(f"head has {head.num_classes} centres, shard {self.shard} has {self.shard.size}")
        per_class = [n for n, p in head.named_parameters() if n != "weight" and p.ndim and p.shape[0] == head.num_classes]
        if per_class:
            raise ValueError(f"{type(head).__name__} has per-class parameters {per_class} that cannot follow sampled "
                             "centres; use a head without them (e.g. softmax with bias=false)")
        self.head = head
        self.num_classes = int(num_classes)
        self.sample_rate = float(sample_rate)
        self.seed = int(seed)
        self.step = 0
        self.embedding_size = head.embedding_size
        self._hooks = [p.register_hook(_sum_over_ranks) for n, p in head.named_parameters() if n != "weight"]

    @property
    def weight(self) -> Tensor:
        return self.head.weight

    def update(self, step: int) -> None:
        """Set the step (seeds this step's sampling) and forward it to the head's schedule."""
        self.step = int(step)
        self.head.update(step)

    def sample(self, local_labels: Tensor) -> tuple[Tensor | None, Tensor]:
        """Centre indices to use this step (None = all) and the labels re-indexed into them.

        Positives are always kept; negatives fill up to ceil(r · shard size), chosen uniformly by
        a generator seeded from (seed, step, shard start) — the same on every resume.
        """
        size = self.shard.size
        num_sample = math.ceil(self.sample_rate * size)
        if num_sample >= size:
            return None, local_labels
        positives = torch.unique(local_labels[local_labels != IGNORE_LABEL])
        device = local_labels.device
        generator = torch.Generator(device=device).manual_seed(
            (self.seed * 1_000_003 + self.step) * 1_000_033 + self.shard.start)
        priority = torch.rand(size, generator=generator, device=device)
        priority[positives] = 2.0
        index = torch.topk(priority, k=max(num_sample, positives.numel())).indices.sort().values
        owned = local_labels != IGNORE_LABEL
        remapped = torch.where(owned, torch.searchsorted(index, local_labels.clamp(min=0)), local_labels)
        return index, remapped

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """Mean cross-entropy of this rank's batch together with every other rank's (same value everywhere)."""
        labels = labels.long()
        check_inputs(embeddings, labels, self.embedding_size, 0, self.num_classes)
        all_embeddings = gather_rows(embeddings)
        all_labels = gather_labels(labels)
        in_shard = (all_labels >= self.shard.start) & (all_labels < self.shard.end)
        local = torch.where(in_shard, all_labels - self.shard.start, torch.full_like(all_labels, IGNORE_LABEL))
        keep = self.screen(all_embeddings, local)
        index, targets = self.sample(local)
        centres = self.head.centres()
        logits = self.head.exact_logits(all_embeddings, centres if index is None else centres[index], targets)
        return sharded_cross_entropy(logits, targets, keep)

    def screen(self, embeddings: Tensor, local_labels: Tensor) -> Tensor | None:
        """The rows every rank keeps: each rank's head screens the rows of its own classes, and a row left out
        by the rank owning its class is left out everywhere (None: the head leaves none out)."""
        drop = self.head.screen(embeddings.detach(), local_labels)
        if drop is None:
            return None
        if _distributed():
            drop = drop.to(torch.int32)
            dist.all_reduce(drop, op=dist.ReduceOp.MAX)
        return ~drop.bool()

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, shard=[{self.shard.start}, {self.shard.end}) of rank "
                f"{self.shard.rank}/{self.shard.world_size}, sample_rate={self.sample_rate}")


def _rank_and_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if _distributed() else (0, 1)


def _sum_over_ranks(grad: Tensor) -> Tensor:
    """Gradient hook of replicated head parameters: each rank holds only its shard's share."""
    if not _distributed():
        return grad
    grad = grad.clone()
    dist.all_reduce(grad, op=dist.ReduceOp.SUM)
    return grad


def build_partial_fc(head_name: str, embedding_size: int, num_classes: int, sample_rate: float = 1.0, seed: int = 0,
                     shard: Shard | None = None, **head_args) -> PartialFC:
    """A Partial FC around the registered head ``head_name``, initialised independently of the sharding."""
    shard = shard or Shard.of(num_classes, *_rank_and_world())
    if shard.size < 2:
        raise ValueError(f"{num_classes} classes over {shard.world_size} ranks leaves rank {shard.rank} with "
                         f"{shard.size}; Partial FC needs at least 2 classes per rank")
    head = build_head(head_name, embedding_size, shard.size, **head_args)
    with torch.no_grad():  # a row may hold several sub-centres: draw the whole row width
        head.weight.copy_(init_centres(num_classes, shard, head.weight.shape[1], seed))
    return PartialFC(head, num_classes, sample_rate, seed, shard)


__all__ = ["PartialFC", "Shard", "build_partial_fc", "gather_rows", "init_centres", "sharded_cross_entropy"]
