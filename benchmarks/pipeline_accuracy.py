"""Recognition through the whole pipeline on raw photos, with the imported InsightFace MobileFaceNet (y1).

1. CACD-VS fold 1 (400 raw 250x250 cross-age pairs): detect → 5 landmarks → ArcFace 112x112 alignment →
   embed (flip-sum) → 10-fold accuracy, for each detector, via ``facesphere eval ... cacd_vs --set detector=``.
2. FG-NET cross-age verification (2,563 + 2,563 pairs, age gap >= 10): crops aligned from FG-NET's manual
   landmarks vs from each detector's 5 points; and how far the detected points are from the manual ones
   (mean over the 5 points, divided by the manual inter-pupil distance).

    python benchmarks/pipeline_accuracy.py [--work /tmp/facesphere-pipeline]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from _common import DATA, markdown_table, setup_logging, write_results

from facesphere.utils.allocator import tune_malloc

DETECTORS = {
    "retinaface": DATA / "weights/retinaface_mnet025_biubug6/official_release/mobilenet0.25_Final.pth",
    "scrfd": DATA / "weights/scrfd_500m_kps_onnx/scrfd_500m_bnkps.onnx",
    "yunet": DATA / "weights/yunet_libfacedetection/onnx/yunet_n_dynamic.onnx",
}


def facesphere(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "facesphere", *args], check=True, capture_output=True, text=True)


def evaluate(model: Path, protocol: str, data: Path, out: Path, *options: str) -> dict:
    sets = sum((["--set", o] for o in options), [])
    facesphere("eval", str(model), protocol, str(data), *sets, "--out", str(out))
    return json.loads((out / "results.json").read_text())["report"]


def landmark_error(name: str, weights: Path) -> dict:
    """Detected vs manual 5 points on every FG-NET photo where the detector finds the annotated face."""
    from facesphere.data.images import load_image
    from facesphere.detect import build_detector
    from facesphere.detect.evaluation import face_at, interocular_error
    from facesphere.evaluate.age import fgnet_five_points, parse_fgnet, read_pts

    detector = build_detector(name, weights)
    errors, missed = [], 0
    for item in parse_fgnet(DATA / "data/fgnet"):
        truth = fgnet_five_points(read_pts(item.points_path))
        found = detector.detect([load_image(item.path)])[0]
        index = face_at(found, truth)
        if index < 0:
            missed += 1
            continue
        errors.append(interocular_error(found.landmarks[index], truth))
    return {"photos": len(errors) + missed, "found": len(errors), "mean_error": float(np.mean(errors)),
            "median_error": float(np.median(errors))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/facesphere-pipeline"))
    parser.add_argument("--detectors", nargs="+", default=list(DETECTORS))
    args = parser.parse_args()
    setup_logging()
    tune_malloc()
    model = args.work / "y1"
    if not (model / "card.json").exists():
        facesphere("import", str(DATA / "weights/mobilefacenet_insightface_y1/model-symbol.json"), str(model))
    results: dict = {"cacd_vs": {}, "fgnet_verification": {}, "fgnet_landmarks": {}}
    cacd_rows, fgnet_rows = [], []
    manual = evaluate(model, "fgnet_verification", DATA / "data/fgnet", args.work / "fgnet_manual")
    results["fgnet_verification"]["manual 68-point markup"] = manual
    fgnet_rows.append(["manual markup (pupils, nose tip, mouth corners)", "—", "—",
                       f"{100 * manual['accuracy_mean']:.2f} ± {100 * manual['accuracy_std']:.2f}"])
    for name in args.detectors:
        weights = DETECTORS[name]
        detector = [f"detector={name}", f"detector_weights={weights}"]
        cacd = evaluate(model, "cacd_vs", DATA / "data/cacd_vs_fold1", args.work / f"cacd_{name}", *detector)
        results["cacd_vs"][name] = cacd
        cacd_rows.append([name, f"{100 * cacd['accuracy_mean']:.2f} ± {100 * cacd['accuracy_std']:.2f}",
                          cacd.get("align_failures", "?"), f"{cacd['auc']:.4f}"])
        fgnet = evaluate(model, "fgnet_verification", DATA / "data/fgnet", args.work / f"fgnet_{name}", *detector)
        marks = landmark_error(name, weights)
        results["fgnet_verification"][name] = fgnet
        results["fgnet_landmarks"][name] = marks
        fgnet_rows.append([f"{name} 5 points", f"{marks['found']}/{marks['photos']}",
                           f"{100 * marks['mean_error']:.2f} / {100 * marks['median_error']:.2f}",
                           f"{100 * fgnet['accuracy_mean']:.2f} ± {100 * fgnet['accuracy_std']:.2f}"])
        print(cacd_rows[-1], fgnet_rows[-1], flush=True)
    table = ("InsightFace MobileFaceNet y1 (imported from MXNet), ArcFace 112x112 alignment, flip-sum, 10-fold.\n\n"
             "(1) CACD-VS fold 1, 400 raw pairs through detect → align → embed:\n\n"
             + markdown_table(["detector", "accuracy %", "photos without a face", "AUC"], cacd_rows)
             + "\n\n(2) FG-NET cross-age verification (age gap >= 10): alignment from the manual markup vs from "
               "detected points; landmark error = mean 5-point distance / manual inter-pupil distance, on the "
               "photos where the detector found the annotated face.\n\n"
             + markdown_table(["alignment from", "faces found", "landmark error % (mean / median)", "accuracy %"],
                              fgnet_rows))
    print(table)
    write_results("pipeline_accuracy", {"args": {k: str(v) for k, v in vars(args).items()}, **results}, table)


if __name__ == "__main__":
    main()
