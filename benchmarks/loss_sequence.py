"""Before/after loss identity: the same recipes trained by a baseline commit and by this tree, step by step.

A temporary ``git worktree`` of the baseline ref (under /tmp, removed afterwards) and this tree each run,
as subprocesses with the same environment and thread count (``PYTHONPATH`` pointing at each tree's
``src``):

* ``quickstart`` — ``facesphere quickstart`` exactly as users run it (untrained evaluation, 300 steps,
  final evaluation);
* ``partial_fc`` — ``facesphere train arcface`` with Partial FC at sample rate 0.5 on synthetic data
  (a small MobileFaceNet, one process);
* ``sphereface`` — ``facesphere train sphereface`` on synthetic data (its λ annealing runs through the
  per-step update hook).

Every ``metrics.csv`` row's ``loss`` is compared, and the final checkpoints' backbone weights; the
claim is that they are identical (Δ = 0).

    python benchmarks/loss_sequence.py [--baseline 8bbe2f7] [--current HEAD] [--threads 2] [--runs ...]

``--current REF`` runs a second temporary worktree of REF instead of this working tree (so the tree
can be edited while the benchmark runs).
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import markdown_table, setup_logging, write_results

from facesphere.models.runs import latest_checkpoint

logger = logging.getLogger("loss_sequence")
REPO = Path(__file__).resolve().parents[1]

SMALL = ["data.kind=synthetic", "data.root=null", "data.image_size=[64, 64]", "data.batch_size=32", "data.num_workers=1",
         "data.synthetic={num_identities: 64, samples_per_identity: 8, difficulty: 0.6}", "train.steps=40",
         "train.log_every=1", "train.checkpoint_every=20", "train.tensorboard=false", "train.progress=false",
         "eval.enabled=false", "schedule={kind: cosine, warmup_steps: 5}"]
RUNS = {
    "quickstart": ["quickstart", "--set", "train.progress=false"],
    "partial_fc": ["train", "arcface", *sum((["--set", o] for o in SMALL + [
        "name=partial_fc", "model.backbone=mobilefacenet", "model.backbone_args={embedding_size: 64, input_size: [64, 64]}",
        "model.head_args={scale: 32.0, margin: 0.5}", "model.partial_fc.enabled=true", "model.partial_fc.sample_rate=0.5",
    ]), [])],
    "sphereface": ["train", "sphereface", *sum((["--set", o] for o in SMALL + [
        "name=sphereface", "model.backbone=sphereface4", "model.backbone_args={embedding_size: 64, input_size: [64, 64]}",
        "optim.lr=0.01",
    ]), [])],
}
RUN_NAME = {"quickstart": "quickstart", "partial_fc": "partial_fc", "sphereface": "sphereface"}


def run(tree: Path, name: str, out: Path, env: dict[str, str]) -> float:
    command = [sys.executable, "-m", "facesphere", *RUNS[name]]
    command += ["--output-dir", str(out)] if name == "quickstart" else ["--set", f"output_dir={out}"]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=out, env={**env, "PYTHONPATH": str(tree / "src")}, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{name} in {tree} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - started


def losses(run_dir: Path) -> list[tuple[int, str]]:
    with open(run_dir / "metrics.csv", newline="") as handle:
        return [(int(row["step"]), row["loss"]) for row in csv.DictReader(handle)]


def backbone_delta(a: Path, b: Path) -> float:
    """Max |Δ| over the backbone weights of the two runs' final checkpoints."""
    last = [latest_checkpoint(d / "checkpoints") for d in (a, b)]
    sa, sb = (torch.load(p, map_location="cpu", weights_only=True)["model"] for p in last)
    keys = [k for k in sa if k.startswith("backbone.")]
    if sorted(keys) != sorted(k for k in sb if k.startswith("backbone.")):
        raise RuntimeError("the two checkpoints hold different backbone tensors")
    return max(float((sa[k].double() - sb[k].double()).abs().max()) if sa[k].numel() else 0.0 for k in keys)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", default="8bbe2f7", help="git ref to compare against")
    parser.add_argument("--current", default=None, help="git ref to run instead of this working tree")
    parser.add_argument("--threads", type=int, default=2, help="OMP/MKL threads in every run")
    parser.add_argument("--runs", nargs="+", choices=list(RUNS), default=list(RUNS))
    args = parser.parse_args()
    setup_logging()
    baseline_sha = subprocess.run(["git", "-C", str(REPO), "rev-parse", args.baseline], check=True, capture_output=True,
                                  text=True).stdout.strip()
    current_sha = subprocess.run(["git", "-C", str(REPO), "rev-parse", args.current or "HEAD"], check=True,
                                 capture_output=True, text=True).stdout.strip()
    dirty = args.current is None and bool(subprocess.run(
        ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"], check=True, capture_output=True,
        text=True).stdout.strip())
    threads = str(args.threads)
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "PYTHONHASHSEED": "0"}
    scratch = Path(tempfile.mkdtemp(prefix="facesphere-loss-sequence-"))
    trees = {"baseline": scratch / "baseline", "current": scratch / "current" if args.current else REPO}
    for label, sha in (("baseline", baseline_sha), ("current", current_sha)):
        if trees[label] != REPO:
            subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(trees[label]), sha], check=True,
                           capture_output=True)
    results, rows = {}, []
    try:
        for name in args.runs:
            dirs = {}
            seconds = {}
            for label, tree in trees.items():
                out = scratch / "runs" / label / name
                out.mkdir(parents=True)
                logger.info("%s: %s tree (%s)", name, label, tree)
                seconds[label] = run(tree, name, out, env)
                dirs[label] = out / RUN_NAME[name]
            a, b = losses(dirs["baseline"]), losses(dirs["current"])
            if [s for s, _ in a] != [s for s, _ in b]:
                raise RuntimeError(f"{name}: the runs logged different steps")
            delta = max(abs(float(x) - float(y)) for (_, x), (_, y) in zip(a, b))
            identical = all(x == y for (_, x), (_, y) in zip(a, b))
            weights = backbone_delta(dirs["baseline"], dirs["current"])
            results[name] = {"command": ["facesphere", *RUNS[name]], "logged_steps": len(a), "max_abs_delta_loss": delta,
                             "identical_loss_text": identical, "max_abs_delta_backbone_weight": weights,
                             "first_loss": float(a[0][1]), "final_loss": float(a[-1][1]), "seconds": seconds}
            rows.append([name, len(a), f"{float(a[0][1]):.6f}", f"{float(a[-1][1]):.6f}", f"{delta:.3g}",
                         "yes" if identical else "no", f"{weights:.3g}",
                         f"{seconds['baseline']:.0f} / {seconds['current']:.0f}"])
            logger.info("%s: max |Δloss| %.3g over %d rows, max |Δw| %.3g", name, delta, len(a), weights)
    finally:
        for tree in trees.values():
            if tree != REPO:
                subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], capture_output=True)
        shutil.rmtree(scratch, ignore_errors=True)
    table = markdown_table(["run", "logged steps", "first loss", "final loss", "max abs Δloss", "identical text",
                            "max abs Δ backbone weight", "seconds (baseline / current)"], rows)
    markdown = (f"Loss sequences of baseline {baseline_sha[:10]} and {current_sha[:10]}{' (+ uncommitted changes)' if dirty else ''}, "
                f"each run as a subprocess with OMP_NUM_THREADS=MKL_NUM_THREADS={threads}.\n\n{table}\n")
    write_results("loss_sequence", {"baseline": baseline_sha, "current": current_sha, "uncommitted_changes": dirty,
                                    "threads": args.threads, "runs": results}, markdown)
    if any(r["max_abs_delta_loss"] != 0 for r in results.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
