"""Training throughput of MobileFaceNet + ArcFace at batch 128: eager vs channels-last vs torch.compile.

Each variant runs in its own process (fresh allocator, fresh compile caches), on the same random batch,
with the same number of warm-up and timed steps; ratios are against eager fp32 with tuned malloc in
the same run. One variant keeps glibc's default malloc to show what the CLI's mallopt tuning buys.

    python benchmarks/train_throughput.py [--steps 10] [--warmup 4] [--batch 128] [--classes 10572]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

from _common import markdown_table, setup_logging, write_results

VARIANTS = {
    "eager": {},
    "eager, default malloc": {"default_malloc": True},
    "channels_last": {"channels_last": True},
    "torch.compile": {"compile": True},
    "torch.compile + channels_last": {"compile": True, "channels_last": True},
    "eager, bf16 autocast": {"bf16": True},
}


def run_variant(args: argparse.Namespace, channels_last=False, compile=False, bf16=False, default_malloc=False) -> dict:
    import torch
    import torch.nn.functional as F

    from facesphere.backbones import build_backbone
    from facesphere.heads import build_head
    from facesphere.utils.allocator import allocator_settings, tune_malloc

    if not default_malloc:
        tune_malloc()
    torch.manual_seed(0)
    backbone = build_backbone("mobilefacenet", embedding_size=128)
    head = build_head("arcface", 128, args.classes, scale=64.0, margin=0.5)
    model = torch.nn.ModuleDict({"backbone": backbone, "head": head})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    images = torch.randn(args.batch, 3, 112, 112)
    labels = torch.randint(0, args.classes, (args.batch,))
    if channels_last:
        model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = head(backbone(images), labels)
        loss = F.cross_entropy(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    if compile:
        step = torch.compile(step)
    t0 = time.perf_counter()
    for _ in range(args.warmup):
        step()
    warmup_seconds = time.perf_counter() - t0
    faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0
    median = statistics.median(times)
    return {"images_per_second": args.batch / median, "median_step_seconds": median,
            "step_seconds": times, "warmup_seconds": warmup_seconds, "page_faults_per_step": faults / args.steps,
            "final_loss": float(loss), "allocator": allocator_settings(), "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--classes", type=int, default=10572, help="ArcFace classes (CASIA-WebFace has 10,572)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds allowed per variant")
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args, **VARIANTS[args.variant])))
        return
    setup_logging()
    results = {}
    for name in VARIANTS:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
        command = [sys.executable, __file__, "--variant", name, "--steps", str(args.steps), "--warmup", str(args.warmup),
                   "--batch", str(args.batch), "--classes", str(args.classes)]
        try:
            out = subprocess.run(command, env=env, capture_output=True, text=True, check=True, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            results[name] = {"timed_out_after_seconds": args.timeout}
            print(f"{name}: timed out after {args.timeout} s", flush=True)
            continue
        results[name] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{name}: {results[name]['images_per_second']:.1f} images/s", flush=True)
    base = results["eager"]["images_per_second"]
    rows = [[name, f"{r['images_per_second']:.1f}", f"{r['images_per_second'] / base:.2f}x", f"{r['median_step_seconds']:.3f}",
             f"{r['page_faults_per_step']:.0f}", f"{r['warmup_seconds']:.1f}"] if "images_per_second" in r
            else [name, f"timed out after {r['timed_out_after_seconds']:.0f} s", "", "", "", ""] for name, r in results.items()]
    table = markdown_table(["variant", "images/s", "vs eager", "median step (s)", "page faults/step", "warm-up (s)"], rows)
    table = (f"MobileFaceNet (D=128) + ArcFace ({args.classes} classes), batch {args.batch}, SGD, fp32 unless stated; "
             f"median of {args.steps} steps after {args.warmup} warm-up steps. Each variant runs in its own process with "
             f"mallopt(mmap and trim thresholds 1 GiB), except 'default malloc'; per-variant allocator settings are in "
             f"the JSON.\n\n" + table)
    print(table)
    write_results("train_throughput", {"args": vars(args), "variants": results}, table)


if __name__ == "__main__":
    main()
