"""Verification evaluation: embeddings, pair sampling, k-fold accuracy / ROC metrics and plots."""

from facesphere.evaluate.embeddings import cosine_scores, extract_embeddings
from facesphere.evaluate.pairs import sample_pairs
from facesphere.evaluate.plots import plot_det, plot_roc
from facesphere.evaluate.verification import (
    DEFAULT_FAR_TARGETS,
    KFoldResult,
    auc,
    best_threshold,
    eer,
    kfold_accuracy,
    roc,
    tar_at_far,
    threshold_at_far,
    verification_report,
)

__all__ = [
    "DEFAULT_FAR_TARGETS",
    "KFoldResult",
    "auc",
    "best_threshold",
    "cosine_scores",
    "eer",
    "extract_embeddings",
    "kfold_accuracy",
    "plot_det",
    "plot_roc",
    "roc",
    "sample_pairs",
    "tar_at_far",
    "threshold_at_far",
    "verification_report",
]
