"""Learning-rate schedules against their closed forms."""

from __future__ import annotations

import math

import pytest
import torch

from facesphere.train.config import ScheduleConfig
from facesphere.train.schedules import build_scheduler, lr_factor


def test_warmup_then_cosine_closed_form():
    cfg = ScheduleConfig(kind="cosine", warmup_steps=10, warmup_start_factor=0.0, min_lr_factor=0.1)
    total = 110
    for step in range(10):
        assert lr_factor(step, total, cfg) == pytest.approx((step + 1) / 10)
    for step in (10, 35, 60, 109):
        progress = (step - 10) / 100
        assert lr_factor(step, total, cfg) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def test_step_and_poly():
    step_cfg = ScheduleConfig(kind="step", milestones=[5, 8], gamma=0.1)
    assert [round(lr_factor(s, 10, step_cfg), 6) for s in (0, 4, 5, 7, 8, 9)] == [1, 1, 0.1, 0.1, 0.01, 0.01]
    poly = ScheduleConfig(kind="poly", power=2.0)
    assert lr_factor(25, 100, poly) == pytest.approx((1 - 0.25) ** 2)


def test_scheduler_drives_optimizer_and_restores():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.2)
    cfg = ScheduleConfig(kind="step", milestones=[2], gamma=0.5)
    sched = build_scheduler(opt, 10, cfg)
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.2, 0.2, 0.1, 0.1])
    state = sched.state_dict()
    opt2 = torch.optim.SGD([p], lr=0.2)
    sched2 = build_scheduler(opt2, 10, cfg)
    sched2.load_state_dict(state)
    assert sched2.last_epoch == sched.last_epoch
