"""How far two runs of the same model disagree on the same inputs: cosine and absolute differences."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class EmbeddingParity:
    """Row-wise disagreement of two (N, D) embedding arrays.

    ``max_cosine_difference`` = max over rows of 1 - cos(reference_i, other_i), the number that
    matters for recognition; ``max_abs_difference`` is element-wise, and ``relative_abs_difference``
    divides it by the reference's largest magnitude.
    """

    rows: int
    max_cosine_difference: float
    max_abs_difference: float
    relative_abs_difference: float

    def describe(self) -> str:
        return (f"{self.rows} embeddings: max 1 - cos {self.max_cosine_difference:.2e}, max |diff| "
                f"{self.max_abs_difference:.2e} ({self.relative_abs_difference:.2e} of the largest value)")


def compare_embeddings(reference: np.ndarray, other: np.ndarray) -> EmbeddingParity:
    """Compare two (N, D) arrays computed from the same N inputs (in float64)."""
    a = np.asarray(reference, dtype=np.float64)
    b = np.asarray(other, dtype=np.float64)
    if a.ndim != 2 or a.shape != b.shape or a.shape[0] == 0:
        raise ValueError(f"expected two non-empty (N, D) arrays of the same shape, got {a.shape} and {b.shape}")
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    cosine = np.sum(a * b, axis=1) / np.maximum(norms, 1e-300)
    abs_diff = float(np.abs(a - b).max())
    scale = float(np.abs(a).max())
    return EmbeddingParity(rows=int(a.shape[0]), max_cosine_difference=float(np.max(1.0 - cosine)),
                           max_abs_difference=abs_diff, relative_abs_difference=abs_diff / scale if scale else abs_diff)


__all__ = ["EmbeddingParity", "compare_embeddings"]
