"""Held-out verification during and after training."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from facesphere.evaluate import cosine_scores, extract_embeddings, plot_roc, roc, sample_pairs, verification_report
from facesphere.train.config import ExperimentConfig

logger = logging.getLogger(__name__)


def evaluate_verification(backbone: torch.nn.Module, dataset, cfg: ExperimentConfig, device: torch.device,
                          plot_dir: Path | None = None, amp_dtype: torch.dtype | None = None) -> dict[str, Any]:
    """10-fold verification accuracy on pairs drawn from ``dataset``; writes roc.png into ``plot_dir``."""
    e = cfg.eval
    embeddings = extract_embeddings(backbone, dataset, batch_size=e.batch_size, device=device, flip=e.flip,
                                    amp_dtype=amp_dtype, progress=False)
    labels = np.asarray(dataset.labels)
    i, j, same = sample_pairs(labels, e.pairs // 2, e.pairs // 2, seed=cfg.seed)
    scores = cosine_scores(embeddings, i, j)
    report = verification_report(scores, same)
    report["num_pairs"] = int(len(same))
    report["num_identities"] = int(len(np.unique(labels)))
    if plot_dir is not None:
        far, tar, _ = roc(scores, same)
        path = Path(plot_dir) / "roc.png"
        plot_roc({cfg.name: (far, tar)}, path, title=f"{cfg.name}: held-out synthetic verification")
        report["roc_plot"] = str(path)
    return report
