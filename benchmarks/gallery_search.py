"""1:N search on a synthetic gallery: queries/s, recall@1 against exact search, memory and build time per index.

The gallery is N random unit vectors of dimension D (default 1M x 512); each query is a gallery vector plus
noise (its own identity is the exact answer's usual winner). Every index type of ``facesphere.gallery``
answers the same queries; recall@1 is the share of queries whose top-1 equals exact search's top-1, and
memory is the serialised index size.

    python benchmarks/gallery_search.py [--size 1000000] [--dim 512] [--queries 1000] [--threads 2] [--ef-search 64 256] [--nprobe 16 64]
        [--latent-dim 0] [--ef-construction 40] [--name gallery_search]
"""

from __future__ import annotations

import argparse
import logging
import time

import numpy as np
from _common import markdown_table, setup_logging, write_results

VARIANTS = [("flat", "fp32"), ("flat", "fp16"), ("flat", "int8"), ("hnsw", "fp16"), ("hnsw", "int8"), ("ivfpq", "fp32")]


def synthetic_gallery(rng, size: int, dim: int, latent_dim: int, latent_noise: float) -> np.ndarray:
    """Unit templates: isotropic (latent_dim 0: the hardest case for graph and IVF indexes), or spanning a random
    ``latent_dim``-dimensional subspace plus isotropic noise of relative norm ``latent_noise`` (embeddings of
    trained networks occupy far fewer directions than their dimension)."""
    if latent_dim:
        basis = np.linalg.qr(rng.standard_normal((dim, latent_dim)))[0].T.astype(np.float32)
        gallery = np.empty((size, dim), np.float32)
        for start in range(0, size, 100_000):
            n = min(100_000, size - start)
            block = rng.standard_normal((n, latent_dim), dtype=np.float32) @ basis
            block /= np.linalg.norm(block, axis=1, keepdims=True)
            noise = rng.standard_normal((n, dim), dtype=np.float32)
            block += latent_noise * noise / np.linalg.norm(noise, axis=1, keepdims=True)
            gallery[start:start + n] = block
    else:
        gallery = rng.standard_normal((size, dim), dtype=np.float32)
    return gallery / np.linalg.norm(gallery, axis=1, keepdims=True)


def search_settings(index, kind: str, args):
    """Yield (setting, value) after applying each search-time setting: efSearch for HNSW, nprobe for IVF."""
    if kind == "hnsw":
        for ef in args.ef_search:
            index.hnsw.efSearch = ef
            yield "efSearch", ef
    elif kind == "ivfpq":
        for nprobe in args.nprobe:
            index.nprobe = nprobe
            yield "nprobe", nprobe
    else:
        yield "", None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--noise", type=float, default=0.6, help="norm of the noise added to each query's source")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--latent-dim", type=int, default=0, help="0: isotropic templates; L: an L-dim subspace + noise")
    parser.add_argument("--latent-noise", type=float, default=0.3, help="relative norm of the off-subspace noise")
    parser.add_argument("--ef-construction", type=int, default=40, help="HNSW build breadth (faiss default 40)")
    parser.add_argument("--name", default="gallery_search", help="results file name")
    parser.add_argument("--ef-search", type=int, nargs="+", default=[64, 256], help="HNSW search breadths to time")
    parser.add_argument("--nprobe", type=int, nargs="+", default=[16, 64], help="IVF lists probed, to time")
    parser.add_argument("--variants", nargs="+", default=[f"{k}:{s}" for k, s in VARIANTS])
    args = parser.parse_args()
    setup_logging()
    import faiss

    from facesphere.gallery import build_faiss_index
    from facesphere.utils.allocator import tune_malloc

    tune_malloc()
    faiss.omp_set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    gallery = synthetic_gallery(rng, args.size, args.dim, args.latent_dim, args.latent_noise)
    sources = rng.choice(args.size, args.queries, replace=False)
    noise = rng.standard_normal((args.queries, args.dim), dtype=np.float32)
    queries = gallery[sources] + args.noise * noise / np.linalg.norm(noise, axis=1, keepdims=True)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    rows, results, exact_top = [], [], None
    for variant in args.variants:
        kind, storage = variant.split(":")
        started = time.perf_counter()
        index = build_faiss_index(gallery, kind, storage, ef_construction=args.ef_construction)
        build = time.perf_counter() - started
        memory = faiss.serialize_index(index).nbytes
        for setting, value in search_settings(index, kind, args):
            started = time.perf_counter()
            _, found = index.search(queries, 1)
            seconds = time.perf_counter() - started
            top = found[:, 0]
            if exact_top is None:
                if (kind, storage) != ("flat", "fp32"):
                    raise ValueError("the first variant must be flat:fp32 (the exact reference)")
                exact_top = top
            recall = float((top == exact_top).mean())
            qps = args.queries / seconds
            results.append({"kind": kind, "storage": storage, "search_setting": setting, "value": value,
                            "build_seconds": build, "queries_per_second": qps, "recall_at_1_vs_exact": recall,
                            "index_bytes": int(memory)})
            rows.append([kind, storage, f"{setting}={value}" if setting else "exact", f"{qps:,.0f}", f"{recall:.4f}",
                         f"{memory / 2**20:,.0f}", f"{build:.1f}"])
            logging.info("%s", rows[-1])
        del index
    shape = (f"spanning a random {args.latent_dim}-dim subspace + noise of relative norm {args.latent_noise}"
             if args.latent_dim else "isotropic")
    table = (f"{args.size:,} x {args.dim} random unit templates ({shape}), HNSW M=32 efConstruction="
             f"{args.ef_construction}, {args.queries} queries (a template + noise of norm "
             f"{args.noise}), top-1, {args.threads} threads; exact top-1 found its own source for "
             f"{float((exact_top == sources).mean()):.3f} of the queries.\n\n"
             + markdown_table(["index", "storage", "search", "queries/s", "recall@1 vs exact", "memory MiB", "build s"], rows))
    logging.info("\n%s", table)
    write_results(args.name, {"args": vars(args), "results": results}, table)


if __name__ == "__main__":
    main()
