"""Learning-rate schedules: linear warm-up, then cosine, step, polynomial or constant.

Each schedule is a multiplicative factor of the base lr as a function of the step, wrapped in
``LambdaLR`` so its state is saved and restored with the checkpoint.
"""

from __future__ import annotations

import bisect
import math
from typing import Callable

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from facesphere.registry import Registry
from facesphere.train.config import ScheduleConfig

DECAYS: Registry[Callable[[float, ScheduleConfig, int, int], float]] = Registry("schedule")


@DECAYS.register("constant")
def _constant(progress: float, cfg: ScheduleConfig, step: int, total: int) -> float:
    return 1.0


@DECAYS.register("cosine")
def _cosine(progress: float, cfg: ScheduleConfig, step: int, total: int) -> float:
    return cfg.min_lr_factor + (1 - cfg.min_lr_factor) * 0.5 * (1 + math.cos(math.pi * progress))


@DECAYS.register("poly")
def _poly(progress: float, cfg: ScheduleConfig, step: int, total: int) -> float:
    return cfg.min_lr_factor + (1 - cfg.min_lr_factor) * (1 - progress) ** cfg.power


@DECAYS.register("step")
def _step(progress: float, cfg: ScheduleConfig, step: int, total: int) -> float:
    return cfg.gamma ** bisect.bisect_right(sorted(cfg.milestones), step)


def lr_factor(step: int, total_steps: int, cfg: ScheduleConfig) -> float:
    """Factor of the base lr at ``step`` (0-based): warm-up from ``warmup_start_factor`` to 1, then decay."""
    if step < cfg.warmup_steps:
        return cfg.warmup_start_factor + (1 - cfg.warmup_start_factor) * (step + 1) / cfg.warmup_steps
    decay_steps = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    return DECAYS.get(cfg.kind)(progress, cfg, step, total_steps)


def build_scheduler(optimizer: Optimizer, total_steps: int, cfg: ScheduleConfig) -> LambdaLR:
    return LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, cfg))
