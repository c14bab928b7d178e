"""kill -9 while a run writes checkpoints, its config and its metrics: every checkpoint left loads and is whole,
the latest one is complete, no temporary file passes for a checkpoint, and the metrics up to it survive."""

from __future__ import annotations

import csv
import os

import pytest
import torch
import yaml
from _faults import kill_loop

from facesphere.models.runs import CHECKPOINT_PATTERN, latest_checkpoint, list_checkpoints, load_checkpoint

SIDE = 768  # a 2.4 MB tensor: long enough writes for kills to land inside them

WRITER = """
from pathlib import Path
import torch
from facesphere.models.runs import latest_checkpoint, load_checkpoint
from facesphere.train.checkpoint import remove_partial_writes, rng_state, save_checkpoint
from facesphere.train.trainer import MetricsLog
from facesphere.utils.files import atomic_write_text

print("ready", flush=True)  # the kills may land in the resume steps below too
run = Path({run!r})
folder = run / "checkpoints"
remove_partial_writes(folder)  # what a resume does first
latest = latest_checkpoint(folder)
step = load_checkpoint(latest)["step"] if latest else 0
metrics = MetricsLog(run / "metrics.csv", ["step", "loss"], step)  # a resume truncates the metrics to its step
while True:
    step += 1
    metrics.write({{"step": step, "loss": f"{{1 / step:.8f}}"}})
    atomic_write_text(run / "config.yaml", f"step: {{step}}\\ncomplete: true\\n")
    save_checkpoint(folder, step, {{"model": {{"w": torch.full(({side}, {side}), float(step))}}, "rng": rng_state(),
                                    "config": {{"train": {{"steps": step}}}}}}, keep=2)
    print(step, flush=True)
"""


def _check(run) -> None:
    folder = run / "checkpoints"
    found = list_checkpoints(folder)
    steps = [int(CHECKPOINT_PATTERN.match(p.name).group(1)) for p in found]
    for path, step in zip(found, steps):
        state = load_checkpoint(path)
        assert state["step"] == step and state["config"]["train"]["steps"] == step
        assert torch.equal(state["model"]["w"], torch.full((SIDE, SIDE), float(step))), f"{path.name} is not whole"
    if not found:
        return
    assert latest_checkpoint(folder) == found[-1] and steps == list(range(steps[0], steps[-1] + 1))
    assert len(found) <= 3, "at most one more than keep=2 (a kill between the rename and the pruning)"
    others = [name for name in os.listdir(folder) if not CHECKPOINT_PATTERN.match(name)]
    assert all(name.startswith(".step_") and name.endswith(".tmp") for name in others), others
    assert len(others) <= 1, f"partial writes of earlier runs were not removed: {others}"
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["complete"] and config["step"] >= steps[-1]
    with open(run / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["step"]) for r in rows[:steps[-1]]] == list(range(1, steps[-1] + 1))
    assert all(float(r["loss"]) == pytest.approx(1 / int(r["step"]), abs=1e-8) for r in rows[:steps[-1]])


@pytest.mark.slow
def test_checkpoints_config_and_metrics_survive_kill_9_at_random_moments(tmp_path):
    run = tmp_path / "run"
    result = kill_loop(WRITER.format(run=str(run), side=SIDE), lambda _: _check(run), runs=6, max_delay_s=0.5)
    print(f"\ncheckpoint kill loop: {result}")
    assert result.mid_write >= result.runs // 2 and result.writes >= result.runs, result
    assert latest_checkpoint(run / "checkpoints") is not None
