"""Checkpoints: written atomically (read by ``facesphere.models.runs``, with ``torch.load(weights_only=True)``).

A checkpoint holds everything needed to continue exactly: model and head weights, optimiser,
scheduler, the step, and the torch / numpy / python RNG states.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from facesphere.models.runs import list_checkpoints
from facesphere.utils.files import atomic_path

logger = logging.getLogger(__name__)

def rng_state() -> dict[str, Any]:
    numpy_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(numpy_state[1].astype(np.int64)), "pos": int(numpy_state[2]),
                  "has_gauss": int(numpy_state[3]), "cached_gaussian": float(numpy_state[4])},
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_path(folder: Path, step: int) -> Path:
    return Path(folder) / f"step_{step:08d}.pt"


def shard_path(folder: Path, step: int, rank: int, world_size: int) -> Path:
    """Where rank ``rank`` of ``world_size`` keeps its classifier shard of step ``step``."""
    return Path(folder) / f"step_{step:08d}.shard-{rank:05d}-of-{world_size:05d}.pt"


def save_checkpoint(folder: Path, step: int, state: dict[str, Any], keep: int = 2) -> Path:
    """Write ``step_XXXXXXXX.pt`` atomically, then delete all but the newest ``keep`` checkpoints (and their shards).

    With a sharded classifier the shards are written first (:func:`save_shard`) and the main file
    last, so a main file is only ever found next to its complete set of shards.
    """
    path = checkpoint_path(folder, step)
    with atomic_path(path) as tmp:
        torch.save({**state, "step": step}, tmp)
    for old in list_checkpoints(folder)[:-keep]:
        for shard in old.parent.glob(f"{old.stem}.shard-*.pt"):
            shard.unlink(missing_ok=True)
        old.unlink(missing_ok=True)
    return path


def remove_partial_writes(folder: Path) -> int:
    """Delete the temporary files of checkpoint and shard writes that a killed run left in ``folder`` (call it
    before training resumes, when nothing writes there); returns how many there were."""
    stale = list(Path(folder).glob(".step_*.tmp")) if Path(folder).is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    if stale:
        logger.info("removed %d partial checkpoint writes of a killed run from %s", len(stale), folder)
    return len(stale)


def save_shard(folder: Path, step: int, rank: int, world_size: int, state: dict[str, Any]) -> Path:
    """Write one rank's classifier shard atomically."""
    path = shard_path(folder, step, rank, world_size)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return path
