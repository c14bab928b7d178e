"""Verification of one pair set: embed each distinct image once, score the pairs, report, write plots.

``evaluate_pairset`` gives ``verification_report`` (k-fold accuracy, exact ROC, TAR@FAR) plus
insightface-style VAL@FAR (``verification.val_at_far``) and, with ``out_dir``, ROC/DET plots, a
failure contact sheet and ``report.json``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from facesphere.evaluate.embeddings import cosine_scores, embed_pairset
from facesphere.evaluate.pairsets import PairSet
from facesphere.evaluate.verification import (
    DEFAULT_FAR_TARGETS,
    _fold_ids,
    kfold_accuracy,
    roc,
    val_at_far,
    verification_report,
)

logger = logging.getLogger(__name__)

__all__ = ["evaluate_pairset"]


def _pair_thresholds(scores: np.ndarray, same: np.ndarray, n_folds: int, folds) -> np.ndarray:
    """The k-fold threshold each pair was judged with (may be +-inf: accept or reject everything)."""
    ids = _fold_ids(scores.size, n_folds, folds)
    return kfold_accuracy(scores, same, n_folds=n_folds, folds=folds).thresholds[ids]


def evaluate_pairset(
    model: nn.Module | Callable,
    pairset: PairSet,
    *,
    preprocess: Callable[[np.ndarray], torch.Tensor] | None = None,
    flip: bool | str = "sum",
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    amp_dtype: torch.dtype | None = None,
    n_folds: int = 10,
    folds=None,
    far_targets: Sequence[float] = DEFAULT_FAR_TARGETS,
    val_far: float = 1e-3,
    out_dir: str | os.PathLike | None = None,
    max_failures: int = 16,
    embeddings: np.ndarray | None = None,
    progress: bool = False,
) -> dict:
    """Embed, score (cosine) and report one pair set; optionally write plots, a failure sheet and JSON.

    Returns ``verification_report`` (k-fold accuracy with ``folds`` / ``pairset.folds`` / ``n_folds``
    contiguous folds, ROC numbers, exact TAR@FAR for ``far_targets``) plus ``name``, ``num_images``,
    ``flip`` and ``val_at_far`` (insightface-style VAL@FAR=``val_far``, ``verification`` module doc). With ``out_dir``
    it writes ``roc.png``, ``det.png``, ``failures.png`` (false accepts/rejects at each pair's k-fold
    threshold) and ``report.json``, listed under ``files``. Pass ``embeddings`` (one row per
    distinct image) to skip the embedding pass.
    """
    if embeddings is None:
        embeddings = embed_pairset(model, pairset, preprocess=preprocess, flip=flip, batch_size=batch_size,
                                   device=device, amp_dtype=amp_dtype, progress=progress)
    embeddings = np.asarray(embeddings)
    if embeddings.shape[0] != pairset.num_images:
        raise ValueError(f"{embeddings.shape[0]} embeddings for {pairset.num_images} images")
    folds = pairset.folds if folds is None else np.asarray(folds)
    scores = cosine_scores(embeddings, pairset.left, pairset.right)
    report = verification_report(scores, pairset.same, n_folds=n_folds, far_targets=far_targets, folds=folds)
    report = {"name": pairset.name, "num_images": pairset.num_images, "flip": str(flip), **report,
              "val_at_far": val_at_far(scores, pairset.same, val_far, n_folds=n_folds, folds=folds)}
    logger.info("%s: accuracy %.4f ± %.4f, VAL@FAR=%g %s", pairset.name, report["accuracy_mean"],
                report["accuracy_std"], val_far, report["val_at_far"]["val_mean"])
    if out_dir is not None:
        report["files"] = _write_outputs(Path(out_dir), pairset, scores, report, n_folds, folds, max_failures)
    return report


def _write_outputs(out: Path, pairset: PairSet, scores: np.ndarray, report: dict, n_folds: int, folds,
                   max_failures: int) -> dict:
    from facesphere.evaluate.contact_sheet import failure_contact_sheet
    from facesphere.evaluate.plots import plot_det, plot_roc
    from facesphere.utils.files import atomic_write_text

    far, tar, _ = roc(scores, pairset.same)
    files = {
        "roc": str(plot_roc({pairset.name: (far, tar)}, out / "roc.png", title=f"ROC: {pairset.name}")),
        "det": str(plot_det({pairset.name: (far, tar)}, out / "det.png", title=f"DET: {pairset.name}")),
    }
    thresholds = _pair_thresholds(scores, pairset.same, n_folds, folds)
    captions = [f"{pairset.image_name(a)} | {pairset.image_name(b)}" for a, b in zip(pairset.left, pairset.right)]
    files["failures"] = str(failure_contact_sheet(out / "failures.png", pairset.load, pairset.left, pairset.right,
                                                  scores, pairset.same, thresholds, max_per_kind=max_failures,
                                                  captions=captions, title=f"{pairset.name}: failed pairs"))
    files["report"] = str(out / "report.json")
    atomic_write_text(out / "report.json", json.dumps({**report, "files": files}, indent=2, allow_nan=False))
    return files
