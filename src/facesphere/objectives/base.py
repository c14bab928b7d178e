"""The objective contract: (model outputs, named targets) -> named loss terms.

See the package docstring (:mod:`facesphere.objectives`) for the whole contract.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from facesphere.data.targets import MASK_SUFFIX
from facesphere.registry import Registry


@dataclass(frozen=True)
class ObjectiveContext:
    """What an objective may need to know when it is built.

    ``key`` names the objective in the run (its loss terms, its checkpoint entries); ``rank`` and
    ``world_size`` say which share a rank-sharded objective owns. ``load_model`` reads a stored model
    (path -> (module, card)) for objectives that consult one (a teacher, a prior): the trainer passes the
    models layer's loader, which objectives, a sibling layer, may not import. Use it through
    :func:`load_frozen`.
    """

    key: str
    embedding_size: int
    num_classes: int
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    load_model: Callable[[str], tuple[nn.Module, Any]] | None = None


class ObjectiveLoadError(ValueError):
    """A model an objective needs cannot be loaded (missing path, unreadable, wrong kind)."""


class FrozenModel:
    """A stored model an objective consults but never trains (a teacher, a prior).

    Deliberately not an ``nn.Module``: held in an objective's attribute it stays outside the module tree, so it is
    never in ``state_dict`` (checkpoints), never optimised, never wrapped by DDP nor converted to SyncBatchNorm.
    It stays in eval mode with ``requires_grad`` False, and follows the data: on a call with tensors on another
    device it moves there first (the trainer moves the objectives, not this).
    """

    def __init__(self, module: nn.Module, card: Any, path: str) -> None:
        self.module, self.card, self.path = module.eval(), card, path
        for parameter in module.parameters():
            parameter.requires_grad_(False)

    def follow(self, like: Tensor) -> nn.Module:
        """The module, on ``like``'s device (moved once, on first use there), in eval mode."""
        first = next(self.module.parameters(), None)
        if first is not None and first.device != like.device:
            self.module.to(like.device)
        return self.module.eval()

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the model's parameters, which its inputs are cast to."""
        return next((p.dtype for p in self.module.parameters()), torch.float32)

    def __call__(self, images: Tensor) -> Tensor:
        """The model's embedding of ``images`` (cast to its dtype) without gradients (a backbone's dict is read at
        ``"embedding"``)."""
        with torch.no_grad():
            out = self.follow(images)(images.to(self.dtype))
        return out["embedding"] if isinstance(out, dict) else out


def load_frozen(context: ObjectiveContext, path: str | Path, argument: str) -> FrozenModel:
    """The stored model at ``path`` (the objective's ``argument``), frozen; a one-line error naming the objective,
    the argument and the path when it cannot be read. Objectives call this in their constructor, so a wrong path
    stops the trainer at start-up, not at step 1."""
    if context.load_model is None:
        raise ObjectiveLoadError(f"objective {context.key!r}: {argument} {path} cannot be loaded: no model loader was "
                                 "given (ObjectiveContext.load_model; the trainer passes one)")
    try:
        module, card = context.load_model(str(path))
    except (OSError, ValueError, RuntimeError, KeyError) as error:  # missing, unreadable, not a model, wrong card
        raise ObjectiveLoadError(f"objective {context.key!r}: {argument} {path} cannot be loaded: "
                                 f"{' '.join(str(error).split())}") from None
    return FrozenModel(module, card, str(path))


class Objective(nn.Module):
    """Base class: ``forward(outputs, targets) -> {term name: scalar}``, optional ``update(step)``.

    Subclasses set ``requires`` (the target names they read) and may set ``sharded = True``; a
    sharded objective also implements :meth:`shard_state` and :meth:`load_shards`.
    """

    sharded: bool = False
    requires: tuple[str, ...] = ()
    reads: tuple[str, ...] | None = None
    """The model outputs ``forward`` reads; None: any (the default). When every objective names them, a backbone
    may skip the others (``Backbone.needed_outputs``)."""

    def __init__(self, context: ObjectiveContext) -> None:
        super().__init__()
        self.key = context.key

    def terms(self) -> list[str]:
        """Names of the loss terms :meth:`forward` returns (one column each in metrics.csv); default: the key."""
        return [self.key]

    def forward(self, outputs: dict[str, Tensor], targets: dict[str, Tensor]) -> dict[str, Tensor]:
        raise NotImplementedError

    def update(self, step: int) -> None:
        """Called with the step number before each optimisation step (schedules); default no-op."""

    def card_fields(self) -> dict[str, Any]:
        """Model-card fields this objective gives the trained backbone, as JSON values (e.g. ``age_branch``);
        the trainer stores them in every checkpoint and export writes them to the card. Default: none."""
        return {}

    def shard_state(self) -> dict[str, Any]:
        """Sharded objectives: this rank's share of the parameters (without the optimiser state)."""
        raise NotImplementedError(f"{type(self).__name__} is not sharded")

    def load_shards(self, shards: list[dict[str, Any]], optimizer: torch.optim.Optimizer) -> None:
        """Sharded objectives: load this rank's share (parameters and ``optimizer``) from the shards saved by
        any number of ranks; each shard is a :meth:`shard_state` with its ``"optimizer"`` state added."""
        raise NotImplementedError(f"{type(self).__name__} is not sharded")


OBJECTIVES: Registry[Objective] = Registry("objective")


def resolve_objective(name: str) -> Callable[..., Objective]:
    """The constructor of a registered objective, or of ``"package.module:Class"`` (a user's objective)."""
    if ":" not in name:
        return OBJECTIVES.get(name)
    module_name, _, attribute = name.partition(":")
    try:
        constructor = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise KeyError(f"objective {name!r} cannot be imported: {error}") from None
    if not (isinstance(constructor, type) and issubclass(constructor, Objective)):
        raise KeyError(f"objective {name!r} is not a subclass of facesphere.objectives.Objective")
    return constructor


def build_objective(name: str, context: ObjectiveContext, **args) -> Objective:
    return resolve_objective(name)(context, **args)


def target_mask(targets: dict[str, Tensor], name: str) -> Tensor | None:
    """The bool (N,) mask of samples that carry target ``name`` (``targets[name + "_mask"]``); None: all do."""
    if name not in targets:
        raise KeyError(f"the batch has no target {name!r}; it has {sorted(k for k in targets if not k.endswith(MASK_SUFFIX))}")
    mask = targets.get(name + MASK_SUFFIX)
    return None if mask is None else mask.bool()


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def global_count(count: Tensor) -> tuple[Tensor, int]:
    """(sum of ``count`` over ranks, world size); gradient-free. A per-sample loss summed on each rank and
    divided by ``sum / world`` has the gradient, once DDP averages over ranks, of the global-batch mean."""
    if not _distributed():
        return count, 1
    total = count.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total, dist.get_world_size()


__all__ = ["MASK_SUFFIX", "OBJECTIVES", "FrozenModel", "Objective", "ObjectiveContext", "ObjectiveLoadError",
           "build_objective", "global_count", "load_frozen", "resolve_objective", "target_mask"]
