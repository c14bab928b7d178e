"""A verification threshold calibrated on pairs of already-aligned face crops (no detector), for profiling sets
of aligned crops (LFW 112x112, RecordIO packs) with the threshold of the same kind of input."""

from __future__ import annotations

import logging
import os

import numpy as np

from facesphere.evaluate.embeddings import cosine_scores
from facesphere.evaluate.pairsets import PairSet
from facesphere.pipeline.threshold import Threshold, calibrate_threshold

logger = logging.getLogger(__name__)

__all__ = ["calibrate_aligned"]


def calibrate_aligned(pairs: str | os.PathLike, model: str | os.PathLike, far: float, *, flip: bool = True,
                      batch_size: int = 64, device: str = "cpu", threads: int | None = None) -> Threshold:
    """The threshold at ``far`` from a ``path1,path2,same`` CSV of crops at the model's input size, embedded directly
    (a crop of another size is refused by the model card, naming the model)."""
    from facesphere.models.runs import load_embedder

    pairset = PairSet.from_csv(pairs)
    embedder = load_embedder(model, device=device, threads=threads)
    embeddings = np.concatenate([
        embedder.embed([pairset.load(i) for i in range(start, min(start + batch_size, pairset.num_images))],
                       flip=flip, batch_size=batch_size)
        for start in range(0, pairset.num_images, batch_size)])
    scores = cosine_scores(embeddings, pairset.left, pairset.right)
    card = embedder.card
    threshold = calibrate_threshold(scores, pairset.same, far, card.name, card.embedding_size, card.weights_sha256)
    logger.info("threshold %.4f at FAR %.3g (measured FAR %.4g, TAR %s) from %d aligned pairs", threshold.value, far,
                threshold.measured_far, threshold.measured_tar, len(pairset))
    return threshold
