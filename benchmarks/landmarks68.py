"""PFLD 68-point landmarks on all 1,002 FG-NET photos: normalised mean error against the manual points.

FG-NET's manual 68 points follow another layout than iBUG's (which PFLD predicts), so the error is taken over
the 18 points both define alike (``facesphere.align.FGNET_TO_IBUG``: outer/inner eye corners, nose tip, outer
lips, chin), divided by the outer-eye-corner distance. Two face boxes: the manual points' bounding box
(detector-free) and RetinaFace's box of the annotated face (what the pipeline does).

    python benchmarks/landmarks68.py
"""

from __future__ import annotations


import numpy as np
from _common import DATA, markdown_table, setup_logging, write_results

from facesphere.utils.allocator import tune_malloc



def main() -> None:
    setup_logging()
    tune_malloc()
    from facesphere.align import FGNET_TO_IBUG, PFLD68
    from facesphere.data.images import load_image
    from facesphere.detect import build_detector
    from facesphere.detect.evaluation import face_at
    from facesphere.evaluate.age import fgnet_five_points, parse_fgnet, read_pts

    pfld = PFLD68(DATA / "weights/pfld68_cunjian_onnx/pfld.onnx")
    detector = build_detector("retinaface", DATA / "weights/retinaface_mnet025_biubug6/official_release/mobilenet0.25_Final.pth")
    fg, ib = np.array(list(FGNET_TO_IBUG)), np.array(list(FGNET_TO_IBUG.values()))
    errors: dict[str, list[float]] = {"manual box": [], "RetinaFace box": []}
    for item in parse_fgnet(DATA / "data/fgnet"):
        manual = read_pts(item.points_path)
        image = load_image(item.path)
        inter_ocular = np.linalg.norm(manual[27] - manual[32])
        boxes = {"manual box": np.array([[*manual.min(axis=0), *manual.max(axis=0)]])}
        found = detector.detect([image])[0]
        index = face_at(found, fgnet_five_points(manual))
        if index >= 0:
            boxes["RetinaFace box"] = found.boxes[index:index + 1]
        for name, box in boxes.items():
            predicted = pfld.landmarks(image, box)[0]
            errors[name].append(float(np.linalg.norm(predicted[ib] - manual[fg], axis=1).mean() / inter_ocular))
    rows = [[name, len(e), f"{100 * np.mean(e):.2f}", f"{100 * np.median(e):.2f}", f"{100 * np.percentile(e, 95):.2f}",
             f"{100 * np.max(e):.2f}"] for name, e in errors.items()]
    table = ("PFLD (cunjian, ONNX) on FG-NET, 18 shared points, NME % of the outer-eye-corner distance "
             "(published 300W full-set NME of this model: 3.97%).\n\n"
             + markdown_table(["face box", "photos", "mean", "median", "95th pct", "max"], rows))
    print(table)
    write_results("landmarks68", {"errors": errors}, table)


if __name__ == "__main__":
    main()
