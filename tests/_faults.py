"""Fault injection for durable writes: kill -9 a writer at random moments, then check what it left.

A writer is a Python snippet run in a child process that keeps rewriting one durable artefact (a checkpoint, a
gallery, a model folder, a list file) and prints one line per completed write. The harness SIGKILLs it at a random
delay, runs the caller's ``check`` on what is on disk (every file must be either the old or the new version and
load), and repeats. It counts how many kills landed after at least one completed write, so a test can assert that
the kills really interrupted writing rather than start-up.

``FACESPHERE_FAULT_SCALE`` (default 1) multiplies every loop's number of runs: each run pays a child's imports
(about 2.5 s), so the suite keeps the counts small and a soak test raises them (``FACESPHERE_FAULT_SCALE=10``).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable

from _training import env


@dataclass
class KillLoopResult:
    runs: int  # writer processes started and killed
    mid_write: int  # kills that landed after the writer had completed at least one write
    writes: int  # completed writes over all runs


def kill_loop(writer: str, check: Callable[[int], None], runs: int, max_delay_s: float, seed: int = 0,
              ready_timeout_s: float = 120.0) -> KillLoopResult:
    """Start ``python -c writer`` ``runs`` times; each time wait for its first output line ("ready", printed once
    its imports are done), sleep a uniform random delay in [0, max_delay_s], SIGKILL it, then call
    ``check(run_index)``. Every further stdout line counts as one completed write. ``runs`` is multiplied by
    ``FACESPHERE_FAULT_SCALE``."""
    runs = max(2, round(runs * float(os.environ.get("FACESPHERE_FAULT_SCALE", "1"))))
    rng = random.Random(seed)
    mid_write = writes = 0
    for run in range(runs):
        proc = subprocess.Popen([sys.executable, "-c", writer], env=env(), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        deadline = time.time() + ready_timeout_s
        line = proc.stdout.readline()
        if not line:
            proc.wait()
            raise AssertionError(f"writer exited before it was ready:\n{proc.stderr.read()[-3000:]}")
        assert time.time() < deadline, "writer took too long to start"
        time.sleep(rng.uniform(0.0, max_delay_s))
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate()
        assert proc.returncode == -signal.SIGKILL, f"writer ended by itself (rc {proc.returncode}) before the kill"
        done = len(out.splitlines())
        writes += done
        mid_write += done > 0
        check(run)
    return KillLoopResult(runs=runs, mid_write=mid_write, writes=writes)
