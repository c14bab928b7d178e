"""Partial FC against the full classifier: step time and peak memory at 100k and 1M identities, and accuracy
at sample rate 0.1 against 1.0 on synthetic identities.

cost: one classifier training step (ArcFace head, 512-d embeddings, batch 128: forward, backward and an
SGD-momentum update of the centres) for the full classifier, Partial FC r=1.0 and r=0.1, each variant
in its own process so peak RSS is its own. The embeddings are a random leaf tensor standing in for the
backbone, whose cost does not depend on the classifier.

accuracy: the quickstart recipe (MobileFaceNet + ArcFace on synthetic identities) with more identities
than a batch covers, trained with Partial FC at r=1.0 and r=0.1; held-out verification accuracy.

    python benchmarks/partial_fc.py cost [--classes 100000 1000000] [--steps 5]
    python benchmarks/partial_fc.py accuracy [--identities 2000 --samples 8 --steps 300]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _common import markdown_table, setup_logging, write_results

VARIANTS = {"full classifier": None, "partial_fc r=1.0": 1.0, "partial_fc r=0.1": 0.1}
ALLOCATOR_VARIANTS = {"partial_fc r=0.1, mmap threshold 2 GiB, no trimming": (0.1, (2**31 - 1, -1)),
                      "partial_fc r=0.1, glibc default malloc": (0.1, None)}
"""Run at the largest class count only: the same step under other malloc settings than the CLI's."""


def _rss_gb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize() / 2**30


def child(variant: str, classes: int, steps: int, batch: int, dim: int) -> dict:
    """One variant in this process: median step seconds and peak RSS."""
    import torch
    import torch.nn.functional as F

    from facesphere.heads import build_head
    from facesphere.heads.partial_fc import build_partial_fc
    from facesphere.utils.allocator import allocator_settings, tune_malloc

    if variant in ALLOCATOR_VARIANTS:
        rate, thresholds = ALLOCATOR_VARIANTS[variant]
        if thresholds:
            tune_malloc(*thresholds)
    else:
        rate = VARIANTS[variant]
        tune_malloc()
    torch.manual_seed(0)
    if rate is None:
        head = build_head("arcface", dim, classes, scale=64.0, margin=0.5)
        step_loss = lambda x, y: F.cross_entropy(head(x, y), y)  # noqa: E731
        params = head.parameters()
    else:
        pfc = build_partial_fc("arcface", dim, classes, sample_rate=rate, scale=64.0, margin=0.5)
        step_loss = pfc
        params = pfc.parameters()
    optimizer = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4)
    generator = torch.Generator().manual_seed(1)
    rss_before = _rss_gb()
    times = []
    for step in range(steps + 1):
        embeddings = torch.randn(batch, dim, generator=generator).requires_grad_(True)
        labels = torch.randint(0, classes, (batch,), generator=generator)
        if rate is not None:
            pfc.update(step)
        started = time.perf_counter()
        loss = step_loss(embeddings, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step:  # the first step allocates the gradient and momentum buffers
            times.append(time.perf_counter() - started)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"variant": variant, "classes": classes, "step_seconds": statistics.median(times), "step_times": times,
            "peak_rss_gb": peak, "rss_before_steps_gb": rss_before, "loss": loss.item(),
            "allocator": allocator_settings(),
            "state_gb": 3 * classes * dim * 4 / 2**30}


def cost(args) -> None:
    from facesphere.utils.allocator import tune_malloc

    tune_malloc()  # the same settings as the children, so the results header records them
    results, rows = [], []
    for classes in args.classes:
        base = None
        extra = list(ALLOCATOR_VARIANTS) if classes == max(args.classes) else []
        for variant in [*VARIANTS, *extra]:
            done = subprocess.run([sys.executable, __file__, "child", variant, str(classes), str(args.steps),
                                   str(args.batch), str(args.dim)], capture_output=True, text=True, check=True)
            r = json.loads(done.stdout.strip().splitlines()[-1])
            base = base or r
            results.append(r)
            rows.append([f"{classes:,}", variant, f"{1000 * r['step_seconds']:.0f}",
                         f"{base['step_seconds'] / r['step_seconds']:.2f}x", f"{r['peak_rss_gb']:.2f}",
                         f"{r['peak_rss_gb'] / base['peak_rss_gb']:.2f}x", f"{r['state_gb']:.2f}"])
            print(rows[-1], flush=True)
    table = (f"One classifier step: ArcFace (s=64, m=0.5), {args.dim}-d embeddings, batch {args.batch}, SGD momentum; "
             f"median of {args.steps} steps after one warm-up step; each variant in its own process.\n"
             "Speed-up and memory ratios are against the full classifier at the same number of identities. "
             "'state' = centres + their gradient + momentum (3·C·D floats), the same for every variant. "
             "All rows use the facesphere CLI's malloc settings (mmap and trim thresholds 1 GiB) except the last "
             "two, which repeat r=0.1 with a 2 GiB mmap threshold and trimming off, and under glibc's defaults.\n\n"
             + markdown_table(["identities", "variant", "ms/step", "speed-up", "peak RSS GB", "vs full", "state GB"], rows))
    print(table)
    write_results("partial_fc_cost", {"args": vars(args), "results": results}, table)


def accuracy(args) -> None:
    from facesphere.train.config import load_config
    from facesphere.train.trainer import Trainer
    from facesphere.utils.allocator import tune_malloc

    tune_malloc()
    results, rows = {}, []
    for rate in args.rates:
        overrides = [f"name=pfc_r{rate}", f"output_dir={args.output_dir}", "model.partial_fc.enabled=true",
                     f"model.partial_fc.sample_rate={rate}", f"data.synthetic.num_identities={args.identities}",
                     f"data.synthetic.samples_per_identity={args.samples}", f"train.steps={args.steps}",
                     "train.progress=false", "train.tensorboard=false"]
        cfg = load_config("quickstart", overrides)
        started = time.perf_counter()
        result = Trainer(cfg).fit()
        ev = result.evaluation
        results[str(rate)] = {"final_loss": result.final_loss, "wall_seconds": time.perf_counter() - started,
                              "evaluation": ev}
        rows.append([rate, f"{result.final_loss:.3f}", f"{100 * ev['accuracy_mean']:.2f} ± {100 * ev['accuracy_std']:.2f}",
                     f"{ev['auc']:.4f}", f"{results[str(rate)]['wall_seconds']:.0f}"])
        print(rows[-1], flush=True)
    table = (f"Quickstart recipe ({cfg.model.backbone}, {cfg.model.head} {cfg.model.head_args}) with Partial FC on "
             f"{args.identities} synthetic identities x {args.samples}, batch {cfg.data.batch_size}, {args.steps} steps; "
             f"verification on {cfg.eval.pairs} pairs of {cfg.eval.num_identities} unseen identities (10-fold).\n\n"
             + markdown_table(["sample rate", "final train loss", "held-out accuracy %", "AUC", "seconds"], rows))
    print(table)
    write_results("partial_fc_accuracy", {"args": {k: str(v) for k, v in vars(args).items()}, "results": results}, table)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "child":
        variant, classes, steps, batch, dim = sys.argv[2], *map(int, sys.argv[3:7])
        print(json.dumps(child(variant, classes, steps, batch, dim)))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("cost")
    c.add_argument("--classes", type=int, nargs="+", default=[100_000, 1_000_000])
    c.add_argument("--steps", type=int, default=5)
    c.add_argument("--batch", type=int, default=128)
    c.add_argument("--dim", type=int, default=512)
    a = sub.add_parser("accuracy")
    a.add_argument("--identities", type=int, default=2000)
    a.add_argument("--samples", type=int, default=8)
    a.add_argument("--steps", type=int, default=300)
    a.add_argument("--rates", type=float, nargs="+", default=[1.0, 0.1])
    a.add_argument("--output-dir", type=Path, default=Path("/tmp/facesphere-pfc"))
    args = parser.parse_args()
    setup_logging()
    cost(args) if args.command == "cost" else accuracy(args)


if __name__ == "__main__":
    main()
