"""The six seed losses on the same backbone, data, schedule and seed: held-out verification accuracy.

Each head keeps the hyper-parameters of its built-in paper config (configs/<loss>.yaml); everything
else comes from the quickstart config (MobileFaceNet on synthetic identities, verification on
identities never seen in training).

    python benchmarks/loss_comparison.py [--steps 600] [--output-dir /tmp/facesphere-losses]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import yaml
from _common import markdown_table, setup_logging, write_results

from facesphere.train.config import load_config
from facesphere.train.trainer import Trainer
from facesphere.utils.allocator import tune_malloc

LOSSES = ["softmax", "normface", "sphereface", "coco", "cosface", "arcface"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=None, help="training steps per loss (default: quickstart's)")
    parser.add_argument("--output-dir", type=Path, default=Path("/tmp/facesphere-losses"))
    parser.add_argument("--losses", nargs="+", default=LOSSES)
    args = parser.parse_args()
    setup_logging()
    tune_malloc()
    results, rows = {}, []
    for loss in args.losses:
        paper = load_config(loss)
        overrides = [f"name={loss}", f"output_dir={args.output_dir}", f"model.head={paper.model.head}",
                     "model.head_args=" + yaml.safe_dump(paper.model.head_args, default_flow_style=True).strip(),
                     "train.progress=false", "train.tensorboard=false"]
        if args.steps:
            overrides.append(f"train.steps={args.steps}")
        cfg = load_config("quickstart", overrides)
        started = time.perf_counter()
        result = Trainer(cfg).fit()
        ev = result.evaluation
        results[loss] = {"head": cfg.model.head, "head_args": cfg.model.head_args, "final_loss": result.final_loss,
                         "wall_seconds": time.perf_counter() - started, "evaluation": ev}
        rows.append([loss, ", ".join(f"{k}={v}" for k, v in cfg.model.head_args.items()), f"{result.final_loss:.3f}",
                     f"{100 * ev['accuracy_mean']:.2f} ± {100 * ev['accuracy_std']:.2f}",
                     f"{ev['tar_at_far'].get('0.01')}", f"{ev['auc']:.4f}", f"{results[loss]['wall_seconds']:.0f}"])
        print(rows[-1], flush=True)
    cfg = load_config("quickstart", [f"train.steps={args.steps}"] if args.steps else [])
    table = (f"{cfg.model.backbone} ({cfg.model.backbone_args}), {cfg.data.synthetic.num_identities} synthetic training identities "
             f"x {cfg.data.synthetic.samples_per_identity}, batch {cfg.data.batch_size}, {cfg.train.steps} steps; "
             f"verification on {cfg.eval.pairs} pairs of {cfg.eval.num_identities} unseen identities (10-fold).\n\n"
             + markdown_table(["loss", "head args (paper config)", "final train loss", "held-out accuracy %", "TAR@FAR=1e-2",
                               "AUC", "seconds"], rows))
    print(table)
    write_results("loss_comparison", {"args": {k: str(v) for k, v in vars(args).items()}, "losses": results}, table)


if __name__ == "__main__":
    main()
