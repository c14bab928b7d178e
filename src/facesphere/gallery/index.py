"""1:N search over unit templates with faiss (inner product = cosine), rebuilt from the gallery store.

Index kinds: ``flat`` (exact), ``hnsw`` (graph, no training), ``ivfpq`` (inverted lists + product
quantisation, trained on the gallery itself); ``auto`` picks exact below 100k templates, HNSW below
2M, IVF-PQ above. Storage ``fp32``, ``fp16`` or ``int8`` (scalar quantisation) for flat and HNSW.
Search is open-set: a match below ``threshold`` is reported as unknown.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

IndexKind = Literal["auto", "flat", "hnsw", "ivfpq"]
Storage = Literal["fp32", "fp16", "int8"]


@dataclass(frozen=True)
class Match:
    name: str | None
    score: float


def choose_kind(count: int) -> str:
    return "flat" if count < 100_000 else "hnsw" if count < 2_000_000 else "ivfpq"


def build_faiss_index(matrix: np.ndarray, kind: IndexKind = "auto", storage: Storage = "fp32", hnsw_m: int = 32,
                      ef_search: int = 64, nprobe: int = 16):
    """A faiss index over the rows of ``matrix`` (N, D) unit vectors, searched by inner product."""
    import faiss

    matrix = np.ascontiguousarray(matrix, dtype=np.float32)
    n, dim = matrix.shape
    kind = choose_kind(n) if kind == "auto" else kind
    quantisers = {"fp16": faiss.ScalarQuantizer.QT_fp16, "int8": faiss.ScalarQuantizer.QT_8bit}
    ip = faiss.METRIC_INNER_PRODUCT
    if kind == "flat":
        index = faiss.IndexFlatIP(dim) if storage == "fp32" else faiss.IndexScalarQuantizer(dim, quantisers[storage], ip)
    elif kind == "hnsw":
        index = (faiss.IndexHNSWFlat(dim, hnsw_m, ip) if storage == "fp32"
                 else faiss.IndexHNSWSQ(dim, quantisers[storage], hnsw_m, ip))
        index.hnsw.efSearch = ef_search
    elif kind == "ivfpq":
        if storage != "fp32":
            raise ValueError("IVF-PQ quantises by itself; storage must be fp32")
        nlist = max(1, min(65_536, int(4 * np.sqrt(n))))
        sub = next(m for m in (64, 32, 16, 8, 4, 2, 1) if dim % m == 0 and m <= dim)
        index = faiss.IndexIVFPQ(faiss.IndexFlatIP(dim), dim, nlist, sub, 8, ip)
        index.nprobe = nprobe
    else:
        raise ValueError(f"unknown index kind {kind!r}; use auto, flat, hnsw or ivfpq")
    if not index.is_trained:
        index.train(matrix if n <= 256 * 1024 else matrix[np.random.default_rng(0).choice(n, 256 * 1024, replace=False)])
    index.add(matrix)
    return index


class SearchIndex:
    """Names + a faiss index of their templates; ``search`` returns the top-k matches per query."""

    def __init__(self, names: list[str], matrix: np.ndarray, kind: IndexKind = "auto", storage: Storage = "fp32",
                 **options) -> None:
        if len(names) != len(matrix):
            raise ValueError(f"{len(names)} names for {len(matrix)} templates")
        self.names = list(names)
        self.dim = int(matrix.shape[1]) if len(matrix) else 0
        self.index = build_faiss_index(matrix, kind, storage, **options) if len(matrix) else None

    @classmethod
    def from_gallery(cls, gallery, kind: IndexKind = "auto", storage: Storage = "fp32", **options) -> SearchIndex:
        names, matrix = gallery.identity_templates()
        return cls(names, matrix if len(matrix) else np.zeros((0, gallery.embedding_size), np.float32), kind, storage,
                   **options)

    def __len__(self) -> int:
        return len(self.names)

    def search(self, queries, k: int = 5, threshold: float | None = None) -> list[list[Match]]:
        """Top-k (name, cosine) per query, best first; below ``threshold`` the name is None (unknown)."""
        queries = np.asarray(queries, dtype=np.float32)
        if queries.ndim == 1:
            queries = queries[None]
        if self.index is None:
            return [[] for _ in queries]
        if queries.shape[1] != self.dim:
            raise ValueError(f"queries must be (N, {self.dim}), got {queries.shape}")
        queries = queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)
        scores, indices = self.index.search(np.ascontiguousarray(queries), min(k, len(self.names)))
        out = []
        for row_scores, row_indices in zip(scores, indices):
            out.append([Match(self.names[i] if threshold is None or s >= threshold else None, float(s))
                        for s, i in zip(row_scores, row_indices) if i >= 0])
        return out


__all__ = ["Match", "SearchIndex", "build_faiss_index", "choose_kind"]
