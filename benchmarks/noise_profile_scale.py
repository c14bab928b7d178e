"""Noise profiling at scale: images/s and peak memory of ``profile_embeddings`` on embeddings streamed from disk.

Synthetic set: C identity directions drawn uniformly on the unit sphere of dimension D (default 512, the
ArcFace/iResNet size; MobileFaceNet's 128 with ``--dim 128``), identity sizes Poisson (mean N/C), each image
its identity's direction plus isotropic noise of the same norm (image-to-image cosine ~0.5 within an identity,
~0 across). Injected so every code path runs, with the truth known: label flips (image filed under another
identity), outliers (a random direction of nobody), near-duplicates (a later image replaced by a copy of an
earlier one of the same chunk plus 1e-3 noise). The embeddings are written chunk by chunk into an
``EmbeddingStore`` by one process; a fresh process then profiles them, so its peak resident memory
(``ru_maxrss``) is profiling's alone, and is compared with the size of the full N x D float32 matrix. The
verification threshold is set in closed form so that an impostor passes it against some centre with
probability FAR = 1e-3 (FAR / C per centre: profiling compares each image with all C identities).

    python benchmarks/noise_profile_scale.py [--sizes 100000:10000 1000000:100000] [--dim 512] [--work /tmp/noise_scale]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from _common import markdown_table, setup_logging, write_results

logger = logging.getLogger("noise_profile_scale")

FAR = 1e-3
NOISE = 1.0  # relative norm of the per-image noise: image-to-image cosine 1 / (1 + NOISE^2) within an identity
CHUNK = 16384  # rows per store chunk: 32 MiB at 512-d, the unit profiling holds in memory


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _images(rng, directions: np.ndarray, labels: np.ndarray) -> np.ndarray:
    noise = rng.standard_normal((len(labels), directions.shape[1]), dtype=np.float32)
    return _unit(directions[labels] + NOISE * _unit(noise))


def generate(folder: Path, images: int, identities: int, dim: int, seed: int) -> None:
    """Write the store, the filed labels and the truth (kind per image, duplicate_of) into ``folder``."""
    from facesphere.cleaning.embedstore import HASH_DTYPE, EmbeddingStore
    from facesphere.cleaning.noise import Status
    from scipy import stats

    from facesphere.pipeline.threshold import Threshold

    rng = np.random.default_rng(seed)
    directions = _unit(rng.standard_normal((identities, dim), dtype=np.float32))
    true_labels = np.sort(rng.integers(0, identities, images))  # stored identity by identity, like a folder
    labels = true_labels.copy()
    kind = np.zeros(images, dtype=np.uint8)
    duplicate_of = np.full(images, -1, dtype=np.int64)
    injected = max(10, images // 1000)  # 0.1 % each
    picks = rng.choice(images, 3 * injected, replace=False)
    flips, outliers = picks[:injected], picks[injected:2 * injected]
    labels[flips] = (true_labels[flips] + rng.integers(1, identities, injected)) % identities
    kind[flips], kind[outliers] = Status.FLIP, Status.OUTLIER
    for later in np.sort(picks[2 * injected:]):  # a copy of an earlier image of the same chunk
        start = later - later % CHUNK
        if later > start and kind[later] == 0:
            duplicate_of[later] = rng.integers(start, later)
            kind[later] = Status.DUPLICATE
    store = EmbeddingStore.create(folder / "store", dim, {"synthetic": [images, identities, dim, seed]}, resume=False)
    for start in range(0, images, CHUNK):
        index = np.arange(start, min(start + CHUNK, images))
        rows = _images(rng, directions, true_labels[index])
        out = np.isin(index, outliers)
        rows[out] = _unit(rng.standard_normal((int(out.sum()), dim), dtype=np.float32))
        copies = np.flatnonzero(duplicate_of[index] >= 0)
        rows[copies] = _unit(rows[duplicate_of[index[copies]] - start] + 1e-3 * rng.standard_normal((len(copies), dim)))
        store.append(rows, np.ones(len(index), bool), np.zeros(len(index), HASH_DTYPE))
    store.finish()
    # An impostor's cosine to another identity's centre is that of a uniform random direction with a fixed one:
    # (cos + 1) / 2 ~ Beta((D-1)/2, (D-1)/2). Each image meets C centres, so the cut is set at FAR / C per centre.
    value = 2 * stats.beta.isf(FAR / identities, (dim - 1) / 2, (dim - 1) / 2) - 1
    threshold = Threshold(value=float(value), target_far=FAR / identities, model="synthetic", embedding_size=dim,
                          calibration_pairs={"genuine": 0, "impostor": 0}, measured_far=FAR / identities)
    np.savez(folder / "truth.npz", labels=labels, true_labels=true_labels, kind=kind, duplicate_of=duplicate_of)
    threshold.save(folder / "threshold.json")


def profile(folder: Path) -> dict:
    """Profile the store in this (fresh) process; the figures, with this process's peak resident memory."""
    import torch

    from facesphere.cleaning.embedstore import EmbeddingStore
    from facesphere.cleaning.noise import Status
    from facesphere.cleaning.profile import profile_embeddings
    from facesphere.pipeline.threshold import Threshold

    rss_imports = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    store = EmbeddingStore.open(folder / "store")
    truth = np.load(folder / "truth.npz")
    threshold = Threshold.load(folder / "threshold.json")
    start = time.perf_counter()
    result = profile_embeddings(store, truth["labels"], threshold.value, far=threshold.target_far, model="synthetic",
                                set_name=f"synthetic {len(store)}")
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    found = {}
    for status in (Status.FLIP, Status.OUTLIER, Status.DUPLICATE):
        flagged, injected = result.status == status, truth["kind"] == status
        hits = int((flagged & injected).sum())
        found[status.name.lower()] = {"injected": int(injected.sum()), "flagged": int(flagged.sum()), "correct": hits}
    caught = (truth["kind"] == Status.FLIP) & (result.status == Status.FLIP)
    found["flip"]["right_suggestion"] = int((result.other_label[caught] == truth["true_labels"][caught]).sum())
    return {"images": len(store), "identities": len(result.identity_names), "dim": store.dim,
            "threshold": threshold.value, "seconds": seconds, "images_per_s": len(store) / seconds,
            "peak_rss_bytes": peak, "rss_after_imports_bytes": rss_imports, "matrix_bytes": len(store) * store.dim * 4,
            "torch_threads": torch.get_num_threads(), "load_average": os.getloadavg(), "found": found,
            "identities_with_2_centres": int((result.identity_centres == 2).sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["100000:10000", "1000000:100000"],
                        help="images:identities per run, smallest first")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=Path("/tmp/noise_profile_scale"))
    parser.add_argument("--keep", action="store_true", help="keep the generated stores")
    parser.add_argument("--stage", choices=["generate", "profile"], help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--images", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--identities", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    setup_logging()
    if args.stage == "generate":
        generate(args.folder, args.images, args.identities, args.dim, args.seed)
        return
    if args.stage == "profile":
        print(json.dumps(profile(args.folder)))
        return
    runs = []
    for size in args.sizes:
        images, identities = (int(v) for v in size.split(":"))
        folder = args.work / f"n{images}_c{identities}_d{args.dim}"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        common = [sys.executable, __file__, "--folder", str(folder), "--dim", str(args.dim), "--seed", str(args.seed)]
        started = time.perf_counter()
        subprocess.run([*common, "--stage", "generate", "--images", str(images), "--identities", str(identities)], check=True)
        logger.info("generated %d x %d embeddings in %.0f s", images, args.dim, time.perf_counter() - started)
        done = subprocess.run([*common, "--stage", "profile"], check=True, capture_output=True, text=True)
        sys.stderr.write(done.stderr[-4000:])
        run = json.loads(done.stdout.strip().splitlines()[-1])
        runs.append(run)
        logger.info("%s", run)
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
        report(runs)  # after every run: a long run interrupted still leaves the ones before it


def report(runs: list[dict]) -> None:
    mib = 2 ** 20
    rows = [[f"{r['images']:,}", f"{r['identities']:,}", r["dim"], f"{r['images_per_s']:,.0f}", f"{r['seconds']:.0f}",
             f"{r['peak_rss_bytes'] / mib:,.0f}", f"{(r['peak_rss_bytes'] - r['rss_after_imports_bytes']) / mib:,.0f}",
             f"{r['matrix_bytes'] / mib:,.0f}",
             " ".join(f"{k} {v['correct']}/{v['injected']} ({v['flagged']} flagged)" for k, v in r["found"].items())]
            for r in runs]
    table = markdown_table(["images", "identities", "D", "images/s", "profiling s", "peak RSS MiB",
                            "peak − RSS after imports MiB", "N×D float32 MiB", "injected noise found"], rows)
    write_results("noise_profile_scale", {"runs": runs, "far": FAR, "noise": NOISE, "chunk": CHUNK},
                  "Noise profiling from embeddings on disk (synthetic identities; one process per run). The machine "
                  "is shared: see each run's load_average (1, 5, 15 min) at the end of profiling in the JSON.\n\n" + table)


if __name__ == "__main__":
    main()
