"""A batch sampler defined by the global batch, so single- and multi-process training see the same data.

Each epoch draws one permutation from ``torch.Generator().manual_seed(seed + epoch)``. Global batch
``b`` is ``perm[b*G:(b+1)*G]`` and rank ``r`` takes ``global_batch[r::world_size]``; the union over
ranks of step ``b`` is therefore exactly the single-process batch ``b``, whatever the world size.
"""

from __future__ import annotations

import math
from typing import Iterator

import torch
from torch.utils.data import Sampler


class GlobalBatchSampler(Sampler[list[int]]):
    """Yields this rank's share of each global batch of one epoch (use as a DataLoader ``batch_sampler``).

    ``set_epoch(e)`` selects the permutation; ``set_start_batch(k)`` makes the next iteration skip the
    first ``k`` batches (resuming mid-epoch) and is consumed by that iteration. ``len()`` is the number
    of batches in a full epoch. With ``drop_last=False`` the final short global batch is padded with
    the first indices of the permutation up to a multiple of ``world_size``, so no rank gets an empty
    or missing batch.
    """

    def __init__(
        self,
        num_samples: int,
        global_batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        drop_last: bool = True,
    ) -> None:
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if global_batch_size < 1:
            raise ValueError(f"global_batch_size must be >= 1, got {global_batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
        if global_batch_size % world_size:
            raise ValueError(
                f"global batch size {global_batch_size} is not divisible by world size {world_size}; "
                f"use a multiple of {world_size}"
            )
        if drop_last and num_samples < global_batch_size:
            raise ValueError(
                f"{num_samples} samples do not fill one global batch of {global_batch_size} with drop_last=True"
            )
        self.num_samples = int(num_samples)
        self.global_batch_size = int(global_batch_size)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.epoch = 0
        self.start_batch = 0

    @property
    def local_batch_size(self) -> int:
        return self.global_batch_size // self.world_size

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_samples // self.global_batch_size
        return math.ceil(self.num_samples / self.global_batch_size)

    def set_epoch(self, epoch: int) -> None:
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = int(epoch)

    def set_start_batch(self, batch: int) -> None:
        """Skip the first ``batch`` batches of the next iteration (only that one)."""
        if not 0 <= batch <= len(self):
            raise ValueError(f"start batch must be in [0, {len(self)}], got {batch}")
        self.start_batch = int(batch)

    def permutation(self, epoch: int | None = None) -> torch.Tensor:
        """The epoch's permutation of all sample indices (identical on every rank)."""
        epoch = self.epoch if epoch is None else epoch
        generator = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.num_samples, generator=generator)

    def global_batch(self, batch: int, epoch: int | None = None) -> list[int]:
        """All indices of global batch ``batch`` (before splitting over ranks)."""
        perm = self.permutation(epoch)
        return self._global_batch(perm, batch)

    def _global_batch(self, perm: torch.Tensor, batch: int) -> list[int]:
        g = self.global_batch_size
        indices = perm[batch * g : (batch + 1) * g]
        short = (-len(indices)) % self.world_size
        if short:
            indices = torch.cat([indices, perm[:short]])
        return indices.tolist()

    def __iter__(self) -> Iterator[list[int]]:
        start, self.start_batch = self.start_batch, 0
        perm = self.permutation()
        for batch in range(start, len(self)):
            yield self._global_batch(perm, batch)[self.rank :: self.world_size]

    def __repr__(self) -> str:
        return (
            f"GlobalBatchSampler(num_samples={self.num_samples}, global_batch_size={self.global_batch_size}, "
            f"rank={self.rank}, world_size={self.world_size}, seed={self.seed}, drop_last={self.drop_last})"
        )
