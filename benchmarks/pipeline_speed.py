"""Pipeline speed on the CPU in one run: detection ms per 640x480 photo for each detector, then embedding
throughput (PyTorch eager, eager with BatchNorm folded, ONNX Runtime) against the multiply-add bound at
this machine's measured matmul peak.

Detection: FG-NET photos resized to 640x480, batch 1, median over repeats after warm-up, each detector
at its defaults (640x640 letterbox canvas) and on a native 640x480 canvas (``input_size=None``).

MobileFaceNet as in the paper (112x112, D=128) at batch 1 and 32, and iResNet-50 at batch 32 for scale
(random weights: speed does not depend on them). Every variant runs in this process on the same random
normalised batch with the same thread count; faces/s = batch / median batch time after warm-up. The
bound is faces/s = peak / (2 * multiply-adds per face), with peak the best fp32 GFLOP/s of a large
``torch.mm`` measured in the same run: what the network would reach if every layer ran at matmul speed
(depthwise convolutions never do).

    python benchmarks/pipeline_speed.py [--threads 2] [--seconds 5] [--quick]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

from _common import markdown_table, setup_logging, write_results

logger = logging.getLogger("pipeline_speed")

CASES = [("mobilefacenet", 1), ("mobilefacenet", 32), ("iresnet50", 32)]
"""(backbone, batch) rows; --quick skips iResNet-50."""


def matmul_peak_gflops(n: int, seconds: float) -> float:
    """Best fp32 GFLOP/s of an n x n by n x n ``torch.mm`` (2 n^3 flops), over ``seconds`` of repeats."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    out = torch.empty(n, n)
    torch.mm(a, b, out=out)  # warm-up
    best, end = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < end:
        started = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - started)
    return 2 * n**3 / best / 1e9


def median_seconds(step, seconds: float, warmup: int = 2, min_runs: int = 3) -> tuple[float, int]:
    """(median wall time of ``step()``, number of timed runs): at least ``min_runs``, else until ``seconds`` pass."""
    for _ in range(warmup):
        step()
    times, end = [], time.perf_counter() + seconds
    while len(times) < min_runs or time.perf_counter() < end:
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return statistics.median(times), len(times)


def variants(name: str, threads: int, work: Path) -> tuple[dict, object]:
    """({label: callable on a float32 (N, 3, H, W) numpy batch}, the eager backbone) for one backbone."""
    import torch

    from facesphere.backbones import build_backbone, fuse_batchnorm
    from facesphere.models.card import training_card
    from facesphere.models.export_onnx import export_onnx
    from facesphere.models.onnx_runtime import OnnxEmbedder

    torch.manual_seed(0)
    model = build_backbone(name).eval()
    card = training_card(model, name, name)
    folded = fuse_batchnorm(model)
    onnx = OnnxEmbedder(export_onnx(model, card, work / f"{name}.onnx"), threads=threads)

    def torch_runner(module):
        def run(batch):
            with torch.inference_mode():
                return module(torch.from_numpy(batch))
        return run

    return {"PyTorch eager fp32": torch_runner(model), "PyTorch eager, BN folded": torch_runner(folded),
            f"ONNX Runtime CPU ({threads} threads)": onnx.run}, model


def main() -> None:
    from facesphere.utils.allocator import tune_malloc

    tune_malloc()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="torch and ONNX Runtime intra-op threads")
    parser.add_argument("--seconds", type=float, default=5.0, help="timed seconds per variant (at least 3 runs)")
    parser.add_argument("--matmul-size", type=int, default=2048, help="n of the n x n matmul measuring the peak")
    parser.add_argument("--quick", action="store_true", help="smoke test: 1 s per variant, MobileFaceNet only, "
                                                              "1024 matmul; results written as pipeline_speed_quick")
    args = parser.parse_args()
    cases = CASES
    if args.quick:
        args.seconds, args.matmul_size = min(args.seconds, 1.0), min(args.matmul_size, 1024)
        cases = [c for c in CASES if c[0] != "iresnet50"]
    setup_logging()

    import numpy as np
    import torch

    from facesphere.backbones import count_complexity

    torch.set_num_threads(args.threads)
    peak = matmul_peak_gflops(args.matmul_size, 2 * args.seconds)
    logger.info("fp32 matmul peak (%dx%d, %d threads): %.1f GFLOP/s", args.matmul_size, args.matmul_size,
                args.threads, peak)
    parity = onnx_parity_on_real_faces(64 if not args.quick else 16)
    logger.info("ONNX Runtime vs PyTorch on real faces: %s", parity)
    detection_rows, detection = detection_latency(args.threads, 3 if args.quick else 10, 5 if args.quick else 20)
    results, rows, built = [], [], {}
    with tempfile.TemporaryDirectory(prefix="facesphere-speed-") as work:
        for name, batch in cases:
            if name not in built:
                built[name] = variants(name, args.threads, Path(work))
            runners, model = built[name]
            madds = count_complexity(model).multiply_adds
            h, w = model.input_size
            x = np.random.default_rng(0).uniform(-1, 1, (batch, 3, h, w)).astype(np.float32)
            bound = peak * 1e9 / (2 * madds)
            eager = None
            for label, run in runners.items():
                seconds, runs = median_seconds(lambda run=run, x=x: run(x), args.seconds)
                faces = batch / seconds
                eager = eager or faces
                results.append({"backbone": name, "batch": batch, "variant": label, "median_batch_seconds": seconds,
                                "runs": runs, "faces_per_second": faces, "vs_eager": faces / eager,
                                "share_of_bound": faces / bound})
                rows.append([name, batch, label, f"{1000 * seconds:.1f}", f"{faces:.1f}", f"{faces / eager:.2f}x",
                             f"{100 * faces / bound:.1f}%"])
                logger.info("%s", rows[-1])
            results.append({"backbone": name, "batch": batch, "variant": "matmul-peak bound", "multiply_adds": madds,
                            "peak_gflops": peak, "faces_per_second": bound, "vs_eager": bound / eager})
            rows.append([name, batch, f"bound: {peak:.0f} GFLOP/s / (2 x {madds / 1e6:.0f}M MAdds)",
                         f"{1000 * batch / bound:.1f}", f"{bound:.1f}", f"{bound / eager:.2f}x", "100%"])
    table = (f"Embedding throughput, {args.threads} threads, random weights and inputs; median batch time over at "
             f"least {args.seconds:g} s after 2 warm-up batches; 'vs eager' = against PyTorch eager fp32 at the same "
             f"backbone and batch in this run. Bound = measured fp32 matmul peak ({args.matmul_size}x"
             f"{args.matmul_size} torch.mm: {peak:.1f} GFLOP/s) / (2 x multiply-adds per face). ONNX Runtime runs "
             "the file `facesphere export` writes (BN folded, dynamic batch).\n\n"
             + markdown_table(["backbone", "batch", "variant", "ms/batch", "faces/s", "vs eager", "of bound"], rows))
    table = (f"ONNX parity: the imported InsightFace MobileFaceNet y1 exported by `facesphere export` (BN folded), "
             f"ONNX Runtime vs PyTorch on {parity['rows']} LFW faces with flip-sum: max (1 - cosine) "
             f"{parity['max_cosine_difference']:.2e}, max |difference| {parity['max_abs_difference']:.2e} "
             f"(relative {parity['relative_abs_difference']:.2e}).\n\n"
             "Detection, ms per 640x480 photo (batch 1, median; FG-NET photos resized), "
             f"{args.threads} threads:\n\n"
             + markdown_table(["detector", "640x640 letterbox canvas", "native 640x480 canvas"], detection_rows)
             + "\n\n" + table)
    print(table)
    write_results("pipeline_speed_quick" if args.quick else "pipeline_speed",
                  {"args": vars(args), "matmul_peak_gflops": peak, "onnx_parity_y1": parity, "detection_ms": detection,
                   "results": results}, table)


def onnx_parity_on_real_faces(count: int) -> dict:
    """y1 (imported from MXNet) in PyTorch vs its ONNX export in ONNX Runtime, on real aligned LFW faces."""
    import dataclasses

    import numpy as np

    from _common import DATA
    from facesphere.data.images import load_image
    from facesphere.models import import_weights
    from facesphere.models.embedding_parity import compare_embeddings
    from facesphere.models.export_onnx import export_onnx
    from facesphere.models.onnx_runtime import OnnxEmbedder
    from facesphere.models.torch_embedder import TorchEmbedder

    model, card = import_weights(DATA / "weights/mobilefacenet_insightface_y1")
    paths = sorted((DATA / "data/lfw_112x112/lfw-112X112").glob("*/*.jpg"))[:: 13_233 // count][:count]
    faces = np.stack([load_image(p) for p in paths])
    with tempfile.TemporaryDirectory(prefix="facesphere-parity-") as work:
        onnx = OnnxEmbedder(export_onnx(model, card, Path(work) / "y1.onnx"))
        result = compare_embeddings(TorchEmbedder(model.eval(), card).embed(faces, flip=True), onnx.embed(faces, flip=True))
    return dataclasses.asdict(result)


def detection_latency(threads: int, photos: int, repeats: int) -> tuple[list[list], dict]:
    """ms per 640x480 photo for every detector of benchmarks/detection.py, letterboxed and native."""
    import cv2

    from _common import DATA
    from detection import DETECTORS, FGNET, build, latency_ms
    from facesphere.data.images import load_image
    from facesphere.evaluate.age import parse_fgnet

    items = parse_fgnet(FGNET)[::max(1, 1002 // photos)][:photos]
    images = [cv2.resize(load_image(i.path), (640, 480), interpolation=cv2.INTER_AREA) for i in items]
    rows, out = [], {}
    for label, (kind, weights) in DETECTORS.items():
        if not (DATA / weights).exists():
            raise FileNotFoundError(f"{DATA / weights} is missing (set FACESPHERE_DATA)")
        letterbox = latency_ms(build(kind, weights, threads), images, repeats)
        native = latency_ms(build(kind, weights, threads, input_size=None), images, repeats)
        out[label] = {"letterbox_640": letterbox, "native_640x480": native}
        rows.append([label, f"{letterbox:.1f}", f"{native:.1f}"])
        logger.info("%s", rows[-1])
    return rows, out


if __name__ == "__main__":
    main()
