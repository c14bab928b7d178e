"""Face detectors on real photos: recall, detection rate, 5-point accuracy and CPU latency.

For each detector (RetinaFace MobileNet-0.25 in PyTorch, both public checkpoints; SCRFD-0.5GF and YuNet-n
in ONNX Runtime), at its default settings (640x640 letterbox canvas, photos never enlarged, score >= 0.5,
NMS IoU 0.4):

* recall at IoU >= 0.5 on the 43 hand-drawn face boxes of dlib's example photos (9 PASCAL VOC images);
* the share of FG-NET photos (1,002, one face each) where a detected box contains the centre of the
  manually marked 5 points (pupils, nose tip, mouth corners of FG-NET's own 68-point markup);
* on those, the mean 5-point error divided by the annotated inter-ocular (pupil) distance;
* milliseconds per 640x480 photo (FG-NET photos resized to 640x480), batch 1, median over repeats after
  warm-up, torch and ONNX Runtime at ``--threads`` threads: on the default 640x640 canvas and on a native
  640x480 canvas (``input_size=None``, the VGA size the published speed tables use).

    python benchmarks/detection.py [--fgnet-every 1] [--timing-photos 10] [--repeats 20] [--threads 2] [--quick]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

import cv2
import numpy as np
import torch
from _common import DATA, markdown_table, setup_logging, write_results

from facesphere.data.images import load_image
from facesphere.detect import build_detector
from facesphere.detect.evaluation import (
    face_at,
    interocular_error,
    read_imglab_boxes,
    recall,
)
from facesphere.evaluate.age import fgnet_five_points, parse_fgnet, read_pts
from facesphere.utils.allocator import tune_malloc

DLIB = DATA / "data/landmark_samples/dlib/examples/faces"
FGNET = DATA / "data/fgnet"
DETECTORS = {
    "RetinaFace MNet-0.25 (release, LeakyReLU)": ("retinaface",
                                                  "weights/retinaface_mnet025_biubug6/official_release/mobilenet0.25_Final.pth"),
    "RetinaFace MNet-0.25 (first commit, ReLU)": ("retinaface", "weights/retinaface_mnet025_biubug6/Final_Retinaface.pth"),
    "SCRFD-0.5GF kps (ONNX)": ("scrfd", "weights/scrfd_500m_kps_onnx/scrfd_500m_bnkps.onnx"),
    "YuNet-n dynamic (ONNX)": ("yunet", "weights/yunet_libfacedetection/onnx/yunet_n_dynamic.onnx"),
}
logger = logging.getLogger("detection")


def build(kind: str, weights: str, threads: int, **options):
    extra = {} if kind == "retinaface" else {"threads": threads}
    return build_detector(kind, DATA / weights, **extra, **options)


def dlib_recall(detector) -> float:
    truth = {**read_imglab_boxes(DLIB / "training.xml"), **read_imglab_boxes(DLIB / "testing.xml")}
    found = detector.detect([load_image(DLIB / name) for name in truth])
    return recall(list(truth.values()), found, 0.5)


def fgnet_scores(detector, items, batch: int = 8) -> dict:
    """Found share and inter-ocular-normalised 5-point error over ``items``."""
    errors, found = [], 0
    for start in range(0, len(items), batch):
        chunk = items[start : start + batch]
        for item, detections in zip(chunk, detector.detect([load_image(i.path) for i in chunk])):
            truth = fgnet_five_points(read_pts(item.points_path))
            k = face_at(detections, truth)
            if k >= 0:
                found += 1
                errors.append(interocular_error(detections.landmarks[k], truth))
    return {"photos": len(items), "found": found, "found_share": found / len(items),
            "mean_error": float(np.mean(errors)) if errors else float("nan"),
            "median_error": float(np.median(errors)) if errors else float("nan")}


def latency_ms(detector, photos: list[np.ndarray], repeats: int) -> float:
    for photo in photos[:3]:
        detector.detect([photo])
    times = []
    for photo in photos:
        for _ in range(repeats):
            start = time.perf_counter()
            detector.detect([photo])
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    tune_malloc()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fgnet-every", type=int, default=1, help="use every n-th FG-NET photo")
    parser.add_argument("--timing-photos", type=int, default=10, help="FG-NET photos resized to 640x480 for timing")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per timing photo")
    parser.add_argument("--threads", type=int, default=2, help="torch and ONNX Runtime intra-op threads")
    parser.add_argument("--quick", action="store_true", help="smoke test: every 10th FG-NET photo, 3 timing photos x 5, "
                                                              "results written as detection_quick")
    args = parser.parse_args()
    if args.quick:
        args.fgnet_every, args.timing_photos, args.repeats = max(args.fgnet_every, 10), min(args.timing_photos, 3), 5
    setup_logging()
    for path in (DLIB, FGNET):
        if not path.is_dir():
            raise SystemExit(f"{path} not found (set FACESPHERE_DATA)")
    torch.set_num_threads(args.threads)
    cv2.setNumThreads(1)
    items = parse_fgnet(FGNET)
    subset = items[:: args.fgnet_every]
    timing = [cv2.resize(load_image(i.path), (640, 480), interpolation=cv2.INTER_AREA)
              for i in items[:: max(1, len(items) // args.timing_photos)][: args.timing_photos]]

    results, rows = {}, []
    for label, (kind, weights) in DETECTORS.items():
        detector = build(kind, weights, args.threads)
        native = build(kind, weights, args.threads, input_size=None)
        r = {"detector": repr(detector), "dlib_recall_iou50": dlib_recall(detector),
             "fgnet": fgnet_scores(detector, subset),
             "ms_640x480_on_640x640_canvas": latency_ms(detector, timing, args.repeats),
             "ms_640x480_native": latency_ms(native, timing, args.repeats)}
        results[label] = r
        fg = r["fgnet"]
        rows.append([label, f"{r['dlib_recall_iou50']:.3f}", f"{fg['found']}/{fg['photos']} ({100 * fg['found_share']:.1f}%)",
                     f"{100 * fg['mean_error']:.2f}", f"{100 * fg['median_error']:.2f}",
                     f"{r['ms_640x480_on_640x640_canvas']:.1f}", f"{r['ms_640x480_native']:.1f}"])
        logger.info("%s", rows[-1])
    table = (f"Default settings (640x640 letterbox, photos never enlarged, score >= 0.5, NMS 0.4). dlib: 43 hand-drawn "
             f"boxes on 9 photos, recall at IoU >= 0.5. FG-NET: {len(subset)} of {len(items)} photos (every "
             f"{args.fgnet_every}), found = a box contains the centre of the manual 5 points; error = mean 5-point "
             "distance / pupil distance, in %. Latency: batch 1, FG-NET photos resized to 640x480, median of "
             f"{args.timing_photos} photos x {args.repeats} calls after warm-up, {args.threads} threads "
             "(torch for RetinaFace, ONNX Runtime CPU for SCRFD/YuNet), pre- and post-processing included.\n\n"
             + markdown_table(["detector", "dlib recall@0.5", "FG-NET found", "5-pt error % IOD (mean)",
                               "(median)", "ms 640x480 (640x640 canvas)", "ms 640x480 (native canvas)"], rows))
    print(table)
    write_results("detection_quick" if args.quick else "detection", {"args": vars(args), "results": results}, table)


if __name__ == "__main__":
    main()
