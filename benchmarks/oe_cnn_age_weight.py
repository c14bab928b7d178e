"""OE-CNN's age weight λ (total = L_id + λ·L_age, arXiv 1810.07599): how much age the norm learns, and what identity pays.

The ``oe_cnn`` recipe shrunk to minutes on a CPU (SphereFace-4 at 32x32, 100 synthetic aged identities, the λ
annealing compressed to its floor by step ~200, gradient norm clipped at 5), trained once per age weight with the
same seed through the one trainer. Measured: held-out verification accuracy (the trainer's own evaluation on
unseen identities, from the direction), and on every third training image Pearson(‖x‖, age) and the age MAE of
the trained branch k·‖x‖ + b beside the MAE of always answering the mean age. The configs' default λ comes
from this table; ``benchmarks/oe_cnn_synthetic.py`` is the full study (held-out ages, age gaps, plain heads).

    python benchmarks/oe_cnn_age_weight.py [--steps 300] [--weights 0 0.01 0.03 0.1] [--work /tmp/facesphere-oe-weight]
"""

from __future__ import annotations

import argparse
import logging

import numpy as np
import torch
from _common import markdown_table, setup_logging, write_results

from facesphere.train.config import load_config
from facesphere.train.trainer import Trainer

logger = logging.getLogger("oe_cnn_age_weight")


def run(weight: float, steps: int, work: str, clip: bool) -> dict:
    settings = ["model.backbone=sphereface4", "model.backbone_args={embedding_size: 64, input_size: [32, 32]}",
                "model.head_args.lambda_gamma=1.0", "data.synthetic.num_identities=100",
                "data.synthetic.samples_per_identity=16", "data.num_workers=0", f"train.steps={steps}",
                "train.checkpoint_every=100000", "train.progress=false", "train.tensorboard=false", "train.log_every=50",
                "eval.num_identities=50", "eval.samples_per_identity=6", "eval.pairs=1000", f"output_dir={work}",
                f"name=w{weight}{'' if clip else '-noclip'}",
                f"objectives=[{{name: recognition}}, {{name: age_from_norm, label: age, weight: {weight}}}]"]
    trainer = Trainer(load_config("oe_cnn", settings + (["train.grad_clip=5"] if clip else [])))
    try:
        result = trainer.fit()
    except FloatingPointError as error:
        return {"weight": weight, "grad_clip": clip, "diverged": str(error)}
    backbone, data = trainer.model.backbone.eval(), trainer.train_set
    index = range(0, len(data), 3)
    with torch.no_grad():
        norms = torch.cat([backbone(torch.stack([data[i][0] for i in index[j:j + 256]])).norm(dim=1)
                           for j in range(0, len(index), 256)]).numpy()
    ages = np.array([data.age(i) for i in index])
    branch = trainer.model.objectives["age"].age_branch()
    predicted = branch["slope"] * norms + branch["intercept"]
    return {"weight": weight, "grad_clip": clip, "verification_accuracy": result.evaluation["accuracy_mean"],
            "pearson_norm_age": float(np.corrcoef(norms, ages)[0, 1]), "age_mae": float(np.abs(predicted - ages).mean()),
            "mean_age_mae": float(np.abs(ages - ages.mean()).mean()), "branch": branch}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--weights", type=float, nargs="+", default=[0.0, 0.01, 0.03, 0.1])
    parser.add_argument("--work", default="/tmp/facesphere-oe-weight")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    setup_logging()
    torch.set_num_threads(args.threads)
    rows = [run(w, args.steps, args.work, clip=True) for w in args.weights]
    rows.append(run(0.03, args.steps, args.work, clip=False))
    table = markdown_table(
        ["λ (age weight)", "grad clip", "held-out verification", "Pearson(‖x‖, age)", "age MAE (y)", "mean-age MAE (y)"],
        [[r["weight"], "5" if r["grad_clip"] else "none"] + (
            [f"{100 * r['verification_accuracy']:.1f} %", f"{r['pearson_norm_age']:.2f}", f"{r['age_mae']:.1f}",
             f"{r['mean_age_mae']:.1f}"] if "diverged" not in r else ["diverged", "", "", ""]) for r in rows])
    path = write_results("oe_cnn_age_weight", {"steps": args.steps, "runs": rows},
                         f"OE-CNN age weight, {args.steps} steps, SphereFace-4 32x32, 100 synthetic aged identities "
                         f"(one seed; λ = 0 trains the branch not at all)\n\n{table}")
    logger.info("wrote %s\n%s", path, table)


if __name__ == "__main__":
    main()
