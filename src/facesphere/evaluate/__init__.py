"""Verification evaluation: embeddings, pair sampling, k-fold accuracy / ROC metrics and plots."""

from facesphere.evaluate.embeddings import cosine_scores, embed_images, embed_pairset, extract_embeddings
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

# Protocols: pair-set sources, the safe .bin reader, identification, cross-age sets, registry.
from facesphere.evaluate.age import (
    evaluate_cacd_vs,
    fgnet_five_points,
    fgnet_identification,
    fgnet_verification,
    fgnet_verification_pairs,
    parse_cacd_vs,
    parse_fgnet,
    read_pts,
)
from facesphere.evaluate.binsets import BinFormatError, UnsafePickleError, load_bin, read_bin
from facesphere.evaluate.contact_sheet import failure_contact_sheet, write_failure_sheet
from facesphere.evaluate.identification import CMCResult, cmc, leave_one_out_cmc, open_set_identification
from facesphere.evaluate.lfw import PairsFileError, lfw_pair_paths, parse_lfw_pairs
from facesphere.evaluate.pairset_eval import evaluate_pairset
from facesphere.evaluate.pairsets import PAIRSET_FORMATS, PairSet, load_pairset
from facesphere.evaluate.verification import val_at_far
from facesphere.evaluate.protocols import describe_protocols, get_protocol, list_protocols, run_protocol

__all__ += [
    "BinFormatError",
    "CMCResult",
    "PAIRSET_FORMATS",
    "PairSet",
    "PairsFileError",
    "UnsafePickleError",
    "cmc",
    "describe_protocols",
    "embed_images",
    "embed_pairset",
    "evaluate_cacd_vs",
    "evaluate_pairset",
    "failure_contact_sheet",
    "fgnet_five_points",
    "fgnet_identification",
    "fgnet_verification",
    "fgnet_verification_pairs",
    "get_protocol",
    "leave_one_out_cmc",
    "lfw_pair_paths",
    "list_protocols",
    "load_bin",
    "load_pairset",
    "open_set_identification",
    "parse_cacd_vs",
    "parse_fgnet",
    "parse_lfw_pairs",
    "read_bin",
    "read_pts",
    "run_protocol",
    "val_at_far",
    "write_failure_sheet",
]
