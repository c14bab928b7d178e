"""Re-cut saved Partial FC shards for a new class range, so a run can resume on a different number of processes."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


def reshard_classifier(shards: list[dict[str, Any]], start: int, end: int, head: nn.Module,
                       optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, Any]]:
    """The head and optimiser state of classes [start, end), cut from shards saved by any number of ranks.

    ``shards`` are the saved shard files (class_start, class_end, num_classes, head, optimizer).
    Per-class tensors (the head's ``class_state`` entries, the centres and any per-class statistics,
    and every optimiser buffer with one row per centre) are sliced and concatenated; everything else (a learned scale, step counters) is replicated and taken from
    the first shard. Raises ``ValueError`` when the shards do not tile the classes.
    """
    if not shards:
        raise ValueError("the checkpoint has no classifier shards")
    shards = sorted(shards, key=lambda s: s["class_start"])
    total = shards[0]["num_classes"]
    bounds = [(s["class_start"], s["class_end"]) for s in shards]
    if bounds[0][0] != 0 or bounds[-1][1] != total or any(a[1] != b[0] for a, b in zip(bounds, bounds[1:])) \
            or any(s["num_classes"] != total for s in shards):
        raise ValueError(f"classifier shards {bounds} do not tile the {total} classes")
    if not 0 <= start < end <= total:
        raise ValueError(f"class range [{start}, {end}) lies outside the saved {total} classes")
    pieces = [(s, max(start, s["class_start"]) - s["class_start"], min(end, s["class_end"]) - s["class_start"])
              for s in shards if s["class_start"] < end and s["class_end"] > start]

    def cut(get) -> torch.Tensor:
        return torch.cat([get(s)[lo:hi] for s, lo, hi in pieces])

    head_state = dict(shards[0]["head"])
    for name in getattr(head, "class_state", ("weight",)):
        head_state[name] = cut(lambda s, name=name: s["head"][name])

    optimizer_state = copy.deepcopy(shards[0]["optimizer"])
    weight_index = _parameter_index(optimizer, head.weight)
    per_shard = [s["optimizer"]["state"].get(weight_index) for s in shards]
    if all(state is not None for state in per_shard):
        new = dict(per_shard[0])
        for key, value in per_shard[0].items():
            if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == shards[0]["class_end"] - shards[0]["class_start"]:
                new[key] = cut(lambda s, key=key: s["optimizer"]["state"][weight_index][key])
        optimizer_state["state"][weight_index] = new
    else:
        optimizer_state["state"].pop(weight_index, None)
    return head_state, optimizer_state


def _parameter_index(optimizer: torch.optim.Optimizer, parameter: torch.Tensor) -> int:
    """The integer key ``optimizer.state_dict()`` gives ``parameter`` (parameters numbered across groups)."""
    index = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p is parameter:
                return index
            index += 1
    raise ValueError("the centres are not among the optimiser's parameters")


__all__ = ["reshard_classifier"]
