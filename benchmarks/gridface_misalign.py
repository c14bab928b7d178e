"""What misalignment costs the imported MobileFaceNet (y1), and what re-aligning or a rectifier recovers.

Two kinds of misaligned input (arXiv 1808.06210 motivates GridFace with both):

* **LFW, jittered**: the 112x112 ArcFace-aligned LFW pair images, each warped by a random similarity + perspective
  homography (``facesphere.data.misalign``) at the strengths mild / medium / strong, seeded per (seed, strength,
  image), and scored with the official 10-fold protocol (``pairs.txt``) beside the clean crops.
* **Box-only crops**: RetinaFace (MobileNet-0.25) on the raw CACD-VS fold-1 and FG-NET photos, the largest face cut
  as a square from its box (``facesphere.align.boxcrop.box_crop``, no landmarks), against the crops aligned from the
  same detection's 5 points (the reference; FG-NET also from its manual 68 points), with the cross-age protocols
  of ``facesphere.evaluate.age`` (CACD-VS 10-fold, FG-NET leave-one-image-out rank-1 and cross-age verification).

Columns (embedder: y1, flip off, batch inference):

* ``y1``: the crops as they are;
* ``y1 + re-detect``: the practical baseline on the jittered LFW crops: each crop, padded by ``PAD`` px on every side
  (edges replicated, as the jitter fills its border), goes through RetinaFace and, when a face is found, is
  re-aligned from the detected 5 points onto the template (``FaceAnalyzer.align_largest``); when none is found, the
  jittered crop is embedded as it is (the share is reported);
* ``--rectifier NAME=PATH``: the crops through the rectifier of a stored gridface / stn model (its ``.rectifier``;
  samples with a degenerate cell stay un-rectified and are counted), then y1;
* ``--model NAME=PATH``: a whole stored model (e.g. an end-to-end GridFace) as the embedder.

The box-crop geometry is measured too: the least-squares scale and the mean offset between the box crop's
detected 5 points and the ArcFace 112x112 template (``BOX_CROP_SCALE`` comes from it).

Baseline embeddings are cached under ``--work`` (outside the repository: research data), so re-running with new
rectifiers only embeds their columns.

    python benchmarks/gridface_misalign.py [--work /tmp/facesphere-misalign] [--rectifier NAME=PATH ...]
        [--model NAME=PATH ...] [--seed 0] [--skip-lfw] [--skip-box] [--batch-size 64]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import torch
from _common import DATA, markdown_table, setup_logging, write_results
from oe_cnn_fgnet import CACD, FGNET, RETINAFACE, Y1, cached_array

from facesphere.align.boxcrop import BOX_CROP_SCALE, box_crop
from facesphere.align.similarity import align_faces, umeyama
from facesphere.align.templates import ARCFACE_POINTS_112
from facesphere.backbones.fuse import fuse_batchnorm
from facesphere.data.images import load_image, to_tensor, to_uint8
from facesphere.data.misalign import MISALIGN_STRENGTHS, misalign
from facesphere.detect import build_detector
from facesphere.evaluate.age import (evaluate_cacd_vs, fgnet_identification, fgnet_loader, fgnet_verification,
                                     parse_cacd_vs, parse_fgnet)
from facesphere.evaluate.pairset_eval import evaluate_pairset
from facesphere.evaluate.pairsets import PairSet
from facesphere.models.runs import load_backbone, load_embedder
from facesphere.pipeline.analyzer import FaceAnalyzer
from facesphere.utils.files import atomic_write_text
from facesphere.utils.allocator import tune_malloc

logger = logging.getLogger("gridface_misalign")

LFW = DATA / "data/lfw_112x112/lfw-112X112"
PAIRS = DATA / "data/lfw_meta/facenet/data/pairs.txt"
CONDITIONS = ("clean", *MISALIGN_STRENGTHS)
PAD = 24
"""Pixels added on each side of a 112x112 crop before re-detection: RetinaFace needs some context around a face."""
PHOTO_CANVAS = {"cacd": None, "fgnet": (320, 320)}
"""Detector canvas per photo set: CACD-VS photos (250x250) at their own size, FG-NET's (up to 676x517) letterboxed
into 320x320 (its faces fill a large part of the photo; this keeps detection cheap on 2 shared cores)."""


# ---------------------------------------------------------------- helpers

def misaligned(crops: np.ndarray, condition: str, seed: int) -> np.ndarray:
    """The crops jittered at ``condition`` (clean: unchanged); image i's jitter is seeded by (seed, strength, i)."""
    if condition == "clean":
        return crops
    level = list(MISALIGN_STRENGTHS).index(condition)
    strength = MISALIGN_STRENGTHS[condition]
    return np.stack([misalign(crop, strength, np.random.default_rng([seed, level, i])) for i, crop in enumerate(crops)])


def largest(found) -> int | None:
    if len(found.boxes) == 0:
        return None
    return int(np.argmax((found.boxes[:, 2] - found.boxes[:, 0]) * (found.boxes[:, 3] - found.boxes[:, 1])))


class Timer:
    """Seconds per stage in this run (``seconds``), and per stage as measured by the run that filled the cache
    (``measured``, kept in ``path``): a re-run from the cache still reports what the cached stages cost."""

    def __init__(self, path: Path) -> None:
        self.path, self.seconds = path, {}
        self.measured: dict[str, float] = json.loads(path.read_text()) if path.is_file() else {}

    def add(self, key: str, started: float) -> None:
        self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - started
        self.measured[key] = self.seconds[key]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, json.dumps(self.measured, indent=1))


def redetect_align(crops: np.ndarray, analyzer: FaceAnalyzer, batch: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(re-aligned crops, found (N,) bool): each crop padded by PAD px (edges replicated), RetinaFace + 5-point
    alignment of the largest face; a crop with no face found is returned unchanged."""
    out, found = crops.copy(), np.zeros(len(crops), dtype=bool)
    for start in range(0, len(crops), batch):
        padded = [cv2.copyMakeBorder(c, PAD, PAD, PAD, PAD, cv2.BORDER_REPLICATE) for c in crops[start:start + batch]]
        for k, result in enumerate(analyzer.analyze(padded, embed=False)):
            if result.faces:
                out[start + k], found[start + k] = result.faces[0].crop, True
    return out, found


class Rectifier:
    """uint8 crops -> uint8 crops through a stored gridface / stn model's ``.rectifier`` (eval mode); a sample with
    a degenerate cell stays un-rectified (the GridFace eval rule) and is counted in ``degenerate``."""

    def __init__(self, path: Path) -> None:
        from facesphere.backbones.rectifier import degenerate_cells

        backbone, card, _ = load_backbone(path)
        if not hasattr(backbone, "rectifier"):
            raise SystemExit(f"{path}: a {card.backbone} model has no rectifier")
        self.module, self.grid, self.size = backbone.rectifier.eval(), backbone.grid, tuple(card.input_size)
        self._degenerate = degenerate_cells
        self.degenerate = 0

    @torch.inference_mode()
    def __call__(self, crops: np.ndarray, batch: int = 64) -> np.ndarray:
        out = []
        for start in range(0, len(crops), batch):
            x = to_tensor(crops[start:start + batch])
            rectified, homographies = self.module(x)
            bad = self._degenerate(homographies, self.grid, self.size).any(dim=1)
            self.degenerate += int(bad.sum())
            out.append(to_uint8(torch.where(bad[:, None, None, None], x, rectified)))
        return np.concatenate(out)


def fast(embedder):
    """The embedder with BatchNorm folded into the convolutions (exact, ``fuse_batchnorm``) and channels-last
    weights: the same embeddings (to ~1e-6) about twice as fast on this CPU."""
    if hasattr(embedder, "backbone"):
        embedder.backbone = fuse_batchnorm(embedder.backbone).eval().to(memory_format=torch.channels_last)
    return embedder


def parse_named(values: list[str], what: str) -> dict[str, Path]:
    named = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"--{what} takes NAME=PATH, got {value!r}")
        if not Path(path).exists():
            raise SystemExit(f"--{what} {name}: {path} does not exist")
        named[name] = Path(path)
    return named


# ---------------------------------------------------------------- LFW

def subset_pairs(ps: PairSet, per_fold: int) -> PairSet:
    """The first ``per_fold`` // 2 genuine and impostor pairs of every fold (a quick check of the script)."""
    keep = np.concatenate([np.flatnonzero((ps.folds == f) & (ps.same == same))[: per_fold // 2]
                           for f in np.unique(ps.folds) for same in (True, False)])
    used = np.unique(np.r_[ps.left[keep], ps.right[keep]])
    slot = {int(old): new for new, old in enumerate(used)}
    return PairSet(ps.name, [ps.images[i] for i in used], np.array([slot[int(i)] for i in ps.left[keep]]),
                   np.array([slot[int(i)] for i in ps.right[keep]]), ps.same[keep], ps.folds[keep])

def lfw_results(args, embed: Callable[[np.ndarray], np.ndarray], rectifiers: dict, models: dict, timer: Timer,
                save: Callable[[], None], out: dict) -> None:
    ps = PairSet.from_lfw(PAIRS, LFW)
    if args.pairs_per_fold:
        ps = subset_pairs(ps, args.pairs_per_fold)
    started = time.perf_counter()
    clean = np.stack([load_image(p) for p in ps.images])
    timer.add("lfw load", started)
    detector = build_detector("retinaface", RETINAFACE, input_size=None, batch_size=args.batch_size)
    detector.model.to(memory_format=torch.channels_last)
    analyzer = FaceAnalyzer(detector, alignment="arcface_112x112")
    cache = args.work / "cache" / (f"lfw_first{args.pairs_per_fold}" if args.pairs_per_fold else "lfw")
    out.update(num_images=len(ps.images), num_pairs=len(ps), pad=PAD, columns={})

    def score(column: str, condition: str, embeddings: np.ndarray, **extra) -> None:
        report = evaluate_pairset(None, ps, embeddings=embeddings, flip="none")
        out["columns"].setdefault(column, {})[condition] = {
            "accuracy_mean": report["accuracy_mean"], "accuracy_std": report["accuracy_std"],
            "val_at_far_1e-3": report["val_at_far"]["val_mean"], **extra}

    for condition in ("clean", "medium", "strong", "mild"):  # the goal (medium) first
        started = time.perf_counter()
        crops = misaligned(clean, condition, args.seed)
        timer.add("lfw misalign", started)

        def y1():
            started = time.perf_counter()
            value = {"embeddings": embed(crops)}
            timer.add("lfw y1 embed", started)
            return value

        score("y1", condition, cached_array(cache / f"y1_{condition}_s{args.seed}.npz", y1)["embeddings"])
        if condition != "clean":
            def realigned():
                started = time.perf_counter()
                again, found = redetect_align(crops, analyzer, args.batch_size)
                timer.add("lfw re-detect + align", started)
                started = time.perf_counter()
                value = {"embeddings": embed(again), "found": found}
                timer.add("lfw y1 embed", started)
                return value

            value = cached_array(cache / f"redetect_{condition}_s{args.seed}_pad{PAD}.npz", realigned)
            score("y1 + re-detect", condition, value["embeddings"], no_face_share=float(1 - value["found"].mean()))
        for name, rectifier in rectifiers.items():
            started = time.perf_counter()
            rectifier.degenerate = 0
            rectified = rectifier(crops, args.batch_size)
            timer.add(f"lfw rectifier {name}", started)
            score(f"y1 + {name}", condition, embed(rectified), degenerate=rectifier.degenerate)
        for name, model in models.items():
            started = time.perf_counter()
            score(name, condition, model.embed(crops, flip=False, batch_size=args.batch_size))
            timer.add(f"lfw model {name}", started)
        logger.info("LFW %s done", condition)
        save()


# ---------------------------------------------------------------- box crops

def detect_photos(kind: str, paths: list[Path], cache: Path, timer: Timer, batch: int) -> dict[str, np.ndarray]:
    """RetinaFace's largest face per photo: boxes (N, 4), landmarks (N, 5, 2), found (N,) (cached)."""

    def build():
        detector = build_detector("retinaface", RETINAFACE, input_size=PHOTO_CANVAS[kind], batch_size=batch)
        detector.model.to(memory_format=torch.channels_last)
        boxes, points, found = np.zeros((len(paths), 4)), np.zeros((len(paths), 5, 2)), np.zeros(len(paths), bool)
        started = time.perf_counter()
        for start in range(0, len(paths), batch):
            chunk = [load_image(p) for p in paths[start:start + batch]]
            for k, result in enumerate(detector.detect(chunk)):
                best = largest(result)
                if best is not None:
                    boxes[start + k], points[start + k], found[start + k] = (result.boxes[best, :4],
                                                                              result.landmarks[best], True)
        timer.add(f"{kind} detect", started)
        return {"boxes": boxes, "landmarks": points, "found": found}

    return cached_array(cache / f"detections_{kind}.npz", build)


def photo_crops(paths: list[Path], det: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """aligned (5-point) and box-only crops of every photo; no face found: the centre square (counted)."""
    aligned, boxed = [], []
    for path, box, points, found in zip(paths, det["boxes"], det["landmarks"], det["found"]):
        image = load_image(path)
        if not found:
            h, w = image.shape[:2]
            side = 0.6 * min(h, w)
            box = np.array([(w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2])
            aligned.append(box_crop(image, box))
        else:
            aligned.append(align_faces(image, points[None])[0])
        boxed.append(box_crop(image, box))
    return {"aligned": np.stack(aligned), "box": np.stack(boxed)}


def box_geometry(det: dict[str, np.ndarray]) -> dict:
    """Least-squares s with template ≈ 112/s * (points - box centre)/side + centre, and the mean residual (px)."""
    b, pts = det["boxes"][det["found"]], det["landmarks"][det["found"]]
    side = np.maximum(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1])[:, None, None]
    centre = np.stack([(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2], axis=1)[:, None]
    u, v = (pts - centre) / side, ARCFACE_POINTS_112[None] - 55.5
    a = float((u * v).sum() / (u * u).sum())
    residual = v - a * u
    # per face: the similarity taking the box crop to the template crop (what a re-alignment would undo)
    in_crop = (pts - centre) / (BOX_CROP_SCALE * side) * 112 + 55.5
    sims = [umeyama(p, ARCFACE_POINTS_112) for p in in_crop]
    angle = np.degrees([abs(np.arctan2(m[1, 0], m[0, 0])) for m in sims])
    log_scale = np.abs(np.log([np.hypot(m[0, 0], m[1, 0]) for m in sims]))
    centre_shift = np.array([np.linalg.norm(m[:2, :2] @ [55.5, 55.5] + m[:2, 2] - 55.5) / 112 for m in sims])
    measures = (("rotation_deg", angle), ("abs_log_scale", log_scale), ("centre_shift_share", centre_shift))
    spread = {name: {"median": float(np.median(x)), "p90": float(np.percentile(x, 90))} for name, x in measures}
    return {"faces": int(len(b)), "scale": 112.0 / a, "mean_offset_px": residual.mean(axis=(0, 1)).round(2).tolist(),
            "rms_residual_px": float(np.sqrt((residual ** 2).sum(-1).mean())), "box_to_template": spread}


def box_results(args, embed, rectifiers: dict, models: dict, timer: Timer, save: Callable[[], None], out: dict) -> None:
    cache = args.work / "cache"
    cacd_paths = list(parse_cacd_vs(CACD).images)
    fgnet_images = parse_fgnet(FGNET)
    sets = {"cacd": cacd_paths, "fgnet": [im.path for im in fgnet_images]}
    out.update(box_crop_scale=BOX_CROP_SCALE, geometry={}, no_face={}, columns={})

    def scores(kind: str, embeddings: np.ndarray) -> dict:
        if kind == "cacd":
            report = evaluate_cacd_vs(None, CACD, embeddings=embeddings)
            return {"cacd_accuracy": report["accuracy_mean"], "cacd_std": report["accuracy_std"]}
        ident = fgnet_identification(None, FGNET, embeddings=embeddings)
        verif = fgnet_verification(None, FGNET, embeddings=embeddings)
        return {"fgnet_rank_1": ident["rank_1"], "fgnet_verification": verif["accuracy_mean"],
                "fgnet_verification_std": verif["accuracy_std"]}

    for kind, paths in sets.items():
        det = detect_photos(kind, paths, cache, timer, args.batch_size)
        out["geometry"][kind] = box_geometry(det)
        out["no_face"][kind] = int((~det["found"]).sum())
        started = time.perf_counter()
        crops = photo_crops(paths, det)
        if kind == "fgnet":
            load = fgnet_loader()
            crops["manual"] = np.stack([load(im) for im in fgnet_images])
        timer.add(f"{kind} crops", started)
        for crop_kind, images in crops.items():
            def y1():
                started = time.perf_counter()
                value = {"embeddings": embed(images)}
                timer.add(f"{kind} y1 embed", started)
                return value

            condition = {"aligned": "aligned (detected 5 points)", "box": "box-only",
                         "manual": "aligned (manual 68 points)"}[crop_kind]
            emb = cached_array(cache / f"{kind}_y1_{crop_kind}_scale{BOX_CROP_SCALE}.npz", y1)["embeddings"]
            out["columns"].setdefault("y1", {}).setdefault(condition, {}).update(scores(kind, emb))
            for name, rectifier in rectifiers.items():
                rectifier.degenerate = 0
                emb = embed(rectifier(images, args.batch_size))
                out["columns"].setdefault(f"y1 + {name}", {}).setdefault(condition, {}).update(
                    scores(kind, emb), **{f"{kind}_degenerate": rectifier.degenerate})
            for name, model in models.items():
                out["columns"].setdefault(name, {}).setdefault(condition, {}).update(
                    scores(kind, model.embed(images, flip=False, batch_size=args.batch_size)))
        logger.info("%s box crops done", kind)
        save()


# ---------------------------------------------------------------- report

def pct(value) -> str:
    return "" if value is None else f"{100 * value:.2f}"


def geometry_line(g: dict) -> str:
    spread = ", ".join(f"{name} median {v['median']:.3f} / p90 {v['p90']:.3f}" for name, v in g["box_to_template"].items())
    return (f"{g['faces']} faces, least-squares scale {g['scale']:.3f}, mean offset (x, y) {g['mean_offset_px']} px, "
            f"rms residual {g['rms_residual_px']:.1f} px; per face, the similarity from box crop to template: {spread}")


def tables(results: dict) -> str:
    parts = []
    lfw = results.get("lfw")
    if lfw and lfw.get("columns", {}).get("y1"):
        rows = []
        clean = lfw["columns"]["y1"]["clean"]["accuracy_mean"]
        for column, by_condition in lfw["columns"].items():
            row = [column]
            for condition in CONDITIONS:
                cell = by_condition.get(condition)
                row.append("—" if cell is None else f"{pct(cell['accuracy_mean'])} ± {pct(cell['accuracy_std'])}")
            medium = lfw["columns"]["y1"].get("medium", {}).get("accuracy_mean")
            mine = by_condition.get("medium", {}).get("accuracy_mean")
            lost = None if medium is None else clean - medium
            row.append("" if mine is None or not lost or lost <= 0 else f"{100 * (mine - medium) / lost:.0f} %")
            extra = [f"{c}: {100 * v['no_face_share']:.1f} %" for c, v in by_condition.items() if "no_face_share" in v]
            extra += [f"{c}: {v['degenerate']}" for c, v in by_condition.items() if v.get("degenerate")]
            row.append(", ".join(extra))
            rows.append(row)
        parts.append(f"**LFW 10-fold accuracy %** ({lfw['num_pairs']} pairs over {lfw['num_images']} distinct aligned "
                     f"images; each image jittered once per strength, seed {results['seed']}; flip off)\n\n"
                     + markdown_table(["column", *CONDITIONS, "medium loss recovered", "no face re-detected / "
                                       "degenerate samples"], rows))
    box = results.get("box")
    if box and box.get("columns"):
        rows = []
        for column, by_condition in box["columns"].items():
            for condition, cell in by_condition.items():
                rows.append([column, condition, pct(cell.get("cacd_accuracy")), pct(cell.get("fgnet_rank_1")),
                             pct(cell.get("fgnet_verification"))])
        no_face = ", ".join(f"{k} {v}" for k, v in box["no_face"].items())
        parts.append(f"**Box-only crops** (RetinaFace's largest face; box crop side = {box['box_crop_scale']} x the "
                     f"box's longer side, centred; photos with no face found: {no_face}, both crops then the centre "
                     f"square)\n\n" + markdown_table(["column", "crops", "CACD-VS 10-fold %", "FG-NET rank-1 %",
                                                     "FG-NET cross-age verification %"], rows))
        parts.append("Box crop vs template (the detected 5 points in the box crop against the ArcFace 112x112 "
                     "template):\n\n" + "\n".join(f"- {k}: {geometry_line(g)}" for k, g in box["geometry"].items())
                     + "\n- the jitter bounds, for comparison (uniform draws): " + "; ".join(
                         f"{k} rotation {v.rotation} deg, scale {v.scale}, shift {v.translate}, corners {v.perspective}"
                         for k, v in MISALIGN_STRENGTHS.items()))
    timing = ", ".join(f"{k} {v:.0f} s" for k, v in results["seconds"].items()) or "nothing"
    measured = ", ".join(f"{k} {v:.0f} s" for k, v in results["measured_seconds"].items())
    partial = "" if results.get("complete") else "**Partial results: the run had not finished.** "
    parts.append(f"{partial}Wall time {results['wall_seconds']:.0f} s on {results['threads']} threads (load average "
                 f"at the start {results['load_start']}, at the end {results['load_end']}); computed in this run: "
                 f"{timing}. Each stage as measured when it was computed (the cache under --work): {measured}.")
    return "\n\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/facesphere-misalign"))
    parser.add_argument("--rectifier", action="append", default=[], metavar="NAME=PATH")
    parser.add_argument("--model", action="append", default=[], metavar="NAME=PATH")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--pairs-per-fold", type=int, default=0, help="quick check: only this many LFW pairs per "
                        "fold (results then go to gridface_misalign_check.*, not for quoting)")
    parser.add_argument("--skip-lfw", action="store_true")
    parser.add_argument("--skip-box", action="store_true")
    args = parser.parse_args()
    setup_logging()
    tune_malloc()
    torch.set_num_threads(args.threads)
    rectifiers = {name: Rectifier(path) for name, path in parse_named(args.rectifier, "rectifier").items()}
    models = {name: fast(load_embedder(path)) for name, path in parse_named(args.model, "model").items()}
    started, load_start = time.perf_counter(), [round(x, 1) for x in os.getloadavg()]
    y1_folder = args.work / "y1"
    if not (y1_folder / "card.json").is_file():
        subprocess.run([sys.executable, "-m", "facesphere", "import", str(Y1), str(y1_folder)], check=True)
    y1 = fast(load_embedder(y1_folder))
    embed = lambda crops: y1.embed(crops, flip=False, batch_size=args.batch_size)  # noqa: E731
    timer = Timer(args.work / "cache" / ("timings_check.json" if args.pairs_per_fold else "timings.json"))
    results: dict = {"seed": args.seed, "threads": args.threads, "flip": False,
                     "strengths": {k: vars(v) for k, v in MISALIGN_STRENGTHS.items()},
                     "rectifiers": {k: str(v) for k, v in parse_named(args.rectifier, "rectifier").items()},
                     "models": {k: str(v) for k, v in parse_named(args.model, "model").items()}}

    def save(final: bool = False) -> None:
        results.update(seconds=timer.seconds, measured_seconds=timer.measured, complete=final,
                       wall_seconds=time.perf_counter() - started, load_start=load_start,
                       load_end=[round(x, 1) for x in os.getloadavg()])
        path = write_results("gridface_misalign_check" if args.pairs_per_fold else "gridface_misalign", results,
                             tables(results))
        logger.info("wrote %s", path)

    if not args.skip_box:
        box_results(args, embed, rectifiers, models, timer, save, results.setdefault("box", {}))
    if not args.skip_lfw:
        lfw_results(args, embed, rectifiers, models, timer, save, results.setdefault("lfw", {}))
    save(final=True)
    print(json.dumps({k: results[k] for k in ("wall_seconds", "seconds")}, indent=1))


if __name__ == "__main__":
    main()
