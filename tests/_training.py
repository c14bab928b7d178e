"""Helpers for tests that train through the CLI: environment, commands, torchrun, SIGKILL-then-resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from facesphere.models.runs import list_checkpoints

SRC = str(Path(__file__).resolve().parents[1] / "src")
TESTS = str(Path(__file__).resolve().parent)
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "facesphere"]


def env() -> dict[str, str]:
    """This tree's src (then tests/, for plug-ins) first on PYTHONPATH, one OpenMP thread per process."""
    values = dict(os.environ)
    values["PYTHONPATH"] = os.pathsep.join([SRC, TESTS, values.get("PYTHONPATH", "")])  # tests/: plug-in modules
    values["OMP_NUM_THREADS"] = "1"
    return values


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "facesphere", *args]


def sets(settings: list[str]) -> list[str]:
    """``--set`` options for config overrides."""
    return sum((["--set", s] for s in settings), [])


def run(command: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run(command, env=env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def kill_after_first_checkpoint(command: list[str], run_dir: Path, steps: int) -> None:
    """Start ``command``, SIGKILL it as soon as its first checkpoint exists, and check it died mid-run."""
    proc = subprocess.Popen(command, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not list_checkpoints(run_dir / "checkpoints"):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = list_checkpoints(run_dir / "checkpoints")
    assert saved and int(saved[-1].stem.split("_")[1]) < steps, "the run finished before it could be killed"
