"""Where noise profiling's cuts come from, measured on real faces (LFW 112x112, imported MobileFaceNet y1).

1. Is the verification threshold T (image-to-image, calibrated at FAR 1e-3 on every pair of the sample) the right
   cut for the image-to-centre cosines profiling compares with it? Measured: the share of genuine images at or
   above T against a single other photo of their identity (TAR) and against their identity's leave-one-out centre;
   the share of (image, other identity's centre) pairs at or above T (the per-centre false accept rate), beside
   the image-to-image FAR.
2. The duplicate cut: cosines of an image and its near copies (JPEG re-encoded at quality 75 and 95, shifted by
   one pixel, downscaled to 100x100 and back) against the highest cosines of distinct photos of one person.

    python benchmarks/noise_profile_thresholds.py [--identities 120] [--per-identity 6] [--copies 120] [--threads 1]
"""

from __future__ import annotations

import argparse
import io
import logging
import tempfile
from pathlib import Path

import cv2
import numpy as np
from _common import DATA, markdown_table, setup_logging, write_results
from PIL import Image

logger = logging.getLogger("noise_profile_thresholds")
FAR = 1e-3


def _jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))


def _shift(image: np.ndarray) -> np.ndarray:
    return np.concatenate([image[:, :1], image[:, :-1]], axis=1)  # one pixel right, edge column repeated


def _rescale(image: np.ndarray) -> np.ndarray:
    small = cv2.resize(image, (100, 100), interpolation=cv2.INTER_AREA)
    return cv2.resize(small, image.shape[1::-1], interpolation=cv2.INTER_LINEAR)


COPIES = {"jpeg q75": lambda x: _jpeg(x, 75), "jpeg q95": lambda x: _jpeg(x, 95), "1-pixel shift": _shift,
          "100x100 and back": _rescale}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--identities", type=int, default=120)
    parser.add_argument("--per-identity", type=int, default=6)
    parser.add_argument("--min-images", type=int, default=6)
    parser.add_argument("--copies", type=int, default=120)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the figures are cosines, not speed)")
    args = parser.parse_args()
    setup_logging()
    import torch

    torch.set_num_threads(args.threads)
    from facesphere.cleaning.sources import open_labelled_set
    from facesphere.models import import_weights
    from facesphere.models.runs import load_embedder
    from facesphere.models.store import save_model
    from facesphere.pipeline.threshold import calibrate_threshold
    from facesphere.utils.roc import decide

    root = DATA / "data" / "lfw_112x112" / "lfw-112X112"
    with tempfile.TemporaryDirectory() as tmp:
        save_model(Path(tmp) / "y1", *import_weights(DATA / "weights" / "mobilefacenet_insightface_y1"))
        embedder = load_embedder(Path(tmp) / "y1")
    folders = [f for f in sorted(root.iterdir()) if len(list(f.glob("*.jpg"))) >= args.min_images][:args.identities]
    paths, labels = [], []
    for label, folder in enumerate(folders):
        files = sorted(folder.glob("*.jpg"))[:args.per_identity]
        paths += files
        labels += [label] * len(files)
    labels = np.array(labels)
    dataset, _ = open_labelled_set(root, tuple(embedder.card.input_size))
    load = {str(p): i for i, p in enumerate(dataset.paths)}
    images = [dataset.load_uint8(load[str(p)]) for p in paths]
    logger.info("embedding %d images of %d identities", len(images), len(folders))
    emb = embedder.embed(images, flip=True)
    cos = emb @ emb.T
    upper = np.triu_indices(len(emb), 1)
    same = labels[upper[0]] == labels[upper[1]]
    scores = cos[upper]
    threshold = calibrate_threshold(scores, same, FAR, embedder.card.name, embedder.card.embedding_size).value
    sums = np.zeros((len(folders), emb.shape[1]))
    np.add.at(sums, labels, emb)
    own_sum = sums[labels] - emb  # leave-one-out
    own = np.einsum("ij,ij->i", emb, own_sum) / np.linalg.norm(own_sum, axis=1)
    centres = sums / np.linalg.norm(sums, axis=1, keepdims=True)
    to_centres = emb @ centres.T
    other = np.ones_like(to_centres, dtype=bool)
    other[np.arange(len(emb)), labels] = False
    figures = {
        "threshold": float(threshold), "far": FAR, "images": len(emb), "identities": len(folders),
        "image_pairs": {"genuine": int(same.sum()), "impostor": int((~same).sum())},
        "tar_image_to_image": float(decide(scores[same], threshold).mean()),
        "far_image_to_image": float(decide(scores[~same], threshold).mean()),
        "tar_image_to_own_centre_loo": float(decide(own, threshold).mean()),
        "far_image_to_other_centre": float(decide(to_centres[other], threshold).mean()),
        "images_with_some_other_centre_above": float(decide(np.where(other, to_centres, -1).max(1), threshold).mean()),
        "genuine_image_to_image_quantiles": np.quantile(scores[same], [0.01, 0.5, 0.99]).tolist(),
        "own_centre_loo_quantiles": np.quantile(own, [0.01, 0.5, 0.99]).tolist(),
        "impostor_image_to_image_quantiles": np.quantile(scores[~same], [0.5, 0.999, 1.0]).tolist(),
        "other_centre_quantiles": np.quantile(to_centres[other], [0.5, 0.999, 1.0]).tolist(),
    }
    picks = np.random.default_rng(0).choice(len(images), min(args.copies, len(images)), replace=False)
    copies = {}
    for name, make in COPIES.items():
        copied = embedder.embed([make(images[i]) for i in picks], flip=True)
        values = np.einsum("ij,ij->i", copied, emb[picks])
        copies[name] = {"min": float(values.min()), "p01": float(np.quantile(values, 0.01)), "median": float(np.median(values))}
    distinct = np.sort(scores[same])[::-1]
    figures["near_copies"] = copies
    figures["distinct_same_person"] = {"max": float(distinct[0]), "p999": float(np.quantile(scores[same], 0.999)),
                                       "top5": distinct[:5].tolist()}
    rows = [["genuine image vs one photo of its identity (TAR at T)", f"{figures['tar_image_to_image']:.3f}"],
            ["genuine image vs its identity's leave-one-out centre (share >= T)", f"{figures['tar_image_to_own_centre_loo']:.3f}"],
            ["impostor image vs one photo (FAR at T)", f"{figures['far_image_to_image']:.2e}"],
            ["image vs another identity's centre (share >= T)", f"{figures['far_image_to_other_centre']:.2e}"],
            ["images with some other centre >= T", f"{figures['images_with_some_other_centre_above']:.3f}"]]
    copy_rows = [[name, f"{v['min']:.4f}", f"{v['p01']:.4f}", f"{v['median']:.4f}"] for name, v in copies.items()]
    copy_rows.append(["distinct photos of one person: max / p99.9", f"{distinct[0]:.4f}",
                      f"{figures['distinct_same_person']['p999']:.4f}", ""])
    write_results("noise_profile_thresholds", figures,
                  f"T = {threshold:.4f} (FAR {FAR:g} over all pairs of {len(emb)} LFW images of {len(folders)} people, "
                  f"MobileFaceNet y1, flip-sum).\n\n" + markdown_table(["comparison", "rate"], rows) +
                  "\n\nCosine of an image and its near copy:\n\n" + markdown_table(["copy", "min", "1st percentile", "median"], copy_rows))


if __name__ == "__main__":
    main()
