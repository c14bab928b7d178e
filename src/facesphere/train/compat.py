"""Whether a run may resume under a new config: the checkpoint's config and the new one, compared field by field.

A resume continues one experiment. Fields that only say where the run lives, how often it logs, checkpoints or
evaluates, or how fast it runs may change; they are listed here, and each change is logged
("resuming with changed settings: train.steps 100 → 200"). Every other field changes the experiment (model,
backbone and its args such as the embedding size, head and margins, objectives, Partial FC, optimiser, lr,
schedule, data source, classes, batch, augmentation, seed, precision, plug-ins, and any field added later): a
change is refused before anything is written, with one :class:`ResumeError` naming every changed field as
``old → new``.

Safe fields (a dotted name covers its sub-fields):

- ``name``, ``output_dir``: where the run folder is (a checkpoint copied into another run resumes);
- ``train.steps``: more steps; it must exceed the checkpoint's step. The schedule's length becomes the new
  total, so a decaying lr continues on the longer curve from the resumed step;
- ``train.log_every``, ``train.checkpoint_every``, ``train.keep_checkpoints``, ``train.progress``,
  ``train.tensorboard``: logging and checkpointing;
- ``train.device``, ``train.compile``, ``train.channels_last``, ``train.find_unused_parameters``,
  ``data.num_workers``: where and how fast the same computation runs;
- ``eval``: what is measured, never what is trained.

The stored config is not touched by a refused resume. An accepted one trains under the new config (the run's
``config.yaml`` shows it), and the checkpoints carry every earlier config in ``config_history``
(``{"until_step": N, "config": ...}``), so no setting a run was trained under is lost.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from facesphere.train.config import ConfigError, ExperimentConfig

logger = logging.getLogger(__name__)

SAFE_FIELDS = (
    "name", "output_dir",
    "train.steps", "train.log_every", "train.checkpoint_every", "train.keep_checkpoints", "train.progress",
    "train.tensorboard",
    "train.device", "train.compile", "train.channels_last", "train.find_unused_parameters", "data.num_workers",
    "eval",
)
"""Fields a resume may change; any other changed field refuses the resume."""

_UNSET = "(unset)"


class ResumeError(ConfigError):
    """A resume that would continue a different experiment, or a run that already reached its step count."""


def is_safe(field: str) -> bool:
    return any(field == safe or field.startswith(safe + ".") for safe in SAFE_FIELDS)


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted field names → leaf values (lists are leaves; an empty mapping has no fields)."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flat(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def _normalised(config: dict[str, Any]) -> dict[str, Any]:
    """The stored config with today's defaults filled in (a checkpoint of an older version lacks newer fields);
    as stored when it no longer validates, so its odd fields show up as changes."""
    try:
        return ExperimentConfig.model_validate(config).model_dump(mode="json")
    except ValueError:  # pydantic's ValidationError among them
        return config


def _show(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def config_changes(stored: dict[str, Any], new: ExperimentConfig) -> dict[str, tuple[Any, Any]]:
    """Every field whose value differs, ``field -> (old, new)`` (``"(unset)"`` where one side lacks it)."""
    old, now = _flat(_normalised(stored)), _flat(new.model_dump(mode="json"))
    return {field: (old.get(field, _UNSET), now.get(field, _UNSET)) for field in sorted(old.keys() | now.keys())
            if old.get(field, _UNSET) != now.get(field, _UNSET)}


def check_resume(stored: dict[str, Any], new: ExperimentConfig, step: int, source: str) -> dict[str, tuple[Any, Any]]:
    """The safe changes between the checkpoint's config ``stored`` (at ``step``, read from ``source``) and ``new``;
    raises :class:`ResumeError` naming every incompatible change, or when ``new.train.steps <= step``."""
    changes = config_changes(stored, new)
    refused = {field: change for field, change in changes.items() if not is_safe(field)}
    if refused:
        listed = "; ".join(f"{field} {_show(old)} → {_show(now)}" for field, (old, now) in refused.items())
        raise ResumeError(f"cannot resume from {source}: the config changes the experiment ({listed}); "
                          "train a new run (another name) instead, or restore these settings")
    if new.train.steps <= step:
        raise ResumeError(f"cannot resume from {source}: the run already reached step {step}; set train.steps "
                          f"above {step} to train further")
    if changes:
        logger.info("resuming with changed settings: %s",
                    "; ".join(f"{field} {_show(old)} → {_show(now)}" for field, (old, now) in changes.items()))
    return changes


__all__ = ["ResumeError", "SAFE_FIELDS", "check_resume", "config_changes", "is_safe"]
