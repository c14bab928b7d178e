"""Partial FC under torchrun, measured through the CLI: sharded vs single process, and sharded checkpoint resume.

1. r = 1.0: one process vs two torchrun processes (gloo, CPU; each holds half of the class centres) with
   the same global batch: per-step loss difference. SphereFace-4 (no batch norm), as in parity.py.
2. r = 0.1, two processes: a run SIGKILLed right after a checkpoint and resumed with --resume latest
   against the same run uninterrupted: per-step loss difference and final difference of every shard.
3. A two-process checkpoint of (1) resumed by ONE process (shards re-cut to one): per-step loss
   difference from the two-process continuation.

    python benchmarks/partial_fc_parity.py [--steps 30] [--output-dir /tmp/facesphere-pfc-parity]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from _common import markdown_table, setup_logging, write_results
from parity import BASE, cli, overrides

from facesphere.models.runs import list_checkpoints
from facesphere.train.trainer import read_metrics

PFC = ["model.backbone=sphereface4", "model.backbone_args={embedding_size: 128}", "optim.lr=0.005",
       "model.partial_fc.enabled=true"]


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc), so torchrun's workers die with it whatever their session."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def running(pid: int) -> bool:
    """Alive and not a zombie waiting to be reaped."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def losses(run: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run / "metrics.csv")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--output-dir", type=Path, default=Path("/tmp/facesphere-pfc-parity"))
    args = parser.parse_args()
    setup_logging()
    out = args.output_dir
    shutil.rmtree(out, ignore_errors=True)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    every = max(2, args.steps // 5)
    common = overrides(BASE + PFC + [f"output_dir={out}", f"train.steps={args.steps}", f"train.checkpoint_every={every}",
                                     "train.keep_checkpoints=10"])

    def train(name: str, launcher, *extra: str) -> float:
        started = time.perf_counter()
        subprocess.run(cli(common + ["--set", f"name={name}", *extra], launcher), env=env, check=True, capture_output=True)
        return time.perf_counter() - started

    seconds = {"one": train("one", None), "two": train("two", torchrun)}
    one, two = losses(out / "one"), losses(out / "two")
    dist_diff = max(abs(a - b) for a, b in zip(one, two))

    sampled = overrides(["model.partial_fc.sample_rate=0.1", "data.synthetic.num_identities=400",
                         "data.synthetic.samples_per_identity=4"])
    seconds["straight"] = train("straight", torchrun, *sampled)
    killed = out / "killed"
    proc = subprocess.Popen(cli(common + ["--set", "name=killed", *sampled], torchrun), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not list_checkpoints(killed / "checkpoints") and proc.poll() is None:
        time.sleep(0.02)
    victims = [proc.pid, *descendants(proc.pid)]
    for pid in victims:  # torchrun and both workers at once, as a crashed node
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()
    time.sleep(1)
    assert len(victims) >= 3 and not [pid for pid in victims if running(pid)], "a worker survived"
    killed_at = int(list_checkpoints(killed / "checkpoints")[-1].stem.split("_")[1])
    seconds["resumed"] = train("killed", torchrun, *sampled, "--resume", "latest")
    moved = out / "moved"  # the first checkpoint of the 2-process r=1.0 run, continued by one process
    (moved / "checkpoints").mkdir(parents=True)
    for path in (out / "two" / "checkpoints").glob(f"step_{every:08d}*"):
        shutil.copy(path, moved / "checkpoints" / path.name)
    seconds["moved"] = train("moved", None, "--resume", "latest")

    straight = losses(out / "straight")
    resumed, moved_losses = losses(killed), losses(moved)
    resume_diff = max(abs(a - b) for a, b in zip(straight, resumed))
    moved_diff = max(abs(a - b) for a, b in zip(two[every:], moved_losses))
    final = f"step_{args.steps:08d}"
    shard_diff = 0.0
    for rank in range(2):
        name = f"{final}.shard-{rank:05d}-of-00002.pt"
        a = torch.load(out / "straight" / "checkpoints" / name, weights_only=True)["head"]["weight"]
        b = torch.load(killed / "checkpoints" / name, weights_only=True)["head"]["weight"]
        shard_diff = max(shard_diff, (a.double() - b.double()).abs().max().item())

    rows = [["r=1.0: 2 torchrun processes (centres sharded) vs 1 process, global batch 32", len(two), f"{dist_diff:.2e}",
             f"{one[0]:.4f} → {one[-1]:.4f}", ""],
            [f"r=0.1, 2 processes: SIGKILL after the step-{killed_at} checkpoint, resume vs uninterrupted",
             len(resumed), f"{resume_diff:.2e}", f"{straight[0]:.4f} → {straight[-1]:.4f}", f"{shard_diff:.2e}"],
            [f"r=1.0: the 2-process step-{every} checkpoint resumed by 1 process (shards re-cut) vs 2 processes",
             len(moved_losses), f"{moved_diff:.2e}", "", ""]]
    table = ("SphereFace-4 (128-d) + ArcFace (s=32, m=0.5), Partial FC, synthetic identities, CPU, gloo.\n\n"
             + markdown_table(["comparison", "steps compared", "max abs Δ loss", "loss curve", "max abs Δ centres at the end"],
                              rows))
    print(table)
    write_results("partial_fc_parity", {"one_process": one, "two_processes": two, "straight": straight, "resumed": resumed,
                                        "moved_to_one_process": moved_losses, "killed_at_step": killed_at,
                                        "max_abs_loss_diff_distributed": dist_diff, "max_abs_loss_diff_resume": resume_diff,
                                        "max_abs_loss_diff_moved": moved_diff, "max_abs_centre_diff_resume": shard_diff,
                                        "seconds": seconds}, table)


if __name__ == "__main__":
    main()
