"""Where the time of one identify goes with threads: the choices behind ``facesphere.service.model_thread``.

Each variant runs in a fresh Python process (thread pools and OpenMP teams are per process), with
SCRFD-500M (ONNX Runtime) + MobileFaceNet y1 (PyTorch, flip-sum), 2 threads, on 30 CACD-VS photos
(250x250): median ms of ``FaceAnalyzer.analyze`` (decode excluded) and of embedding one aligned crop.

- main thread: models loaded and run on the main thread (a script);
- pool thread after a main-thread op: the main thread ran one PyTorch parallel op, then a worker thread
  loads nothing but runs everything (what a web server's thread pool does without a model thread);
- model thread: a dedicated thread loads and runs everything, the main thread runs no PyTorch op;
- ONNX Runtime spinning: main thread, detector session with ``allow_spinning`` (ONNX Runtime's default);
- flip-sum as two runs: main thread, crop and mirror embedded by two network runs instead of one batch.

    python benchmarks/inference_threads.py [--repeats 30]
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import DATA, markdown_table, setup_logging, write_results

SCRFD = "weights/scrfd_500m_kps_onnx/scrfd_500m_bnkps.onnx"
CACD = "data/cacd_vs_fold1/CACD_VS"
VARIANTS = ["main thread", "pool thread after a main-thread op", "model thread", "ONNX Runtime spinning",
            "flip-sum as two runs"]
logger = logging.getLogger("inference_threads")

CHILD = r'''
import functools, json, statistics, sys, time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
import numpy as np

variant, data, model, repeats = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
if variant == "ONNX Runtime spinning":
    import facesphere.utils.onnxrt as onnxrt  # before the detectors import it
    onnxrt.make_session = functools.partial(onnxrt.make_session, allow_spinning=True)
from facesphere.pipeline import build_analyzer
from facesphere.data.images import load_image_bytes
from facesphere.service.model_thread import ModelThread

photos = [load_image_bytes((data / f"{sys.argv[5]}/{i:04d}_1.jpg").read_bytes()) for i in range(repeats)]

def measure():
    analyzer = build_analyzer(detector="scrfd", detector_weights=data / sys.argv[6], model=model, threads=2)
    crop = analyzer.analyze([photos[0]], embed=False)[0].faces[0].crop[None]
    embedder = analyzer.embedder
    if variant == "flip-sum as two runs":
        def embed():
            batch = embedder.preprocess(crop)
            return embedder.run(batch) + embedder.run(np.ascontiguousarray(batch[..., ::-1]))
    else:
        def embed():
            return analyzer.embed_crops(crop)
    def median_ms(fn):
        fn(0)
        times = []
        for i in range(repeats):
            start = time.perf_counter()
            fn(i)
            times.append((time.perf_counter() - start) * 1000)
        return statistics.median(times)
    if variant == "flip-sum as two runs":
        analyze_ms = float("nan")
    else:
        analyze_ms = median_ms(lambda i: analyzer.analyze([photos[i]]))
    return {"analyze_ms": analyze_ms, "embed_ms": median_ms(lambda i: embed())}

if variant == "pool thread after a main-thread op":
    import torch
    torch.ones(1_000_000).add_(1)
    with ThreadPoolExecutor(1) as pool:
        result = pool.submit(measure).result()
elif variant == "model thread":
    thread = ModelThread()
    result = thread.run(measure)
    thread.close()
else:
    result = measure()
print(json.dumps(result))
'''


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    setup_logging()
    from facesphere.models import import_weights
    from facesphere.models.store import save_model
    from facesphere.service.model_thread import ModelThread
    from facesphere.utils.allocator import tune_malloc

    tune_malloc()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "y1"
        converter = ModelThread()
        converter.run(lambda: save_model(model, *import_weights(DATA / "weights/mobilefacenet_insightface_y1")))
        converter.close()
        for variant in VARIANTS:
            done = subprocess.run([sys.executable, "-c", CHILD, variant, str(DATA), str(model), str(args.repeats),
                                   CACD, SCRFD], capture_output=True, text=True, check=True)
            results[variant] = json.loads(done.stdout.strip().splitlines()[-1])
            logger.info("%s: %s", variant, results[variant])
    base = results["main thread"]
    rows = [[v, f"{r['analyze_ms']:.1f}" if r["analyze_ms"] == r["analyze_ms"] else "",
             f"{r['analyze_ms'] / base['analyze_ms']:.2f}x" if r["analyze_ms"] == r["analyze_ms"] else "",
             f"{r['embed_ms']:.1f}", f"{r['embed_ms'] / base['embed_ms']:.2f}x"] for v, r in results.items()]
    table = (f"SCRFD-500M (ONNX Runtime) + MobileFaceNet y1 (PyTorch, flip-sum), 2 threads, median of {args.repeats} "
             "CACD-VS photos (250x250); each variant in a fresh process; ratios against the main-thread variant "
             "of the same run.\n\n"
             + markdown_table(["variant", "analyze ms", "vs main", "embed 1 crop ms", "vs main"], rows))
    logger.info("\n%s", table)
    write_results("inference_threads", {"args": vars(args), "results": results}, table)


if __name__ == "__main__":
    main()
