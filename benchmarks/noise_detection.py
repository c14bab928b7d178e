"""Label-noise detection on real faces: facesphere's profiler vs cleanlab's kNN path vs the centre-distance rule.

The imported InsightFace MobileFaceNet (y1) embeds aligned 112x112 LFW crops. Clean set: the LFW identities with
at least ``--min-images`` images (first ``--cap`` images of each by file name). Outlier pool: LFW people with one
image who appear nowhere in pairs.txt (so neither in the clean set nor in the calibration pairs). The verification
threshold is calibrated at ``--far`` with facesphere's own calibration on the pairs.txt pairs whose two people are
both outside the clean set. For each noise rate (half flips, half outliers, injected by
``facesphere.cleaning.noise.inject_noise``) and seed, every detector sees the same embeddings and labels; precision
and recall are over flagged vs injected images, plus recall per kind and, for flips, whether the suggested identity
is the true one. Then the Glint360K celebrity subset is profiled from its folder (``profile_set``, no flip as
calibrated) and a contact sheet of its flagged images written outside the repository (research-derived images are
never committed).

Embeddings are cached outside the repository (``--cache``, keyed by the model's weights hash); the imported model
lives there too.

    python benchmarks/noise_detection.py [--cache /tmp/facesphere-cache] [--seeds 3] [--embed-only]
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np

from _common import DATA, markdown_table, setup_logging, write_results
from facesphere.cleaning.baselines import centre_distance_flags, cleanlab_knn_flags
from facesphere.cleaning.noise import Status, inject_noise
from facesphere.cleaning.profile import profile_embeddings, profile_set
from facesphere.data.images import load_image
from facesphere.evaluate.contact_sheet import write_image_grid
from facesphere.evaluate.lfw import lfw_image_path, parse_lfw_pairs
from facesphere.models import import_weights
from facesphere.models.runs import load_embedder
from facesphere.models.store import CARD_FILE, save_model
from facesphere.pipeline.threshold import calibrate_threshold
from facesphere.utils.files import atomic_path

logger = logging.getLogger("noise_detection")

LFW = DATA / "data/lfw_112x112/lfw-112X112"
PAIRS = DATA / "data/lfw_meta/facenet/data/pairs.txt"
GLINT = DATA / "data/glint360k_celeb_subset/datasets/celebrity_images"
WEIGHTS = DATA / "weights/mobilefacenet_insightface_y1/model-symbol.json"
RATES = (0.1, 0.2, 0.4)


# ---------------------------------------------------------------- model and embedding cache (outside the repo)

def model_folder(cache: Path) -> Path:
    """The imported MobileFaceNet as a facesphere model folder under ``cache`` (imported once)."""
    folder = cache / "mobilefacenet_insightface_y1"
    if not (folder / CARD_FILE).is_file():
        backbone, card = import_weights(WEIGHTS)
        save_model(folder, backbone, card)
    return folder


class EmbeddingCache:
    """Per-image embeddings of one model, in ``<cache>/embeddings/<weights hash>.npz``; only missing images are embedded."""

    def __init__(self, cache: Path, embedder) -> None:
        self.embedder = embedder
        key = (embedder.card.weights_sha256 or embedder.card.name)[:16]
        self.path = cache / "embeddings" / f"{key}.npz"
        self.rows: dict[str, np.ndarray] = {}
        if self.path.is_file():
            with np.load(self.path, allow_pickle=False) as stored:
                self.rows = dict(zip(stored["paths"].tolist(), stored["embeddings"]))

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.path) as tmp, open(tmp, "wb") as f:
            np.savez(f, paths=np.array(list(self.rows)), embeddings=np.stack(list(self.rows.values())))

    def get(self, paths: list[Path], chunk: int = 256) -> np.ndarray:
        """(len(paths), D) unit embeddings, embedding (and saving every ``chunk``) the ones not cached yet."""
        missing = [p for p in dict.fromkeys(map(str, paths)) if p not in self.rows]
        started = time.perf_counter()
        for start in range(0, len(missing), chunk):
            batch = missing[start:start + chunk]
            vectors = self.embedder.embed([load_image(p) for p in batch])
            self.rows.update(zip(batch, vectors))
            self._save()
            done = start + len(batch)
            logger.info("embedded %d/%d new images (%.1f images/s)", done, len(missing),
                        done / (time.perf_counter() - started))
        return np.stack([self.rows[str(p)] for p in paths]) if paths else np.zeros((0, self.embedder.embedding_size))


# ---------------------------------------------------------------- the sets

def lfw_sets(min_images: int, cap: int):
    """(clean paths, clean labels, identity names, outlier-pool paths, calibration pairs (p1, p2, same))."""
    folders = {d.name: sorted(d.glob("*.jpg")) for d in sorted(LFW.iterdir()) if d.is_dir()}
    names = [n for n, files in folders.items() if len(files) >= min_images]
    paths, labels = [], []
    for label, name in enumerate(names):
        chosen = folders[name][:cap]
        paths += chosen
        labels += [label] * len(chosen)
    pairs = parse_lfw_pairs(PAIRS)
    in_pairs = {p.name1 for p in pairs} | {p.name2 for p in pairs}
    chosen_names = set(names)
    pool = [files[0] for n, files in folders.items() if len(files) == 1 and n not in in_pairs]
    calibration = [p for p in pairs if p.name1 not in chosen_names and p.name2 not in chosen_names]
    p1 = [lfw_image_path(LFW, p.name1, p.num1) for p in calibration]
    p2 = [lfw_image_path(LFW, p.name2, p.num2) for p in calibration]
    same = np.array([p.same for p in calibration], dtype=bool)
    return paths, np.array(labels, dtype=np.int64), names, pool, (p1, p2, same)


# ---------------------------------------------------------------- measuring the detectors

def calibrate(cache: EmbeddingCache, pairs, far: float):
    """The verification threshold at ``far`` from facesphere's calibration on the pairs' cosines."""
    p1, p2, same = pairs
    scores = np.einsum("nd,nd->n", cache.get(p1), cache.get(p2))
    card = cache.embedder.card
    return calibrate_threshold(scores, same, far, card.name, card.embedding_size, card.weights_sha256)


def score(flagged: np.ndarray, kind: np.ndarray, suggested: np.ndarray | None, true_labels: np.ndarray,
          suspect: np.ndarray | None = None) -> dict:
    """Precision/recall of ``flagged`` against the injected noise, recall per kind, flips given their true identity;
    ``suspect``: images the profiler flags in the set before injection (how many false positives are those)."""
    noisy = kind != Status.CLEAN
    hit = flagged & noisy
    flips, outliers = kind == Status.FLIP, kind == Status.OUTLIER
    out = {"flagged": int(flagged.sum()), "noisy": int(noisy.sum()),
           "precision": float(hit.sum() / max(1, flagged.sum())), "recall": float(hit.sum() / max(1, noisy.sum())),
           "flip_recall": float((flagged & flips).sum() / max(1, flips.sum())),
           "outlier_recall": float((flagged & outliers).sum() / max(1, outliers.sum())),
           "false_positives": int((flagged & ~noisy).sum())}
    if suspect is not None:
        out["false_positives_flagged_before_injection"] = int((flagged & ~noisy & suspect).sum())
    if suggested is not None:
        found = flagged & flips
        out["flip_identity_correct"] = float((suggested[found] == true_labels[found]).sum() / max(1, found.sum()))
    return out


def run_detectors(embeddings: np.ndarray, noisy_labels: np.ndarray, threshold, names: list[str], k: int):
    """{method: (flagged, suggested or None, extra)} of the three detectors on the same embeddings."""
    started = time.perf_counter()
    profile = profile_embeddings(embeddings, noisy_labels, threshold.value, far=threshold.target_far,
                                 model=threshold.model, identity_names=names)
    t_profile = time.perf_counter() - started
    started = time.perf_counter()
    cl = cleanlab_knn_flags(embeddings, noisy_labels, k=k)
    t_cleanlab = time.perf_counter() - started
    centre, _ = centre_distance_flags(embeddings, noisy_labels, threshold.value)
    suggested = np.where(profile.status == Status.FLIP, profile.other_label, -1)
    return {"facesphere": (profile.status != Status.CLEAN, suggested, {"seconds": t_profile, "status": profile.status}),
            "cleanlab_knn": (cl.flagged, cl.suggested, {"seconds": t_cleanlab, "quality": cl.quality}),
            "centre_distance": (centre, None, {})}, profile


def what_if(profile, kind: np.ndarray, threshold: float) -> list[dict]:
    """The profiler's two rules re-applied to its own cosines with the cuts moved: where precision and recall go.

    Rows: the outlier cut (own_cosine below it) moved alone, then both cuts (flip: other_cosine at or above it)."""
    own, other = profile.own_cosine, profile.other_cosine
    cuts = [(threshold, threshold + d) for d in (-0.10, -0.05, 0.0, 0.05, 0.10, 0.15, 0.20)]
    cuts += [(threshold + d, threshold + d) for d in (-0.10, -0.05, 0.05, 0.10)]
    cuts += [(threshold + d, threshold) for d in (0.05, 0.10, 0.15, 0.20, 0.25)]  # the flip cut raised alone
    # the flip cut from the set itself: the (1 - FAR) quantile of the nearest-other-centre cosine of the images
    # the profiler calls clean (impostor image-to-centre scores, maximised over the other identities as the rule is)
    clean_other = other[(profile.status == Status.CLEAN) & np.isfinite(other)]
    cuts += [(float(np.quantile(clean_other, 1 - far)), threshold) for far in (1e-2, 1e-3)]
    rows = []
    for flip_cut, outlier_cut in cuts:
        with np.errstate(invalid="ignore"):
            flip = (other >= flip_cut) & ~(own >= other)
            outlier = (own < outlier_cut) & ~(other >= flip_cut)
        flagged = flip | outlier | (profile.status == Status.DUPLICATE)
        rows.append({"flip_cut": round(flip_cut, 4), "outlier_cut": round(outlier_cut, 4),
                     **score(flagged, kind, None, kind),
                     "outliers_called_flip": int((flip & (kind == Status.OUTLIER)).sum()),
                     "flips_called_outlier": int((outlier & ~flip & (kind == Status.FLIP)).sum())})
    return rows


def two_centre_check(profile, kind: np.ndarray) -> dict:
    """In identities kept with two centres: the injected share, and how much of it is still flagged (a second
    'mode' made of noise would hide it)."""
    inside = np.isin(profile.labels, np.flatnonzero(profile.identity_centres > 1))
    noisy = inside & (kind != Status.CLEAN)
    return {"two_centre_images": int(inside.sum()), "two_centre_injected": int(noisy.sum()),
            "two_centre_injected_flagged": int((noisy & (profile.status != Status.CLEAN)).sum())}


def cosine_quantiles(profile, kind: np.ndarray) -> dict:

    out = {}
    for status in (Status.CLEAN, Status.FLIP, Status.OUTLIER):
        mask = kind == status
        for field in ("own_cosine", "other_cosine"):
            values = getattr(profile, field)[mask]
            values = values[np.isfinite(values)]
            out[f"{status.name.lower()}_{field}"] = [round(float(q), 3) for q in
                                                     np.quantile(values, [0.01, 0.05, 0.5, 0.95, 0.99])]
    return out


def glint_sheet(profile, paths: list[Path], sheet: Path, typical: int = 3) -> dict:
    """Contact sheet: each flagged image, then its filed identity's most typical images, then (flips) the
    suggested identity's; written outside the repository (derived research images)."""
    flagged = np.flatnonzero(profile.status != Status.CLEAN)
    clean = profile.status == Status.CLEAN

    def most_typical(label: int) -> list[int]:
        members = np.flatnonzero(clean & (profile.labels == label))
        return members[np.argsort(-profile.own_cosine[members])][:typical].tolist()

    images, captions, rows = [], [], []
    columns = 1 + 2 * typical
    for i in flagged:
        status = Status(int(profile.status[i]))
        filed = int(profile.labels[i])
        suggested = int(profile.other_label[i]) if status == Status.FLIP else -1
        cells = [(int(i), f"{status.name.lower()} {profile.own_cosine[i]:.2f}")]
        if status == Status.DUPLICATE:  # the copy it repeats first
            cells.append((int(profile.duplicate_of[i]), "copy of " + Path(paths[profile.duplicate_of[i]]).stem))
        cells += [(j, profile.identity_names[filed][:14]) for j in most_typical(filed)][:columns - len(cells)]
        if suggested >= 0:
            cells += [(j, "-> " + profile.identity_names[suggested][:11]) for j in most_typical(suggested)]
        cells += [(None, "")] * (columns - len(cells))
        for j, caption in cells:
            images.append(load_image(paths[j]) if j is not None else np.full((112, 112, 3), 255, np.uint8))
            captions.append(caption)
        rows.append({"image": str(paths[i]), "status": status.name, "filed": profile.identity_names[filed],
                     "suggested": profile.identity_names[suggested] if suggested >= 0 else None,
                     "own_cosine": float(profile.own_cosine[i]), "other_cosine": float(profile.other_cosine[i])})
    if images:
        write_image_grid(sheet, images, captions, columns=columns, tile=112,
                         title="flagged (status, own cosine) | its copy (duplicates) | filed identity's most typical "
                               "| suggested identity's (flips)")
    return {"sheet": str(sheet) if images else None, "flagged": rows}


def mean_std(values) -> str:
    values = np.asarray(values, dtype=float)
    return f"{values.mean():.3f} ± {values.std():.3f}" if len(values) > 1 else f"{values.mean():.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/facesphere-cache"))
    parser.add_argument("--sheet", type=Path, default=Path("/tmp/facesphere-results/glint_flagged.png"))
    parser.add_argument("--min-images", type=int, default=10)
    parser.add_argument("--cap", type=int, default=40)
    parser.add_argument("--far", type=float, default=1e-3)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--k", type=int, default=10, help="neighbours of cleanlab's kNN vote")
    parser.add_argument("--embed-only", action="store_true")
    args = parser.parse_args()
    setup_logging()

    embedder = load_embedder(model_folder(args.cache))
    cache = EmbeddingCache(args.cache, embedder)
    paths, labels, names, pool, (p1, p2, same) = lfw_sets(args.min_images, args.cap)
    k_max = max(int(round(r / 2 * len(paths) / (1 - r / 2))) for r in RATES)
    pool = pool[: max(k_max, min(len(pool), 2 * k_max))]
    logger.info("clean set %d images of %d identities; outlier pool %d; calibration %d pairs",
                len(paths), len(names), len(pool), len(same))
    for group in (paths, pool, p1 + p2):
        cache.get(group)
    if args.embed_only:
        return
    threshold = calibrate(cache, (p1, p2, same), args.far)
    logger.info("threshold %.4f at FAR %g (measured %.2g, TAR %s) on %s", threshold.value, args.far,
                threshold.measured_far, threshold.measured_tar, threshold.calibration_pairs)
    clean, outlier_pool = cache.get(paths), cache.get(pool)
    # the "clean" set's own noise (real LFW label errors, repeated photos) before anything is injected
    before = profile_embeddings(clean, labels, threshold.value, far=args.far, model=threshold.model, identity_names=names)
    suspect = before.status != Status.CLEAN
    before_rows = [{"image": f"{paths[i].parent.name}/{paths[i].name}", "status": Status(int(before.status[i])).name,
                    "own_cosine": float(before.own_cosine[i]), "other_cosine": float(before.other_cosine[i]),
                    "suggested": names[before.other_label[i]] if before.status[i] == Status.FLIP else None,
                    "duplicate_of": paths[before.duplicate_of[i]].name if before.duplicate_of[i] >= 0 else None}
                   for i in np.flatnonzero(suspect)]

    runs, diagnostics = [], {}
    for rate in RATES:
        for seed in range(args.seeds):
            noise = inject_noise(labels, len(names), rate / 2, rate / 2, len(pool), seed=seed)
            embeddings = np.concatenate([clean, outlier_pool[noise.outliers]])
            detectors, profile = run_detectors(embeddings, noise.labels, threshold, names, args.k)
            for method, (flagged, suggested, extra) in detectors.items():
                if "status" in extra:  # the kind it names: an outlier called a flip gets a wrong identity suggested
                    status = extra.pop("status")
                    for truth, called in ((Status.OUTLIER, Status.FLIP), (Status.FLIP, Status.OUTLIER)):
                        extra[f"{truth.name.lower()}s_called_{called.name.lower()}"] = float(
                            ((noise.kind == truth) & (status == called)).sum() / max(1, (noise.kind == truth).sum()))
                if "quality" in extra:  # cleanlab's ranking alone: are the |injected| lowest-quality images the noise?
                    quality = extra.pop("quality")
                    worst = np.argsort(quality, kind="stable")[:int((noise.kind != Status.CLEAN).sum())]
                    extra["precision_of_lowest_quality"] = float((noise.kind[worst] != Status.CLEAN).mean())
                runs.append({"rate": rate, "seed": seed, "method": method, **extra,
                             **score(flagged, noise.kind, suggested, noise.true_labels,
                                     np.concatenate([suspect, np.zeros(len(noise.outliers), bool)]))})
                logger.info("rate %.2f seed %d %-16s P %.3f R %.3f", rate, seed, method, runs[-1]["precision"],
                            runs[-1]["recall"])
            if seed == 0:
                diagnostics[str(rate)] = {
                    "what_if": what_if(profile, noise.kind, threshold.value),
                    "cosine_quantiles": cosine_quantiles(profile, noise.kind),
                    "flips_called_outlier": int(((noise.kind == Status.FLIP) & (profile.status == Status.OUTLIER)).sum()),
                    "outliers_called_flip": int(((noise.kind == Status.OUTLIER) & (profile.status == Status.FLIP)).sum()),
                    "duplicates_flagged": int((profile.status == Status.DUPLICATE).sum()),
                    "identities_with_two_centres": int((profile.identity_centres > 1).sum()),
                    **two_centre_check(profile, noise.kind)}

    # the whole path a user takes: the folder read by facesphere, embedded (no flip, as calibrated) and profiled
    glint_profile = profile_set(GLINT, model_folder(args.cache), threshold, args.cache / "glint_profile", flip=False,
                                progress=False)
    glint = {"summary": glint_profile.summary(),
             **glint_sheet(glint_profile, [Path(s) for s in glint_profile.sources], args.sheet)}

    setup = {"clean_set": f"LFW identities with >= {args.min_images} images, first {args.cap} images each by file name",
             "clean_images": len(paths), "identities": len(names), "outlier_pool": len(pool),
             "outlier_pool_rule": "LFW people with one image absent from pairs.txt",
             "calibration": "pairs.txt pairs whose two people are outside the clean set", "k": args.k,
             "threshold": threshold.model_dump(), "seeds": args.seeds, "model_folder": str(model_folder(args.cache)),
             "embedding": "unit embeddings, no flip augmentation", "cache": str(cache.path),
             "glint": f"profile_set on {GLINT} (flip=False), profile saved to {args.cache / 'glint_profile'}"}
    write_results("noise_detection", {"setup": setup, "flagged_before_injection": before_rows, "runs": runs,
                                      "diagnostics": diagnostics, "glint": glint},
                  render(setup, runs, diagnostics, glint, before_rows))


def render(setup: dict, runs: list[dict], diagnostics: dict, glint: dict, before: list[dict]) -> str:
    t = setup["threshold"]
    text = [f"Clean set: {setup['clean_set']} ({setup['clean_images']} images, {setup['identities']} identities); "
            f"outliers from {setup['outlier_pool_rule']} ({setup['outlier_pool']}). Threshold {t['value']:.4f} "
            f"at FAR {t['target_far']:g} (measured {t['measured_far']:.2g}, TAR {t['measured_tar']}) from "
            f"{setup['calibration']} ({t['calibration_pairs']}). Noise = half flips, half outliers; "
            f"{setup['seeds']} seeds, mean ± std. cleanlab: confident learning on a {setup['k']}-NN vote.\n"]
    rows, kinds = [], []
    for rate in RATES:
        for method in ("facesphere", "cleanlab_knn", "centre_distance"):
            sel = [r for r in runs if r["rate"] == rate and r["method"] == method]
            if not sel:
                continue
            rows.append([f"{rate:.0%}", method, mean_std([r["precision"] for r in sel]),
                         mean_std([r["recall"] for r in sel]), f"{np.mean([r['flagged'] for r in sel]):.0f}",
                         f"{np.mean([r['noisy'] for r in sel]):.0f}",
                         f"{np.mean([r['false_positives'] for r in sel]):.1f} "
                         f"({np.mean([r['false_positives_flagged_before_injection'] for r in sel]):.1f})"])
            kinds.append([f"{rate:.0%}", method, mean_std([r["flip_recall"] for r in sel]),
                          mean_std([r["outlier_recall"] for r in sel]),
                          mean_std([r["flip_identity_correct"] for r in sel]) if "flip_identity_correct" in sel[0]
                          else "n/a",
                          mean_std([r["outliers_called_flip"] for r in sel]) if "outliers_called_flip" in sel[0]
                          else "n/a"])
    text += [f"Before injection the profiler already flags {len(before)} images of the clean set (real LFW label "
             "errors and repeated photos, listed below); flagging them counts against precision here.\n",
             "## Precision and recall",
             markdown_table(["noise", "method", "precision", "recall", "flagged", "injected",
                             "false positives (of them flagged before injection)"], rows),
             "\n## Recall per kind", markdown_table(["noise", "method", "flip recall", "outlier recall",
                                                     "flip -> true identity", "outliers called flip"], kinds),
             "\ncleanlab's label quality as a ranking alone (given the true noise count): precision of the "
             "|injected| lowest-quality images: " + ", ".join(
                 f"{rate:.0%} {mean_std([r['precision_of_lowest_quality'] for r in runs if r['rate'] == rate and 'precision_of_lowest_quality' in r])}"
                 for rate in RATES)]
    for rate, d in diagnostics.items():
        text += [f"\n## facesphere's rules with the cut moved (noise {float(rate):.0%}, seed 0)",
                 f"flips called outlier {d['flips_called_outlier']}, outliers called flip {d['outliers_called_flip']}, "
                 f"duplicates {d['duplicates_flagged']}, identities with two centres "
                 f"{d['identities_with_two_centres']} ({d['two_centre_images']} images, {d['two_centre_injected']} "
                 f"injected, {d['two_centre_injected_flagged']} of them flagged)",
                 markdown_table(["flip cut", "outlier cut", "precision", "recall", "flip recall", "outlier recall",
                                 "outliers called flip", "flips called outlier"],
                                [[r["flip_cut"], r["outlier_cut"], f"{r['precision']:.3f}",
                                  f"{r['recall']:.3f}", f"{r['flip_recall']:.3f}", f"{r['outlier_recall']:.3f}",
                                  r["outliers_called_flip"], r["flips_called_outlier"]]
                                 for r in d["what_if"]])]
    q = next(iter(diagnostics.values()))["cosine_quantiles"] if diagnostics else {}
    if q:
        text += ["\n## Cosine quantiles (1, 5, 50, 95, 99 %) by injected kind (lowest noise rate, seed 0)",
                 markdown_table(["kind / cosine", "quantiles"], [[k, v] for k, v in q.items()])]
    text += ["\n## Flagged in the LFW clean set before injection",
             markdown_table(["image", "status", "own cos", "other cos", "suggested / duplicate of"],
                            [[r["image"], r["status"], f"{r['own_cosine']:.3f}", f"{r['other_cosine']:.3f}",
                              r["suggested"] or r["duplicate_of"] or ""] for r in before])]
    s = glint["summary"]
    text += ["\n## Glint360K celebrity subset", f"{s['images']} images, {s['identities']} identities: "
             f"flips {s['flip']} ({s['flip_rate']:.1%}), outliers {s['outlier']} ({s['outlier_rate']:.1%}), "
             f"duplicates {s['duplicate']} ({s['duplicate_rate']:.1%}). Contact sheet (not committed: derived "
             f"research images): `{glint['sheet']}`",
             markdown_table(["image", "status", "filed", "suggested", "own cos", "other cos"],
                            [[Path(r["image"]).parent.name + "/" + Path(r["image"]).name, r["status"], r["filed"],
                              r["suggested"] or "", f"{r['own_cosine']:.3f}", f"{r['other_cosine']:.3f}"]
                             for r in glint["flagged"]])]
    return "\n".join(text)


if __name__ == "__main__":
    main()
