"""OE-CNN on synthetic aged identities, where the truth is known: a plain head against the OE head, from scratch.

OE-CNN (Wang et al., arXiv 1810.07599) writes the feature as ‖x‖·x̃: the direction carries identity through
SphereFace's ψ margin at a fixed scale s (the ``oe`` head), the norm regresses age, f(‖x‖) = k‖x‖ + b (the
``age_from_norm`` objective, weight λ), and only the direction is compared at test time. This study trains
every condition through facesphere's one training loop (``Trainer``, as ``facesphere train`` runs it), each
from the ``oe_cnn`` recipe (``configs/oe_cnn.yaml``) shrunk to minutes on a CPU (SphereFace-4 at 32x32, a few
hundred steps) with the condition's head and age weight, and otherwise the same backbone, data, steps and seeds:

- training: procedural identities (``SyntheticFaces``) rendered at ages drawn uniformly in [age_min, age_max]
  for every sample (``data.synthetic.targets: [age]``; the ageing is monotone: child proportions, greying hair,
  age lines, a sagging lower face, see ``facesphere.data.face_traits.age_face``);
- held out: identities never seen in training (identity offset 1,000,000), ages drawn the same way.

Measured on the held-out identities, from the unit embeddings (the direction): rank-1 identification with each
identity's youngest image as its gallery entry, by the probe's age gap to it; verification accuracy (10-fold)
of same-identity pairs against as many different-identity pairs in the same age-gap bin. From the raw norm:
Pearson(‖x‖, age), and the age MAE of the OE run's trained branch (k, b from the ``age_from_norm`` objective);
for every run also the MAE of k, b fitted by least squares on the training set's norms (the plain heads' only
age reading), beside the MAE of always answering the training set's mean age. Pearson(cos(x̃, identity centre),
age) is the orthogonality claim's other half (the direction should not move with age).

SphereFace's λ annealing (1000 → 5 in the paper, γ = 0.12: 1,658 steps) is compressed so that λ reaches its
floor at half of the run; without that a run of a few hundred steps would train an almost plain softmax.
Every run clips the global gradient norm at 5 (``train.grad_clip``, as the recipe does): SphereFace-4 (no batch
norm) at lr 0.1 makes the norms jump, and the age loss, in years², follows them (``oe_cnn_age_weight.py``: λ = 0.03
without clipping diverged). Finished runs are cached in <work>/runs.jsonl, so a killed study resumes; the cache
is keyed by the study's settings only, so runs made with other code must be removed from it by hand.

    python benchmarks/oe_cnn_synthetic.py [--steps 300] [--conditions ...] [--threads 1] [--work /tmp/facesphere-oe-synthetic]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml
from _common import markdown_table, setup_logging, write_results

from facesphere.data import SyntheticFaces
from facesphere.evaluate.identification import cmc
from facesphere.evaluate.verification import kfold_accuracy
from facesphere.models.runs import load_backbone
from facesphere.train.config import load_config
from facesphere.train.trainer import Trainer
from facesphere.utils.allocator import tune_malloc

logger = logging.getLogger("oe_cnn_synthetic")

EVAL_OFFSET = 1_000_000
GAP_BINS = (0.0, 15.0, 30.0, 45.0, 61.0)
"""Age-gap bins (years) of the identification and verification columns: [0, 15), [15, 30), [30, 45), [45, 60]."""


@dataclass(frozen=True)
class Condition:
    """One training run: a registered head with its arguments and the age objective's weight λ (None: no age term)."""

    key: str
    head: str
    head_args: dict = field(default_factory=dict)
    age_weight: float | None = None


READING, READING_WEIGHT = "oe_m4_s32_l0.03", 0.03  # the paper's reading as configs/oe_cnn.yaml ships it
SPHERE = {"lambda_base": 1000.0, "lambda_power": 1.0, "lambda_min": 5.0}  # the paper's schedule, γ set per run


def conditions(steps: int) -> dict[str, Condition]:
    """The plain heads, the OE reading (m = 4, s = 32, λ = 0.03: ``configs/oe_cnn.yaml``'s) and its alternatives,
    by key: without the age term, λ from 0.001 to 1, m = 2, s = 64, and the age term beside an additive-angle
    margin (ArcFace, at the s = 16, m = 0.3 that suits this backbone in short runs, see ``noise_study.py``)
    instead of ψ; the alternatives change one thing from the reading."""
    anneal = {**SPHERE, "lambda_gamma": round(199.0 / (0.5 * steps), 4)}  # 1000 / (1 + γ t) = 5 at t = steps / 2
    oe = lambda key, lam, **kw: Condition(key, "oe", {"scale": 32.0, "margin": 4, **anneal, **kw}, lam)  # noqa: E731
    table = [
        Condition("plain_arcface", "arcface", {"scale": 16.0, "margin": 0.3}),
        Condition("plain_sphereface", "sphereface", {"margin": 4, **anneal}),
        oe(READING, READING_WEIGHT),
        oe("oe_m4_s32_no_age", None),
        oe("oe_m4_s32_l0.001", 0.001),
        oe("oe_m4_s32_l0.01", 0.01),
        oe("oe_m4_s32_l0.1", 0.1),
        oe("oe_m4_s32_l1", 1.0),
        oe("oe_m2_s32_l0.03", 0.03, margin=2),
        oe("oe_m4_s64_l0.03", 0.03, scale=64.0),
        Condition("arcface_age_l0.03", "arcface", {"scale": 16.0, "margin": 0.3}, 0.03),
    ]
    return {c.key: c for c in table}


def overrides(c: Condition, seed: int, args) -> list[str]:
    """``configs/oe_cnn.yaml`` shrunk to the study's budget (SphereFace-4 at ``args.size``, ``args.steps`` steps, the
    study's data), with the condition's head as ``model.head`` and its age term (if any) as the recipe's."""
    objectives = [{"name": "recognition"}]
    if c.age_weight is not None:
        objectives.append({"name": "age_from_norm", "label": "age", "weight": c.age_weight})
    synthetic = {"num_identities": args.identities, "samples_per_identity": args.samples, "seed": args.data_seed,
                 "difficulty": args.difficulty, "targets": ["age"], "age_min": args.age_min, "age_max": args.age_max}
    return [
        f"name={c.key}_s{seed}", f"output_dir={args.work / 'runs'}", f"seed={seed}",
        "model.backbone=sphereface4", f"model.backbone_args={{embedding_size: 128, input_size: [{args.size}, {args.size}]}}",
        f"model.head={c.head}", "model.head_args=" + yaml.safe_dump(c.head_args, default_flow_style=True).strip(),
        "objectives=" + yaml.safe_dump(objectives, default_flow_style=True).strip(),
        "data.synthetic=" + yaml.safe_dump(synthetic, default_flow_style=True).strip(),
        "data.augment={flip: 0.5}", "data.num_workers=0", f"data.batch_size={args.batch}",
        "eval.enabled=false", f"train.steps={args.steps}", f"train.grad_clip={args.grad_clip}", f"train.checkpoint_every={args.steps}",
        "train.channels_last=false", "train.progress=false", "train.tensorboard=false", "train.log_every=25",
        "schedule={kind: cosine, warmup_steps: 20}",
    ]


def train(c: Condition, seed: int, args) -> Path:
    return Trainer(load_config("oe_cnn", overrides(c, seed, args))).fit().run_dir


@torch.no_grad()
def embed(backbone, dataset: SyntheticFaces, batch: int = 256) -> np.ndarray:
    """Raw (un-normalised) embeddings of every sample, no flip: the norm is read from one view."""
    out = []
    for start in range(0, len(dataset), batch):
        images = torch.stack([dataset[i][0] for i in range(start, min(start + batch, len(dataset)))])
        out.append(backbone(images).float().numpy())
    return np.concatenate(out)


def _bin(gaps: np.ndarray) -> np.ndarray:
    return np.digitize(gaps, GAP_BINS[1:-1])


def gap_identification(unit: np.ndarray, labels: np.ndarray, ages: np.ndarray) -> list[float | None]:
    """Rank-1 per age-gap bin: each identity's youngest image is its gallery entry, all its others are probes."""
    youngest = np.array([np.flatnonzero(labels == k)[np.argmin(ages[labels == k])] for k in np.unique(labels)])
    probes = np.setdiff1d(np.arange(len(labels)), youngest)
    gaps = ages[probes] - ages[youngest[np.searchsorted(np.unique(labels), labels[probes])]]
    out = []
    for b in range(len(GAP_BINS) - 1):
        sel = probes[_bin(gaps) == b]
        out.append(cmc(unit[sel], labels[sel], unit[youngest], labels[youngest]).accuracy(1) if len(sel) else None)
    return out


def gap_verification(unit: np.ndarray, labels: np.ndarray, ages: np.ndarray, seed: int) -> list[float | None]:
    """10-fold accuracy per age-gap bin: all same-identity pairs in the bin against as many different-identity
    pairs with a gap in the same bin (so only identity tells the classes apart)."""
    i, j = np.triu_indices(len(labels), 1)
    same = labels[i] == labels[j]
    bins = _bin(np.abs(ages[i] - ages[j]))
    rng = np.random.default_rng(seed)
    out = []
    for b in range(len(GAP_BINS) - 1):
        genuine = np.flatnonzero(same & (bins == b))
        impostor = np.flatnonzero(~same & (bins == b))
        n = min(len(genuine), len(impostor))
        if n < 20:
            out.append(None)
            continue
        pick = np.concatenate([rng.choice(genuine, n, replace=False), rng.choice(impostor, n, replace=False)])
        scores = np.einsum("nd,nd->n", unit[i[pick]], unit[j[pick]])
        out.append(kfold_accuracy(scores, np.repeat([True, False], n)).accuracy_mean)
    return out


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a, b)[0, 1])


def measure(run_dir: Path, train_set: SyntheticFaces, test_set: SyntheticFaces, seed: int) -> dict:
    backbone, card, _ = load_backbone(run_dir)
    train_norms = np.linalg.norm(embed(backbone, train_set), axis=1)
    raw = embed(backbone, test_set)
    norms = np.linalg.norm(raw, axis=1)
    unit = raw / norms[:, None]
    train_ages = np.array([train_set.age(i) for i in range(len(train_set))])
    ages = np.array([test_set.age(i) for i in range(len(test_set))])
    labels = test_set.labels
    centres = np.stack([unit[labels == k].mean(0) for k in range(test_set.num_classes)])
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    slope, intercept = np.polyfit(train_norms, train_ages, 1)
    record = {
        "rank1_by_gap": gap_identification(unit, labels, ages),
        "verification_by_gap": gap_verification(unit, labels, ages, seed),
        "pearson_norm_age": pearson(norms, ages),
        "pearson_centre_cos_age": pearson(np.einsum("nd,nd->n", unit, centres[labels]), ages),
        "mae_least_squares": float(np.mean(np.abs(slope * norms + intercept - ages))),
        "least_squares": {"slope": float(slope), "intercept": float(intercept)},
        "mae_branch": None, "branch": None,
        "mean_norm": float(norms.mean()),
    }
    if card.age_branch is not None:
        record["branch"] = card.age_branch.model_dump()
        record["mae_branch"] = float(np.mean(np.abs(card.age_branch.predict(norms) - ages)))
    first = first_of(labels)
    record["rank1_first_image"] = cmc(unit[~first], labels[~first], unit[first], labels[first]).accuracy(1)
    return record


def first_of(labels: np.ndarray) -> np.ndarray:
    """Mask of each identity's first sample (an age-blind gallery, for an overall rank-1)."""
    mask = np.zeros(len(labels), dtype=bool)
    mask[np.unique(labels, return_index=True)[1]] = True
    return mask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300, help="training steps per run (all runs alike)")
    parser.add_argument("--conditions", nargs="+", default=None, help="condition keys (default: all)")
    parser.add_argument("--identities", type=int, default=200, help="training identities")
    parser.add_argument("--samples", type=int, default=12, help="training images per identity")
    parser.add_argument("--test-identities", type=int, default=100)
    parser.add_argument("--test-samples", type=int, default=10)
    parser.add_argument("--age-min", type=float, default=10.0)
    parser.add_argument("--age-max", type=float, default=70.0)
    parser.add_argument("--size", type=int, default=32, help="image side in pixels")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--difficulty", type=float, default=0.6, help="within-identity variation (quickstart's)")
    parser.add_argument("--grad-clip", type=float, default=5.0,
                        help="max global gradient norm of every run (the recipe's): without it OE runs with an age "
                        "term diverged at lr 0.1 as the norm, and with it the age loss, jumped")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="training seeds: every condition runs with each")
    parser.add_argument("--data-seed", type=int, default=0, help="the renderer's seed")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: the machine is shared)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/facesphere-oe-synthetic"))
    parser.add_argument("--name", default="oe_cnn_synthetic", help="results name: benchmarks/results/<name>.{json,md}")
    args = parser.parse_args()
    setup_logging()
    tune_malloc()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    args.work.mkdir(parents=True, exist_ok=True)
    table = conditions(args.steps)
    keys = args.conditions or list(table)
    unknown = sorted(set(keys) - set(table))
    if unknown:
        parser.error(f"unknown conditions {unknown}; known: {', '.join(table)}")

    size = (args.size, args.size)
    train_set = SyntheticFaces(args.identities, args.samples, size, seed=args.data_seed, difficulty=args.difficulty,
                               targets=["age"], age_range=(args.age_min, args.age_max))
    test_set = SyntheticFaces(args.test_identities, args.test_samples, size, seed=args.data_seed,
                              identity_offset=EVAL_OFFSET, difficulty=args.difficulty, targets=["age"],
                              age_range=(args.age_min, args.age_max))
    settings = {k: v for k, v in vars(args).items() if k not in ("conditions", "seeds", "work", "name")}
    cache = args.work / "runs.jsonl"
    done = [r for r in map(json.loads, cache.read_text().splitlines())] if cache.exists() else []
    done = {(r["key"], r["seed"]): r for r in done if r.get("settings") == settings}  # other settings: a fresh run
    runs = []
    started = time.perf_counter()
    plan = [(key, seed) for key in keys for seed in args.seeds]
    for n, (key, seed) in enumerate(plan):
        if (key, seed) in done:
            runs.append(done[key, seed])
            continue
        t0 = time.perf_counter()
        run_dir = train(table[key], seed, args)
        train_seconds = time.perf_counter() - t0
        record = {**asdict(table[key]), "seed": seed, "settings": settings, "train_seconds": train_seconds,
                  **measure(run_dir, train_set, test_set, seed), "load_after": os.getloadavg()[0]}
        runs.append(record)
        with open(cache, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        logger.info("[%d/%d] %s seed %d: rank-1 by gap %s, MAE %s / LS %.1f, r(norm, age) %.3f, %.0f s (study %.0f s)",
                    n + 1, len(plan), key, seed, _fmt(record["rank1_by_gap"]), _fmt([record["mae_branch"]]),
                    record["mae_least_squares"], record["pearson_norm_age"], train_seconds, time.perf_counter() - started)
    report(runs, keys, args, train_set, test_set, load_before, time.perf_counter() - started)


def _fmt(values) -> str:
    return " ".join("-" if v is None else f"{v:.3f}" for v in values)


def _cell(values: list, scale: float = 1.0, digits: int = 1, sign: str = "") -> str:
    """Mean ± standard deviation over seeds (population, ddof 0); "–" where a run has no value."""
    if any(v is None for v in values):
        return "–"
    v = scale * np.asarray(values, dtype=np.float64)
    return f"{v.mean():{sign}.{digits}f}" + (f" ± {v.std():.{digits}f}" if len(v) > 1 else "")


def findings(runs: list[dict], keys: list[str], constant_mae: float) -> str:
    """What the table says about the OE reading against the plain heads, computed from the seed means."""
    mean = lambda key, name: np.mean([r[name] for r in runs if r["key"] == key], axis=0)  # noqa: E731
    plain = [k for k in keys if k.startswith("plain_")]
    if READING not in keys or not plain:
        return ""
    nbins = len(GAP_BINS) - 1
    best = {name: np.max([mean(k, name) for k in plain], axis=0) for name in ("rank1_by_gap", "verification_by_gap")}
    lines = ["", "Measured (means over seeds):", ""]
    for name, what in (("rank1_by_gap", "rank-1"), ("verification_by_gap", "verification")):
        reading = mean(READING, name)
        wins = int(np.sum(reading > best[name]))
        lines.append(f"- {what} by age gap, OE reading (λ = {READING_WEIGHT:g}) vs the better plain head per bin: "
                     + " / ".join(f"{100 * a:.1f} vs {100 * b:.1f}" for a, b in zip(reading, best[name]))
                     + f": the OE reading is ahead in {wins} of {nbins} bins.")
    oe_keys = [k for k in keys if not k.startswith("plain_")]
    ahead = [k for k in oe_keys if np.any(mean(k, "rank1_by_gap") > best["rank1_by_gap"])]
    lines.append(f"- Of the {len(oe_keys)} OE / age-term conditions, "
                 + (f"{', '.join(ahead)} beat the better plain head's rank-1 in at least one gap bin."
                    if ahead else "none beats the better plain head's rank-1 in any gap bin."))
    if "oe_m4_s32_no_age" in keys and "plain_sphereface" in keys:
        overall = lambda key: 100 * np.mean(mean(key, "rank1_by_gap"))  # noqa: E731
        lines.append(f"- rank-1 averaged over the gap bins: plain SphereFace {overall('plain_sphereface'):.1f}, the oe "
                     f"head without the age term {overall('oe_m4_s32_no_age'):.1f}, with it (λ = {READING_WEIGHT:g}) "
                     f"{overall(READING):.1f}: the fixed-scale oe head alone is "
                     f"{overall('plain_sphereface') - overall('oe_m4_s32_no_age'):.1f} points behind, the age term "
                     f"moves it by {overall(READING) - overall('oe_m4_s32_no_age'):+.1f}.")
    lines.append(f"- Age from the norm, OE reading: branch MAE {mean(READING, 'mae_branch'):.1f} y, "
                 f"|r(‖x‖, age)| {np.mean([abs(r['pearson_norm_age']) for r in runs if r['key'] == READING]):.2f}; "
                 f"always answering the mean age: {constant_mae:.1f} y; least squares on the plain heads' training "
                 "norms: " + ", ".join(f"{k} {mean(k, 'mae_least_squares'):.1f} y" for k in plain) + ".")
    return "\n".join(lines) + "\n"


def report(runs: list[dict], keys: list[str], args, train_set: SyntheticFaces, test_set: SyntheticFaces, load_before, seconds: float) -> None:
    train_ages = np.array([train_set.age(i) for i in range(len(train_set))])
    test_ages = np.array([test_set.age(i) for i in range(len(test_set))])
    constant_mae = float(np.mean(np.abs(test_ages - train_ages.mean())))
    bins = [f"{GAP_BINS[b]:.0f}-{GAP_BINS[b + 1] - 1:.0f}" for b in range(len(GAP_BINS) - 1)]
    train_seconds = sum(r["train_seconds"] for r in runs)
    rows = []
    for key in keys:
        group = [r for r in runs if r["key"] == key]
        r = group[0]
        lam = "–" if r["age_weight"] is None else f"{r['age_weight']:g}"
        head = r["head"] + (f" m={r['head_args']['margin']}" if "margin" in r["head_args"] and r["head"] != "arcface" else "")
        head += f" s={r['head_args']['scale']:g}" if "scale" in r["head_args"] else ""
        per_bin = lambda name: [[g[name][b] for g in group] for b in range(len(GAP_BINS) - 1)]  # noqa: E731
        column = lambda name: [g[name] for g in group]  # noqa: E731
        rows.append([key, head, lam, *(_cell(v, 100) for v in per_bin("rank1_by_gap")),
                     *(_cell(v, 100) for v in per_bin("verification_by_gap")), _cell(column("mae_branch")),
                     _cell(column("mae_least_squares")), _cell(np.abs(column("pearson_norm_age")).tolist(), digits=2),
                     _cell(column("pearson_centre_cos_age"), digits=2, sign="+")])
    headers = ["run", "head", "λ", *(f"rank-1 gap {b}" for b in bins), *(f"verif. gap {b}" for b in bins),
               "age MAE (branch)", "age MAE (LS on train norms)", "|r(‖x‖, age)|", "r(cos to centre, age)"]
    markdown = (
        f"# OE-CNN on synthetic aged identities\n\n"
        f"SphereFace-4 at {args.size}x{args.size}, {args.identities} training identities x {args.samples} images "
        f"(difficulty {args.difficulty}), ages uniform in [{args.age_min:g}, {args.age_max:g}] per image, "
        f"{args.steps} steps at batch {args.batch}, gradient norm clipped at {args.grad_clip:g}, mean ± std over "
        f"seeds {', '.join(map(str, args.seeds))}; held out: {args.test_identities} identities x "
        f"{args.test_samples} images. Rank-1: gallery = each identity's youngest image, probes binned by their "
        f"age gap to it (years). Verification: 10-fold accuracy, same-identity pairs vs as many different-identity "
        f"pairs in the same gap bin. Age MAE in years; always answering the training mean age gives "
        f"{constant_mae:.1f}. Training took {train_seconds / 60:.1f} min over the "
        f"{len(runs)} runs; this invocation {seconds / 60:.1f} min (runs it found cached in its work folder are reused; "
        f"load {load_before[0]:.1f} before).\n\n"
        "Reading of OE-CNN (arXiv 1810.07599, Sec. 3): the ``oe`` head is A-Softmax's ψ(θ) margin on the direction at "
        "a fixed scale s (m = 4, s = 32), plus λ·L_age with L_age = 1/(2M) Σ (k‖x‖ + b − z)² (``age_from_norm``, "
        f"λ = {READING_WEIGHT:g} as in ``configs/oe_cnn.yaml``); SphereFace's λ annealing reaches its floor of 5 at half "
        "the run. The age objective learns f in standardised coordinates, f(n) = c + a·(n − μ)/σ: a, c start at the "
        "least-squares fit on the first batch with ages, and before every later training step μ and σ follow the "
        "batch's norms (running averages, ``norm_momentum`` 0.1) with a, c re-expressed so that f is unchanged; the "
        "card's k = a/σ, b = c − a·μ/σ. Alternatives run (each changes one thing from the reading): no age term, "
        "λ = 0.001 / 0.01 / 0.1 / 1, m = 2, s = 64, and the age term beside ArcFace (s = 16, m = 0.3) instead of ψ. "
        "Plain heads have no age branch; their ages come from k, b fitted by least "
        "squares on the training images' norms (column 'LS on train norms', given for every run). |r(‖x‖, age)| is "
        "the size of Pearson's r: its sign is free (k takes it) and differs between seeds of one condition; the signed "
        "values are in the JSON.\n\n"
        + markdown_table(headers, rows) + "\n"
        + findings(runs, keys, constant_mae)
    )
    payload = {"settings": {k: v for k, v in vars(args).items() if k != "work"}, "gap_bins": list(GAP_BINS),
               "constant_mae": constant_mae, "load_before": load_before, "load_after": os.getloadavg(),
               "wall_seconds": seconds, "train_seconds_total": train_seconds, "runs": runs}
    write_results(args.name, payload, markdown)


if __name__ == "__main__":
    main()
