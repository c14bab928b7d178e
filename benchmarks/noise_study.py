"""Controlled label noise: held-out accuracy against the noise rate and against the number of clean samples.

IMDb-Face (arXiv 1807.11649, Sec. 3) finds that "a noisy sample is worth less than a clean one": a model trained
on a clean set beats one trained on a noisier, larger set. This study reproduces the controlled version on
synthetic identities, through facesphere's one training loop (``Trainer``, as ``facesphere train`` runs it):

- a pool of procedural faces (``SyntheticFaces``, the quickstart's renderer) is written once as image files,
  with a second pool of identities outside the label set as outlier photos;
- each run draws a training set of a given size, injects noise with ``facesphere.cleaning.noise.inject_noise``
  at rate r (r/2 label flips + r/2 outliers, both shares of the final set, so noise replaces clean samples and
  the set size stays fixed) and writes it as a list file (``data.kind: list``);
- every run trains SphereFace-4 at 32x32 for the same number of steps (SphereFace, ArcFace, sub-center ArcFace
  with and without its drop) and is scored by the trainer's held-out verification on synthetic identities
  never seen in training (10-fold accuracy on pairs).

Two sweeps: (a) head x noise rate at a fixed set size N; (b) clean-only training at 0.6N and N images against
40%-noisy training at N (0.6N clean + 0.4N noise) and 2N (1.2N clean), i.e. at equal clean-sample counts and at
equal set sizes. Finished runs are cached in <work>/runs.jsonl, so a killed study resumes.

    python benchmarks/noise_study.py [--steps 120] [--seeds 0 1] [--key-seeds 2] [--threads 1]
                                     [--work /tmp/facesphere-noise-study]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from _common import RESULTS, markdown_table, setup_logging, write_results

from facesphere.cleaning.noise import inject_noise
from facesphere.data import SyntheticFaces
from facesphere.data.export import write_image_folder
from facesphere.models.runs import latest_checkpoint, load_checkpoint
from facesphere.train.config import load_config
from facesphere.train.trainer import Trainer
from facesphere.utils.allocator import tune_malloc
from facesphere.utils.files import atomic_write_text

logger = logging.getLogger("noise_study")

HEADS = ["sphereface", "arcface", "subcenter_arcface", "subcenter_arcface_nodrop"]
"""Heads by registered name; ``subcenter_arcface_nodrop`` is sub-center ArcFace with K = 3 throughout (no drop)."""
SIZE_HEADS = ["sphereface", "arcface"]
OUTLIER_OFFSET = 500_000
"""Outlier photos come from synthetic identities this far from the training ones (and from the held-out
identities at the eval's offset, 1,000,000): people outside the label set, as the paper's outliers are."""


@dataclass(frozen=True)
class Condition:
    head: str
    size: int  # images in the training set (clean + noisy)
    rate: float  # noisy share of the set: rate/2 flips + rate/2 outliers
    seed: int

    @property
    def key(self) -> str:
        return f"{self.head}_n{self.size}_r{round(100 * self.rate):02d}_s{self.seed}"

    @property
    def outliers(self) -> int:  # as many as flips
        return round(self.rate / 2 * self.size)

    @property
    def members(self) -> int:  # photos of identities in the set, flipped or not
        return self.size - self.outliers

    @property
    def clean(self) -> int:
        return self.members - self.outliers


def render_pool(dataset: SyntheticFaces, folder: Path) -> list[str]:
    """Write ``dataset`` once as image files; their paths in index order (folder per identity, file per sample)."""
    if not (folder / "done").exists():
        write_image_folder(dataset, folder, ext="png", log_every=25)
        atomic_write_text(folder / "done", f"{len(dataset)}\n")
    paths = sorted(str(p) for p in folder.glob("*/*.png"))
    if len(paths) != len(dataset):
        raise RuntimeError(f"{folder} holds {len(paths)} images, expected {len(dataset)}; delete it and rerun")
    return paths


def noisy_list(c: Condition, pool: list[str], pool_labels: np.ndarray, outliers: list[str], classes: int,
               path: Path) -> dict[str, int]:
    """Draw ``c.size`` images with ``c.rate`` noise from the pools and write them as a ``<path> <label>`` list.

    The clean part is the first n of a per-seed permutation of the pool, so sets of one seed are nested.
    """
    if c.members > len(pool):
        raise ValueError(f"{c.key}: needs {c.members} pool images, the pool holds {len(pool)}")
    chosen = np.random.default_rng([c.seed, 0x5E7]).permutation(len(pool))[:c.members]
    noise = inject_noise(pool_labels[chosen], classes, flip_rate=c.rate / 2, outlier_rate=c.rate / 2,
                         outlier_pool=len(outliers), seed=c.seed)
    files = [pool[i] for i in chosen] + [outliers[i] for i in noise.outliers]
    atomic_write_text(path, "".join(f"{f} {int(label)}\n" for f, label in zip(files, noise.labels)))
    kind = np.bincount(noise.kind, minlength=3)
    return {"images": len(files), "clean": int(kind[0]), "flips": int(kind[1]), "outliers": int(kind[2])}


SELECTION = ("seeds", "key_seeds", "heads", "size_heads", "rates", "only_sweep", "threads", "work")
"""Arguments that choose which runs to make (or how fast), not how each run trains: free to change on a resume."""


def check_settings(args) -> None:
    """A work folder caches runs of one setting: refuse to mix in runs trained otherwise."""
    settings = {k: v for k, v in sorted(vars(args).items()) if k not in SELECTION}
    path = args.work / "settings.json"
    if path.exists() and json.loads(path.read_text()) != settings:
        raise SystemExit(f"{args.work} holds runs of other settings ({path}); give another --work")
    atomic_write_text(path, json.dumps(settings, indent=1))


def plan(args) -> list[Condition]:
    """The runs, most informative first: every rate at ``seeds``, then the key points (0% and 40% noise, and the size
    sweep) again at ``key_seeds``; the size sweep is clean-only at 0.6N and 40%-noisy at 2N (plus the rate sweep's N)."""
    runs = []
    for seed in args.seeds + args.key_seeds:
        rates = args.rates if seed in args.seeds else [r for r in args.rates if r in (0.0, 0.4)]
        runs += [Condition(h, args.n, r, seed) for r in rates for h in args.heads]
        if not args.only_sweep:
            runs += [Condition(h, size, rate, seed) for h in args.size_heads
                     for size, rate in ((round(0.6 * args.n), 0.0), (2 * args.n, 0.4))]
    return list(dict.fromkeys(runs))


def run(c: Condition, list_file: Path, args, paper: dict) -> dict:
    head = c.head.removesuffix("_nodrop")
    head_args = dict(paper[head])
    if "arcface" in head:
        head_args.update(scale=args.arc_scale, margin=args.arc_margin)
    if head == "subcenter_arcface":  # the drop after warm-up, scaled from the paper's schedule to this one
        drop = c.head == head
        head_args.update(drop_step=int(args.steps * args.drop_at) if drop else None,
                         count_steps=max(1, int(args.steps * args.drop_at / 2)) if drop else None)
    overrides = [
        f"name={c.key}", f"output_dir={args.work / 'runs'}", f"seed={c.seed}",
        "model.backbone=sphereface4", f"model.backbone_args={{embedding_size: 128, input_size: [{args.size}, {args.size}]}}",
        f"model.head={head}", "model.head_args=" + yaml.safe_dump(head_args, default_flow_style=True).strip(),
        "data.kind=list", f"data.list_file={list_file}", "data.num_workers=0", f"data.batch_size={args.batch}",
        f"data.synthetic.seed={args.data_seed}", f"data.synthetic.difficulty={args.difficulty}",
        f"eval.num_identities={args.eval_identities}", "eval.samples_per_identity=6", f"eval.pairs={args.eval_pairs}",
        f"train.steps={args.steps}", f"train.checkpoint_every={args.steps}", "train.channels_last=false",
        "train.progress=false", "train.tensorboard=false", "train.log_every=25",
    ]
    cfg = load_config("quickstart", overrides)
    started = time.perf_counter()
    result = Trainer(cfg).fit()
    ev = result.evaluation
    return {"key": c.key, **asdict(c), "clean_images": c.clean, "head_args": head_args, "accuracy": ev["accuracy_mean"],
            "accuracy_fold_std": ev["accuracy_std"], "auc": ev["auc"], "final_loss": result.final_loss,
            "wall_seconds": time.perf_counter() - started, "load_after": os.getloadavg()[0],
            "left_out": left_out(result.run_dir)}


def accuracies(runs: list[dict]) -> dict[tuple[str, int, float], list[float]]:
    """Held-out accuracies over seeds, by (head, set size, noise rate)."""
    table: dict[tuple[str, int, float], list[float]] = {}
    for r in runs:
        table.setdefault((r["head"], r["size"], r["rate"]), []).append(r["accuracy"])
    return table


def left_out(run_dir: Path) -> int | None:
    """Sample-visits sub-center ArcFace's screen left out after its drop (the head's ``dropped`` counts, summed), read
    from the run's last checkpoint; None for a head without a screen."""
    state = load_checkpoint(latest_checkpoint(run_dir / "checkpoints"))["model"]
    counts = [v for k, v in state.items() if k.endswith(".dropped")]
    return int(sum(c.sum() for c in counts)) if counts else None


def spread(values: list[float]) -> tuple[float, float]:
    """Mean and half the range over seeds (with 2 seeds: each seed lies at mean ± spread)."""
    return float(np.mean(values)), float((max(values) - min(values)) / 2)


def cell(values: list[float] | None) -> str:
    if not values:
        return "–"
    mean, half = spread(values)
    return f"{100 * mean:.1f} ± {100 * half:.1f} (n={len(values)})"


def plot(acc: dict, args, heads: list[str], path: Path) -> None:
    """Left: accuracy vs noise rate per head at N images; right: accuracy vs clean images, clean-only vs 40% noisy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def draw(axes, points, marker="o", **style):
        means = [spread(v) for _, v in points]
        axes.errorbar([x for x, _ in points], [100 * m for m, _ in means], yerr=[100 * h for _, h in means],
                      marker=marker, capsize=3, **style)

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, head in enumerate(heads):
        colour = f"C{i}"
        draw(left, [(100 * r, acc[head, args.n, r]) for r in args.rates if (head, args.n, r) in acc], color=colour,
             label=head)
        if head not in args.size_heads:
            continue
        for rate, line, marker, what in ((0.0, "-", "o", "clean only"), (0.4, "--", "s", "40% noisy")):
            sizes = sorted(size for h, size, r in acc if h == head and r == rate)
            draw(right, [(Condition(head, size, rate, 0).clean, acc[head, size, rate]) for size in sizes], marker,
                 color=colour, linestyle=line, label=f"{head}, {what}")
    left.set(xlabel="injected noise, % of the set (half flips, half outliers)", ylabel="held-out verification accuracy %",
             title=f"accuracy vs noise rate ({args.n} training images)")
    right.set(xlabel="clean training images", ylabel="held-out verification accuracy %",
              title="accuracy vs clean-sample count")
    left.legend()
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=120, help="training steps per run (all runs alike)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="seeds of every run")
    parser.add_argument("--key-seeds", type=int, nargs="*", default=[], help="more seeds for 0%%, 40%% and the size sweep")
    parser.add_argument("--heads", nargs="+", default=HEADS)
    parser.add_argument("--size-heads", nargs="+", default=SIZE_HEADS, help="heads of the clean-vs-noisy size sweep")
    parser.add_argument("--rates", type=float, nargs="+", default=[0.0, 0.1, 0.2, 0.4])
    parser.add_argument("--identities", type=int, default=200, help="identities in the label set")
    parser.add_argument("--n", type=int, default=2400, help="N: training images of the noise-rate sweep")
    parser.add_argument("--size", type=int, default=32, help="image side in pixels")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--difficulty", type=float, default=0.6, help="within-identity variation (quickstart's)")
    parser.add_argument("--data-seed", type=int, default=0, help="the renderer's seed (training, outlier and eval faces)")
    parser.add_argument("--eval-identities", type=int, default=150)
    parser.add_argument("--eval-pairs", type=int, default=3000)
    parser.add_argument("--arc-scale", type=float, default=16.0,
                        help="ArcFace and sub-center ArcFace scale s: clean pilot runs of the BN-free SphereFace-4 reached "
                        "73%% at the paper's s=64, m=0.5 (150 steps), 76%% at s=32, m=0.5 and 85%% at s=16, m=0.3 (120)")
    parser.add_argument("--arc-margin", type=float, default=0.3, help="ArcFace and sub-center ArcFace margin m")
    parser.add_argument("--drop-at", type=float, default=0.5, help="sub-center ArcFace: drop_step as a share of steps")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: the machine is shared)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/facesphere-noise-study"))
    parser.add_argument("--name", default="noise_study", help="results name: benchmarks/results/<name>.{json,md,png}")
    parser.add_argument("--only-sweep", action="store_true", help="skip the size sweep")
    args = parser.parse_args()
    setup_logging()
    tune_malloc()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    args.work.mkdir(parents=True, exist_ok=True)
    check_settings(args)

    conditions = plan(args)
    # The pool holds the largest clean part any run draws; the outlier pool the most outliers any run adds.
    per_identity = -(-max(c.members for c in conditions) // args.identities)
    pool_set = SyntheticFaces(args.identities, per_identity, (args.size, args.size), seed=args.data_seed,
                              difficulty=args.difficulty)
    outlier_count = max(c.outliers for c in conditions) or 1
    outlier_ids = -(-outlier_count // 8)
    outlier_set = SyntheticFaces(outlier_ids, 8, (args.size, args.size), seed=args.data_seed,
                                 identity_offset=OUTLIER_OFFSET, difficulty=args.difficulty)
    pool = render_pool(pool_set, args.work / f"pool_{args.identities}x{per_identity}_{args.size}px_d{args.difficulty}")
    outliers = render_pool(outlier_set, args.work / f"outliers_{outlier_ids}x8_{args.size}px_d{args.difficulty}")

    paper = {h: load_config(h).model.head_args for h in ("sphereface", "arcface")}
    paper["subcenter_arcface"] = load_config("subcenter_arcface").model.head_args
    cache = args.work / "runs.jsonl"
    done = {r["key"]: r for r in map(json.loads, cache.read_text().splitlines())} if cache.exists() else {}
    for key, record in done.items():  # runs cached before left_out was recorded
        record.setdefault("left_out", left_out(args.work / "runs" / key))
    runs = []
    started = time.perf_counter()
    for i, c in enumerate(conditions):
        if c.key in done:
            runs.append(done[c.key])
            continue
        list_file = args.work / "lists" / f"{c.key}.txt"
        list_file.parent.mkdir(exist_ok=True)
        counts = noisy_list(c, pool, pool_set.labels, outliers, args.identities, list_file)
        record = {**run(c, list_file, args, paper), "steps": args.steps, "counts": counts}
        runs.append(record)
        with open(cache, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        logger.info("[%d/%d] %s: accuracy %.4f, %.0f s (study %.0f s)", i + 1, len(conditions), c.key, record["accuracy"],
                    record["wall_seconds"], time.perf_counter() - started)

    report(runs, args, load_before)


def report(runs: list[dict], args, load_before) -> None:
    acc = accuracies(runs)
    heads = [h for h in args.heads if any(key[0] == h for key in acc)]
    table_a = markdown_table(["head"] + [f"{round(100 * r)}% noise" for r in args.rates],
                             [[h] + [cell(acc.get((h, args.n, r))) for r in args.rates] for h in heads])
    points = sorted({(size, rate) for h, size, rate in acc if h in args.size_heads and rate in (0.0, 0.4)},
                    key=lambda p: (Condition("", *p, 0).clean, p[1]))  # equal clean counts side by side
    table_b = markdown_table(["training set", "images", "clean images"] + list(args.size_heads),
                             [["clean only" if rate == 0 else "40% noisy", size, Condition("", size, rate, 0).clean]
                              + [cell(acc.get((h, size, rate))) for h in args.size_heads] for size, rate in points])
    plot_path = RESULTS / f"{args.name}.png"
    plot(acc, args, heads, plot_path)
    wall = sum(r["wall_seconds"] for r in runs)
    loads = [r["load_after"] for r in runs]
    sphere = load_config("sphereface").model.head_args
    lam = max(sphere["lambda_min"],  # the head's annealing at the last step
              sphere["lambda_base"] * (1 + sphere["lambda_gamma"] * args.steps) ** -sphere["lambda_power"])
    load_after = os.getloadavg()
    setup = (f"SphereFace-4 at {args.size}x{args.size} (128-d), batch {args.batch}, {args.steps} SGD steps per run "
             f"(quickstart's lr 0.1, cosine, 30 warm-up steps), each head with its paper config but ArcFace's "
             f"s = {args.arc_scale:g}, m = {args.arc_margin:g} (both ArcFace heads); sub-center ArcFace K = 3, dominant "
             f"sub-centre kept at step {int(args.steps * args.drop_at)} and samples beyond 75° left out from then on "
             f"(subcenter_arcface_nodrop: K = 3 throughout); SphereFace's λ anneals from {sphere['lambda_base']:g} only "
             f"to {lam:.0f} in {args.steps} steps, so its margin stays mostly softened. Training: {args.identities} "
             f"synthetic identities "
             f"(difficulty {args.difficulty}); noise at rate r = r/2 label flips + r/2 outliers (photos of synthetic "
             f"people outside the set), both shares of the final set (facesphere.cleaning.noise.inject_noise). "
             f"Held-out: 10-fold verification accuracy on {args.eval_pairs} pairs of {args.eval_identities} unseen "
             f"synthetic identities. Cells: mean ± half the range over seeds {args.seeds + args.key_seeds} (n = runs). "
             f"{len(runs)} runs, {wall:.0f} s of training and evaluation; torch threads {torch.get_num_threads()}; 1-minute "
             f"load average after each run {min(loads):.1f}–{max(loads):.1f} (the 2-core machine was shared).\n\n")
    screened = {}
    for r in runs:
        if r["head"] == "subcenter_arcface" and r["size"] == args.n:
            screened.setdefault(r["rate"], []).append(r["left_out"])
    visits = (args.steps - int(args.steps * args.drop_at)) * args.batch
    if screened:
        setup += ("Sub-center ArcFace's 75° screen left out, of the " + f"{visits} sample-visits after its drop: "
                  + ", ".join(f"{min(v)}–{max(v)} at {round(100 * rate)}% noise" for rate, v in sorted(screened.items()))
                  + ".\n\n")
    markdown = (setup + f"**(a) Held-out accuracy % by head and noise rate ({args.n} training images)**\n\n{table_a}\n\n"
                f"**(b) Clean-only vs 40%-noisy training at equal and unequal sizes**\n\n{table_b}\n\n"
                f"Plot: `benchmarks/results/{plot_path.name}` (left: accuracy vs noise rate per head; right: accuracy "
                f"vs clean-sample count, clean-only vs 40% noisy).\n")
    print(markdown)
    write_results(args.name, {"args": {k: str(v) for k, v in vars(args).items()}, "load_before": load_before,
                                  "load_after": load_after, "plot": str(plot_path.relative_to(RESULTS.parent.parent)),
                                  "runs": runs}, markdown)


if __name__ == "__main__":
    main()
