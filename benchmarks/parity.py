"""Distributed parity and exact resume, measured through the CLI as users run it.

1. The same config trained by one process and by two torchrun processes (gloo, CPU) with the same
   global batch: per-step loss difference. SphereFace-4 (no batch norm) isolates data sharding, DDP
   gradient averaging and loss reduction; cross-process batch norm is checked exactly in float64 by
   tests/test_distributed_batchnorm.py.
2. A run SIGKILLed right after a checkpoint, then resumed with --resume latest, against the same run
   uninterrupted: per-step loss difference and final-weight difference.

    python benchmarks/parity.py [--steps 30] [--output-dir /tmp/facesphere-parity]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from _common import markdown_table, setup_logging, write_results

from facesphere.models.runs import list_checkpoints
from facesphere.train.trainer import read_metrics

BASE = ["model.backbone=mobilefacenet", "model.backbone_args={embedding_size: 128}", "model.head=arcface",
        "model.head_args={scale: 32.0, margin: 0.5}", "data.kind=synthetic", "data.synthetic.num_identities=100",
        "data.synthetic.samples_per_identity=8", "data.batch_size=32", "data.num_workers=1", "data.augment={flip: 0.5}",
        "optim.lr=0.1", "schedule.kind=cosine", "schedule.warmup_steps=5", "train.log_every=1", "train.tensorboard=false",
        "train.progress=false", "eval.enabled=false"]


def cli(args: list[str], launcher: list[str] | None = None) -> list[str]:
    return (launcher or [sys.executable]) + ["-m", "facesphere", "train", "quickstart", *args]


def overrides(items: list[str]) -> list[str]:
    return sum((["--set", item] for item in items), [])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--output-dir", type=Path, default=Path("/tmp/facesphere-parity"))
    args = parser.parse_args()
    setup_logging()
    shutil.rmtree(args.output_dir, ignore_errors=True)
    common = overrides(BASE + [f"output_dir={args.output_dir}", f"train.steps={args.steps}",
                               f"train.checkpoint_every={max(2, args.steps // 5)}"])
    env = dict(os.environ, OMP_NUM_THREADS="1")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]

    timings = {}
    no_bn = overrides(["model.backbone=sphereface4", "model.backbone_args={embedding_size: 128}", "optim.lr=0.005"])
    for name, launcher in (("one", None), ("two", torchrun)):
        started = time.perf_counter()
        subprocess.run(cli(common + no_bn + ["--set", f"name={name}"], launcher), env=env, check=True, capture_output=True)
        timings[name] = time.perf_counter() - started
    one = [r["loss"] for r in read_metrics(args.output_dir / "one" / "metrics.csv")]
    two = [r["loss"] for r in read_metrics(args.output_dir / "two" / "metrics.csv")]
    dist_diff = max(abs(a - b) for a, b in zip(one, two))

    killed = args.output_dir / "killed"
    proc = subprocess.Popen(cli(common + ["--set", "name=killed"]), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not list_checkpoints(killed / "checkpoints") and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = int(list_checkpoints(killed / "checkpoints")[-1].stem.split("_")[1])
    subprocess.run(cli(common + ["--set", "name=killed", "--resume", "latest"]), env=env, check=True, capture_output=True)
    resumed = [r["loss"] for r in read_metrics(killed / "metrics.csv")]
    subprocess.run(cli(common + ["--set", "name=straight"]), env=env, check=True, capture_output=True)
    straight = [r["loss"] for r in read_metrics(args.output_dir / "straight" / "metrics.csv")]
    resume_diff = max(abs(a - b) for a, b in zip(straight, resumed))
    final = f"step_{args.steps:08d}.pt"
    wa = torch.load(args.output_dir / "straight" / "checkpoints" / final, weights_only=True)["model"]
    wb = torch.load(killed / "checkpoints" / final, weights_only=True)["model"]
    weight_diff = max((wa[k].double() - wb[k].double()).abs().max().item() for k in wa)

    rows = [["SphereFace-4 + ArcFace: 2 torchrun processes (gloo) vs 1 process, global batch 32", len(two), f"{dist_diff:.2e}",
             f"first {one[0]:.4f} → last {one[-1]:.4f}", ""],
            [f"MobileFaceNet + ArcFace: SIGKILL after checkpoint at step {killed_at}, resume vs uninterrupted", len(resumed),
             f"{resume_diff:.2e}", f"first {straight[0]:.4f} → last {straight[-1]:.4f}", f"{weight_diff:.2e}"]]
    table = markdown_table(["comparison", "steps compared", "max abs Δ loss", "loss curve", "max abs Δ weight at the end"], rows)
    print(table)
    write_results("parity", {"straight_losses": straight, "one_process_losses": one, "two_process_losses": two, "resumed_losses": resumed,
                             "killed_at_step": killed_at, "max_abs_loss_diff_distributed": dist_diff,
                             "max_abs_loss_diff_resume": resume_diff, "max_abs_weight_diff_resume": weight_diff,
                             "seconds": timings}, table)


if __name__ == "__main__":
    main()
