"""Checkpoints: written atomically, read with ``torch.load(weights_only=True)``.

A checkpoint holds everything needed to continue exactly: model and head weights, optimiser,
scheduler, the step, and the torch / numpy / python RNG states.
"""

from __future__ import annotations

import logging
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from facesphere.utils.files import atomic_path

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^step_(\d{8})\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable or does not fit the model."""


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


def save_shard(folder: Path, step: int, rank: int, world_size: int, state: dict[str, Any]) -> Path:
    """Write one rank's classifier shard atomically."""
    path = shard_path(folder, step, rank, world_size)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return path


def list_checkpoints(folder: Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if CHECKPOINT_PATTERN.match(p.name))


def latest_checkpoint(folder: Path) -> Path | None:
    found = list_checkpoints(folder)
    return found[-1] if found else None


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises several unrelated types for corrupt or unsafe files
        raise CheckpointError(f"cannot read checkpoint {path}: {error}") from None
