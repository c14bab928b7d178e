"""Checkpoints: atomic, restricted loading, RNG round trip."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch

from facesphere.models.runs import CheckpointError, latest_checkpoint, list_checkpoints, load_checkpoint
from facesphere.train.checkpoint import remove_partial_writes, rng_state, save_checkpoint, set_rng_state


def test_rng_round_trip():
    state = rng_state()
    a = (torch.rand(3), np.random.rand(3))
    set_rng_state(state)
    b = (torch.rand(3), np.random.rand(3))
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def test_save_keeps_newest_and_loads_with_weights_only(tmp_path):
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, {"w": torch.full((2,), float(step)), "rng": rng_state()}, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000002.pt", "step_00000003.pt"]
    state = load_checkpoint(latest_checkpoint(tmp_path))
    assert state["step"] == 3 and torch.equal(state["w"], torch.full((2,), 3.0))
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_malicious_pickle_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "step_00000001.pt"
    with open(path, "wb") as handle:
        pickle.dump({"model": _Evil()}, handle)
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint(path)
    assert not (tmp_path / "pwned").exists()


def test_missing_and_truncated(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path / "nope.pt")
    path = save_checkpoint(tmp_path, 1, {"w": torch.ones(1000)})
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError):
        load_checkpoint(path)


def test_partial_writes_of_a_killed_run_are_removed_and_never_listed(tmp_path):
    save_checkpoint(tmp_path, 1, {"w": torch.ones(2)})
    stale = [tmp_path / ".step_00000002.pt.k1ll3d.tmp", tmp_path / ".step_00000002.shard-00000-of-00002.pt.x.tmp"]
    for path in stale:
        path.write_bytes(b"PK\x03\x04 cut short")
    (tmp_path / "notes.txt").write_text("kept")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000001.pt"]
    assert remove_partial_writes(tmp_path) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "step_00000001.pt"]
    assert remove_partial_writes(tmp_path / "absent") == 0
